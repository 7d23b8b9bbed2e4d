"""fate-bench: expert offloading policies side by side, in one process (the command over
:mod:`fate.tools.bench`)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from fate.cli.common import CONTEXT, engine_options, user_errors, write_json
from fate.errors import UsageError
from fate.tools.bench import (DEFAULT_POLICIES, DEFAULT_LINKS, DEFAULT_MEMS, DEFAULT_PROMPT_TOKENS, BenchSession,
                              footer_text, header_text, parse_links, parse_mems, parse_policies, per_layer_text,
                              require_matplotlib, simulated_text, table_text, write_csv, write_plot)

@click.command(context_settings=CONTEXT)
@click.argument("bundle", required=False, type=click.Path(path_type=str))
@click.option("--policies", default=",".join(DEFAULT_POLICIES), show_default=True,
              help="Comma-separated policies: ondemand (load on demand), lru (caching alone), paper (the Fate "
                   "paper's prefetch rule), fate (prefetch by expected value), resident.")
@click.option("--mem", "mems", default=",".join(DEFAULT_MEMS), show_default=True,
              help="Comma-separated memory budgets (P% of experts, or sizes like 512MiB).")
@click.option("--link", "links", default=",".join(DEFAULT_LINKS), show_default=True,
              help="Comma-separated emulated links: ratio:R, 12GB/s, pcie1/pcie3/pcie4, none.")
@click.option("-p", "--prompt", default=None, help="Prompt text.")
@click.option("-f", "--prompt-file", type=click.Path(path_type=str), default=None, help="Read the prompt from a file.")
@click.option("--prompt-tokens", type=int, default=None,
              help=f"Synthetic prompt: N tokens of the built-in calibration text [default: {DEFAULT_PROMPT_TOKENS}].")
@click.option("-n", "--n-predict", "n", default=32, show_default=True, help="Tokens to generate per run.")
@click.option("-r", "--repetitions", "reps", default=3, show_default=True, help="Repetitions (median reported).")
@engine_options(only=("experts", "predictor", "evict", "prefetch_extra", "int2_share", "threads"))
@click.option("--verify", is_flag=True, help="Check every expert blob's crc32 once before measuring.")
@click.option("--cached-profile", is_flag=True,
              help="Use the cached timing profile (ratio:R links, fate's prefetch width) instead of measuring "
                   "it afresh at the start.")
@click.option("--json", "json_path", type=click.Path(path_type=str), default=None, help="Write the rows as JSON.")
@click.option("--csv", "csv_path", type=click.Path(path_type=str), default=None, help="Write the rows as CSV.")
@click.option("--plot", "plot_path", type=click.Path(path_type=str), default=None,
              help="Draw speedup and hit rate against the budget (PNG; needs matplotlib).")
@click.option("--simulate", is_flag=True,
              help="Also replay each configuration's routing trace through the same policy objects with a timing "
                   "model (zero host cost): simulated decode, the perfect-prediction bound, measured/simulated.")
@click.option("--simulate-only", is_flag=True,
              help="Only the replay (seconds): choose --mem for a link before a long run.")
@click.option("--per-layer", is_flag=True,
              help="Also print per-layer hit rate, recall and stalls of each configuration.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
def main(bundle, policies, mems, links, prompt, prompt_file, prompt_tokens, n, reps, experts, predictor, evict,
         prefetch_extra, int2_share, threads, verify, cached_profile, json_path, csv_path, plot_path, simulate,
         simulate_only, per_layer, no_progress, debug):
    """Benchmark expert offloading policies on a fate BUNDLE, side by side in one process.

    \b
    Examples:
      fate-bench model.gguf
      fate-bench model.gguf --policies ondemand,fate,resident --mem 25%,50% --link ratio:1 -r 5
      fate-bench model.gguf --link pcie3,ratio:2 --json bench.json --plot bench.png
    """
    with user_errors(debug):
        _main(bundle, policies, mems, links, prompt, prompt_file, prompt_tokens, n, reps, experts,
              predictor, evict, prefetch_extra, int2_share, threads, verify, cached_profile, json_path, csv_path,
              plot_path, per_layer, no_progress, simulate, simulate_only)
    sys.exit(0)


def _main(bundle, policies, mems, links, prompt, prompt_file, prompt_tokens, n, reps, experts, predictor, evict,
          prefetch_extra, int2_share, threads, verify, cached_profile, json_path, csv_path, plot_path, per_layer,
          no_progress, simulate=False, simulate_only=False):
    if not bundle:
        raise UsageError("no bundle given: fate-bench BUNDLE (see fate-bench --help)")
    # everything that can be checked without measuring is checked first
    parse_policies(policies)
    parse_mems(mems)
    parse_links(links)
    if plot_path:
        require_matplotlib()
    if prompt is not None and prompt_file is not None:
        raise UsageError("give the prompt with -p or -f, not both")
    if prompt_file is not None:
        try:
            prompt = Path(prompt_file).read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            raise UsageError(f"-f {prompt_file}: the prompt file is not UTF-8 text") from None
    if prompt is not None and prompt_tokens is not None:
        raise UsageError("give -p/-f or --prompt-tokens, not both")
    s = BenchSession(bundle, policies=policies, mems=mems, links=links, prompt=prompt, prompt_tokens=prompt_tokens,
                     n=n, reps=reps, experts=experts, predictor=predictor, evict=evict, prefetch_extra=prefetch_extra,
                     int2_share=int2_share, threads=threads, verify=verify, reprofile=not cached_profile,
                     simulate=simulate or simulate_only, measure=not simulate_only)
    rows = s.run(progress=not no_progress)
    meta = s.meta()
    click.echo(header_text(meta))
    if not simulate_only:
        click.echo()
        click.echo(table_text(rows))
        click.echo()
        click.echo(footer_text(rows))
    sim = simulated_text(rows)
    if sim:
        click.echo()
        click.echo("trace replay (simulated; zero host cost" + (", emulated link" if any(r["emulated"] for r in rows)
                                                               or any(ln != "none" for ln in s.links) else "") + "):")
        click.echo(sim)
        click.echo("perfect: the budget and link's ceiling, the same in each of its rows — fate's plan and caching, "
                   "told each next layer's experts exactly")
    if per_layer:
        text = per_layer_text(rows)
        if text:
            click.echo()
            click.echo(text)
    if json_path:
        write_json(json_path, {"meta": meta, "rows": rows}, indent=1)
    if csv_path:
        write_csv(Path(csv_path), rows)
    if plot_path:
        write_plot(Path(plot_path), rows, meta)
    failed = [r for r in rows if r["error"]]
    if failed:
        click.echo(f"error: {len(failed)} configuration(s) failed in the engine (marked †)", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
