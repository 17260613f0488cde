// KL estimators and reward shaping on CPU (see rlhf_fast/ops/kl.py for the math).
//   x = logp - ref_logp;  k1 = x, k2 = x^2/2, k3 = expm1(-x) + x, abs = |x|;  optional clamp to [-c, c].
// Elementwise passes over the flattened tensors (kl_forward / kl_backward) and one pass per row for
// shape_rewards, in fp32 SIMD lanes (rlhf_fast::map_lanes; the k3 expm1 is rlhf_fast::expm1_full: std::expm1 is a
// scalar libm call and GCC turns scalar selects into branches, either of which stops the vectoriser);
// inputs converted to fp32 once; OpenMP via at::parallel_for.
#include "loss_common.h"
#include "ops.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <optional>

namespace {

enum Est { K1 = 0, K2 = 1, K3 = 2, ABS = 3 };
constexpr int64_t kGrain = 1 << 14;  // tokens per task: below this, waking the OpenMP pool does not pay

using rlhf_fast::splat;
using rlhf_fast::vf;
using rlhf_fast::vi;

template <int E>
inline vf kl_value(vf x) {
  if constexpr (E == K1) return x;
  else if constexpr (E == K2) return 0.5f * x * x;
  else if constexpr (E == K3) return rlhf_fast::expm1_full(-x) + x;
  else return x < 0.f ? -x : x;
}

template <int E>
inline vf kl_grad(vf x) {  // d value / d logp
  if constexpr (E == K1) return splat(1.f);
  else if constexpr (E == K2) return x;
  else if constexpr (E == K3) return -rlhf_fast::expm1_full(-x);
  else return x > 0.f ? splat(1.f) : (x < 0.f ? splat(-1.f) : splat(0.f));  // sign; 0 at 0 and NaN
}

template <typename F>
void dispatch_est(int64_t est, F&& f) {
  switch (est) {
    case K1: f(std::integral_constant<int, K1>{}); break;
    case K2: f(std::integral_constant<int, K2>{}); break;
    case K3: f(std::integral_constant<int, K3>{}); break;
    case ABS: f(std::integral_constant<int, ABS>{}); break;
    default: TORCH_CHECK(false, "unknown estimator id ", est);
  }
}

at::Tensor as_float(const at::Tensor& t) { return t.to(at::kFloat).contiguous(); }

float bound(const std::optional<double>& c) { return c ? static_cast<float>(*c) : INFINITY; }

// clamp to [-c, c] that keeps NaN (unlike fmin/fmax), as torch.clamp
inline vf clampv(vf v, float c) {
  v = v < -c ? splat(-c) : v;
  return v > c ? splat(c) : v;
}

at::Tensor kl_forward(const at::Tensor& logp, const at::Tensor& ref_logp, int64_t est, std::optional<double> clamp) {
  auto lp = as_float(logp), rp = as_float(ref_logp);
  auto out = at::empty(lp.sizes(), lp.options());
  const float* a = lp.data_ptr<float>();
  const float* b = rp.data_ptr<float>();
  float* o = out.data_ptr<float>();
  const float c = bound(clamp);
  dispatch_est(est, [&](auto e) {
    at::parallel_for(0, lp.numel(), kGrain, [&](int64_t begin, int64_t end) {
      rlhf_fast::map_lanes(begin, end, o, [&](vf x, vf y) { return clampv(kl_value<e()>(x - y), c); }, a, b);
    });
  });
  return out;
}

// (grad wrt logp, grad wrt ref_logp or None); straight-through: gradient of k2 whatever the estimator.
std::tuple<at::Tensor, at::Tensor> kl_backward(const at::Tensor& grad, const at::Tensor& logp,
                                               const at::Tensor& ref_logp, int64_t est, bool straight,
                                               std::optional<double> clamp, bool need_ref) {
  auto g = as_float(grad), lp = as_float(logp), rp = as_float(ref_logp);
  auto gl = at::empty(lp.sizes(), lp.options());
  const float* gp = g.data_ptr<float>();
  const float* a = lp.data_ptr<float>();
  const float* b = rp.data_ptr<float>();
  float* o = gl.data_ptr<float>();
  const float c = bound(clamp);
  dispatch_est(straight ? int64_t(K2) : est, [&](auto e) {
    at::parallel_for(0, lp.numel(), kGrain, [&](int64_t begin, int64_t end) {
      rlhf_fast::map_lanes(begin, end, o, [&](vf gv, vf x, vf y) {
        const vf d = gv * kl_grad<e()>(x - y);
        if (straight) return d;
        const vf v = kl_value<e()>(x - y);  // torch.clamp passes the gradient where the value lies within [-c, c]
        return (v >= -c) & (v <= c) ? d : splat(0.f);
      }, gp, a, b);
    });
  });
  at::Tensor gr;
  if (need_ref) gr = (-gl).to(ref_logp.scalar_type());
  return {gl.to(logp.scalar_type()), gr};
}

// rewards = -kl_coef * kl (valid tokens) + clip(score) at the last valid token of the row; kl = 0 when masked.
std::tuple<at::Tensor, at::Tensor> shape_rewards_forward(const at::Tensor& scores, const at::Tensor& logp,
                                                         const at::Tensor& ref_logp, const at::Tensor& mask,
                                                         double kl_coef, int64_t est,
                                                         std::optional<double> reward_clip,
                                                         std::optional<double> clamp) {
  auto sc = as_float(scores), lp = as_float(logp), rp = as_float(ref_logp);
  auto m = mask.to(at::kBool).contiguous();
  const int64_t B = lp.size(0), T = lp.size(1);
  auto rewards = at::empty({B, T}, lp.options());
  auto kl = at::empty({B, T}, lp.options());
  const float* s = sc.data_ptr<float>();
  const float* a = lp.data_ptr<float>();
  const float* b = rp.data_ptr<float>();
  const bool* mp = m.data_ptr<bool>();
  float* rw = rewards.data_ptr<float>();
  float* kp = kl.data_ptr<float>();
  const float c = bound(clamp), rc = bound(reward_clip), coef = static_cast<float>(kl_coef);
  dispatch_est(est, [&](auto e) {
    at::parallel_for(0, B, std::max<int64_t>(1, kGrain / std::max<int64_t>(T, 1)), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t o = r * T;
        rlhf_fast::map_lanes(o, o + T, kp, [&](vf x, vf y, vi valid) {
          return valid ? clampv(kl_value<e()>(x - y), c) : splat(0.f);
        }, a, b, mp);
        rlhf_fast::map_lanes(o, o + T, rw, [&](vf k) { return -coef * k; }, kp);  // the row is still in L1
        int64_t last = T - 1;
        while (last >= 0 && !mp[o + last]) --last;
        if (last >= 0) rw[o + last] += std::min(std::max(s[r], -rc), rc);
      }
    });
  });
  return {rewards, kl};
}

}  // namespace

void register_kl(pybind11::module_& m) {
  using pybind11::arg;
  m.def("kl_forward", &kl_forward, "per-token KL estimate, fp32", arg("logp"), arg("ref_logp"), arg("est"),
        arg("clamp"));
  m.def("kl_backward", &kl_backward, "gradients of kl_forward wrt (logp, ref_logp or None)", arg("grad"),
        arg("logp"), arg("ref_logp"), arg("est"), arg("straight"), arg("clamp"), arg("need_ref"));
  m.def("shape_rewards_forward", &shape_rewards_forward, "PPO token rewards and masked KL, fp32 [B, T]",
        arg("scores"), arg("logp"), arg("ref_logp"), arg("mask"), arg("kl_coef"), arg("est"), arg("reward_clip"),
        arg("clamp"));
}
