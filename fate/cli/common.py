"""What every fate command shares: the engine options (declared once), user mistakes as one line on stderr
with exit status 2, JSON output, and the demo bundle.  click is imported here and in the commands only."""

from __future__ import annotations

import contextlib
import json
import math
import sys
from importlib import resources
from pathlib import Path

import click

from fate.errors import UserError
from fate.quant.expert import KERNELS
from fate.runtime.options import ALLOCS, EVICTIONS, POLICIES, PREDICTORS, EngineOptions

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}
DEMO_BUNDLE = "data/demo.gguf"


@contextlib.contextmanager
def user_errors(debug: bool = False):
    """Print a user mistake (:class:`fate.errors.UserError`, or an OSError such as a missing file) as
    ``error: …`` and exit 2; a Ctrl-C exits 130; ``--debug`` shows tracebacks instead."""
    try:
        yield
    except KeyboardInterrupt:
        if debug:
            raise
        click.echo("interrupted", err=True)
        sys.exit(130)
    except (UserError, OSError) as e:
        if debug:
            raise
        click.echo(f"error: {e}", err=True)
        sys.exit(2)


def demo_path() -> Path:
    """The tiny demo bundle shipped inside the package."""
    return Path(str(resources.files("fate").joinpath(DEMO_BUNDLE)))


def resolve_bundle(bundle: str | None, demo: bool, command: str) -> str:
    """BUNDLE or --demo (one of them), as a path."""
    if demo:
        if bundle:
            raise UserError("give either a BUNDLE or --demo, not both")
        path = demo_path()
        if not path.is_file():
            raise UserError(f"the demo bundle is missing from this install ({path}); reinstall fate")
        return str(path)
    if not bundle:
        raise UserError(f"no bundle given: {command} BUNDLE (or --demo); see {command} --help")
    return bundle


# --- the engine options, declared once ------------------------------------------------------------------
# Each entry: EngineOptions field → its click option.  The click parameter is named after the field, except
# --no-verify, whose flag is the field's negation.
ENGINE_OPTIONS = {
    "experts": click.option("--experts", "experts", default="q4", show_default=True,
                            help="Stored expert precision to compute with: f16, q4 or q2."),
    "context": click.option("-c", "--ctx-size", "context", type=int, default=None,
                            help="Context size in tokens [default: min(4096, model's)]."),
    "threads": click.option("-t", "--threads", "threads", type=int, default=None,
                            help="CPU threads [default: one per physical core]."),
    "device": click.option("--device", default=None, help="cpu or cuda [default: cuda when available]."),
    "compute_dtype": click.option("--compute-dtype", default=None,
                                  help="fp32, fp16 or bf16 [default: fp32 on cpu, fp16 on cuda]."),
    "verify": click.option("--no-verify", "no_verify", is_flag=True,
                           help="Skip crc32 checks of expert blobs (faster first use)."),
    "no_mmap": click.option("--no-mmap", is_flag=True,
                            help="Read every expert into memory at load (RSS holds all experts from the start). By "
                                 "default each expert is read from the memory map when first used, which decodes "
                                 "as fast once warm. Ignored when experts are offloaded."),
    "kernels": click.option("--kernels", type=click.Choice(KERNELS), default="int8", show_default=True,
                            help="CPU products: int8 (8-bit activations against q4/q2/q8 weights: fastest, ~0.3% "
                                 "error per product), fp32 (float32 activations: the reference), torch (torch "
                                 "operations only: plain dequantize-then-matmul, bit for bit)."),
    "mem": click.option("--mem", default=None,
                        help="Device memory budget for the whole model: 6GiB, 512MiB, or P% (resident weights + KV "
                             "+ P% of all experts). Default: everything resident."),
    "policy": click.option("--policy", type=click.Choice(POLICIES), default="fate", show_default=True,
                           help="Expert offloading policy: fate (prefetch by expected value + LRFU caching + INT2 "
                                "prefill), paper (the Fate paper's rule: top k+m of the next layer within one window), "
                                "ondemand (load on demand), lru (mixtral-offloading), resident (everything "
                                "resident)."),
    "evict": click.option("--evict", type=click.Choice(EVICTIONS), default="auto", show_default=True,
                          help="Cache eviction policy per layer: lrfu (uses weighed by their age: decayed "
                               "frequency), arc, lru or lfu; auto: lrfu for fate, arc for paper (lru caching "
                               "is always LRU)."),
    "cache_alloc": click.option("--cache-alloc", type=click.Choice(ALLOCS), default="auto", show_default=True,
                                help="How expert slots are spread over layers (auto: to minimise the expected misses "
                                     "by the bundle's reuse statistics; else by its recall statistics; else "
                                     "shallow4)."),
    "predictor": click.option("--predictor", type=click.Choice(PREDICTORS), default="fitted", show_default=True,
                              help="How the next layers' experts are predicted: fitted (the bundle's linear maps "
                                   "from a gate input to the next routers' logits, fitted on its calibration text; "
                                   "the next router where the bundle has none), router (the next layer's router "
                                   "on this layer's gate input, as in the Fate paper)."),
    "prefetch_extra": click.option("--prefetch-extra", type=int, default=None,
                                   help="Extra prefetch candidates beyond top-k [default: from the timing profile]."),
    "int2_share": click.option("--int2-share", type=float, default=0.3, show_default=True,
                               help="Prefill: least popular experts covering at most this share of assignments run "
                                    "as INT2."),
    "link": click.option("--link", default=None,
                         help="Emulate a host-to-device link: 12GB/s, 80MB/s, pcie1, pcie3, pcie4, or ratio:R (one "
                              "INT4 expert copy = R x one layer's decode compute)."),
    "profile": click.option("--profile", is_flag=True,
                            help="Re-measure the timing profile (compute and copy times) and print it."),
}
_PARAM = {name: ("no_verify" if name == "verify" else name) for name in ENGINE_OPTIONS}


def engine_options(*, skip: tuple[str, ...] = (), only: tuple[str, ...] | None = None):
    """A decorator adding the engine options (all, or those in ``only``, but none in ``skip``; EngineOptions
    field names) to a command, in one order everywhere; :func:`options_from` turns them back into an
    EngineOptions."""
    chosen = [opt for name, opt in ENGINE_OPTIONS.items() if name not in skip and (only is None or name in only)]

    def decorate(f):
        for opt in reversed(chosen):
            f = opt(f)
        return f

    return decorate


def options_from(kwargs: dict, **fixed) -> EngineOptions:
    """Pop the engine options a command was given out of its ``kwargs``; ``fixed`` adds or overrides
    fields the command sets itself."""
    values = {}
    for name, param in _PARAM.items():
        if param in kwargs:
            v = kwargs.pop(param)
            values[name] = (not v) if name == "verify" else v
    values.update(fixed)
    return EngineOptions.of(**values)


# --- JSON ---------------------------------------------------------------------------------------------------
def jsonable(obj):
    """``obj`` with non-finite floats as None and anything JSON cannot hold as its str(): what every
    command's --json / --stats-json writes."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if obj is None or isinstance(obj, (str, int, bool)):
        return obj
    return str(obj)


def write_json(path: str | Path, obj, indent: int = 2) -> None:
    Path(path).write_text(json.dumps(jsonable(obj), indent=indent, allow_nan=False) + "\n", encoding="utf-8")
