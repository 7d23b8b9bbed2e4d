"""fate-inspect: what is inside a bundle, and whether its expert blobs are intact (the command over
:mod:`fate.tools.inspector`)."""

from __future__ import annotations

import json
import sys

import click

from fate.cli.common import CONTEXT, jsonable, user_errors
from fate.errors import UsageError
from fate.tools.inspector import (DEFAULT_TOP_N, TEMPLATE_HEAD_LINES, format_bad, format_report, inspect_bundle,
                                  plot_report, require_matplotlib, verify_bundle)
from fate.units import format_size


@click.command(context_settings=CONTEXT)
@click.argument("bundle", type=click.Path(path_type=str))
@click.option("--verify", is_flag=True, help="Check the crc32 of every expert blob; list each bad one, exit 1 if any.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON (keys: python -m pydoc fate.tools.inspector).")
@click.option("--plot", "plot_file", type=click.Path(path_type=str), default=None,
              help="Draw a layer x expert popularity heatmap and the per-layer recall curves (needs matplotlib).")
@click.option("--top", "top_n", type=int, default=DEFAULT_TOP_N, show_default=True,
              help="N of the 'share of the assignments going to the top-N experts' column.")
@click.option("--template-lines", type=int, default=TEMPLATE_HEAD_LINES, show_default=True,
              help="Chat template lines to show.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
def main(bundle, verify, as_json, plot_file, top_n, template_lines, quiet, debug):
    """Describe a fate BUNDLE: architecture, sizes, precisions, quantization, tokenizer, chat template,
    calibration and provenance, and per-layer expert popularity and cross-layer recall.

    \b
    Examples:
      fate-inspect model.gguf
      fate-inspect model.gguf --verify          # exit 1 if any expert blob is corrupt
      fate-inspect model.gguf --json > info.json
      fate-inspect model.gguf --plot layers.png
    """
    with user_errors(debug):
        if plot_file is not None:
            require_matplotlib()
        if template_lines < 0:
            raise UsageError(f"--template-lines {template_lines}: give 0 or more")
        report = inspect_bundle(bundle, top_n=top_n, template_lines=template_lines)
        bad = None
        if verify:
            counts: dict = {}
            bad = verify_bundle(bundle, progress=not quiet, report=counts)
            report["verify"] = {"checked": counts["checked"], "bytes": counts["bytes"], "bad": bad, "ok": not bad}
        if plot_file is not None:
            plot_report(report, plot_file)
        if as_json:
            click.echo(json.dumps(jsonable(report), indent=2, allow_nan=False))
        else:
            click.echo(format_report(report))
            if verify:
                for line in format_bad(bad):
                    click.echo(line)
                v = report["verify"]
                click.echo(f"verify        {v['checked']} expert blobs ({format_size(v['bytes'])}): "
                           + ("all good" if not bad else f"{len(bad)} bad"))
        if plot_file is not None:
            click.echo(f"wrote {plot_file}", err=True)
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
