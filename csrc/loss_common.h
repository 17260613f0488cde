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

// exp(x) for |x| <= 80 within 2 ulp (Cephes expf: Cody-Waite reduction by ln 2, degree-6 polynomial),
// written so that `#pragma omp simd` loops vectorise it (std::exp stays a scalar libm call without -ffast-math).
inline float exp_simd(float x) {
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

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
