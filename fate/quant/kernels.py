"""fate's native CPU kernels: products of float32 activations with weights read as stored.

The C++ lives in ``fate/quant/csrc/``: ``fate_kernels.cpp`` (the torch glue: argument checks, activation
quantization, rows split over threads) and ``isa_body.h``, the arithmetic, compiled once per instruction set
(``isa_avx2.cpp``, ``isa_avxvnni.cpp``, ``isa_avx512vnni.cpp``; each sets its own ``#pragma GCC target`` and sees
no torch header, so nothing compiled for one CPU can run on another).  It is built on first use with torch's
``cpp_extension`` (g++ and ninja; about a minute, once per machine and source version, cached by torch under
``~/.cache/torch_extensions``).  :func:`mm` is the one entry point; ``kind`` says what the weights are:

``Q4_I8`` / ``Q2_I8``
    HQQ INT4 / INT2 codes (:mod:`fate.quant.layout`) against **8-bit activations**: each token's activations
    are quantized in blocks of 32 (``d = max|x| / 127``, ``q = round(x * (127 / max|x|))`` half to even,
    ``|q| <= 127``), the codes meet
    them in integer dot products (AVX2 ``maddubs``; ``vpdpbusd`` with AVX-VNNI or AVX512-VNNI) and HQQ's affine
    form is applied per group: ``sum_k s (c_k - z) x_k ~= s * sum_b d_b (sum_k c_k q_k - z sum_k q_k)`` — the
    zero point meets the same quantized activations, so only the activations' rounding differs from the
    float32 product (like llama.cpp's Q4_1 x Q8_1).
``Q8_I8``
    int8 weights with one float16 scale per 32 (``fate-convert --dtype q8``) against the same 8-bit
    activations.
``F16``
    float16 weights, float32 activations: each weight widened in registers and multiplied in (one read of
    2 bytes a weight instead of widening into a scratch matrix and reading that).
``Q4_F32`` / ``Q4_F32_512``
    HQQ INT4 codes against float32 activations, each weight dequantized in registers exactly as fate.quant
    does (``(c - z) * s``): the reference INT4 product (256- or 512-bit registers).

**Error of the 8-bit activations.**  Rounding moves each activation by at most half a step, ``|e_k| <= d_b / 2
= max_b|x| / 254``, so an output moves by at most ``sum_b (max_b|x| / 254) * sum_{k in b} |w_k|`` (w the
dequantized weights); the rounding errors are independent and centred, so the typical change is about
``||w|| * max|x| / (254 * sqrt(3))``, some 0.2-0.4 % of an output's size for activations without large outliers
inside a block of 32 (measured: tests/test_kernels.py; perplexity on the trained demo: docs/BENCHMARKS.md).
Every other difference from the float32 products is float32 summation order (~1e-7 relative).

Threads: every product splits its rows into units (about eight per thread) that a persistent pool claims as it
gets to them, the calling thread included (``csrc/pool.h``): a thread the scheduler has not run yet leaves its
share to the others instead of holding the product at a barrier, which torch's OpenMP team would do (on a core
another process keeps busy that costs a time slice per product: two threads decoded slower than one).  The pool
takes :func:`set_threads` threads per product (by default ``torch.get_num_threads()``), started once.  The engine
gives it fate-run's ``-t`` and sets torch's own intra-op count to 1 while the kernels compute the model's
products: two pools both sized to the cores would spin on each other's cores (measured: a 64-token prefill at
2 threads ran 4x slower than at 1 while torch's OpenMP team and this pool alternated), and what torch still
computes in a decode step (norms, attention over the cache, routing) is too small to split.  Each output is one
row's sum computed by one thread, so the thread count changes no bit.

Instruction sets: :func:`isa` is the widest this CPU has (``avx512vnni`` with AVX512F/BW/VL/VNNI, else
``avxvnni``, else ``avx2``); ``FATE_NATIVE=avx2`` (or ``avxvnni``) forces a narrower one, ``FATE_NATIVE=0`` turns
the kernels off.  The VNNI units differ from the AVX2 one in the dot-product step alone; tests/test_kernels.py
runs every unit the CPU has against the same integer arithmetic (the machine they were written on had AVX2
only, so the VNNI units are compiled there but not run).  Where the CPU lacks AVX2/F16C/FMA (Arm, older x86),
there is no compiler, or the build fails, :func:`available` is False and callers keep the torch path.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import threading
from pathlib import Path

import torch

from fate.sysinfo import cpu_flags

__all__ = ["available", "unavailable_reason", "isa", "q4_f32_kind", "mm", "set_threads", "threads", "quantize", "q4_matvec", "q4_swiglu", "q4_dequant",
           "GROUP", "Q4_I8", "Q2_I8", "Q8_I8", "F16", "Q4_F32", "Q4_F32_512", "ISAS", "Q8_GROUP"]

GROUP = 64  # the q4 group size the kernels handle (q4's default)
Q2_GROUP = 32  # the q2 group size they handle (q2's default)
Q8_GROUP = 32  # weights per float16 scale of --dtype q8
MAX_GROUPS = 1024  # groups per row a kernel holds (isa.h)

Q4_I8, Q2_I8, Q8_I8, F16, Q4_F32, Q4_F32_512 = range(6)
ISAS = ("avx2", "avxvnni", "avx512vnni")
_LAYOUT = {Q4_I8: 1, Q2_I8: 2, Q8_I8: 0}

_CSRC = Path(__file__).resolve().parent / "csrc"
_SOURCES = ("fate_kernels.cpp", "isa_avx2.cpp", "isa_avxvnni.cpp", "isa_avx512vnni.cpp", "isa_avx512f.cpp")  # + .h
_NEEDS = {"avx2": {"avx2", "f16c", "fma"}, "avxvnni": {"avx2", "f16c", "fma", "avx_vnni"},
          "avx512vnni": {"avx2", "f16c", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni"}}

_lock = threading.Lock()
_module = None
_tried = False
_why = ""
_isa = ""
_wide = False  # AVX-512 rows for the float32-activation INT4 product


def _name() -> str:
    """The extension's name, with a digest of every source file: torch caches builds by name, so a changed
    header (which torch's own check does not see) builds afresh."""
    h = hashlib.sha256()
    for f in sorted(_CSRC.iterdir()):
        if f.suffix in (".cpp", ".h"):
            h.update(f.name.encode() + f.read_bytes())
    return "fate_kernels_" + h.hexdigest()[:12]


def _choose_isa(flags: set[str]) -> tuple[str, str]:
    """(instruction set, reason when none): the widest this CPU has, or what FATE_NATIVE names."""
    want = os.environ.get("FATE_NATIVE", "1")
    if want == "0":
        return "", "FATE_NATIVE=0"
    if sys.byteorder != "little" or not _NEEDS["avx2"] <= flags:
        return "", "this CPU has no AVX2/F16C/FMA"
    if want in ISAS:
        if not _NEEDS[want] <= flags:
            return "", f"FATE_NATIVE={want}, but this CPU lacks {', '.join(sorted(_NEEDS[want] - flags))}"
        return want, ""
    return next(i for i in reversed(ISAS) if _NEEDS[i] <= flags), ""


def _load():
    global _module, _tried, _why, _isa, _wide
    with _lock:
        if _tried:
            return _module
        _tried = True
        flags = cpu_flags()
        _isa, _why = _choose_isa(flags)
        if not _isa:
            return None
        _wide = "avx512f" in flags and os.environ.get("FATE_NATIVE") not in ("avx2", "avxvnni")
        if shutil.which(os.environ.get("CXX", "c++")) is None:
            _why = "no C++ compiler"
            return None
        name = _name()
        try:
            from torch.utils import cpp_extension as X  # pulls in setuptools: only when the kernels load

            if not _built(name):
                print("fate: building the native CPU kernels (once per machine, about a minute; FATE_NATIVE=0 "
                      "skips it)", file=sys.stderr, flush=True)
            module = X.load(name, sources=[str(_CSRC / s) for s in _SOURCES], extra_cflags=["-O3"],
                            extra_include_paths=[str(_CSRC)], verbose=False)
            module.set_isa(ISAS.index(_isa))
            _module = module
        except Exception as e:  # no ninja, a broken toolchain, ...: the torch path serves
            _why = f"the kernels did not build ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
            _module = None
        return _module


def _built(name: str) -> bool:
    """Whether torch's extension cache already holds this build (then loading takes a moment)."""
    try:
        from torch.utils.cpp_extension import _get_build_directory  # as above: heavy, needed once

        d = _get_build_directory(name, verbose=False)
        return any(f.startswith(name) and f.endswith(".so") for f in os.listdir(d))
    except Exception:
        return False


def _required():
    module = _load()
    if module is None:
        raise RuntimeError(f"fate's native kernels are unavailable here: {_why}")
    return module


def available() -> bool:
    """Whether the kernels run here (builds them on the first call)."""
    return _load() is not None


def unavailable_reason() -> str:
    _load()
    return _why


def isa() -> str:
    """The instruction set the kernels use here (``""`` when they are unavailable)."""
    _load()
    return _isa if _module is not None else ""


def q4_f32_kind() -> int:
    """The reference INT4 product's kind on this CPU: ``Q4_F32_512`` where it has AVX-512, else ``Q4_F32`` —
    what :func:`q4_matvec` computes by default, and ``--kernels fp32`` too (the two round alike)."""
    _load()
    return Q4_F32_512 if _wide else Q4_F32


def set_threads(n: int) -> None:
    """Threads per product from now on (``0``: follow ``torch.get_num_threads()``, the default)."""
    (_module or _required()).set_threads(int(n))


def threads() -> int:
    """Threads a product takes now."""
    return int((_module or _required()).get_threads())


def fits(kind: int, k: int) -> bool:
    """Whether a product of ``kind`` takes rows of ``k`` inputs (group multiples, at most MAX_GROUPS groups)."""
    g = GROUP if kind in (Q4_I8, Q4_F32, Q4_F32_512) else (Q2_GROUP if kind == Q2_I8 else 32)
    return k % g == 0 and k % 32 == 0 and k // g <= MAX_GROUPS


def mm(x: torch.Tensor, mats, kind: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """``x`` [T, K] float32 (contiguous) times each matrix of ``mats`` transposed, the outputs side by side:
    [T, sum N] float32 (into ``out`` when given).  A matrix is ``(codes, scale, zero)`` for Q4/Q2 (as
    :class:`fate.quant.expert.ExpertView` gives them), ``(codes int8 [N, K], scale)`` for Q8, ``(weight,)``
    float16 [N, K] for F16.  Raises RuntimeError where the kernels are unavailable (:func:`available`)."""
    return (_module or _required()).mm(x, mats, kind, out)


def quantize(x: torch.Tensor, kind: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The 8-bit activations a product of ``kind`` (Q4_I8, Q2_I8, Q8_I8) computes with: ``(q, d, gs)`` with q
    [T, K] int8 laid out for the codes' packing, d [T, K/32] the block scales, gs the quantized sums per weight
    group (what the zero points meet).  For tests and the documentation of the arithmetic."""
    return tuple((_module or _required()).quantize(x, _LAYOUT[kind]))


def q4_matvec(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
              wide: bool | None = None) -> torch.Tensor:
    """The reference INT4 product: ``x`` [T, K] float32 times the INT4 matrix (``packed`` [N, K/2] uint8,
    ``scale``/``zero`` float16 with N * K / 64 elements), transposed, with float32 activations: [T, N].
    ``wide``: AVX-512 (True) or 256-bit (False) rows; default what this CPU has."""
    module = _module or _required()
    wide = _wide if wide is None else wide
    return module.mm(x, [(packed, scale, zero)], Q4_F32_512 if wide else Q4_F32, None)


def q4_swiglu(x: torch.Tensor, gate, up, down) -> torch.Tensor:
    """One expert on one token with the reference INT4 products, ``down(silu(gate(x)) * up(x))``, each matrix a
    ``(packed, scale, zero)`` triple: [1, H] float32."""
    return q4_matvec(torch.nn.functional.silu(q4_matvec(x, *gate)) * q4_matvec(x, *up), *down)


def q4_dequant(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """The INT4 matrix as float32 into ``out`` ([N, K], contiguous): fate.quant's ``(q - zero) * scale``,
    bit for bit, in one pass (batched calls multiply it as usual)."""
    (_module or _required()).q4_dequant(packed, scale, zero, out)
    return out
