// Float32 CPU kernels for the small ops of a decode step, each one call instead of the 3-10 torch
// ops (and their dispatch and temporaries) of the reference in ascend_llm/ops/cpu.py: RMSNorm,
// add + RMSNorm, neox rotary embedding, SiLU-and-mul, the paged KV-cache write, and attention of
// one new token per sequence over its paged context (read in place from the block table, no
// gather). Same math as the reference, fp32 throughout; rows are split over torch's intra-op
// threads when there are enough of them. Registered as torch.ops.ascend_llm_cpu.*; built with
// cpu_gemv.cpp into one library by ascend_llm/ops/cpu_extension.py.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define ASCEND_LLM_AVX2 1
#endif

namespace {

constexpr int64_t kRowGrainElements = 16384;   // ~64 KiB of fp32 per parallel task

#ifdef ASCEND_LLM_AVX2
inline float hsum(__m256 a) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  s = _mm_hadd_ps(s, s);
  s = _mm_hadd_ps(s, s);
  return _mm_cvtss_f32(s);
}
#endif

inline float dot(const float* a, const float* b, int64_t n) {
  int64_t i = 0;
  float sum = 0.f;
#ifdef ASCEND_LLM_AVX2
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  for (; i + 16 <= n; i += 16) {
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), acc1);
  }
  for (; i + 8 <= n; i += 8) acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
  sum = hsum(_mm256_add_ps(acc0, acc1));
#endif
  for (; i < n; ++i) sum += a[i] * b[i];
  return sum;
}

// y[i] += a * x[i]
inline void axpy(float a, const float* x, float* y, int64_t n) {
  int64_t i = 0;
#ifdef ASCEND_LLM_AVX2
  const __m256 va = _mm256_set1_ps(a);
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, _mm256_fmadd_ps(va, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
#endif
  for (; i < n; ++i) y[i] += a * x[i];
}

#ifdef ASCEND_LLM_AVX2
// e^x for 8 floats: x = k ln2 + r with |r| <= ln2 / 2, e^r by a degree-6 polynomial, 2^k through the
// exponent bits; relative error ~2e-7 over the clamped range [-87.3, 88] (e^x underflows to ~0 below)
inline __m256 exp8(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.f));
  const __m256 k = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(k, _mm256_set1_ps(0.693359375f), x);    // ln2 split in two for precision
  r = _mm256_fnmadd_ps(k, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.f)));
  const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(k), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
}
#endif

// s[i] = e^(s[i] - shift) in place; returns their sum
inline float exp_shifted(float* s, int64_t n, float shift) {
  int64_t i = 0;
  float sum = 0.f;
#ifdef ASCEND_LLM_AVX2
  const __m256 vs = _mm256_set1_ps(shift);
  __m256 acc = _mm256_setzero_ps();
  for (; i + 8 <= n; i += 8) {
    const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(s + i), vs));
    _mm256_storeu_ps(s + i, e);
    acc = _mm256_add_ps(acc, e);
  }
  sum = hsum(acc);
#endif
  for (; i < n; ++i) sum += (s[i] = std::exp(s[i] - shift));
  return sum;
}

int64_t row_grain(int64_t row_elements) {
  return std::max<int64_t>(1, kRowGrainElements / std::max<int64_t>(row_elements, 1));
}

void check_float(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat, op, ": ", name, " must be float32, got ", t.scalar_type());
}

void check_rows(const at::Tensor& x, const at::Tensor& weight, const char* op) {
  check_float(x, op, "x");
  check_float(weight, op, "weight");
  TORCH_CHECK(x.dim() == 2, op, ": x must be [num_tokens, hidden], got ", x.sizes());
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == x.size(1), op, ": weight must be [", x.size(1),
              "], got ", weight.sizes());
}

// out = x * rsqrt(mean(x^2) + eps) * weight, one row of h
inline void rms_row(const float* x, const float* w, float eps, float* out, int64_t h) {
  const float r = 1.f / std::sqrt(dot(x, x, h) / static_cast<float>(h) + eps);
  for (int64_t i = 0; i < h; ++i) out[i] = x[i] * r * w[i];
}

// x: [num_tokens, hidden], weight: [hidden] -> [num_tokens, hidden]
at::Tensor rms_norm(const at::Tensor& x_in, const at::Tensor& weight_in, double eps) {
  check_rows(x_in, weight_in, "rms_norm");
  const at::Tensor x = x_in.contiguous(), w = weight_in.contiguous();
  at::Tensor out = at::empty_like(x);
  const int64_t h = x.size(1);
  const float* xp = x.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, x.size(0), row_grain(h), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) rms_row(xp + t * h, wp, static_cast<float>(eps), op + t * h, h);
  });
  return out;
}

// (rms_norm(x + residual), x + residual); x, residual: [num_tokens, hidden]
std::tuple<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& x_in, const at::Tensor& residual_in,
                                                const at::Tensor& weight_in, double eps) {
  check_rows(x_in, weight_in, "add_rms_norm");
  check_float(residual_in, "add_rms_norm", "residual");
  TORCH_CHECK(residual_in.sizes() == x_in.sizes(), "add_rms_norm: residual ", residual_in.sizes(),
              " and x ", x_in.sizes(), " differ");
  const at::Tensor x = x_in.contiguous(), res = residual_in.contiguous(), w = weight_in.contiguous();
  at::Tensor sum = at::empty_like(x), out = at::empty_like(x);
  const int64_t h = x.size(1);
  const float* xp = x.data_ptr<float>();
  const float* rp = res.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  float* sp = sum.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, x.size(0), row_grain(h), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      float* s = sp + t * h;
      for (int64_t i = 0; i < h; ++i) s[i] = xp[t * h + i] + rp[t * h + i];
      rms_row(s, wp, static_cast<float>(eps), op + t * h, h);
    }
  });
  return {out, sum};
}

// x: [num_tokens, num_heads, head_dim] (any strides, head_dim contiguous) -> contiguous rotated copy;
// cos/sin: [num_tokens, head_dim] as (cos | cos) and (-sin | sin): out = x * cos + roll(x, d/2) * sin
at::Tensor rotate(const at::Tensor& x, const float* cos, const float* sin) {
  TORCH_CHECK(x.dim() == 3 && x.stride(2) == 1, "rope: query/key must be [num_tokens, heads, head_dim] "
              "with head_dim contiguous, got ", x.sizes(), " strides ", x.strides());
  const int64_t tokens = x.size(0), heads = x.size(1), d = x.size(2), half = d / 2;
  at::Tensor out = at::empty({tokens, heads, d}, x.options());
  const float* xp = x.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t s0 = x.stride(0), s1 = x.stride(1);
  at::parallel_for(0, tokens, row_grain(heads * d), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const float* c = cos + t * d;
      const float* s = sin + t * d;
      for (int64_t h = 0; h < heads; ++h) {
        const float* src = xp + t * s0 + h * s1;
        float* dst = op + (t * heads + h) * d;
        for (int64_t i = 0; i < half; ++i) dst[i] = src[i] * c[i] + src[i + half] * s[i];
        for (int64_t i = half; i < d; ++i) dst[i] = src[i] * c[i] + src[i - half] * s[i];
      }
    }
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> rope(const at::Tensor& query, const at::Tensor& key,
                                        const at::Tensor& cos_in, const at::Tensor& sin_in) {
  for (const auto* t : {&query, &key, &cos_in, &sin_in}) check_float(*t, "rope", "every input");
  const int64_t tokens = query.size(0), d = query.size(-1);
  TORCH_CHECK(d % 2 == 0, "rope: head_dim must be even, got ", d);
  TORCH_CHECK(key.dim() == 3 && key.size(0) == tokens && key.size(2) == d, "rope: key ", key.sizes(),
              " does not match query ", query.sizes());
  TORCH_CHECK(cos_in.numel() == tokens * d && sin_in.numel() == tokens * d,
              "rope: cos/sin must hold [num_tokens, head_dim] = [", tokens, ", ", d, "] values, got ",
              cos_in.sizes(), " and ", sin_in.sizes());
  const at::Tensor cos = cos_in.contiguous(), sin = sin_in.contiguous();
  return {rotate(query, cos.data_ptr<float>(), sin.data_ptr<float>()),
          rotate(key, cos.data_ptr<float>(), sin.data_ptr<float>())};
}

// x: [num_tokens, 2 * d] (gate | up) -> silu(gate) * up: [num_tokens, d]
at::Tensor silu_and_mul(const at::Tensor& x_in) {
  check_float(x_in, "silu_and_mul", "x");
  TORCH_CHECK(x_in.dim() == 2 && x_in.size(1) % 2 == 0, "silu_and_mul: x must be [num_tokens, 2 * d], got ",
              x_in.sizes());
  const at::Tensor x = x_in.contiguous();
  const int64_t tokens = x.size(0), d = x.size(1) / 2;
  at::Tensor out = at::empty({tokens, d}, x.options());
  const float* xp = x.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, tokens, row_grain(2 * d), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const float* gate = xp + t * 2 * d;
      const float* up = gate + d;
      float* o = op + t * d;
      int64_t i = 0;
#ifdef ASCEND_LLM_AVX2
      const __m256 one = _mm256_set1_ps(1.f);
      for (; i + 8 <= d; i += 8) {
        const __m256 g = _mm256_loadu_ps(gate + i);
        const __m256 sig = _mm256_div_ps(one, _mm256_add_ps(one, exp8(_mm256_sub_ps(_mm256_setzero_ps(), g))));
        _mm256_storeu_ps(o + i, _mm256_mul_ps(_mm256_mul_ps(g, sig), _mm256_loadu_ps(up + i)));
      }
#endif
      for (; i < d; ++i) o[i] = gate[i] / (1.f + std::exp(-gate[i])) * up[i];
    }
  });
  return out;
}

void check_cache(const at::Tensor& cache, const char* name) {
  check_float(cache, "paged KV cache", name);
  TORCH_CHECK(cache.dim() == 4 && cache.is_contiguous(), "paged KV cache: ", name,
              " must be a contiguous [num_blocks, block_size, num_kv_heads, head_dim], got ", cache.sizes());
}

// key/value: [num_tokens, num_kv_heads, head_dim] (head_dim contiguous) written into the caches
// [num_blocks, block_size, num_kv_heads, head_dim] at flat slots slot_mapping [num_tokens]
void reshape_and_cache(const at::Tensor& key, const at::Tensor& value, at::Tensor k_cache,
                       at::Tensor v_cache, const at::Tensor& slot_mapping_in) {
  check_cache(k_cache, "k_cache");
  check_cache(v_cache, "v_cache");
  TORCH_CHECK(k_cache.sizes() == v_cache.sizes(), "reshape_and_cache: k_cache and v_cache differ");
  const int64_t heads = k_cache.size(2), d = k_cache.size(3);
  const int64_t num_slots = k_cache.size(0) * k_cache.size(1);
  const at::Tensor slots = slot_mapping_in.to(at::kLong).contiguous();
  const int64_t tokens = slots.numel();
  const int64_t* sp = slots.data_ptr<int64_t>();
  for (int64_t t = 0; t < tokens; ++t) {
    TORCH_CHECK(sp[t] >= 0 && sp[t] < num_slots, "reshape_and_cache: slot ", sp[t], " outside the cache (",
                num_slots, " slots)");
  }
  for (const auto* src : {&key, &value}) {
    check_float(*src, "reshape_and_cache", "key/value");
    TORCH_CHECK(src->dim() == 3 && src->size(0) == tokens && src->size(1) == heads && src->size(2) == d &&
                src->stride(2) == 1, "reshape_and_cache: key/value must be [", tokens, ", ", heads, ", ", d,
                "] with head_dim contiguous, got ", src->sizes());
  }
  for (int pass = 0; pass < 2; ++pass) {
    const at::Tensor& src = pass == 0 ? key : value;
    float* dst = (pass == 0 ? k_cache : v_cache).data_ptr<float>();
    const float* xp = src.data_ptr<float>();
    for (int64_t t = 0; t < tokens; ++t) {
      for (int64_t h = 0; h < heads; ++h) {
        std::copy_n(xp + t * src.stride(0) + h * src.stride(1), d, dst + (sp[t] * heads + h) * d);
      }
    }
  }
}

// Attention of one query token per sequence over its paged context, flash-decoding style: each
// sequence's context is cut into chunks (a number fixed by its own length, never by the thread count
// or the rest of the batch, so results are bitwise the same alone, batched, or on any thread count);
// one task per (sequence, chunk) reads the chunk's K/V rows once for every head and leaves a partial
// (running max, exp-sum, unnormalised output) per head; a second pass merges the partials.
// query: [num_seqs, num_heads, head_dim]; caches: [num_blocks, block_size, num_kv_heads, head_dim];
// block_tables: [num_seqs, max_blocks]; context_lens: [num_seqs] -> [num_seqs, num_heads, head_dim]
constexpr int64_t kMinChunkTokens = 64;
constexpr int64_t kMaxChunksPerSeq = 8;

int64_t chunk_tokens(int64_t ctx) {
  return std::max(kMinChunkTokens, (ctx + kMaxChunksPerSeq - 1) / kMaxChunksPerSeq);
}

void check_block_tables(const int64_t* tp, const int64_t* lp, int64_t seqs, int64_t max_blocks,
                        int64_t block_size, int64_t num_blocks) {
  for (int64_t n = 0; n < seqs; ++n) {
    TORCH_CHECK(lp[n] >= 1 && lp[n] <= max_blocks * block_size, "decode_attention: context length ", lp[n],
                " of sequence ", n, " does not fit its ", max_blocks, " blocks");
    for (int64_t b = 0; b < (lp[n] + block_size - 1) / block_size; ++b) {
      const int64_t block = tp[n * max_blocks + b];
      TORCH_CHECK(block >= 0 && block < num_blocks, "decode_attention: block ", block, " outside the cache");
    }
  }
}

// One chunk [t0, t1) of one sequence, every head: partial[h] = (sum_t p_t * v_t | max score | sum_t p_t)
// with p_t = exp(score_t - max score); partial: [heads, d + 2]
void attend_chunk(const float* q, const float* kp, const float* vp, const int64_t* table, int64_t block_size,
                  int64_t t0, int64_t t1, int64_t heads, int64_t kv_heads, int64_t d, float scale,
                  std::vector<float>& scores, float* partial) {
  const int64_t len = t1 - t0, group = heads / kv_heads, row = kv_heads * d;
  scores.resize(heads * len);
  for (int64_t t = t0; t < t1; ++t) {
    const float* k = kp + (table[t / block_size] * block_size + t % block_size) * row;   // [kv_heads, d]
    for (int64_t h = 0; h < heads; ++h) scores[h * len + t - t0] = dot(q + h * d, k + (h / group) * d, d) * scale;
  }
  for (int64_t h = 0; h < heads; ++h) {
    float* s = scores.data() + h * len;
    const float mx = *std::max_element(s, s + len);
    float* p = partial + h * (d + 2);
    p[d] = mx;
    p[d + 1] = exp_shifted(s, len, mx);
    std::fill_n(p, d, 0.f);
  }
  for (int64_t t = t0; t < t1; ++t) {
    const float* v = vp + (table[t / block_size] * block_size + t % block_size) * row;
    for (int64_t h = 0; h < heads; ++h) axpy(scores[h * len + t - t0], v + (h / group) * d, partial + h * (d + 2), d);
  }
}

at::Tensor decode_attention(const at::Tensor& query_in, const at::Tensor& k_cache, const at::Tensor& v_cache,
                            const at::Tensor& block_tables_in, const at::Tensor& context_lens_in, double scale) {
  check_float(query_in, "decode_attention", "query");
  check_cache(k_cache, "k_cache");
  check_cache(v_cache, "v_cache");
  TORCH_CHECK(k_cache.sizes() == v_cache.sizes(), "decode_attention: k_cache and v_cache differ");
  TORCH_CHECK(query_in.dim() == 3, "decode_attention: query must be [num_seqs, num_heads, head_dim], got ",
              query_in.sizes());
  const at::Tensor q = query_in.contiguous();
  const at::Tensor tables = block_tables_in.to(at::kLong).contiguous();
  const at::Tensor lens = context_lens_in.to(at::kLong).contiguous();
  const int64_t seqs = q.size(0), heads = q.size(1), d = q.size(2);
  const int64_t num_blocks = k_cache.size(0), block_size = k_cache.size(1), kv_heads = k_cache.size(2);
  TORCH_CHECK(k_cache.size(3) == d, "decode_attention: query ", q.sizes(),
              " does not match the cache ", k_cache.sizes());
  TORCH_CHECK(kv_heads > 0 && heads % kv_heads == 0, "decode_attention: ", heads,
              " query heads are not a multiple of ", kv_heads, " KV heads");
  TORCH_CHECK(tables.dim() == 2 && tables.size(0) == seqs && lens.numel() == seqs,
              "decode_attention: block_tables ", tables.sizes(), " / context_lens ", lens.sizes(),
              " do not match ", seqs, " sequences");
  const int64_t max_blocks = tables.size(1);
  const int64_t* tp = tables.data_ptr<int64_t>();
  const int64_t* lp = lens.data_ptr<int64_t>();
  check_block_tables(tp, lp, seqs, max_blocks, block_size, num_blocks);
  // task i covers tokens [task_start[i], min(start + chunk, ctx)) of sequence task_seq[i]
  std::vector<int64_t> task_seq, task_start, first_task(seqs + 1, 0);
  for (int64_t n = 0; n < seqs; ++n) {
    first_task[n] = static_cast<int64_t>(task_seq.size());
    for (int64_t t = 0; t < lp[n]; t += chunk_tokens(lp[n])) {
      task_seq.push_back(n);
      task_start.push_back(t);
    }
  }
  first_task[seqs] = static_cast<int64_t>(task_seq.size());
  const int64_t tasks = first_task[seqs];
  at::Tensor partials = at::empty({tasks, heads, d + 2}, q.options());
  const float* qp = q.data_ptr<float>();
  const float* kp = k_cache.data_ptr<float>();
  const float* vp = v_cache.data_ptr<float>();
  float* pp = partials.data_ptr<float>();
  const float sc = static_cast<float>(scale);
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    for (int64_t i = begin; i < end; ++i) {
      const int64_t n = task_seq[i], t0 = task_start[i], t1 = std::min(lp[n], t0 + chunk_tokens(lp[n]));
      attend_chunk(qp + n * heads * d, kp, vp, tp + n * max_blocks, block_size, t0, t1, heads, kv_heads, d, sc,
                   scores, pp + i * heads * (d + 2));
    }
  });
  at::Tensor out = at::empty({seqs, heads, d}, q.options());
  float* op = out.data_ptr<float>();
  at::parallel_for(0, seqs * heads, 64, [&](int64_t begin, int64_t end) {
    for (int64_t sh = begin; sh < end; ++sh) {
      const int64_t n = sh / heads, h = sh % heads;
      float mx = -std::numeric_limits<float>::infinity();
      for (int64_t i = first_task[n]; i < first_task[n + 1]; ++i) mx = std::max(mx, pp[(i * heads + h) * (d + 2) + d]);
      float* o = op + sh * d;
      std::fill_n(o, d, 0.f);
      float total = 0.f;
      for (int64_t i = first_task[n]; i < first_task[n + 1]; ++i) {
        const float* p = pp + (i * heads + h) * (d + 2);
        const float w = std::exp(p[d] - mx);
        total += w * p[d + 1];
        axpy(w, p, o, d);
      }
      const float inv = 1.f / total;
      for (int64_t j = 0; j < d; ++j) o[j] *= inv;
    }
  });
  return out;
}

// How many threads at::parallel_for runs a 64-task loop on: torch's thread count when the library
// was built with OpenMP, 1 when it was not (a check of the build, see cpu_extension.py).
int64_t parallel_workers() {
  std::atomic<int64_t> workers{0};
  at::parallel_for(0, 64, 1, [&](int64_t, int64_t) {
    const int64_t mine = at::get_thread_num() + 1;
    int64_t seen = workers.load();
    while (seen < mine && !workers.compare_exchange_weak(seen, mine)) {
    }
  });
  return workers.load();
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(ascend_llm_cpu, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("add_rms_norm(Tensor x, Tensor residual, Tensor weight, float eps) -> (Tensor, Tensor)");
  m.def("rope(Tensor query, Tensor key, Tensor cos, Tensor sin) -> (Tensor, Tensor)");
  m.def("silu_and_mul(Tensor x) -> Tensor");
  m.def("parallel_workers() -> int", &parallel_workers);    // no tensors: a catch-all kernel
  m.def("reshape_and_cache(Tensor key, Tensor value, Tensor(a!) k_cache, Tensor(b!) v_cache, "
        "Tensor slot_mapping) -> ()");
  m.def("decode_attention(Tensor query, Tensor k_cache, Tensor v_cache, Tensor block_tables, "
        "Tensor context_lens, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(ascend_llm_cpu, CPU, m) {
  m.impl("rms_norm", &rms_norm);
  m.impl("add_rms_norm", &add_rms_norm);
  m.impl("rope", &rope);
  m.impl("silu_and_mul", &silu_and_mul);
  m.impl("reshape_and_cache", &reshape_and_cache);
  m.impl("decode_attention", &decode_attention);
}
