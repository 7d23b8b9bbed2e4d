// The kernels, written once for 256-bit registers and compiled once per instruction set: isa_avx2.cpp,
// isa_avxvnni.cpp and isa_avx512vnni.cpp each set a `#pragma GCC target`, define FATE_NS (the namespace) and
// FATE_DOT (how 8-bit products are summed), then include this file.  Everything here but the entry points
// has internal linkage, and no standard header is included past the pragma.
//
// FATE_DOT 0: AVX2 `maddubs` (u8 x s8 pairs summed to int16) then `madd` (pairs of int16 to int32);
//          1: AVX-VNNI `vpdpbusd` (four u8 x s8 products summed into int32, no int16 step);
//          2: AVX512-VNNI `vpdpbusd` on 256-bit registers (AVX512VL).
// The int16 step of FATE_DOT 0 never saturates here: q4 codes are <= 15, q2 codes <= 3, q8 weights enter
// as |w| <= 128 against activations |q| <= 127 (2 * 128 * 127 < 32767), and at most two q4 or four q2
// pair sums are added in int16 (2 * 2 * 15 * 127, 4 * 2 * 3 * 127 < 32767).

namespace FATE_NS {
namespace {

using fate::Act8;
using fate::Mat;
using fate::MAX_GROUPS;

inline float hsum(__m256 v) {
  __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  h = _mm_add_ps(h, _mm_movehl_ps(h, h));
  h = _mm_add_ss(h, _mm_shuffle_ps(h, h, 1));
  return _mm_cvtss_f32(h);
}

inline int32_t hsum_i32(__m256i v) {
  __m128i h = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  h = _mm_add_epi32(h, _mm_shuffle_epi32(h, 0x4E));
  h = _mm_add_epi32(h, _mm_shuffle_epi32(h, 0xB1));
  return _mm_cvtsi128_si32(h);
}

inline __m256i loadu(const void* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }

#if FATE_DOT == 1
inline __m256i dpbusd(__m256i acc, __m256i u, __m256i s) { return _mm256_dpbusd_avx_epi32(acc, u, s); }
#elif FATE_DOT == 2
inline __m256i dpbusd(__m256i acc, __m256i u, __m256i s) { return _mm256_dpbusd_epi32(acc, u, s); }
#endif

// int32 lane i = sum over bytes 4i..4i+3 of u * s (u unsigned, s signed)
inline __m256i dot1(__m256i u, __m256i s) {
#if FATE_DOT
  return dpbusd(_mm256_setzero_si256(), u, s);
#else
  return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
#endif
}

inline __m256i dot2(__m256i u0, __m256i s0, __m256i u1, __m256i s1) {
#if FATE_DOT
  return dpbusd(dpbusd(_mm256_setzero_si256(), u0, s0), u1, s1);
#else
  const __m256i p = _mm256_add_epi16(_mm256_maddubs_epi16(u0, s0), _mm256_maddubs_epi16(u1, s1));
  return _mm256_madd_epi16(p, _mm256_set1_epi16(1));
#endif
}

inline __m256i dot4(__m256i u0, __m256i s0, __m256i u1, __m256i s1, __m256i u2, __m256i s2, __m256i u3,
                    __m256i s3) {
#if FATE_DOT
  return dpbusd(dpbusd(dpbusd(dpbusd(_mm256_setzero_si256(), u0, s0), u1, s1), u2, s2), u3, s3);
#else
  const __m256i p = _mm256_add_epi16(_mm256_add_epi16(_mm256_maddubs_epi16(u0, s0), _mm256_maddubs_epi16(u1, s1)),
                                     _mm256_add_epi16(_mm256_maddubs_epi16(u2, s2), _mm256_maddubs_epi16(u3, s3)));
  return _mm256_madd_epi16(p, _mm256_set1_epi16(1));
#endif
}

// half -> float for n values (n <= MAX_GROUPS); sz (when given) = s * z
inline void halves(const uint16_t* s, const uint16_t* z, int64_t n, float* S, float* SZ) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 a = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i)));
    _mm256_storeu_ps(S + i, a);
    if (SZ) {
      const __m256 b = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(z + i)));
      _mm256_storeu_ps(SZ + i, _mm256_mul_ps(a, b));
    }
  }
  for (; i < n; ++i) {
    S[i] = _cvtsh_ss(s[i]);
    if (SZ) SZ[i] = S[i] * _cvtsh_ss(z[i]);
  }
}

inline float dotf(const float* a, const float* b, int64_t n) {
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
  float r = hsum(acc);
  for (; i < n; ++i) r += a[i] * b[i];
  return r;
}

// ---- q4: codes 2j (low nibble) and 2j+1 (high nibble) in byte j; one group of 64 codes = 32 bytes ----------
// The activations of each 64-group are laid out evens first, then odds, so the low and high nibbles of one
// 32-byte load meet their activations without a shuffle; the int32 lanes 0-3 then hold the first 32-block of
// the group and lanes 4-7 the second, which d8 scales.

// rows n .. n+R-1 on one token
template <int R>
inline void q4_rows(const Act8& a, const Mat& m, int64_t n, float* out) {
  const int64_t G = m.K / 64, ldw = m.K / 2;
  const uint8_t* W = static_cast<const uint8_t*>(m.codes) + n * ldw;
  float S[R][MAX_GROUPS], SZ[R][MAX_GROUPS];
  for (int r = 0; r < R; ++r) halves(m.scale + (n + r) * G, m.zero + (n + r) * G, G, S[r], SZ[r]);
  const __m256i low = _mm256_set1_epi8(0x0F);
  __m256 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    const __m256i xe = loadu(a.q + g * 64), xo = loadu(a.q + g * 64 + 32);
    const __m256 dv = _mm256_loadu_ps(a.d8 + g * 8);
    if (g % 2 == 0)  // the next rows' codes, one block ahead: short row streams defeat the hardware prefetcher
      for (int r = 0; r < R; ++r) _mm_prefetch(reinterpret_cast<const char*>(W + (2 * R + r) * ldw + g * 32), _MM_HINT_T0);
    for (int r = 0; r < R; ++r) {
      const __m256i w = loadu(W + r * ldw + g * 32);
      const __m256i p = dot2(_mm256_and_si256(w, low), xe, _mm256_and_si256(_mm256_srli_epi16(w, 4), low), xo);
      acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_mul_ps(_mm256_set1_ps(S[r][g]), dv), acc[r]);
    }
  }
  for (int r = 0; r < R; ++r) out[n + r] = hsum(acc[r]) - dotf(SZ[r], a.gs, G);
}

// row n on tokens t0 .. t0+RT-1
template <int RT>
inline void q4_tokens(const Act8& a, const uint8_t* w_row, const float* S, const float* SZ, int64_t t0, float* out,
                      int64_t ldo) {
  const int64_t K = a.K, G = K / 64;
  const __m256i low = _mm256_set1_epi8(0x0F);
  __m256 acc[RT];
  for (int t = 0; t < RT; ++t) acc[t] = _mm256_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    const __m256i w = loadu(w_row + g * 32);
    const __m256i lo = _mm256_and_si256(w, low), hi = _mm256_and_si256(_mm256_srli_epi16(w, 4), low);
    const __m256 s = _mm256_set1_ps(S[g]);
    for (int t = 0; t < RT; ++t) {
      const int8_t* xq = a.q + (t0 + t) * K + g * 64;
      const __m256i p = dot2(lo, loadu(xq), hi, loadu(xq + 32));
      const __m256 sv = _mm256_mul_ps(s, _mm256_loadu_ps(a.d8 + ((t0 + t) * G + g) * 8));
      acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), sv, acc[t]);
    }
  }
  for (int t = 0; t < RT; ++t) out[(t0 + t) * ldo] = hsum(acc[t]) - dotf(SZ, a.gs + (t0 + t) * G, G);
}

// ---- q2: codes 4j+k in bits 2k..2k+1 of byte j; groups of 32 codes = 8 bytes -------------------------------
// In each span of 128 codes (four groups, one 32-byte load) the activations are laid out as four planes,
// plane k holding the activations of codes 4j+k, so (w >> 2k) & 3 meets plane k; the int32 lanes 2i, 2i+1
// then hold group i of the span.  A tail of fewer than four groups is laid out the same way (planes of 8 bytes
// per group) and summed in scalar code.

inline float q2_tail(const Act8& a, const uint8_t* w_tail, const int8_t* x_tail, const float* S, const float* dv,
                     int64_t GT) {
  float r = 0.f;
  for (int64_t gl = 0; gl < GT; ++gl) {
    int32_t s = 0;
    for (int k = 0; k < 4; ++k)
      for (int j = 0; j < 8; ++j) s += ((w_tail[8 * gl + j] >> (2 * k)) & 3) * x_tail[k * 8 * GT + 8 * gl + j];
    r += S[gl] * dv[gl] * static_cast<float>(s);
  }
  return r;
}

inline __m256 q2_span(__m256i w, const int8_t* xq, __m256 sd_pairs) {
  const __m256i three = _mm256_set1_epi8(3);
  const __m256i p = dot4(_mm256_and_si256(w, three), loadu(xq), _mm256_and_si256(_mm256_srli_epi16(w, 2), three),
                         loadu(xq + 32), _mm256_and_si256(_mm256_srli_epi16(w, 4), three), loadu(xq + 64),
                         _mm256_and_si256(_mm256_srli_epi16(w, 6), three), loadu(xq + 96));
  return _mm256_mul_ps(_mm256_cvtepi32_ps(p), sd_pairs);
}

// four (scale * d) of a span, each twice: the int32 lanes' order
inline __m256 pairs(const float* S, const float* d) {
  const __m128 v = _mm_mul_ps(_mm_loadu_ps(S), _mm_loadu_ps(d));
  return _mm256_permutevar8x32_ps(_mm256_castps128_ps256(v), _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3));
}

template <int RT>
inline void q2_tokens(const Act8& a, const uint8_t* w_row, const float* S, const float* SZ, int64_t t0, float* out,
                      int64_t ldo) {
  const int64_t K = a.K, G = K / 32, NS = K / 128, GT = G - 4 * NS;
  __m256 acc[RT];
  for (int t = 0; t < RT; ++t) acc[t] = _mm256_setzero_ps();
  for (int64_t s = 0; s < NS; ++s) {
    const __m256i w = loadu(w_row + s * 32);
    for (int t = 0; t < RT; ++t) {
      const int64_t tt = t0 + t;
      acc[t] = _mm256_add_ps(acc[t], q2_span(w, a.q + tt * K + s * 128, pairs(S + 4 * s, a.d + tt * G + 4 * s)));
    }
  }
  for (int t = 0; t < RT; ++t) {
    const int64_t tt = t0 + t;
    float r = hsum(acc[t]);
    if (GT) r += q2_tail(a, w_row + NS * 32, a.q + tt * K + NS * 128, S + 4 * NS, a.d + tt * G + 4 * NS, GT);
    out[tt * ldo] = r - dotf(SZ, a.gs + tt * G, G);
  }
}

// ---- q8: int8 weights, one half scale per 32 ---------------------------------------------------------------
// maddubs multiplies unsigned by signed bytes: one side enters as its absolute value, the other with that side's
// sign moved onto it (one token: |x| against sign(x) * w, so |x| is taken once for every row; a batch: |w| once
// per row against sign(w) * x).  Weights are in [-127, 127] as the converter writes them.

template <int RT>
inline void q8_tokens(const Act8& a, const int8_t* w_row, const float* S, int64_t t0, float* out, int64_t ldo) {
  const int64_t K = a.K, G = K / 32;
  __m256 acc[RT];
  for (int t = 0; t < RT; ++t) acc[t] = _mm256_setzero_ps();
  for (int64_t b = 0; b < G; ++b) {
    const __m256i w = loadu(w_row + b * 32);
    const __m256i u = _mm256_abs_epi8(w);
    const __m256 s = _mm256_set1_ps(S[b]);
    for (int t = 0; t < RT; ++t) {
      const int64_t tt = t0 + t;
      const __m256i p = dot1(u, _mm256_sign_epi8(loadu(a.q + tt * K + b * 32), w));
      acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_mul_ps(s, _mm256_set1_ps(a.d[tt * G + b])), acc[t]);
    }
  }
  for (int t = 0; t < RT; ++t) out[(t0 + t) * ldo] = hsum(acc[t]);
}

template <int R>
inline void q8_rows(const Act8& a, const Mat& m, int64_t n, float* out) {
  const int64_t K = m.K, G = K / 32;
  const int8_t* W = static_cast<const int8_t*>(m.codes) + n * K;
  float SD[R][MAX_GROUPS];  // weight scale times activation scale, per block
  for (int r = 0; r < R; ++r) {
    halves(m.scale + (n + r) * G, nullptr, G, SD[r], nullptr);
    for (int64_t b = 0; b < G; ++b) SD[r][b] *= a.d[b];
  }
  __m256 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
  for (int64_t b = 0; b < G; ++b) {
    // |x| once for every row, the sign of x moved onto each row's weights
    const __m256i x = loadu(a.q + b * 32), ax = _mm256_abs_epi8(x);
    if (b % 2 == 0)
      for (int r = 0; r < R; ++r) _mm_prefetch(reinterpret_cast<const char*>(W + (2 * R + r) * K + b * 32), _MM_HINT_T0);
    for (int r = 0; r < R; ++r) {
      const __m256i p = dot1(ax, _mm256_sign_epi8(loadu(W + r * K + b * 32), x));
      acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(SD[r][b]), acc[r]);
    }
  }
  for (int r = 0; r < R; ++r) out[n + r] = hsum(acc[r]);
}

// ---- f16 weights, float32 activations ------------------------------------------------------------------------
template <int R>
inline void f16_rows(const float* x, const uint16_t* W, int64_t K, float* out) {
  __m256 a0[R], a1[R];
  for (int r = 0; r < R; ++r) a0[r] = a1[r] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    const __m256 x0 = _mm256_loadu_ps(x + k), x1 = _mm256_loadu_ps(x + k + 8);
    if (k % 32 == 0)  // 64 bytes a row: the next rows' line, two blocks ahead
      for (int r = 0; r < R; ++r) _mm_prefetch(reinterpret_cast<const char*>(W + (2 * R + r) * K + k), _MM_HINT_T0);
    for (int r = 0; r < R; ++r) {
      const uint16_t* w = W + r * K + k;
      a0[r] = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w))), x0, a0[r]);
      a1[r] = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + 8))), x1, a1[r]);
    }
  }
  for (int r = 0; r < R; ++r) {
    float s = hsum(_mm256_add_ps(a0[r], a1[r]));
    for (int64_t j = k; j < K; ++j) s += _cvtsh_ss(W[r * K + j]) * x[j];
    out[r] = s;
  }
}

// tokens t0 .. t0+RT-1 times rows n .. n+RM-1: RM x RT accumulators of 8 lanes, each weight widened once
// and multiplied into every token (a GEMM micro-tile: 12 FMAs per 3 conversions and 7 loads at 3 x 4)
template <int RM, int RT>
inline void f16_tile(const float* x, int64_t t0, const uint16_t* W, int64_t n, int64_t K, float* out, int64_t ldo) {
  __m256 acc[RM][RT];
  for (int r = 0; r < RM; ++r)
    for (int t = 0; t < RT; ++t) acc[r][t] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    __m256 w[RM];
    for (int r = 0; r < RM; ++r)
      w[r] = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(W + (n + r) * K + k)));
    for (int t = 0; t < RT; ++t) {
      const __m256 xv = _mm256_loadu_ps(x + (t0 + t) * K + k);
      for (int r = 0; r < RM; ++r) acc[r][t] = _mm256_fmadd_ps(w[r], xv, acc[r][t]);
    }
  }
  for (int r = 0; r < RM; ++r)
    for (int t = 0; t < RT; ++t) {
      float s = hsum(acc[r][t]);
      for (int64_t j = k; j < K; ++j) s += _cvtsh_ss(W[(n + r) * K + j]) * x[(t0 + t) * K + j];
      out[(t0 + t) * ldo + n + r] = s;
    }
}

// rows nb .. ne-1 on tokens t0 .. t0+RT-1 (their activations stay in L1 while the rows pass)
template <int RT>
inline void f16_block(const float* x, int64_t t0, const uint16_t* W, int64_t nb, int64_t ne, int64_t K, float* out,
                      int64_t ldo) {
  int64_t n = nb;
  for (; n + 3 <= ne; n += 3) f16_tile<3, RT>(x, t0, W, n, K, out, ldo);
  for (; n < ne; ++n) f16_tile<1, RT>(x, t0, W, n, K, out, ldo);
}

// ---- q4 with float32 activations: the reference path (weights dequantized in registers) ----------------------
// codes k .. k+15 of a row (8 packed bytes at p) as two float vectors, in order
inline void codes16(const uint8_t* p, __m256* c0, __m256* c1) {
  const __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  const __m256i lo = _mm256_and_si256(b, _mm256_set1_epi32(15)), hi = _mm256_srli_epi32(b, 4);
  const __m256i a = _mm256_unpacklo_epi32(lo, hi), c = _mm256_unpackhi_epi32(lo, hi);
  *c0 = _mm256_cvtepi32_ps(_mm256_permute2x128_si256(a, c, 0x20));
  *c1 = _mm256_cvtepi32_ps(_mm256_permute2x128_si256(a, c, 0x31));
}

}  // namespace

// x [T0.., K] float32 -> 8-bit blocks of 32 for tokens t0 .. t1-1 (plain order): q [T, K], d and bs [T, K/32]
// (bs = d * sum(q), the block's quantized sum)
void quant_rows(const float* x, int64_t K, int64_t t0, int64_t t1, int8_t* q, float* d, float* bs) {
  const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  const int64_t B = K / 32;
  for (int64_t t = t0; t < t1; ++t) {
    for (int64_t b = 0; b < B; ++b) {
      const float* xp = x + t * K + b * 32;
      const __m256 v0 = _mm256_loadu_ps(xp), v1 = _mm256_loadu_ps(xp + 8), v2 = _mm256_loadu_ps(xp + 16),
                   v3 = _mm256_loadu_ps(xp + 24);
      __m256 m = _mm256_max_ps(_mm256_max_ps(_mm256_and_ps(v0, absmask), _mm256_and_ps(v1, absmask)),
                               _mm256_max_ps(_mm256_and_ps(v2, absmask), _mm256_and_ps(v3, absmask)));
      __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
      h = _mm_max_ps(h, _mm_movehl_ps(h, h));
      h = _mm_max_ss(h, _mm_shuffle_ps(h, h, 1));
      const float amax = _mm_cvtss_f32(h);
      const float dd = amax / 127.f, id = amax > 0.f ? 127.f / amax : 0.f;
      const __m256 mul = _mm256_set1_ps(id);
      // round half to even (the default rounding mode), as torch.round does
      const __m256i i0 = _mm256_cvtps_epi32(_mm256_mul_ps(v0, mul)), i1 = _mm256_cvtps_epi32(_mm256_mul_ps(v1, mul)),
                    i2 = _mm256_cvtps_epi32(_mm256_mul_ps(v2, mul)), i3 = _mm256_cvtps_epi32(_mm256_mul_ps(v3, mul));
      const int32_t isum = hsum_i32(_mm256_add_epi32(_mm256_add_epi32(i0, i1), _mm256_add_epi32(i2, i3)));
      const __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(i0, i1), _mm256_packs_epi32(i2, i3));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + t * K + b * 32), _mm256_permutevar8x32_epi32(p, order));
      d[t * B + b] = dd;
      bs[t * B + b] = dd * static_cast<float>(isum);
    }
  }
}

// Several tokens on rows n0 .. n1-1 of a 4- or 2-bit matrix (G groups and ldw code bytes a row): rows in blocks
// whose codes stay in L1/L2 while every token passes, four tokens at a time (Tile::run<R>: R tokens, one row)
struct Q4Tile {
  template <int R>
  static void run(const Act8& a, const uint8_t* w, const float* S, const float* SZ, int64_t t0, float* out, int64_t ldo) {
    q4_tokens<R>(a, w, S, SZ, t0, out, ldo);
  }
};
struct Q2Tile {
  template <int R>
  static void run(const Act8& a, const uint8_t* w, const float* S, const float* SZ, int64_t t0, float* out, int64_t ldo) {
    q2_tokens<R>(a, w, S, SZ, t0, out, ldo);
  }
};

template <class Tile>
void tiles_i8(const Act8& a, const Mat& m, int64_t G, int64_t ldw, int64_t n0, int64_t n1, float* out, int64_t ldo) {
  float S[MAX_GROUPS], SZ[MAX_GROUPS];
  constexpr int64_t RB = 32;  // rows per block
  for (int64_t nb = n0; nb < n1; nb += RB) {
    const int64_t ne = nb + RB < n1 ? nb + RB : n1;
    for (int64_t t0 = 0; t0 < a.T; t0 += 4) {
      const int64_t rt = a.T - t0 < 4 ? a.T - t0 : 4;
      for (int64_t n = nb; n < ne; ++n) {
        halves(m.scale + n * G, m.zero + n * G, G, S, SZ);
        const uint8_t* w = static_cast<const uint8_t*>(m.codes) + n * ldw;
        switch (rt) {
          case 4: Tile::template run<4>(a, w, S, SZ, t0, out + n, ldo); break;
          case 3: Tile::template run<3>(a, w, S, SZ, t0, out + n, ldo); break;
          case 2: Tile::template run<2>(a, w, S, SZ, t0, out + n, ldo); break;
          default: Tile::template run<1>(a, w, S, SZ, t0, out + n, ldo);
        }
      }
    }
  }
}

// out[t * ldo + n] for rows n0 .. n1-1 and every token of a
void q4_i8(const Act8& a, const Mat& m, int64_t n0, int64_t n1, float* out, int64_t ldo) {
  if (a.T == 1) {
    int64_t n = n0;
    for (; n + 4 <= n1; n += 4) q4_rows<4>(a, m, n, out);
    for (; n < n1; ++n) q4_rows<1>(a, m, n, out);
    return;
  }
  tiles_i8<Q4Tile>(a, m, m.K / 64, m.K / 2, n0, n1, out, ldo);
}

void q2_i8(const Act8& a, const Mat& m, int64_t n0, int64_t n1, float* out, int64_t ldo) {
  tiles_i8<Q2Tile>(a, m, m.K / 32, m.K / 4, n0, n1, out, ldo);
}

void q8_i8(const Act8& a, const Mat& m, int64_t n0, int64_t n1, float* out, int64_t ldo) {
  if (a.T == 1) {
    int64_t n = n0;
    for (; n + 4 <= n1; n += 4) q8_rows<4>(a, m, n, out);
    for (; n < n1; ++n) q8_rows<1>(a, m, n, out);
    return;
  }
  const int64_t G = m.K / 32;
  float S[MAX_GROUPS];
  constexpr int64_t RB = 32;
  for (int64_t nb = n0; nb < n1; nb += RB) {
    const int64_t ne = nb + RB < n1 ? nb + RB : n1;
    for (int64_t t0 = 0; t0 < a.T; t0 += 4) {
      const int64_t rt = a.T - t0 < 4 ? a.T - t0 : 4;
      for (int64_t n = nb; n < ne; ++n) {
        halves(m.scale + n * G, nullptr, G, S, nullptr);
        const int8_t* w = static_cast<const int8_t*>(m.codes) + n * m.K;
        switch (rt) {
          case 4: q8_tokens<4>(a, w, S, t0, out + n, ldo); break;
          case 3: q8_tokens<3>(a, w, S, t0, out + n, ldo); break;
          case 2: q8_tokens<2>(a, w, S, t0, out + n, ldo); break;
          default: q8_tokens<1>(a, w, S, t0, out + n, ldo);
        }
      }
    }
  }
}

void f16_f32(const float* x, int64_t T, const Mat& m, int64_t n0, int64_t n1, float* out, int64_t ldo) {
  const int64_t K = m.K;
  const uint16_t* W = static_cast<const uint16_t*>(m.codes);
  if (T == 1) {  // bound by memory: four rows at a time, each weight read once
    int64_t n = n0;
    for (; n + 4 <= n1; n += 4) f16_rows<4>(x, W + n * K, K, out + n);
    for (; n < n1; ++n) f16_rows<1>(x, W + n * K, K, out + n);
    return;
  }
  // a GEMM: blocks of rows small enough to stay in L2 while every token passes them, 3 x 4 micro-tiles
  const int64_t RB = 48;
  for (int64_t nb = n0; nb < n1; nb += RB) {
    const int64_t ne = nb + RB < n1 ? nb + RB : n1;
    int64_t t0 = 0;
    for (; t0 + 4 <= T; t0 += 4) f16_block<4>(x, t0, W, nb, ne, K, out, ldo);
    switch (T - t0) {
      case 3: f16_block<3>(x, t0, W, nb, ne, K, out, ldo); break;
      case 2: f16_block<2>(x, t0, W, nb, ne, K, out, ldo); break;
      case 1: f16_block<1>(x, t0, W, nb, ne, K, out, ldo); break;
      default: break;
    }
  }
}

// y[t, n] = sum_k ((q[n, k] - zero[n, k/64]) * scale[n, k/64]) * x[t, k]: each weight dequantized in registers
// as fate.quant does ((q - z) * s in float32), then multiplied in
void q4_f32(const float* x, int64_t T, const Mat& m, int64_t n0, int64_t n1, float* out, int64_t ldo) {
  const int64_t K = m.K, G = K / 64;
  const uint8_t* P = static_cast<const uint8_t*>(m.codes);
  for (int64_t t = 0; t < T; ++t) {
    const float* xp = x + t * K;
    for (int64_t n = n0; n < n1; ++n) {
      __m256 acc = _mm256_setzero_ps();
      const uint8_t* row = P + n * (K / 2);
      for (int64_t g = 0; g < G; ++g) {
        const __m256 s = _mm256_set1_ps(_cvtsh_ss(m.scale[n * G + g]));
        const __m256 z = _mm256_set1_ps(_cvtsh_ss(m.zero[n * G + g]));
        for (int64_t j = 0; j < 64; j += 16) {
          const int64_t k = g * 64 + j;
          __m256 c0, c1;
          codes16(row + k / 2, &c0, &c1);
          acc = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_sub_ps(c0, z), s), _mm256_loadu_ps(xp + k), acc);
          acc = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_sub_ps(c1, z), s), _mm256_loadu_ps(xp + k + 8), acc);
        }
      }
      out[t * ldo + n] = hsum(acc);
    }
  }
}

// out[n, k] = (q[n, k] - zero) * scale in float32: fate.quant's dequantization, bit for bit
void q4_dequant(const Mat& m, int64_t n0, int64_t n1, float* out) {
  const int64_t K = m.K, G = K / 64;
  const uint8_t* P = static_cast<const uint8_t*>(m.codes);
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = P + n * (K / 2);
    float* o = out + n * K;
    for (int64_t g = 0; g < G; ++g) {
      const __m256 s = _mm256_set1_ps(_cvtsh_ss(m.scale[n * G + g]));
      const __m256 z = _mm256_set1_ps(_cvtsh_ss(m.zero[n * G + g]));
      for (int64_t j = 0; j < 64; j += 16) {
        const int64_t k = g * 64 + j;
        __m256 c0, c1;
        codes16(row + k / 2, &c0, &c1);
        _mm256_storeu_ps(o + k, _mm256_mul_ps(_mm256_sub_ps(c0, z), s));
        _mm256_storeu_ps(o + k + 8, _mm256_mul_ps(_mm256_sub_ps(c1, z), s));
      }
    }
  }
}

}  // namespace FATE_NS
