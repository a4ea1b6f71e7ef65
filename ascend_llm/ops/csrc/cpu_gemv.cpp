// Float32 GEMV for CPU decode: out[m, n] = x[m, k] . w[n, k] (+ bias[n]) for 1 <= m <= 4 rows.
// Weight rows are streamed once, in memory order, each dotted with every row of x (AVX2/FMA when
// the compiler targets them, plain C++ otherwise); output rows are split over torch's intra-op
// threads. Registered as torch.ops.ascend_llm_cpu.gemv; built with cpu_decode.cpp into one library by
// ascend_llm/ops/cpu_extension.py.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define ASCEND_LLM_AVX2 1
#endif

namespace {

constexpr int64_t kMaxRows = 4;

template <int M>
void gemv_rows(const float* x, const float* w, const float* bias, float* out,
               int64_t k, int64_t n, int64_t begin, int64_t end) {
  for (int64_t j = begin; j < end; ++j) {
    const float* wj = w + j * k;
    float sums[M];
    int64_t i = 0;
#ifdef ASCEND_LLM_AVX2
    __m256 acc0[M], acc1[M];
    for (int r = 0; r < M; ++r) {
      acc0[r] = _mm256_setzero_ps();
      acc1[r] = _mm256_setzero_ps();
    }
    for (; i + 16 <= k; i += 16) {
      const __m256 w0 = _mm256_loadu_ps(wj + i);
      const __m256 w1 = _mm256_loadu_ps(wj + i + 8);
      for (int r = 0; r < M; ++r) {
        acc0[r] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + r * k + i), acc0[r]);
        acc1[r] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + r * k + i + 8), acc1[r]);
      }
    }
    for (int r = 0; r < M; ++r) {
      const __m256 a = _mm256_add_ps(acc0[r], acc1[r]);
      __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
      s = _mm_hadd_ps(s, s);
      s = _mm_hadd_ps(s, s);
      sums[r] = _mm_cvtss_f32(s);
    }
#else
    for (int r = 0; r < M; ++r) sums[r] = 0.f;
#endif
    for (; i < k; ++i) {
      for (int r = 0; r < M; ++r) sums[r] += wj[i] * x[r * k + i];
    }
    for (int r = 0; r < M; ++r) out[r * n + j] = sums[r] + (bias != nullptr ? bias[j] : 0.f);
  }
}

at::Tensor gemv(const at::Tensor& x_in, const at::Tensor& w, const c10::optional<at::Tensor>& bias_in) {
  TORCH_CHECK(x_in.dim() == 2 && w.dim() == 2, "gemv: x [m, k] and w [n, k] expected, got ",
              x_in.sizes(), " and ", w.sizes());
  TORCH_CHECK(x_in.size(1) == w.size(1), "gemv: x has ", x_in.size(1), " columns, w has ", w.size(1));
  TORCH_CHECK(x_in.scalar_type() == at::kFloat && w.scalar_type() == at::kFloat, "gemv: float32 only");
  TORCH_CHECK(x_in.size(0) >= 1 && x_in.size(0) <= kMaxRows, "gemv: 1 to 4 rows, got ", x_in.size(0));
  TORCH_CHECK(w.is_contiguous(), "gemv: the weight must be contiguous");
  const at::Tensor x = x_in.contiguous();
  at::Tensor bias;
  if (bias_in.has_value() && bias_in->defined()) {
    bias = bias_in->contiguous();
    TORCH_CHECK(bias.scalar_type() == at::kFloat && bias.numel() == w.size(0), "gemv: bias must be float32 [n]");
  }
  const int64_t m = x.size(0), k = x.size(1), n = w.size(0);
  at::Tensor out = at::empty({m, n}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  const float* bp = bias.defined() ? bias.data_ptr<float>() : nullptr;
  float* op = out.data_ptr<float>();
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(k, 1));   // ~64 KiB of weight per task
  at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
    switch (m) {
      case 1: gemv_rows<1>(xp, wp, bp, op, k, n, begin, end); break;
      case 2: gemv_rows<2>(xp, wp, bp, op, k, n, begin, end); break;
      case 3: gemv_rows<3>(xp, wp, bp, op, k, n, begin, end); break;
      default: gemv_rows<4>(xp, wp, bp, op, k, n, begin, end); break;
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(ascend_llm_cpu, m) {
  m.def("gemv(Tensor x, Tensor w, Tensor? bias) -> Tensor");
}

TORCH_LIBRARY_IMPL(ascend_llm_cpu, CPU, m) {
  m.impl("gemv", &gemv);
}
