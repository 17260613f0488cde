// Masked statistics on CPU: per-row partials (count, mean, M2) for the global masked mean/var/whiten.
//   n_r = sum_t m[r,t] ;  mean_r = sum_t m x / n_r ;  M2_r = sum_t m (x - mean_r)^2   (0 when n_r == 0)
// Two passes over each row (the second hits cache), so one read of x from memory; rows in parallel.
// The caller merges the rows with Chan's formula.
#include "ops.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

namespace {

constexpr int64_t kGrainTokens = 1 << 16;  // per task: below this, waking the OpenMP pool does not pay

template <typename scalar_t>
void row_stats(const scalar_t* x, const bool* m, float* out, int64_t R, int64_t T) {
  at::parallel_for(0, R, std::max<int64_t>(1, kGrainTokens / std::max<int64_t>(T, 1)), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* xr = x + r * T;
      const bool* mr = m + r * T;
      float n = 0.f, s = 0.f;
#pragma omp simd reduction(+ : n, s)
      for (int64_t t = 0; t < T; ++t) {
        const float w = mr[t] ? 1.f : 0.f;
        n += w;
        s += w * static_cast<float>(xr[t]);
      }
      const float mean = n > 0.f ? s / n : 0.f;
      float m2 = 0.f;
#pragma omp simd reduction(+ : m2)
      for (int64_t t = 0; t < T; ++t) {
        const float d = mr[t] ? static_cast<float>(xr[t]) - mean : 0.f;
        m2 += d * d;
      }
      out[3 * r] = n;
      out[3 * r + 1] = mean;
      out[3 * r + 2] = m2;
    }
  });
}

at::Tensor masked_row_stats(const at::Tensor& x, const at::Tensor& mask) {
  TORCH_CHECK(x.dim() == 2 && mask.sizes() == x.sizes(), "x and mask must be [R, T] of one shape");
  auto xc = x.contiguous();
  auto mc = mask.to(at::kBool).contiguous();
  const int64_t R = xc.size(0), T = xc.size(1);
  auto out = at::empty({R, 3}, x.options().dtype(at::kFloat));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, xc.scalar_type(), "masked_row_stats", [&] {
    row_stats<scalar_t>(xc.data_ptr<scalar_t>(), mc.data_ptr<bool>(), out.data_ptr<float>(), R, T);
  });
  return out;
}

}  // namespace

void register_masked(pybind11::module_& m) {
  m.def("masked_row_stats", &masked_row_stats, "per-row (count, mean, M2) of the valid entries, fp32 [R, 3]",
        pybind11::arg("x"), pybind11::arg("mask"));
}
