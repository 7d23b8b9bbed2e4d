"""fate-run: generate text from a bundle (a thin command over ``fate.load``)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

import fate
from fate.cli.common import CONTEXT, engine_options, options_from, resolve_bundle, user_errors, write_json
from fate.errors import ChatTemplateError, RequestError
from fate.runtime.chat import ChatSession


@click.command(context_settings=CONTEXT)
@click.argument("bundle", required=False, type=click.Path(path_type=str))
@click.option("--demo", is_flag=True, help="Use the tiny demo bundle shipped with fate (no download).")
@click.option("-p", "--prompt", default=None, help="Prompt text.")
@click.option("-f", "--file", "prompt_file", type=click.Path(path_type=str), default=None, help="Read the prompt from a file.")
@click.option("-n", "--n-predict", "n_predict", default=128, show_default=True, help="Tokens to generate at most.")
@click.option("--temp", type=float, default=None, help="Temperature; 0 = greedy [default: the bundle's, else 0.8].")
@click.option("--top-k", type=int, default=None, help="Top-k sampling (0 = off).")
@click.option("--top-p", type=float, default=None, help="Top-p (nucleus) sampling (1 = off).")
@click.option("--min-p", type=float, default=None, help="Min-p sampling (0 = off).")
@click.option("--repeat-penalty", type=float, default=None, help="Repetition penalty (1 = off).")
@click.option("-s", "--seed", type=int, default=None, help="Random seed, for reproducible sampling.")
@click.option("-cnv", "--chat", is_flag=True, help="Chat: apply the bundle's chat template (interactive without -p).")
@click.option("--system", default=None, help="System message for --chat.")
@click.option("--ignore-eos", is_flag=True, help="Keep generating past the end-of-sequence token.")
@click.option("--stats-json", type=click.Path(path_type=str), default=None,
              help="Write timings, token ids and expert figures as JSON (the schema of docs/STATS.md).")
@click.option("--no-timings", is_flag=True, help="Do not print timings to stderr at the end.")
@engine_options()
@click.option("-v", "--verbose", is_flag=True, help="Print the memory plan, timing profile and per-layer expert stats.")
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
def main(bundle, demo, prompt, prompt_file, n_predict, temp, top_k, top_p, min_p, repeat_penalty, seed, chat, system,
         ignore_eos, stats_json, no_timings, verbose, debug, **engine):
    """Generate text from a fate BUNDLE (.gguf or .safetensors made by fate-convert).

    \b
    Examples:
      fate-run --demo -p "The module"
      fate-run model.gguf -p "Explain MoE offloading" -n 64 --temp 0
      fate-run model.gguf --chat
      fate-run model.gguf -p "..." --mem 50% --link pcie3 -v
    """
    with user_errors(debug):
        options = options_from(engine)
        sampling = dict(temperature=temp, top_k=top_k, top_p=top_p, min_p=min_p, repetition_penalty=repeat_penalty,
                        seed=seed)
        run(resolve_bundle(bundle, demo, "fate-run"), options, prompt=prompt, prompt_file=prompt_file,
            n_predict=n_predict, sampling=sampling, chat=chat, system=system, ignore_eos=ignore_eos,
            stats_json=stats_json, no_timings=no_timings, verbose=verbose)
    sys.exit(0)


def run(bundle: str, options, *, prompt, prompt_file, n_predict, sampling, chat, system, ignore_eos, stats_json,
        no_timings, verbose) -> None:
    if prompt is not None and prompt_file is not None:
        raise RequestError("give the prompt with -p or -f, not both")
    if prompt_file is not None:
        try:
            prompt = Path(prompt_file).read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            raise RequestError(f"-f {prompt_file}: the prompt file is not UTF-8 text") from None
    if prompt is None and not chat:
        raise RequestError("no prompt: pass -p \"...\" or -f FILE (or --chat for an interactive chat)")
    model = fate.load(bundle, options)
    model.sampling_params(**sampling)  # invalid values fail before any work
    if not options.verify:
        click.echo("note: checksums are not verified (--no-verify): a corrupt bundle may give wrong output", err=True)
    if (verbose or options.profile) and model.timing is not None:
        click.echo(model.timing.describe(), err=True)
    if verbose and model.plan is not None:
        click.echo(model.plan.describe(), err=True)
    if prompt is not None:
        for piece in model.stream(prompt, n_predict, chat=chat, system=system, stop_at_eos=not ignore_eos, **sampling):
            click.echo(piece, nl=False)
            sys.stdout.flush()
        click.echo()
        _finish(model, stats_json, no_timings, verbose)
    else:
        _interactive(model, n_predict, system, ignore_eos, sampling, stats_json, no_timings, verbose)
    model.close()


def _finish(model, stats_json, no_timings, verbose=False):
    stats = model.last_stats
    if stats is None:
        return
    if not no_timings:
        click.echo(stats.timings_text(), err=True)
    if verbose and model.offloading is not None:
        click.echo(model.offloading.stats.table(), err=True)
    if stats_json:
        write_json(stats_json, stats.to_dict())


def _interactive(model, n_predict, system, ignore_eos, sampling, stats_json, no_timings, verbose):
    if not model.chat_template:
        raise RequestError("this bundle has no chat template; use -p for plain completion")
    tok = model.tokenizer
    session = ChatSession(model.chat_template, system=system, bos_token=tok.bos_token, eos_token=tok.eos_token)
    click.echo("chat mode: type a message and press Enter; /exit or Ctrl-D to quit", err=True)
    while True:
        try:
            line = input("> ")
        except EOFError:
            click.echo()
            break
        if line.strip() in ("/exit", "/quit"):
            break
        if not line.strip():
            continue
        try:
            prompt_text = session.user(line)
        except ChatTemplateError as e:  # e.g. a template that insists on alternating roles: keep chatting
            click.echo(f"error: {e}", err=True)
            continue
        ids = tok.encode_chat(prompt_text)
        params = model.sampling_params(**sampling)
        decoder = tok.stream_decoder(skip_special_tokens=True)
        reply = []
        for t in model.generate_ids(ids, n_predict, params, stop_at_eos=not ignore_eos):
            piece = decoder.feed(t)
            reply.append(piece)
            click.echo(piece, nl=False)
            sys.stdout.flush()
        reply.append(decoder.flush())
        click.echo(reply[-1])
        session.assistant("".join(reply).strip())
        _finish(model, stats_json, no_timings, verbose)


if __name__ == "__main__":
    main()
