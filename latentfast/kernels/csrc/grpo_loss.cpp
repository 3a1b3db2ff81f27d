// Native CPU kernels for the per-chunk softmax work of the fused lm_head + GRPO loss.
//
// Same semantics as latentfast/ops/grpo_loss.py::_torch_logit_stats / _torch_logit_grad_
// (and the Triton kernels in kernels/grpo_loss.py), but one pass over each row of the
// (R, V) logits chunk instead of several full-tensor passes:
//
//   latentfast_native::logit_stats(L, ids, inv_t) -> (lse, logp[ids], entropy)   fp32 (R,)
//   latentfast_native::logit_grad_(L, ids, lse, g, inv_t) -> L                   in place:
//       L <- g * inv_t * (onehot(ids) - softmax(L * inv_t))
//
// L is fp32, bf16 or fp16 with unit column stride; statistics accumulate in fp32.
// Rows run in parallel (at::parallel_for). Each row is walked in tiles of TILE values:
// a tile is read from memory once, converted/scaled into a small fp32 buffer, and the
// vector loops below (max, exp, sums) run over that L1-resident buffer. The loops are
// plain C++ written so the compiler vectorises them without -ffast-math (per-lane
// partial sums, a polynomial exp with no library call); on x86-64 Linux they are
// compiled for AVX-512F, AVX2 and the baseline and picked at load time (target_clones),
// so the library needs no -march flag and runs on any x86-64 CPU. Built with -O3
// -fno-trapping-math (without it the selects below stay branches) and -ffp-contract=off
// (no FMA: the same roundings as the torch path), see CMakeLists.txt.
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "lf_math.h"  // lf_exp, LF_CLONES

namespace {

using latentfast_native::lf_exp;

constexpr int64_t TILE = 1024;  // values per tile: 4 KiB of fp32, stays in L1
constexpr int W = 16;           // independent partial sums per reduction (vector lanes)

// Online softmax statistics over one tile z[0, n) (already scaled by inv_t):
// running max m, s = sum exp(z - m), t = sum exp(z - m) * (z - m). Keeping t relative
// to m avoids the cancellation of lse - sum(p z) at |z| ~ 1e4.
LF_CLONES void stats_tile(const float* z, int64_t n, float* m, float* s, float* t) {
  float mx[W];
  for (int j = 0; j < W; ++j) mx[j] = -std::numeric_limits<float>::infinity();
  int64_t i = 0;
  for (; i + W <= n; i += W)
    for (int j = 0; j < W; ++j) mx[j] = z[i + j] > mx[j] ? z[i + j] : mx[j];
  float bmax = -std::numeric_limits<float>::infinity();
  for (int j = 0; j < W; ++j) bmax = std::max(bmax, mx[j]);
  for (; i < n; ++i) bmax = std::max(bmax, z[i]);

  const float m_new = std::max(*m, bmax);
  float e[TILE];  // exp(z - m_new): a simple loop of its own, so it vectorises
  for (i = 0; i < n; ++i) e[i] = lf_exp(z[i] - m_new);
  float se[W] = {0}, te[W] = {0};
  for (i = 0; i + W <= n; i += W)
    for (int j = 0; j < W; ++j) {
      se[j] += e[i + j];
      te[j] += e[i + j] > 0.0f ? e[i + j] * (z[i + j] - m_new) : 0.0f;  // 0 * -inf -> 0
    }
  float bs = 0.0f, bt = 0.0f;
  for (int j = 0; j < W; ++j) {
    bs += se[j];
    bt += te[j];
  }
  for (; i < n; ++i) {
    bs += e[i];
    bt += e[i] > 0.0f ? e[i] * (z[i] - m_new) : 0.0f;
  }
  const float a = std::exp(*m - m_new);  // m starts finite (-1e30): a = 0, s * (m - m_new) = 0
  *t = a * (*t + *s * (*m - m_new)) + bt;
  *s = a * *s + bs;
  *m = m_new;
}

// buf[i] = float(src[i]) * inv_t
template <typename T>
inline void load_tile(const T* src, int64_t n, float inv_t, float* buf) {
  for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<float>(src[i]) * inv_t;
}

// out[i] = exp(z[i] * inv_t - lse) * -coef (z and out may alias: the fp32 in-place case)
LF_CLONES void grad_tile(const float* z, float* out, int64_t n, float inv_t, float lse, float coef) {
  const float neg = -coef;
  for (int64_t i = 0; i < n; ++i) out[i] = lf_exp(z[i] * inv_t - lse) * neg;
}

template <typename T>
void stats_rows(const at::Tensor& L, const int64_t* ids, float inv_t, float* lse, float* logp,
                float* ent) {
  const T* base = L.const_data_ptr<T>();
  const int64_t R = L.size(0), V = L.size(1), ld = L.stride(0);
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(V, 1));
  at::parallel_for(0, R, grain, [&](int64_t begin, int64_t end) {
    float buf[TILE];
    for (int64_t r = begin; r < end; ++r) {
      const T* row = base + r * ld;
      float m = -1e30f, s = 0.0f, t = 0.0f;
      for (int64_t off = 0; off < V; off += TILE) {
        const int64_t n = std::min(TILE, V - off);
        load_tile(row + off, n, inv_t, buf);
        stats_tile(buf, n, &m, &s, &t);
      }
      const float log_s = std::log(s);
      lse[r] = m + log_s;
      logp[r] = static_cast<float>(row[ids[r]]) * inv_t - lse[r];
      ent[r] = log_s - t / s;
    }
  });
}

template <typename T>
void grad_rows(at::Tensor& L, const int64_t* ids, const float* lse, const float* g, float inv_t) {
  T* base = L.mutable_data_ptr<T>();
  const int64_t R = L.size(0), V = L.size(1), ld = L.stride(0);
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(V, 1));
  at::parallel_for(0, R, grain, [&](int64_t begin, int64_t end) {
    float buf[TILE];
    for (int64_t r = begin; r < end; ++r) {
      T* row = base + r * ld;
      const float coef = g[r] * inv_t;
      const int64_t target = ids[r];
      if constexpr (std::is_same_v<T, float>) {
        grad_tile(row, row, V, inv_t, lse[r], coef);
        row[target] += coef;
      } else {
        for (int64_t off = 0; off < V; off += TILE) {
          const int64_t n = std::min(TILE, V - off);
          load_tile(row + off, n, 1.0f, buf);
          grad_tile(buf, buf, n, inv_t, lse[r], coef);
          if (target >= off && target < off + n) buf[target - off] += coef;
          for (int64_t i = 0; i < n; ++i) row[off + i] = static_cast<T>(buf[i]);
        }
      }
    }
  });
}

void check_logits(const at::Tensor& L) {
  TORCH_CHECK(L.device().is_cpu(), "logit kernels: L (logits) must be a CPU tensor, got ", L.device());
  TORCH_CHECK(L.dim() == 2, "logit kernels: L (logits) must be 2-D (rows, vocab), got shape ", L.sizes());
  TORCH_CHECK(L.scalar_type() == at::kFloat || L.scalar_type() == at::kBFloat16 ||
                  L.scalar_type() == at::kHalf,
              "logit kernels: L (logits) must be float32, bfloat16 or float16, got ", L.scalar_type());
  TORCH_CHECK(L.size(1) <= 1 || L.stride(1) == 1,
              "logit kernels: L (logits) must have unit stride along the vocab dim, got strides ",
              L.strides());
  TORCH_CHECK(L.size(0) == 0 || L.size(1) > 0, "logit kernels: L (logits) must have a non-empty vocab dim");
}

void check_row_vector(const char* name, const at::Tensor& t, int64_t R, at::ScalarType dtype) {
  TORCH_CHECK(t.device().is_cpu(), "logit kernels: ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == R, "logit kernels: ", name, " must have shape (", R,
              ",) (one per row of L), got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == dtype, "logit kernels: ", name, " must have dtype ", dtype, ", got ",
              t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), "logit kernels: ", name, " must be contiguous");
}

void check_ids(const at::Tensor& ids, int64_t R, int64_t V) {
  check_row_vector("ids", ids, R, at::kLong);
  const int64_t* p = ids.const_data_ptr<int64_t>();
  for (int64_t r = 0; r < R; ++r)
    TORCH_CHECK(p[r] >= 0 && p[r] < V, "logit kernels: ids must lie in [0, ", V, "), got ids[", r,
                "] = ", p[r]);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> logit_stats(const at::Tensor& L, const at::Tensor& ids,
                                                           double inv_t) {
  check_logits(L);
  const int64_t R = L.size(0);
  check_ids(ids, R, L.size(1));
  auto opts = L.options().dtype(at::kFloat);
  at::Tensor lse = at::empty({R}, opts), logp = at::empty({R}, opts), ent = at::empty({R}, opts);
  const int64_t* id = ids.const_data_ptr<int64_t>();
  float* out[3] = {lse.mutable_data_ptr<float>(), logp.mutable_data_ptr<float>(), ent.mutable_data_ptr<float>()};
  const float it = static_cast<float>(inv_t);
  switch (L.scalar_type()) {
    case at::kFloat: stats_rows<float>(L, id, it, out[0], out[1], out[2]); break;
    case at::kBFloat16: stats_rows<at::BFloat16>(L, id, it, out[0], out[1], out[2]); break;
    default: stats_rows<at::Half>(L, id, it, out[0], out[1], out[2]); break;
  }
  return {lse, logp, ent};
}

at::Tensor& logit_grad_(at::Tensor& L, const at::Tensor& ids, const at::Tensor& lse, const at::Tensor& g,
                        double inv_t) {
  check_logits(L);
  const int64_t R = L.size(0);
  check_ids(ids, R, L.size(1));
  check_row_vector("lse", lse, R, at::kFloat);
  check_row_vector("g", g, R, at::kFloat);
  const int64_t* id = ids.const_data_ptr<int64_t>();
  const float *ls = lse.const_data_ptr<float>(), *gp = g.const_data_ptr<float>();
  const float it = static_cast<float>(inv_t);
  switch (L.scalar_type()) {
    case at::kFloat: grad_rows<float>(L, id, ls, gp, it); break;
    case at::kBFloat16: grad_rows<at::BFloat16>(L, id, ls, gp, it); break;
    default: grad_rows<at::Half>(L, id, ls, gp, it); break;
  }
  return L;
}

}  // namespace

TORCH_LIBRARY(latentfast_native, m) {
  m.def("logit_stats(Tensor L, Tensor ids, float inv_t) -> (Tensor, Tensor, Tensor)");
  m.def("logit_grad_(Tensor(a!) L, Tensor ids, Tensor lse, Tensor g, float inv_t) -> Tensor(a!)");
}

TORCH_LIBRARY_IMPL(latentfast_native, CPU, m) {
  m.impl("logit_stats", &logit_stats);
  m.impl("logit_grad_", &logit_grad_);
}
