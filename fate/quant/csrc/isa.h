// Types shared by fate's native kernels: the glue (fate_kernels.cpp, which sees torch) and one translation
// unit per instruction set (isa_*.cpp, which see nothing but <immintrin.h> and this header, so that no
// function compiled for AVX-512 can stand in for a generic one).
#pragma once
#include <cstdint>

namespace fate {

// Activations of T tokens, K values each, quantized to 8 bits in blocks of 32 consecutive values:
// d = max|x| / 127 over the block, q = round(x * 127 / max|x|) (half to even), |q| <= 127.
struct Act8 {
  const int8_t* q;   // [T, K], in the order the weights' packing needs (see fate_kernels.cpp: plain, q4, q2)
  const float* d;    // [T, K / 32] block scales
  const float* gs;   // [T, K / g] the quantized sums d * sum(q) over each weight group (q4: g = 64, q2: g = 32)
  const float* d8;   // q4 only: [T, K / 64, 8], per group the d of its first 32-block four times, then its second's
  int64_t T, K;
};

// One weight matrix [N, K] as stored.
struct Mat {
  const void* codes;       // q4: uint8 [N, K/2]; q2: uint8 [N, K/4]; q8: int8 [N, K]; f16: half bits [N, K]
  const uint16_t* scale;   // half bits [N, K/g] (q4 g = 64, q2 g = 32, q8 g = 32); unused for f16
  const uint16_t* zero;    // half bits [N, K/g] (q4, q2)
  int64_t N, K;
};

constexpr int64_t MAX_GROUPS = 1024;  // groups per row the kernels keep on the stack (q4: K <= 65536)

}  // namespace fate

// The kernels every instruction-set unit defines (namespace fate_avx2, fate_avxvnni, fate_avx512vnni).
#define FATE_DECLARE_ISA(NS)                                                                                 \
  namespace NS {                                                                                             \
  void quant_rows(const float* x, int64_t K, int64_t t0, int64_t t1, int8_t* q, float* d, float* bs);       \
  void q4_i8(const fate::Act8& a, const fate::Mat& m, int64_t n0, int64_t n1, float* out, int64_t ldo);      \
  void q2_i8(const fate::Act8& a, const fate::Mat& m, int64_t n0, int64_t n1, float* out, int64_t ldo);      \
  void q8_i8(const fate::Act8& a, const fate::Mat& m, int64_t n0, int64_t n1, float* out, int64_t ldo);      \
  void f16_f32(const float* x, int64_t T, const fate::Mat& m, int64_t n0, int64_t n1, float* out,           \
               int64_t ldo);                                                                                 \
  void q4_f32(const float* x, int64_t T, const fate::Mat& m, int64_t n0, int64_t n1, float* out,            \
              int64_t ldo);                                                                                  \
  void q4_dequant(const fate::Mat& m, int64_t n0, int64_t n1, float* out);                                   \
  }

FATE_DECLARE_ISA(fate_avx2)
FATE_DECLARE_ISA(fate_avxvnni)
FATE_DECLARE_ISA(fate_avx512vnni)

namespace fate_avx512f {  // the fp32-activation INT4 rows with 512-bit registers (the reference path)
void q4_f32(const float* x, int64_t T, const fate::Mat& m, int64_t n0, int64_t n1, float* out, int64_t ldo);
}
