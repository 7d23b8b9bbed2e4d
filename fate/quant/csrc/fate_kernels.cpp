// fate's native CPU kernels: the torch-facing glue.  It checks arguments, quantizes activations, lays them out
// for the weights' packing and splits the rows of a product over fate's pool (pool.h: as many threads as torch
// is set to use, at::get_num_threads(), which fate-run -t sets).  The arithmetic lives in isa_body.h, compiled
// once per instruction set; set_isa picks the one this CPU runs.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <pthread.h>
#include <vector>

#include "pool.h"
#include "isa.h"

namespace {

using fate::Act8;
using fate::Mat;

enum Kind : int64_t { Q4_I8 = 0, Q2_I8 = 1, Q8_I8 = 2, F16 = 3, Q4_F32 = 4, Q4_F32_512 = 5 };
enum Layout : int64_t { PLAIN = 0, L_Q4 = 1, L_Q2 = 2 };

struct Isa {
  decltype(&fate_avx2::quant_rows) quant_rows;
  decltype(&fate_avx2::q4_i8) q4_i8, q2_i8, q8_i8;
  decltype(&fate_avx2::f16_f32) f16_f32, q4_f32;
  decltype(&fate_avx2::q4_dequant) q4_dequant;
};

#define FATE_ISA_TABLE(NS) \
  Isa { NS::quant_rows, NS::q4_i8, NS::q2_i8, NS::q8_i8, NS::f16_f32, NS::q4_f32, NS::q4_dequant }
const Isa ISAS[3] = {FATE_ISA_TABLE(fate_avx2), FATE_ISA_TABLE(fate_avxvnni), FATE_ISA_TABLE(fate_avx512vnni)};
int g_isa = 0;  // index into ISAS, set once by the Python side from the CPU's flags
std::atomic<int> g_threads{0};  // threads per product (set_threads); 0: torch's intra-op count

int threads() {
  const int n = g_threads.load(std::memory_order_relaxed);
  return n > 0 ? n : at::get_num_threads();
}

// 8-bit activations of one call; the buffers belong to the calling thread and are reused by its next call
struct ActBuf {
  std::vector<int8_t> plain, q;
  std::vector<float> d, bs, gs, d8;
};
thread_local ActBuf t_act;

// q4: per 64 values, the evens then the odds (the low and high nibbles of a 32-byte load)
void to_q4(const int8_t* p, int8_t* q, int64_t K) {
  for (int64_t s = 0; s < K; s += 64)
    for (int64_t j = 0; j < 32; ++j) {
      q[s + j] = p[s + 2 * j];
      q[s + 32 + j] = p[s + 2 * j + 1];
    }
}

// q2: per 128 values four planes of 32, plane k holding values 4j+k of each 32-group in turn; a shorter tail
// of GT groups the same way with planes of 8 * GT
void to_q2(const int8_t* p, int8_t* q, int64_t K) {
  const int64_t NS = K / 128, GT = (K - NS * 128) / 32;
  for (int64_t s = 0; s < NS; ++s)
    for (int64_t k = 0; k < 4; ++k)
      for (int64_t gl = 0; gl < 4; ++gl)
        for (int64_t j = 0; j < 8; ++j) q[s * 128 + 32 * k + 8 * gl + j] = p[s * 128 + 32 * gl + 4 * j + k];
  const int64_t base = NS * 128;
  for (int64_t k = 0; k < 4; ++k)
    for (int64_t gl = 0; gl < GT; ++gl)
      for (int64_t j = 0; j < 8; ++j) q[base + k * 8 * GT + 8 * gl + j] = p[base + 32 * gl + 4 * j + k];
}

Act8 quantize_into(const float* x, int64_t T, int64_t K, int64_t layout, ActBuf& b) {
  const Isa& isa = ISAS[g_isa];
  const int64_t B = K / 32;
  b.plain.resize(T * K);
  b.d.resize(T * B);
  b.bs.resize(T * B);
  if (layout != PLAIN) b.q.resize(T * K);
  if (layout == L_Q4) {
    b.gs.resize(T * (K / 64));
    b.d8.resize(T * (K / 64) * 8);
  }
  auto work = [&](int64_t t0, int64_t t1) {
    isa.quant_rows(x, K, t0, t1, b.plain.data(), b.d.data(), b.bs.data());
    for (int64_t t = t0; t < t1; ++t) {
      if (layout == L_Q4) {
        to_q4(b.plain.data() + t * K, b.q.data() + t * K, K);
        const float* d = b.d.data() + t * B;
        const float* bs = b.bs.data() + t * B;
        for (int64_t g = 0; g < K / 64; ++g) {
          b.gs[t * (K / 64) + g] = bs[2 * g] + bs[2 * g + 1];
          float* d8 = b.d8.data() + (t * (K / 64) + g) * 8;
          for (int i = 0; i < 4; ++i) d8[i] = d[2 * g], d8[4 + i] = d[2 * g + 1];
        }
      } else if (layout == L_Q2) {
        to_q2(b.plain.data() + t * K, b.q.data() + t * K, K);
      }
    }
  };
  if (T > 1) fate::parallel(threads(), T, [&](int64_t t) { work(t, t + 1); });
  else work(0, T);
  Act8 a;
  a.q = layout == PLAIN ? b.plain.data() : b.q.data();
  a.d = b.d.data();
  a.gs = layout == L_Q4 ? b.gs.data() : b.bs.data();
  a.d8 = layout == L_Q4 ? b.d8.data() : nullptr;
  a.T = T;
  a.K = K;
  return a;
}

const uint16_t* half_ptr(const torch::Tensor& t) { return reinterpret_cast<const uint16_t*>(t.data_ptr<at::Half>()); }

// the matrices of a product, checked against its kind
std::vector<Mat> matrices(const std::vector<std::vector<torch::Tensor>>& mats, int64_t kind, int64_t K) {
  std::vector<Mat> out;
  const int64_t g = kind == Q4_I8 || kind >= Q4_F32 ? 64 : 32;
  for (const auto& parts : mats) {
    Mat m{};
    m.K = K;
    if (kind == F16) {
      TORCH_CHECK(parts.size() == 1, "f16: one tensor per matrix");
      const auto& w = parts[0];
      TORCH_CHECK(w.dtype() == torch::kFloat16 && w.is_contiguous() && w.dim() == 2 && w.size(1) == K,
                  "f16 weight: [N, K] float16, contiguous, K matching x");
      m.codes = w.data_ptr();
      m.N = w.size(0);
    } else {
      const bool zeros = kind != Q8_I8;
      TORCH_CHECK(parts.size() == (zeros ? 3u : 2u), "a quantized matrix is (codes, scale", zeros ? ", zero)" : ")");
      const auto& c = parts[0];
      const int64_t per = kind == Q8_I8 ? 1 : (kind == Q2_I8 ? 4 : 2);  // codes per byte
      TORCH_CHECK((kind == Q8_I8 ? c.dtype() == torch::kInt8 : c.dtype() == torch::kUInt8) && c.is_contiguous()
                  && c.dim() == 2 && c.size(1) * per == K, "codes: [N, K * bits / 8] contiguous, K matching x");
      TORCH_CHECK(K % g == 0, "K must be a multiple of the group size ", g);
      TORCH_CHECK(K / g <= fate::MAX_GROUPS, "K / group size must be at most ", fate::MAX_GROUPS);
      m.N = c.size(0);
      m.codes = c.data_ptr();
      const int64_t G = m.N * (K / g);
      for (size_t i = 1; i < parts.size(); ++i)
        TORCH_CHECK(parts[i].dtype() == torch::kFloat16 && parts[i].is_contiguous() && parts[i].numel() == G,
                    "scale/zero: [N, K / group] float16, contiguous");
      m.scale = half_ptr(parts[1]);
      m.zero = zeros ? half_ptr(parts[2]) : nullptr;
    }
    out.push_back(m);
  }
  return out;
}

}  // namespace

// threads per product from now on (0: follow torch's intra-op count)
void set_threads(int64_t n) {
  TORCH_CHECK(n >= 0 && n <= 1024, "threads: 0 (torch's count) to 1024");
  g_threads.store(static_cast<int>(n), std::memory_order_relaxed);
}

int64_t get_threads() { return threads(); }

void set_isa(int64_t isa) {
  TORCH_CHECK(isa >= 0 && isa < 3, "isa: 0 avx2, 1 avxvnni, 2 avx512vnni");
  g_isa = static_cast<int>(isa);
}

// x [T, K] float32 times each matrix (transposed), the outputs side by side: [T, sum N] float32
torch::Tensor mm(torch::Tensor x, std::vector<std::vector<torch::Tensor>> mats, int64_t kind,
                 c10::optional<torch::Tensor> out) {
  TORCH_CHECK(kind >= Q4_I8 && kind <= Q4_F32_512, "unknown kind ", kind);
  TORCH_CHECK(x.dtype() == torch::kFloat32 && x.is_contiguous() && x.dim() == 2, "x: [T, K] float32, contiguous");
  const int64_t T = x.size(0), K = x.size(1);
  TORCH_CHECK(K % 32 == 0, "K must be a multiple of 32");
  const std::vector<Mat> ms = matrices(mats, kind, K);
  std::vector<int64_t> first{0};
  for (const Mat& m : ms) first.push_back(first.back() + m.N);
  const int64_t R = first.back();
  torch::Tensor y;
  if (out.has_value()) {
    y = *out;
    TORCH_CHECK(y.dtype() == torch::kFloat32 && y.is_contiguous() && y.dim() == 2 && y.size(0) == T && y.size(1) == R,
                "out: [T, sum N] float32, contiguous");
  } else {
    y = torch::empty({T, R}, x.options());
  }
  if (T == 0 || R == 0) return y;
  const Isa& isa = ISAS[g_isa];
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  Act8 a{};
  if (kind <= Q8_I8) a = quantize_into(xp, T, K, kind == Q4_I8 ? L_Q4 : (kind == Q2_I8 ? L_Q2 : PLAIN), t_act);
  // rows in units that are a multiple of 4 (the one-token kernels take four rows at a time): about eight per
  // thread, so that a thread that starts late leaves its share to the others, and none below ~32K multiply-adds
  const int nt = threads();
  const int64_t quads = (R + 3) / 4;
  const int64_t min_quads = std::max<int64_t>(1, (1 << 15) / std::max<int64_t>(1, 4 * K * T));
  const int64_t per = std::max(min_quads, (quads + 8 * nt - 1) / (8 * nt));
  const int64_t units = (quads + per - 1) / per;
  fate::parallel(nt, units, [&](int64_t u) {
    const int64_t r0 = u * per * 4, r1 = std::min(R, (u + 1) * per * 4);
    for (size_t j = 0; j < ms.size(); ++j) {
      const int64_t lo = std::max(r0, first[j]), hi = std::min(r1, first[j + 1]);
      if (lo >= hi) continue;
      const Mat& m = ms[j];
      float* o = yp + first[j];  // column offset of matrix j; rows of m are lo - first[j] ..
      const int64_t n0 = lo - first[j], n1 = hi - first[j];
      switch (kind) {
        case Q4_I8: isa.q4_i8(a, m, n0, n1, o, R); break;
        case Q2_I8: isa.q2_i8(a, m, n0, n1, o, R); break;
        case Q8_I8: isa.q8_i8(a, m, n0, n1, o, R); break;
        case F16: isa.f16_f32(xp, T, m, n0, n1, o, R); break;
        case Q4_F32: isa.q4_f32(xp, T, m, n0, n1, o, R); break;
        default: fate_avx512f::q4_f32(xp, T, m, n0, n1, o, R);
      }
    }
  });
  return y;
}

// The 8-bit activations a product of `layout` (0 plain / q8, 1 q4, 2 q2) computes with: (q, d, gs) — q [T, K]
// int8 in that layout, d [T, K/32] block scales, gs the quantized group sums (q4: [T, K/64]; else [T, K/32]).
std::vector<torch::Tensor> quantize(torch::Tensor x, int64_t layout) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && x.is_contiguous() && x.dim() == 2, "x: [T, K] float32, contiguous");
  const int64_t T = x.size(0), K = x.size(1);
  TORCH_CHECK(K % (layout == L_Q4 ? 64 : 32) == 0, "K must be a multiple of the group size");
  ActBuf b;
  const Act8 a = quantize_into(x.data_ptr<float>(), T, K, layout, b);
  const int64_t G = layout == L_Q4 ? K / 64 : K / 32;
  auto q = torch::empty({T, K}, torch::kInt8), d = torch::empty({T, K / 32}), gs = torch::empty({T, G});
  std::memcpy(q.data_ptr(), a.q, T * K);
  std::memcpy(d.data_ptr(), a.d, T * (K / 32) * sizeof(float));
  std::memcpy(gs.data_ptr(), a.gs, T * G * sizeof(float));
  return {q, d, gs};
}

void q4_dequant(torch::Tensor packed, torch::Tensor scale, torch::Tensor zero, torch::Tensor out) {
  TORCH_CHECK(packed.dtype() == torch::kUInt8 && packed.is_contiguous() && packed.dim() == 2, "packed: [N, K/2] uint8");
  const int64_t N = packed.size(0), K = packed.size(1) * 2, G = K / 64;
  TORCH_CHECK(K % 64 == 0, "K must be a multiple of 64");
  TORCH_CHECK(scale.dtype() == torch::kFloat16 && zero.dtype() == torch::kFloat16 && scale.is_contiguous()
              && zero.is_contiguous() && scale.numel() == N * G && zero.numel() == N * G, "scale/zero: [N, K/64] float16");
  TORCH_CHECK(out.dtype() == torch::kFloat32 && out.is_contiguous() && out.numel() == N * K, "out: [N, K] float32");
  Mat m{packed.data_ptr(), half_ptr(scale), half_ptr(zero), N, K};
  float* op = out.data_ptr<float>();
  const Isa& isa = ISAS[g_isa];
  const int64_t units = (N + 63) / 64;
  fate::parallel(threads(), units, [&](int64_t u) { isa.q4_dequant(m, u * 64, std::min(N, (u + 1) * 64), op); });
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  mod.def("set_isa", &set_isa);
  mod.def("set_threads", &set_threads);
  mod.def("get_threads", &get_threads);
  mod.def("mm", &mm, pybind11::arg("x"), pybind11::arg("mats"), pybind11::arg("kind"),
          pybind11::arg("out") = pybind11::none());
  mod.def("quantize", &quantize);
  mod.def("q4_dequant", &q4_dequant);
}
