"""fate-run: generate text from a bundle (a thin wrapper over ``fate.load``)."""

from __future__ import annotations

import json
import sys
from importlib import resources
from pathlib import Path

import click

from fate.cli_common import user_errors

DEMO_BUNDLE = "data/demo.gguf"


def demo_path() -> Path:
    return Path(str(resources.files("fate").joinpath(DEMO_BUNDLE)))


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.argument("bundle", required=False, type=click.Path(path_type=str))
@click.option("--demo", is_flag=True, help="Use the tiny demo bundle shipped with fate (no download).")
@click.option("-p", "--prompt", default=None, help="Prompt text.")
@click.option("-f", "--file", "prompt_file", type=click.Path(path_type=str), default=None, help="Read the prompt from a file.")
@click.option("-n", "--n-predict", "n_predict", default=128, show_default=True, help="Tokens to generate at most.")
@click.option("-c", "--ctx-size", "ctx", type=int, default=None, help="Context size in tokens [default: min(4096, model's)].")
@click.option("-t", "--threads", type=int, default=None, help="CPU threads.")
@click.option("--temp", type=float, default=None, help="Temperature; 0 = greedy [default: the bundle's, else 0.8].")
@click.option("--top-k", type=int, default=None, help="Top-k sampling (0 = off).")
@click.option("--top-p", type=float, default=None, help="Top-p (nucleus) sampling (1 = off).")
@click.option("--min-p", type=float, default=None, help="Min-p sampling (0 = off).")
@click.option("--repeat-penalty", type=float, default=None, help="Repetition penalty (1 = off).")
@click.option("-s", "--seed", type=int, default=None, help="Random seed, for reproducible sampling.")
@click.option("--experts", "precision", default="q4", show_default=True,
              help="Stored expert precision to compute with: f16, q4 or q2.")
@click.option("--device", default=None, help="cpu or cuda [default: cuda when available].")
@click.option("--compute-dtype", default=None, help="fp32, fp16 or bf16 [default: fp32 on cpu, fp16 on cuda].")
@click.option("-cnv", "--chat", is_flag=True, help="Chat: apply the bundle's chat template (interactive without -p).")
@click.option("--system", default=None, help="System message for --chat.")
@click.option("--ignore-eos", is_flag=True, help="Keep generating past the end-of-sequence token.")
@click.option("--stats-json", type=click.Path(path_type=str), default=None, help="Write timings and token ids as JSON.")
@click.option("--no-verify", is_flag=True, help="Skip crc32 checks of expert blobs (faster first use).")
@click.option("--no-mmap", is_flag=True, help="Read every expert into memory at load (RSS holds all experts "
              "from the start). By default each expert is read from the memory map when first used (f16 in "
              "place, q4/q2 codes widened then), which decodes as fast once warm. Ignored when experts are "
              "offloaded.")
@click.option("--no-timings", is_flag=True, help="Do not print timings to stderr at the end.")
@click.option("--mem", default=None, help="Device memory budget for the whole model: 6GiB, 512MiB, or P% "
              "(resident weights + KV + P% of all experts). Default: everything resident.")
@click.option("--policy", type=click.Choice(["fate", "ondemand", "lru", "resident"]), default="fate", show_default=True,
              help="Expert offloading policy: fate (prefetch + ARC + INT2 prefill), ondemand (load on demand), "
                   "lru (mixtral-offloading), resident (everything resident).")
@click.option("--evict", type=click.Choice(["arc", "lru", "lfu"]), default="arc", show_default=True,
              help="Cache eviction policy per layer.")
@click.option("--cache-alloc", type=click.Choice(["auto", "recall", "shallow4", "even"]), default="auto",
              show_default=True, help="How expert slots are spread over layers (auto: by the bundle's recall "
                                      "statistics, else shallow4).")
@click.option("--prefetch-extra", type=int, default=None,
              help="Extra prefetch candidates beyond top-k [default: from the timing profile].")
@click.option("--int2-share", type=float, default=0.3, show_default=True,
              help="Prefill: least popular experts covering at most this share of assignments run as INT2.")
@click.option("--link", default=None, help="Emulate a host-to-device link: 12GB/s, 80MB/s, pcie1, pcie3, pcie4, "
                                           "or ratio:R (one INT4 expert copy = R x one layer's decode compute).")
@click.option("--profile", is_flag=True, help="Re-measure the timing profile (compute and copy times) and print it.")
@click.option("-v", "--verbose", is_flag=True, help="Print the memory plan, timing profile and per-layer expert stats.")
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
def main(bundle, demo, prompt, prompt_file, n_predict, ctx, threads, temp, top_k, top_p, min_p, repeat_penalty, seed,
         precision, device, compute_dtype, chat, system, ignore_eos, stats_json, no_verify, no_mmap, no_timings, mem, policy,
         evict, cache_alloc, prefetch_extra, int2_share, link, profile, verbose, debug):
    """Generate text from a fate BUNDLE (.gguf or .safetensors made by fate-convert).

    \b
    Examples:
      fate-run --demo -p "The module"
      fate-run model.gguf -p "Explain MoE offloading" -n 64 --temp 0
      fate-run model.gguf --chat
    """
    with user_errors(debug):
        offload = dict(mem=mem, policy=policy, evict=evict, cache_alloc=cache_alloc, prefetch_extra=prefetch_extra,
                       int2_share=int2_share, link=link, profile=profile, no_mmap=no_mmap)
        _run(bundle, demo, prompt, prompt_file, n_predict, ctx, threads, temp, top_k, top_p, min_p,
             repeat_penalty, seed, precision, device, compute_dtype, chat, system, ignore_eos, stats_json,
             no_verify, no_timings, offload, verbose)
    sys.exit(0)


def _run(bundle, demo, prompt, prompt_file, n_predict, ctx, threads, temp, top_k, top_p, min_p, repeat_penalty,
         seed, precision, device, compute_dtype, chat, system, ignore_eos, stats_json, no_verify, no_timings, offload,
         verbose):
    import fate
    from fate.runtime.engine import RuntimeUserError

    if demo:
        if bundle:
            raise RuntimeUserError("give either a BUNDLE or --demo, not both")
        bundle = str(demo_path())
        if not Path(bundle).is_file():
            raise RuntimeUserError(f"the demo bundle is missing from this install ({bundle}); reinstall fate")
    if not bundle:
        raise RuntimeUserError("no bundle given: fate-run BUNDLE -p \"...\" (or --demo); see fate-run --help")
    if prompt is not None and prompt_file is not None:
        raise RuntimeUserError("give the prompt with -p or -f, not both")
    if prompt_file is not None:
        try:
            prompt = Path(prompt_file).read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            raise RuntimeUserError(f"-f {prompt_file}: the prompt file is not UTF-8 text") from None
    if prompt is None and not chat:
        raise RuntimeUserError("no prompt: pass -p \"...\" or -f FILE (or --chat for an interactive chat)")
    sampling = dict(temperature=temp, top_k=top_k, top_p=top_p, min_p=min_p, repetition_penalty=repeat_penalty,
                    seed=seed)
    model = fate.load(bundle, device=device, compute_dtype=compute_dtype, experts=precision, context=ctx,
                      threads=threads, verify=not no_verify, **offload)
    model.sampling_params(**sampling)  # invalid values fail before any work
    if no_verify:
        click.echo("note: checksums are not verified (--no-verify): a corrupt bundle may give wrong output", err=True)
    if verbose or offload["profile"]:
        if getattr(model, "timing", None) is not None:
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
    if verbose and model.expert_stats is not None:
        click.echo(model.expert_stats.table(), err=True)
    if stats_json:
        Path(stats_json).write_text(json.dumps(stats.to_dict(), indent=2))


def _interactive(model, n_predict, system, ignore_eos, sampling, stats_json, no_timings, verbose):
    from fate.runtime.chat import ChatSession, ChatTemplateError

    if not model.chat_template:
        from fate.runtime.engine import RuntimeUserError

        raise RuntimeUserError("this bundle has no chat template; use -p for plain completion")
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
