// Shared by the CPU kernels: fp32 SIMD lanes, a vectorisable exp, dtype and threading helpers.
#pragma once
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <limits>
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

// kLanes fp32 lanes (GCC/clang vector extensions: arithmetic, comparisons giving vi masks of -1/0, and
// `m ? a : b` with both arms evaluated, i.e. a blend). The width follows the target the extension is compiled
// for (setup.py: -march=native unless RLHF_FAST_MARCH says otherwise): 16 lanes with AVX-512, 8 with AVX2,
// else 4 (SSE, or the compiler's generic lowering). Everything below is written for any width.
#if defined(__AVX512F__)
constexpr int kLanes = 16;
#elif defined(__AVX2__)
constexpr int kLanes = 8;
#else
constexpr int kLanes = 4;
#endif
typedef float vf __attribute__((vector_size(4 * kLanes)));
typedef int32_t vi __attribute__((vector_size(4 * kLanes)));
typedef uint16_t vu16 __attribute__((vector_size(2 * kLanes)));
typedef uint8_t vu8 __attribute__((vector_size(kLanes)));

inline vf splat(float x) { return vf{} + x; }

// floor for |x| < 2^31: truncate, then step down where truncation rounded up (negative non-integers).
inline vf floor_f32(vf x) {
  const vf t = __builtin_convertvector(__builtin_convertvector(x, vi), vf);
  return t > x ? t - 1.f : t;
}
// 2^n for integral-valued n in the normal range, by building the float's exponent field.
inline vf pow2i(vf n) { return reinterpret_cast<vf>((__builtin_convertvector(n, vi) + 127) << 23); }

// exp(x) for |x| <= 80 within 2 ulp (Cephes expf: Cody-Waite reduction by ln 2, degree-6 polynomial),
// branch-free (std::exp stays a scalar libm call without -ffast-math).
inline vf exp_simd(vf x) {
  const vf n = floor_f32(x * 1.44269504088896341f + 0.5f);
  const vf r = x - n * 0.693359375f + n * 2.12194440e-4f;
  vf p = r * 1.9875691500e-4f + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.f;
  return p * pow2i(n);
}

// exp over the whole float range: exp_simd where it is accurate, and at the ends what std::exp gives in fp32
// up to rounding (0 below -87, inf above 88; std::exp overflows at 88.72). NaN lanes stay NaN.
inline vf exp_full(vf x) {
  vf xc = x < -87.f ? splat(-87.f) : x;
  xc = xc > 88.f ? splat(88.f) : xc;
  const vf e = exp_simd(xc);
  return x > 88.f ? splat(std::numeric_limits<float>::infinity()) : (x < -87.f ? splat(0.f) : e);
}

// expm1(x) = exp(x) - 1 without the cancellation near 0: the Taylor series to x^8 / 8! for |x| < 1/2 (the
// remainder x^9 / 9! is < 2^-26 of the value there), exp_full(x) - 1 elsewhere (|exp(x) - 1| >= 0.39 there,
// so the subtraction costs at most ~3 ulp). k3 = expm1(-x) + x and its gradient -expm1(-x) use it.
inline vf expm1_full(vf x) {
  vf p = x * (1.f / 40320.f) + (1.f / 5040.f);
  p = p * x + (1.f / 720.f);
  p = p * x + (1.f / 120.f);
  p = p * x + (1.f / 24.f);
  p = p * x + (1.f / 6.f);
  p = p * x + 0.5f;
  p = (p * x) * x + x;
  const vf ax = x < 0.f ? -x : x;
  return ax < 0.5f ? p : exp_full(x) - 1.f;
}

// kLanes consecutive elements as fp32 lanes.
inline vf loadv(const float* x) {
  vf v;
  std::memcpy(&v, x, sizeof v);
  return v;
}
inline vf loadv(const c10::BFloat16* x) {  // bf16 -> fp32 is a 16-bit left shift
  vu16 bits;
  std::memcpy(&bits, x, sizeof bits);
  return reinterpret_cast<vf>(__builtin_convertvector(bits, vi) << 16);
}
template <typename T>
inline vf loadv(const T* x) {
  vf v;
  for (int i = 0; i < kLanes; ++i) v[i] = static_cast<float>(x[i]);
  return v;
}
inline void storev(float* x, vf v) { std::memcpy(x, &v, sizeof v); }

// kLanes consecutive bools as a lane mask (-1 where true).
inline vi load_maskv(const bool* m) {
  vu8 bytes;
  std::memcpy(&bytes, m, sizeof bytes);
  return __builtin_convertvector(bytes, vi) != 0;
}

// Lanes of one input pointer: fp32 values, or a lane mask for bools.
inline vf load_lanes(const float* x) { return loadv(x); }
inline vi load_lanes(const bool* x) { return load_maskv(x); }

// The last n < kLanes elements of p as full lanes, zero- (false-) padded.
template <typename T>
inline auto tail_lanes(const T* p, int64_t n) {
  T q[kLanes] = {};
  std::copy(p, p + n, q);
  return load_lanes(q);
}

// out[i] = f(lanes of in[i]...) for i in [begin, end), kLanes elements at a time; the last (end - begin) % kLanes
// go through padded lanes (tail_lanes), so f sees full lanes only and the tail is computed the same way.
template <typename F, typename... In>
inline void map_lanes(int64_t begin, int64_t end, float* out, F&& f, const In*... in) {
  int64_t i = begin;
  for (; i + kLanes <= end; i += kLanes) storev(out + i, f(load_lanes(in + i)...));
  if (i < end) {
    float q[kLanes];
    storev(q, f(tail_lanes(in + i, end - i)...));
    std::copy(q, q + (end - i), out + i);
  }
}

// Horizontal reductions.
inline float hsum(vf v) {
  float s = 0.f;
  for (int i = 0; i < kLanes; ++i) s += v[i];
  return s;
}
inline float hsum(vi v) {
  int32_t s = 0;
  for (int i = 0; i < kLanes; ++i) s += v[i];
  return static_cast<float>(s);
}
inline float hmax(vf v) {
  float m = v[0];
  for (int i = 1; i < kLanes; ++i) m = std::max(m, v[i]);
  return m;
}
inline float hmin(vf v) {
  float m = v[0];
  for (int i = 1; i < kLanes; ++i) m = std::min(m, v[i]);
  return m;
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
