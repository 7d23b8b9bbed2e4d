// The float32-activation INT4 rows with 512-bit registers: fate's reference INT4 product on CPUs with AVX-512
// (each weight dequantized in registers as fate.quant does, then multiplied in; see isa_body.h q4_f32).
#include <immintrin.h>

#include "isa.h"

#pragma GCC target("avx512f,f16c,fma")

namespace fate_avx512f {

void q4_f32(const float* x, int64_t T, const fate::Mat& m, int64_t n0, int64_t n1, float* out, int64_t ldo) {
  const int64_t K = m.K, G = K / 64;
  const uint8_t* P = static_cast<const uint8_t*>(m.codes);
  const __m512i low = _mm512_set1_epi32(15);
  const __m512i first = _mm512_set_epi32(23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  const __m512i second = _mm512_set_epi32(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8);
  for (int64_t t = 0; t < T; ++t) {
    const float* xp = x + t * K;
    for (int64_t n = n0; n < n1; ++n) {
      __m512 acc = _mm512_setzero_ps();
      const uint8_t* row = P + n * (K / 2);
      for (int64_t g = 0; g < G; ++g) {
        const __m512 s = _mm512_set1_ps(_cvtsh_ss(m.scale[n * G + g]));
        const __m512 z = _mm512_set1_ps(_cvtsh_ss(m.zero[n * G + g]));
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
      out[t * ldo + n] = _mm512_reduce_add_ps(acc);
    }
  }
}

}  // namespace fate_avx512f
