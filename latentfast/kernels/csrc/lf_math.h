// Shared helpers of the native CPU kernels (kernels/csrc/*.cpp).
#pragma once

#include <cstdint>
#include <cstring>

// The hot loops are compiled for AVX-512F, AVX2 and the baseline and picked at load time,
// so the library needs no -march flag and runs on any x86-64 CPU.
#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__)
#define LF_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define LF_CLONES
#endif

#if defined(__GNUC__)
#define LF_INLINE inline __attribute__((always_inline))  // into every clone, so the loops vectorise
#else
#define LF_INLINE inline
#endif

namespace latentfast_native {

// exp(x) for x <= ~88 (Cephes expf: |rel err| ~ 1e-7). Exactly 0 below -87.3, where
// expf would return denormals; NaN propagates. Branch-free so it vectorises.
LF_INLINE float lf_exp(float x) {
  const float lo = -87.33f;
  float xc = x < lo ? lo : x;
  xc = xc > 88.0f ? 88.0f : xc;
  // n = round(x / ln 2) by the 1.5 * 2^23 trick (round-to-nearest; no floorf call)
  float r = xc * 1.44269504088896341f + 12582912.0f;
  r -= 12582912.0f;
  float f = xc - r * 0.693359375f;
  f = f - r * -2.12194440e-4f;
  float y = 1.9875691500e-4f;
  y = y * f + 1.3981999507e-3f;
  y = y * f + 8.3334519073e-3f;
  y = y * f + 4.1665795894e-2f;
  y = y * f + 1.6666665459e-1f;
  y = y * f + 5.0000001201e-1f;
  y = y * (f * f) + f + 1.0f;
  int32_t bits = (static_cast<int32_t>(r) + 127) << 23;  // 2^n
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return x < lo ? 0.0f : y * scale;
}

}  // namespace latentfast_native
