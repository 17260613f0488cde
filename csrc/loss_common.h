// Shared by the PPO loss kernels (policy_loss.cpp, value_loss.cpp).
#pragma once
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <type_traits>
#include <vector>

#if defined(__SSE4_1__)
#include <immintrin.h>
#endif

namespace rlhf_fast {

// The defined inputs as contiguous tensors of one floating dtype: their own when they all agree
// (the kernel is then templated on it and converts on load), else fp32.
inline std::vector<at::Tensor> one_float_dtype(std::initializer_list<at::Tensor> inputs) {
  std::vector<at::Tensor> out(inputs);
  at::ScalarType dtype = out.front().scalar_type();
  const bool same = std::all_of(out.begin(), out.end(), [&](const at::Tensor& t) {
    return !t.defined() || t.scalar_type() == dtype;
  });
  for (auto& t : out) {
    if (t.defined()) t = same ? t.contiguous() : t.to(at::kFloat).contiguous();
  }
  return out;
}

// 4 fp32 lanes (GCC/clang vector extensions: arithmetic, comparisons giving v4i masks of -1/0, and `m ? a : b`
// with both arms evaluated, i.e. a blend). SSE4.1 at -march=x86-64-v2; the plain C++ fallbacks elsewhere.
typedef float v4f __attribute__((vector_size(16)));
typedef int32_t v4i __attribute__((vector_size(16)));

inline v4f splat(float x) { return v4f{x, x, x, x}; }
inline float floor_f32(float x) { return std::floor(x); }
inline v4f floor_f32(v4f x) {
#if defined(__SSE4_1__)
  return _mm_floor_ps(x);
#else
  return v4f{std::floor(x[0]), std::floor(x[1]), std::floor(x[2]), std::floor(x[3])};
#endif
}
// 2^n for integral-valued n in the normal range, by building the float's exponent field.
inline float pow2i(float n) {
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float out;
  std::memcpy(&out, &bits, sizeof out);
  return out;
}
inline v4f pow2i(v4f n) { return reinterpret_cast<v4f>((__builtin_convertvector(n, v4i) + 127) << 23); }

// exp(x) for |x| <= 80 within 2 ulp (Cephes expf: Cody-Waite reduction by ln 2, degree-6 polynomial),
// branch-free, for F = float or v4f with bitwise-identical lanes (std::exp stays a libm call without -ffast-math).
template <typename F>
inline F exp_simd(F x) {
  const F n = floor_f32(x * 1.44269504088896341f + 0.5f);
  const F r = x - n * 0.693359375f + n * 2.12194440e-4f;
  F p = r * 1.9875691500e-4f + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.f;
  return p * pow2i(n);
}

// 4 consecutive elements as fp32 lanes.
inline v4f load4(const float* x) {
  v4f v;
  std::memcpy(&v, x, sizeof v);
  return v;
}
template <typename T>
inline v4f load4(const T* x) {
  return v4f{static_cast<float>(x[0]), static_cast<float>(x[1]), static_cast<float>(x[2]), static_cast<float>(x[3])};
}
#if defined(__SSE4_1__)
inline v4f load4(const c10::BFloat16* x) {  // bf16 -> fp32 is a 16-bit left shift
  int64_t bits;
  std::memcpy(&bits, x, sizeof bits);
  return _mm_castsi128_ps(_mm_slli_epi32(_mm_cvtepu16_epi32(_mm_cvtsi64_si128(bits)), 16));
}
#endif
inline void store4(float* x, v4f v) { std::memcpy(x, &v, sizeof v); }

// 4 consecutive bools as a lane mask (-1 where true).
inline v4i load_mask4(const bool* m) {
  int32_t bytes;
  std::memcpy(&bytes, m, sizeof bytes);
#if defined(__SSE4_1__)
  const v4i lanes = reinterpret_cast<v4i>(_mm_cvtepu8_epi32(_mm_cvtsi32_si128(bytes)));
#else
  const auto* u = reinterpret_cast<const uint8_t*>(m);
  const v4i lanes{u[0], u[1], u[2], u[3]};
#endif
  return lanes != 0;
}

inline float hsum(v4f v) { return (v[0] + v[1]) + (v[2] + v[3]); }
inline float hsum(v4i v) { return static_cast<float>((v[0] + v[1]) + (v[2] + v[3])); }

// f(std::true_type{}) or f(std::false_type{}): turns a runtime flag into a template parameter, so the
// inner loops carry no branch on it (branches stop the vectoriser).
template <typename F>
void with_flag(bool flag, F&& f) {
  if (flag) {
    f(std::true_type{});
  } else {
    f(std::false_type{});
  }
}

// Rows per parallel_for chunk so that a chunk holds at least ~16k tokens.
inline int64_t row_grain(int64_t T) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(T, 1)); }

}  // namespace rlhf_fast
