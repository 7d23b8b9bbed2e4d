"""fate-convert: the command line over ``fate.convert``."""

from __future__ import annotations

import sys

import click

from fate.cli.common import CONTEXT, user_errors
from fate.convert.pipeline import convert


@click.command(context_settings=CONTEXT)
@click.argument("model_dir", type=click.Path(path_type=str))
@click.argument("out", type=click.Path(path_type=str))
@click.option("--experts", default="q4,q2", show_default=True,
              help="Precisions to store every routed expert in: comma list of q4 (HQQ INT4), q2 (HQQ INT2), "
                   "f16 (unquantized copy).")
@click.option("--group-size-q4", default=64, show_default=True,
              help="HQQ group size for INT4 (along the input dim). A matrix whose input dim it does not divide uses "
                   "the largest power of two >= 8 that does (said in the output, recorded in the bundle).")
@click.option("--group-size-q2", default=32, show_default=True, help="HQQ group size for INT2 (same rule).")
@click.option("--dtype", type=click.Choice(["f16", "bf16", "f32", "q8"]), default="f16", show_default=True,
              help="Storage type of non-expert tensors (norms and routers always stay f32). q8: attention, "
                   "shared-expert/dense MLP and LM head matrices as 8-bit codes with a float16 scale per 32 "
                   "weights (half the bytes of f16; the rest f16).")
@click.option("--calib", type=click.Path(path_type=str), default=None,
              help="Calibration text file (UTF-8). Default: varied text shipped with fate.")
@click.option("--calib-tokens", default=4096, show_default=True, help="Calibration tokens to run.")
@click.option("--no-calib", is_flag=True, help="Skip calibration (no popularity or prefetch statistics).")
@click.option("-f", "--force", is_flag=True, help="Overwrite OUT if it exists.")
@click.option("-t", "--threads", type=int, default=None, help="Threads for quantization and torch.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
def main(model_dir, out, experts, group_size_q4, group_size_q2, dtype, calib, calib_tokens, no_calib, force,
         threads, quiet, debug):
    """Convert the Hugging Face MoE checkpoint in MODEL_DIR into one fate bundle OUT (.gguf or .safetensors).

    Every routed expert is stored quantized with HQQ (INT4 and INT2 by default), one aligned blob per
    expert and precision with a crc32; non-expert tensors keep --dtype; expert popularity and
    cross-layer prediction statistics are measured on calibration text; the tokenizer and chat
    template are included, so the bundle alone is enough to run.

    Supported model_type: qwen2_moe, qwen3_moe, mixtral, olmoe, deepseek, gpt_oss (MXFP4 experts are
    dequantized), deepseek_v2, deepseek_v3, glm4_moe, ernie4_5_moe.

    Example: fate-convert ./Qwen1.5-MoE-A2.7B qwen-moe.gguf
    """
    with user_errors(debug):
        result = convert(model_dir, out, experts=experts, group_size_q4=group_size_q4,
                         group_size_q2=group_size_q2, dtype=dtype, calib=calib, calib_tokens=calib_tokens,
                         no_calib=no_calib, force=force, threads=threads, progress=not quiet,
                         log=lambda line: click.echo(line, err=True))
        click.echo(result.summary(), err=True)
    sys.exit(0)


if __name__ == "__main__":
    main()
