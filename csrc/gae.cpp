// GAE on CPU: one backward sweep per row, rows spread over torch's OpenMP pool.
//   for t = T-1 .. 0 where mask[t]:  delta = r_t + gamma * v_next - v_t
//                                    A_t   = delta + gamma * lam * A_next ;  R_t = A_t + v_t
//   masked positions output 0 and carry (v_next, A_next) through unchanged.
#include "ops.h"

#include <ATen/Parallel.h>

namespace {

// Rows per task: at least ~64k tokens, below which waking the OpenMP pool costs more than it saves
// (and on a loaded machine a descheduled worker stalls the whole call).
constexpr int64_t kGrainTokens = 1 << 16;

std::tuple<at::Tensor, at::Tensor> gae_forward(const at::Tensor& rewards, const at::Tensor& values,
                                               const at::Tensor& mask, double gamma, double lam) {
  TORCH_CHECK(rewards.dim() == 2, "rewards must be [B, T]");
  auto r = rewards.to(at::kFloat).contiguous();
  auto v = values.to(at::kFloat).contiguous();
  auto m = mask.to(at::kBool).contiguous();
  const int64_t B = r.size(0), T = r.size(1);
  auto adv = at::empty({B, T}, r.options());
  auto ret = at::empty({B, T}, r.options());
  const float* rp = r.data_ptr<float>();
  const float* vp = v.data_ptr<float>();
  const bool* mp = m.data_ptr<bool>();
  float* ap = adv.data_ptr<float>();
  float* tp = ret.data_ptr<float>();
  const float g = static_cast<float>(gamma), gl = static_cast<float>(gamma * lam);
  at::parallel_for(0, B, std::max<int64_t>(1, kGrainTokens / std::max<int64_t>(T, 1)), [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t o = b * T;
      float next_value = 0.f, last = 0.f;
      for (int64_t t = T - 1; t >= 0; --t) {
        if (mp[o + t]) {
          const float vt = vp[o + t];
          last = rp[o + t] + g * next_value - vt + gl * last;
          next_value = vt;
          ap[o + t] = last;
          tp[o + t] = last + vt;
        } else {
          ap[o + t] = 0.f;
          tp[o + t] = 0.f;
        }
      }
    }
  });
  return {adv, ret};
}

}  // namespace

void register_gae(pybind11::module_& m) {
  m.def("gae_forward", &gae_forward, "GAE advantages and returns, fp32 [B, T]",
        pybind11::arg("rewards"), pybind11::arg("values"), pybind11::arg("mask"),
        pybind11::arg("gamma"), pybind11::arg("lam"));
}
