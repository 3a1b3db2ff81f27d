// Native CPU epilogues of the fused thinking residual.
//
// Same signatures and semantics as forward_epilogue / backward_epilogue in
// kernels/thinking_residual.py (the Triton kernels); latentfast/ops/thinking_residual.py
// picks these on CPU when the library is built. The GEMMs stay in torch; these fuse the
// elementwise chain around them:
//
//   latentfast_native::thinking_residual_fwd_epilogue(e, p, z, Lambda, c, eps, has_proj)
//       -> (out, a)                                              e's dtype, (N, D)
//   latentfast_native::thinking_residual_bwd_epilogue(e, p, z, Lambda, grad_out, grad_a?,
//       c, eps, has_proj, dp_in_place, dz_in_place)
//       -> (de_direct, dp, dz, dLambda, db_r, db_i)              dLambda, db_*: fp32 (D,)
//
// e, p: (N, D), z: (N, 2D) = [z_r | z_i], contiguous, fp32 / bf16 / fp16 (one dtype);
// all math in fp32. hn = p / (|p| + 1e-8) (has_proj) or p, r = sigmoid(z_r),
// i = sigmoid(z_i), a = exp(-c * softplus(-Lambda) * r) (softplus threshold 20, as
// PyTorch's), g = sqrt(1 - a^2 + eps), out = a * e + g * (i * hn). The backward writes
// dp over p / dz over z when asked (buffers recomputed by the caller): the returned dp /
// dz are then p / z themselves. Rows run in parallel (at::parallel_for), each walked in
// L1-sized column tiles converted to fp32; the column sums (dLambda, db_r, db_i) are
// accumulated per fixed chunk of rows (the chunking depends on N only) and the chunk
// partials summed in chunk order, so results do not depend on the thread count.
// Build flags and the AVX-512 / AVX2 clones: see grpo_loss.cpp and CMakeLists.txt.
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

#include "lf_math.h"  // lf_exp, LF_CLONES, LF_INLINE

namespace {

using latentfast_native::lf_exp;

constexpr int64_t TILE = 256;   // columns per tile: ~10 fp32 tiles of 1 KiB live at once
constexpr int W = 16;           // independent partial sums per row reduction (vector lanes)
constexpr float NORM_EPS = 1e-8f;  // the recipe's |p| + 1e-8

template <typename T>
inline void load(const T* src, int64_t n, float* dst) {
  for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<float>(src[j]);
}

template <typename T>
inline void store(const float* src, int64_t n, T* dst) {
  for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<T>(src[j]);
}

LF_CLONES float dot(const float* x, const float* y, int64_t n) {
  float acc[W] = {0};
  int64_t j = 0;
  for (; j + W <= n; j += W)
    for (int k = 0; k < W; ++k) acc[k] += x[j + k] * y[j + k];
  float s = 0.0f;
  for (int k = 0; k < W; ++k) s += acc[k];
  for (; j < n; ++j) s += x[j] * y[j];
  return s;
}

LF_INLINE float sigmoid(float x) { return 1.0f / (1.0f + lf_exp(-x)); }

// Per-column constants from Lambda: s = softplus(-Lambda) (PyTorch: linear above 20),
// ncs = -c * s, ds = d s / d Lambda = -sigmoid(-Lambda) (-1 on the linear branch).
struct Columns {
  std::vector<float> s, ncs, ds;
  Columns(const at::Tensor& Lambda, float c) {
    const at::Tensor lam = Lambda.to(at::kFloat).contiguous();
    const float* l = lam.const_data_ptr<float>();
    const int64_t D = lam.numel();
    s.resize(D), ncs.resize(D), ds.resize(D);
    for (int64_t j = 0; j < D; ++j) {
      const float x = -l[j];
      const float ex = std::exp(std::min(x, 20.0f));
      s[j] = x > 20.0f ? x : std::log1p(ex);
      ncs[j] = -c * s[j];
      ds[j] = x > 20.0f ? -1.0f : -(ex / (ex + 1.0f));
    }
  }
};

// The tile functions take distinct buffers (__restrict: without it the loops stay scalar).
using in_t = const float* __restrict;
using out_t = float* __restrict;

// One forward tile. hn = p / denom (denom = |p| + 1e-8, or 1 without the projection).
LF_CLONES void fwd_tile(in_t e, in_t p, in_t zr, in_t zi, in_t ncs, int64_t n, float eps, float denom, out_t out,
                        out_t a_out) {
  for (int64_t j = 0; j < n; ++j) {
    const float r = sigmoid(zr[j]), i = sigmoid(zi[j]);
    const float a = lf_exp(ncs[j] * r);
    const float g = std::sqrt(1.0f - a * a + eps);
    const float hn = p[j] / denom;
    out[j] = a * e[j] + g * (i * hn);
    a_out[j] = a;
  }
}

// One backward tile: de = a * grad_out, dz_r, dz_i, d_hn (the gradient w.r.t. hn = p * inv)
// and the column sums' contributions.
LF_CLONES void bwd_tile(in_t e, in_t p, in_t zr, in_t zi, in_t go, in_t ga, in_t s, in_t ncs, in_t ds, int64_t n,
                        float c, float eps, float inv, out_t de, out_t dzr, out_t dzi, out_t dhn, out_t acc_lam,
                        out_t acc_br, out_t acc_bi) {
  for (int64_t j = 0; j < n; ++j) {
    const float hn = p[j] * inv;
    const float r = sigmoid(zr[j]), i = sigmoid(zi[j]);
    const float a = lf_exp(ncs[j] * r);
    const float g = std::sqrt(1.0f - a * a + eps);
    const float d_a = go[j] * (e[j] - i * hn * a / g) + ga[j];
    const float d_hn = go[j] * g * i;
    const float d_zi = d_hn * hn * (1.0f - i);
    const float d_ar = d_a * a * -c;  // d a / d(s * r) = -c * a
    const float d_zr = d_ar * s[j] * r * (1.0f - r);
    acc_lam[j] += d_ar * r * ds[j];
    acc_br[j] += d_zr;
    acc_bi[j] += d_zi;
    de[j] = go[j] * a;
    dzr[j] = d_zr;
    dzi[j] = d_zi;
    dhn[j] = d_hn;
  }
}

template <typename T>
void fwd_rows(const at::Tensor& e, const at::Tensor& p, const at::Tensor& z, const Columns& col, float eps,
              bool has_proj, at::Tensor& out, at::Tensor& a) {
  const int64_t N = e.size(0), D = e.size(1);
  const T *E = e.const_data_ptr<T>(), *P = p.const_data_ptr<T>(), *Z = z.const_data_ptr<T>();
  T *O = out.mutable_data_ptr<T>(), *A = a.mutable_data_ptr<T>();
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 14) / D);
  at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> prow(D);
    float et[TILE], zrt[TILE], zit[TILE], ot[TILE], at_[TILE];
    for (int64_t row = begin; row < end; ++row) {
      load(P + row * D, D, prow.data());
      const float denom = has_proj ? std::sqrt(dot(prow.data(), prow.data(), D)) + NORM_EPS : 1.0f;
      for (int64_t off = 0; off < D; off += TILE) {
        const int64_t n = std::min(TILE, D - off);
        load(E + row * D + off, n, et);
        load(Z + row * 2 * D + off, n, zrt);
        load(Z + row * 2 * D + D + off, n, zit);
        fwd_tile(et, prow.data() + off, zrt, zit, col.ncs.data() + off, n, eps, denom, ot, at_);
        store(ot, n, O + row * D + off);
        store(at_, n, A + row * D + off);
      }
    }
  });
}

template <typename T>
void bwd_rows(const at::Tensor& e, const at::Tensor& p, const at::Tensor& z, const at::Tensor& go,
              const std::optional<at::Tensor>& ga, const Columns& col, float c, float eps, bool has_proj,
              at::Tensor& de, at::Tensor& dp, at::Tensor& dz, float* sums /* (3, D) */) {
  const int64_t N = e.size(0), D = e.size(1);
  const T *E = e.const_data_ptr<T>(), *P = p.const_data_ptr<T>(), *Z = z.const_data_ptr<T>();
  const T *GO = go.const_data_ptr<T>(), *GA = ga ? ga->const_data_ptr<T>() : nullptr;
  // dp / dz may alias p / z: every tile / row is read into fp32 buffers before it is written
  T *DE = de.mutable_data_ptr<T>(), *DP = dp.data_ptr<T>(), *DZ = dz.data_ptr<T>();
  // Fixed chunks of rows, each with its own column partials: deterministic for any thread count.
  const int64_t chunk_rows = std::max<int64_t>(16, (N + 63) / 64);
  const int64_t chunks = (N + chunk_rows - 1) / chunk_rows;
  std::vector<float> partial(chunks * 3 * D, 0.0f);
  at::parallel_for(0, chunks, 1, [&](int64_t cbegin, int64_t cend) {
    std::vector<float> prow(D), dhn(D);
    float et[TILE], zrt[TILE], zit[TILE], got[TILE], gat[TILE], det[TILE], dzrt[TILE], dzit[TILE];
    if (!GA) std::fill(gat, gat + TILE, 0.0f);
    for (int64_t chunk = cbegin; chunk < cend; ++chunk) {
      float* acc = partial.data() + chunk * 3 * D;
      for (int64_t row = chunk * chunk_rows; row < std::min(N, (chunk + 1) * chunk_rows); ++row) {
        load(P + row * D, D, prow.data());
        const float norm = has_proj ? std::sqrt(dot(prow.data(), prow.data(), D)) : 0.0f;
        const float inv = has_proj ? 1.0f / (norm + NORM_EPS) : 1.0f;
        for (int64_t off = 0; off < D; off += TILE) {
          const int64_t n = std::min(TILE, D - off);
          const int64_t o = row * D + off, oz = row * 2 * D + off;
          load(E + o, n, et);
          load(Z + oz, n, zrt);
          load(Z + oz + D, n, zit);
          load(GO + o, n, got);
          if (GA) load(GA + o, n, gat);
          bwd_tile(et, prow.data() + off, zrt, zit, got, gat, col.s.data() + off, col.ncs.data() + off,
                   col.ds.data() + off, n, c, eps, inv, det, dzrt, dzit, dhn.data() + off, acc + off,
                   acc + D + off, acc + 2 * D + off);
          store(det, n, DE + o);
          store(dzrt, n, DZ + oz);
          store(dzit, n, DZ + oz + D);
        }
        if (has_proj) {
          // d/dp [p / (|p| + eps)]; the |p| term vanishes on a zero row (torch's subgradient)
          const float dt = dot(dhn.data(), prow.data(), D);
          const float corr = norm > 0.0f ? dt * inv * inv / std::max(norm, 1e-30f) : 0.0f;
          for (int64_t j = 0; j < D; ++j) dhn[j] = dhn[j] * inv - prow[j] * corr;
        }
        store(dhn.data(), D, DP + row * D);
      }
    }
  });
  for (int64_t chunk = 0; chunk < chunks; ++chunk)  // in chunk order
    for (int64_t j = 0; j < 3 * D; ++j) sums[j] += partial[chunk * 3 * D + j];
}

// ------------------------------------------------------------------------------ checks

void check_rows(const char* name, const at::Tensor& t, int64_t N, int64_t cols, at::ScalarType dtype) {
  TORCH_CHECK(t.device().is_cpu(), "thinking_residual epilogue: ", name, " must be a CPU tensor, got ",
              t.device());
  TORCH_CHECK(t.dim() == 2 && t.size(0) == N && t.size(1) == cols, "thinking_residual epilogue: ", name,
              " must have shape (", N, ", ", cols, "), got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == dtype, "thinking_residual epilogue: ", name, " must have e's dtype ", dtype,
              ", got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), "thinking_residual epilogue: ", name, " must be contiguous");
}

void check_common(const at::Tensor& e, const at::Tensor& p, const at::Tensor& z, const at::Tensor& Lambda) {
  TORCH_CHECK(e.device().is_cpu(), "thinking_residual epilogue: e must be a CPU tensor, got ", e.device());
  TORCH_CHECK(e.dim() == 2, "thinking_residual epilogue: e must be 2-D (N, D), got shape ", e.sizes());
  const auto dt = e.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf,
              "thinking_residual epilogue: e must be float32, bfloat16 or float16, got ", dt);
  const int64_t N = e.size(0), D = e.size(1);
  check_rows("e", e, N, D, dt);
  check_rows("p", p, N, D, dt);
  check_rows("z", z, N, 2 * D, dt);
  TORCH_CHECK(Lambda.device().is_cpu(), "thinking_residual epilogue: Lambda must be a CPU tensor, got ",
              Lambda.device());
  TORCH_CHECK(Lambda.dim() == 1 && Lambda.size(0) == D, "thinking_residual epilogue: Lambda must have shape (",
              D, ",), got ", Lambda.sizes());
  TORCH_CHECK(at::isFloatingType(Lambda.scalar_type()),
              "thinking_residual epilogue: Lambda must be a floating tensor, got ", Lambda.scalar_type());
}

std::tuple<at::Tensor, at::Tensor> fwd_epilogue(const at::Tensor& e, const at::Tensor& p, const at::Tensor& z,
                                                const at::Tensor& Lambda, double c, double eps, bool has_proj) {
  check_common(e, p, z, Lambda);
  at::Tensor out = at::empty_like(e), a = at::empty_like(e);
  if (e.numel() == 0) return {out, a};
  const Columns col(Lambda, static_cast<float>(c));
  const float ep = static_cast<float>(eps);
  switch (e.scalar_type()) {
    case at::kFloat: fwd_rows<float>(e, p, z, col, ep, has_proj, out, a); break;
    case at::kBFloat16: fwd_rows<at::BFloat16>(e, p, z, col, ep, has_proj, out, a); break;
    default: fwd_rows<at::Half>(e, p, z, col, ep, has_proj, out, a); break;
  }
  return {out, a};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> bwd_epilogue(
    const at::Tensor& e, at::Tensor& p, at::Tensor& z, const at::Tensor& Lambda, const at::Tensor& grad_out,
    const std::optional<at::Tensor>& grad_a, double c, double eps, bool has_proj, bool dp_in_place,
    bool dz_in_place) {
  check_common(e, p, z, Lambda);
  const int64_t N = e.size(0), D = e.size(1);
  const at::Tensor go = grad_out.contiguous();
  check_rows("grad_out", go, N, D, e.scalar_type());
  std::optional<at::Tensor> ga;
  if (grad_a.has_value() && grad_a->defined()) {
    ga = grad_a->contiguous();
    check_rows("grad_a", *ga, N, D, e.scalar_type());
  }
  at::Tensor de = at::empty_like(e);
  at::Tensor dp = dp_in_place ? p : at::empty_like(p);
  at::Tensor dz = dz_in_place ? z : at::empty_like(z);
  at::Tensor sums = at::zeros({3, D}, e.options().dtype(at::kFloat));
  if (N > 0 && D > 0) {
    const Columns col(Lambda, static_cast<float>(c));
    const float cf = static_cast<float>(c), ep = static_cast<float>(eps);
    float* s = sums.mutable_data_ptr<float>();
    switch (e.scalar_type()) {
      case at::kFloat: bwd_rows<float>(e, p, z, go, ga, col, cf, ep, has_proj, de, dp, dz, s); break;
      case at::kBFloat16: bwd_rows<at::BFloat16>(e, p, z, go, ga, col, cf, ep, has_proj, de, dp, dz, s); break;
      default: bwd_rows<at::Half>(e, p, z, go, ga, col, cf, ep, has_proj, de, dp, dz, s); break;
    }
  }
  return {de, dp, dz, sums[0].clone(), sums[1].clone(), sums[2].clone()};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(latentfast_native, m) {
  m.def("thinking_residual_fwd_epilogue(Tensor e, Tensor p, Tensor z, Tensor Lambda, float c, float eps, "
        "bool has_proj) -> (Tensor, Tensor)");
  // p / z are overwritten by dp / dz (and returned as them) when dp_in_place / dz_in_place
  m.def("thinking_residual_bwd_epilogue(Tensor e, Tensor(a!) p, Tensor(b!) z, Tensor Lambda, Tensor grad_out, "
        "Tensor? grad_a, float c, float eps, bool has_proj, bool dp_in_place, bool dz_in_place) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(latentfast_native, CPU, m) {
  m.impl("thinking_residual_fwd_epilogue", &fwd_epilogue);
  m.impl("thinking_residual_bwd_epilogue", &bwd_epilogue);
}
