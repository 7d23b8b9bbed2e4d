"""fate-perplexity: perplexity of a bundle on a text file, per expert precision (the command over
:mod:`fate.tools.perplexity`)."""

from __future__ import annotations

import dataclasses
import sys

import click

from fate.cli.common import CONTEXT, engine_options, options_from, user_errors, write_json
from fate.tools.perplexity import DEFAULT_CTX, PerplexityError, compare, perplexity, read_text, summary, table


@click.command(context_settings=CONTEXT)
@click.argument("bundle", type=click.Path(path_type=str))
@click.option("-f", "--file", "text_file", type=click.Path(path_type=str), required=True,
              help="UTF-8 text file to score.")
@click.option("-c", "--ctx-size", "ctx", type=int, default=None,
              help=f"Window size in tokens [default: min({DEFAULT_CTX}, model's context)].")
@click.option("--stride", type=int, default=None,
              help="Tokens between window starts [default: -c, non-overlapping]; with a smaller stride only "
                   "each window's new tokens are scored.")
@click.option("--experts", default=None,
              help="Expert precision: f16, q4, q2, or hybrid (q4 + INT2 for the least popular prefill "
                   "experts, offloaded under --mem) [default: q4].")
@click.option("--compare", "do_compare", is_flag=True, help="Run every stored precision (+ hybrid when q2 is stored) and "
                                                "print them side by side with the delta vs f16 (vs q4 without f16).")
@click.option("--json", "json_file", type=click.Path(path_type=str), default=None,
              help="Write the results as JSON to this file.")
@click.option("--chunks", type=int, default=None, help="Score only the first N windows.")
@engine_options(skip=("experts", "context"))
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
def main(bundle, text_file, ctx, stride, experts, do_compare, json_file, chunks, quiet, debug, **engine):
    """Perplexity of a fate BUNDLE on a text file (-f), in windows of -c tokens every --stride tokens.

    \b
    Examples:
      fate-perplexity model.gguf -f wiki.test.raw -c 512
      fate-perplexity model.gguf -f wiki.test.raw --experts hybrid --mem 40%
      fate-perplexity model.gguf -f wiki.test.raw --compare --json ppl.json
    """
    with user_errors(debug):
        if do_compare and experts is not None:
            raise PerplexityError("give --experts or --compare, not both")
        text = read_text(text_file)
        options = dataclasses.asdict(options_from(engine))
        for name in ("experts", "context"):  # set per run by fate.tools.perplexity
            options.pop(name)
        mem, policy, int2_share = options.pop("mem"), options.pop("policy"), options.pop("int2_share")
        if do_compare:
            notes: list[str] = []
            doc = compare(bundle, text, ctx, stride, mem=mem, policy=policy, int2_share=int2_share,
                           chunks=chunks, progress=not quiet, notes=notes,
                           on_result=lambda r: click.echo(summary(r), err=True), **options)
            for note in notes:
                click.echo(f"note: {note}", err=True)
            click.echo(table(doc))
        else:
            r = perplexity(bundle, text, ctx, stride, experts=experts or "q4", mem=mem, policy=policy,
                           int2_share=int2_share, chunks=chunks, progress=not quiet, **options)
            click.echo(summary(r))
            doc = {"bundle": bundle, "text_tokens": r["text_tokens"], "ctx": r["ctx"], "stride": r["stride"],
                   "reference": None, "results": [r]}
        if json_file:
            doc = {"bundle": doc["bundle"], "file": text_file, **{k: v for k, v in doc.items() if k != "bundle"}}
            write_json(json_file, doc)
    sys.exit(0)


if __name__ == "__main__":
    main()
