"""A native CPU kernel for one-token (decode) products with HQQ INT4 weights, read packed.

``q4_matvec(x, packed, scale, zero)`` computes ``x @ W.T`` for ``x`` [1, K] float32 and
``W = (q - zero) * scale`` ([N, K]; q 4-bit codes packed two per byte, low nibble first, as
:mod:`fate.quant.layout` stores them; float16 scale/zero per group of 64 along K) without materializing ``W``:
each weight is dequantized in registers, ``(q - zero) * scale`` in float32 as hqq and fate.quant do,
and multiplied in.  A decode step is bound by the bytes it reads, and this reads 0.56 byte per weight
where widening into a float32 scratch first (the torch-only path) writes and reads 8 more: on the 2-core
Zen 4 VM, a [1024, 512] product took 48 us against 230 us for fate.quant's dequantization + F.linear
and 120 us for an f16 matrix (benchmarks/runtime.py ``--kernels``).  Sums run in a different order than
F.linear's, so results differ from the torch path in the last bits (~1e-7 relative), not more.

It is C++ with AVX-512 and AVX2 intrinsics (the widest the CPU has is used; ``FATE_NATIVE=avx2``
forces AVX2), compiled on first use with torch's ``cpp_extension`` (g++ and ninja; about 30 s, once per
machine, cached by torch under ``~/.cache/torch_extensions``).  Where the CPU lacks AVX2/F16C/FMA,
there is no compiler, the build fails, or ``FATE_NATIVE=0`` is set, :func:`available` is False and
callers keep the torch path.
"""

from __future__ import annotations

import os
import shutil
import sys
import threading

import torch

from fate.sysinfo import cpu_flags

__all__ = ["available", "q4_matvec", "q4_swiglu", "q4_dequant", "GROUP"]

GROUP = 64  # the group size the kernel handles (q4's default)
_NAME = "fate_q4_kernel_v4"  # change with the source: torch caches builds by name

_SOURCE = r"""
#include <torch/extension.h>
#include <immintrin.h>

// y[0, n] = sum_k ((q[n, k] - zero[n, k / 64]) * scale[n, k / 64]) * x[0, k] for rows n0 .. n1-1;
// q: 4-bit codes, byte i of a row holding codes 2i (low nibble) and 2i + 1
__attribute__((target("avx512f,f16c,fma")))
static void rows_avx512(const float* xp, const uint8_t* pp, const uint16_t* sp, const uint16_t* zp, float* yp,
                        int64_t K, int64_t n0, int64_t n1) {
  const int64_t G = K / 64;
  const __m512i low = _mm512_set1_epi32(15);
  const __m512i first = _mm512_set_epi32(23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  const __m512i second = _mm512_set_epi32(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8);
  for (int64_t n = n0; n < n1; ++n) {
    __m512 acc = _mm512_setzero_ps();
    const uint8_t* row = pp + n * (K / 2);
    for (int64_t g = 0; g < G; ++g) {
      const __m512 s = _mm512_set1_ps(_cvtsh_ss(sp[n * G + g]));
      const __m512 z = _mm512_set1_ps(_cvtsh_ss(zp[n * G + g]));
      for (int64_t j = 0; j < 64; j += 32) {  // 16 bytes = 32 codes
        const int64_t k = g * 64 + j;
        const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + k / 2)));
        const __m512i lo = _mm512_and_si512(b, low), hi = _mm512_srli_epi32(b, 4);
        const __m512 w0 = _mm512_mul_ps(_mm512_sub_ps(_mm512_cvtepi32_ps(_mm512_permutex2var_epi32(lo, first, hi)), z), s);
        const __m512 w1 = _mm512_mul_ps(_mm512_sub_ps(_mm512_cvtepi32_ps(_mm512_permutex2var_epi32(lo, second, hi)), z), s);
        acc = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xp + k), acc);
        acc = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xp + k + 16), acc);
      }
    }
    yp[n] = _mm512_reduce_add_ps(acc);
  }
}

// codes k .. k+15 of a row (8 packed bytes at p) as two float vectors, in order
__attribute__((target("avx2,f16c,fma")))
static inline void codes16_avx2(const uint8_t* p, __m256* c0, __m256* c1) {
  const __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  const __m256i lo = _mm256_and_si256(b, _mm256_set1_epi32(15)), hi = _mm256_srli_epi32(b, 4);
  // unpack within 128-bit lanes, then put the lanes in order
  const __m256i a = _mm256_unpacklo_epi32(lo, hi), c = _mm256_unpackhi_epi32(lo, hi);
  *c0 = _mm256_cvtepi32_ps(_mm256_permute2x128_si256(a, c, 0x20));
  *c1 = _mm256_cvtepi32_ps(_mm256_permute2x128_si256(a, c, 0x31));
}

__attribute__((target("avx2,f16c,fma")))
static void rows_avx2(const float* xp, const uint8_t* pp, const uint16_t* sp, const uint16_t* zp, float* yp,
                      int64_t K, int64_t n0, int64_t n1) {
  const int64_t G = K / 64;
  for (int64_t n = n0; n < n1; ++n) {
    __m256 acc = _mm256_setzero_ps();
    const uint8_t* row = pp + n * (K / 2);
    for (int64_t g = 0; g < G; ++g) {
      const __m256 s = _mm256_set1_ps(_cvtsh_ss(sp[n * G + g]));
      const __m256 z = _mm256_set1_ps(_cvtsh_ss(zp[n * G + g]));
      for (int64_t j = 0; j < 64; j += 16) {  // 8 bytes = 16 codes
        const int64_t k = g * 64 + j;
        __m256 c0, c1;
        codes16_avx2(row + k / 2, &c0, &c1);
        const __m256 w0 = _mm256_mul_ps(_mm256_sub_ps(c0, z), s);
        const __m256 w1 = _mm256_mul_ps(_mm256_sub_ps(c1, z), s);
        acc = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xp + k), acc);
        acc = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xp + k + 8), acc);
      }
    }
    const __m128 h = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
    const __m128 q = _mm_add_ps(h, _mm_movehl_ps(h, h));
    yp[n] = _mm_cvtss_f32(_mm_add_ss(q, _mm_shuffle_ps(q, q, 1)));
  }
}

// out[n, k] = (q[n, k] - zero[n, k / 64]) * scale[n, k / 64] in float32: fate.quant's dequantization
// (a subtraction, then a multiplication, each rounded) in one pass
__attribute__((target("avx2,f16c,fma")))
static void dequant_rows(const uint8_t* pp, const uint16_t* sp, const uint16_t* zp, float* op, int64_t K,
                         int64_t n0, int64_t n1) {
  const int64_t G = K / 64;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = pp + n * (K / 2);
    float* o = op + n * K;
    for (int64_t g = 0; g < G; ++g) {
      const __m256 s = _mm256_set1_ps(_cvtsh_ss(sp[n * G + g]));
      const __m256 z = _mm256_set1_ps(_cvtsh_ss(zp[n * G + g]));
      for (int64_t j = 0; j < 64; j += 16) {
        const int64_t k = g * 64 + j;
        __m256 c0, c1;
        codes16_avx2(row + k / 2, &c0, &c1);
        _mm256_storeu_ps(o + k, _mm256_mul_ps(_mm256_sub_ps(c0, z), s));
        _mm256_storeu_ps(o + k + 8, _mm256_mul_ps(_mm256_sub_ps(c1, z), s));
      }
    }
  }
}

void q4_dequant(torch::Tensor packed, torch::Tensor scale, torch::Tensor zero, torch::Tensor out) {
  TORCH_CHECK(packed.dtype() == torch::kUInt8 && packed.is_contiguous() && packed.dim() == 2, "packed: [N, K/2] uint8");
  const int64_t N = packed.size(0), K = packed.size(1) * 2, G = K / 64;
  TORCH_CHECK(K % 64 == 0, "K must be a multiple of 64");
  TORCH_CHECK(scale.dtype() == torch::kFloat16 && zero.dtype() == torch::kFloat16 && scale.is_contiguous()
              && zero.is_contiguous() && scale.numel() == N * G && zero.numel() == N * G, "scale/zero: [N, K/64] float16");
  TORCH_CHECK(out.dtype() == torch::kFloat32 && out.is_contiguous() && out.numel() == N * K, "out: [N, K] float32");
  const uint8_t* pp = packed.data_ptr<uint8_t>();
  const uint16_t* sp = reinterpret_cast<const uint16_t*>(scale.data_ptr<at::Half>());
  const uint16_t* zp = reinterpret_cast<const uint16_t*>(zero.data_ptr<at::Half>());
  float* op = out.data_ptr<float>();
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) { dequant_rows(pp, sp, zp, op, K, n0, n1); });
}

torch::Tensor q4_matvec(torch::Tensor x, torch::Tensor packed, torch::Tensor scale, torch::Tensor zero, bool wide) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && x.is_contiguous() && x.dim() == 2 && x.size(0) == 1, "x: [1, K] float32");
  TORCH_CHECK(packed.dtype() == torch::kUInt8 && packed.is_contiguous() && packed.dim() == 2, "packed: [N, K/2] uint8");
  const int64_t N = packed.size(0), K = packed.size(1) * 2, G = K / 64;
  TORCH_CHECK(K % 64 == 0 && x.size(1) == K, "K must be a multiple of 64 and match x");
  TORCH_CHECK(scale.dtype() == torch::kFloat16 && zero.dtype() == torch::kFloat16 && scale.is_contiguous()
              && zero.is_contiguous() && scale.numel() == N * G && zero.numel() == N * G, "scale/zero: [N, K/64] float16");
  auto y = torch::empty({1, N}, x.options());
  const float* xp = x.data_ptr<float>();
  const uint8_t* pp = packed.data_ptr<uint8_t>();
  const uint16_t* sp = reinterpret_cast<const uint16_t*>(scale.data_ptr<at::Half>());
  const uint16_t* zp = reinterpret_cast<const uint16_t*>(zero.data_ptr<at::Half>());
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    if (wide) rows_avx512(xp, pp, sp, zp, yp, K, n0, n1);
    else rows_avx2(xp, pp, sp, zp, yp, K, n0, n1);
  });
  return y;
}
"""

_lock = threading.Lock()
_module = None
_tried = False
_why = ""


_wide = False  # AVX-512 rows (else AVX2)


def _load():
    global _module, _tried, _why
    with _lock:
        if _tried:
            return _module
        _tried = True
        if os.environ.get("FATE_NATIVE", "1") == "0":
            _why = "FATE_NATIVE=0"
            return None
        flags = cpu_flags()
        if sys.byteorder != "little" or not {"avx2", "f16c", "fma"} <= flags:
            _why = "this CPU has no AVX2/F16C/FMA"
            return None
        global _wide
        _wide = "avx512f" in flags and os.environ.get("FATE_NATIVE") != "avx2"
        if shutil.which(os.environ.get("CXX", "c++")) is None:
            _why = "no C++ compiler"
            return None
        try:
            from torch.utils import cpp_extension as X  # pulls in setuptools: only when the kernel loads

            if not _built():
                print("fate: building the native INT4 kernel (once per machine, ~30 s; FATE_NATIVE=0 skips it)",
                      file=sys.stderr, flush=True)
            # each row loop names its instruction set itself; the rest is plain C++
            _module = X.load_inline(_NAME, cpp_sources=_SOURCE, functions=["q4_matvec", "q4_dequant"], extra_cflags=["-O3"],
                                    verbose=False)
        except Exception as e:  # no ninja, a broken toolchain, ...: the torch path serves
            _why = f"the kernel did not build ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
            _module = None
        return _module


def _built() -> bool:
    """Whether torch's extension cache already holds the built kernel (then loading takes a moment)."""
    try:
        from torch.utils.cpp_extension import _get_build_directory  # as above: heavy, needed once

        d = _get_build_directory(_NAME, verbose=False)
        return any(f.startswith(_NAME) and f.endswith(".so") for f in os.listdir(d))
    except Exception:
        return False


def available() -> bool:
    """Whether :func:`q4_matvec` can run here (builds the kernel on the first call)."""
    return _load() is not None


def unavailable_reason() -> str:
    _load()
    return _why


def q4_matvec(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
              wide: bool | None = None) -> torch.Tensor:
    """``x`` [1, K] float32 times the INT4 matrix (``packed`` [N, K/2] uint8, ``scale``/``zero`` float16
    with N * K / 64 elements), transposed: [1, N] float32.  Call :func:`available` first.  ``wide``:
    AVX-512 (True) or AVX2 (False) rows; default what this CPU has (``FATE_NATIVE=avx2`` forces AVX2)."""
    return _module.q4_matvec(x, packed, scale, zero, _wide if wide is None else wide)


def q4_swiglu(x: torch.Tensor, gate, up, down) -> torch.Tensor:
    """One expert on one token, ``down(silu(gate(x)) * up(x))``, each matrix a ``(packed, scale, zero)``
    triple as :func:`q4_matvec` takes it: [1, H] float32."""
    return q4_matvec(torch.nn.functional.silu(q4_matvec(x, *gate)) * q4_matvec(x, *up), *down)


def q4_dequant(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """The INT4 matrix as float32 into ``out`` ([N, K], contiguous): fate.quant's ``(q - zero) * scale``,
    bit for bit, in one pass (batched calls multiply it as usual)."""
    _module.q4_dequant(packed, scale, zero, out)
    return out
