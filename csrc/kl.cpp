// KL estimators and reward shaping on CPU (see rlhf_fast/ops/kl.py for the math).
//   x = logp - ref_logp;  k1 = x, k2 = x^2/2, k3 = exp(-x) + x - 1, abs = |x|;  optional clamp to [-c, c].
// Elementwise passes over the flattened tensors (kl_forward / kl_backward) and one pass per row for
// shape_rewards; work in float, inputs converted once, OpenMP via at::parallel_for.
#include "ops.h"

#include <ATen/Parallel.h>

#include <cmath>
#include <optional>

namespace {

enum Est { K1 = 0, K2 = 1, K3 = 2, ABS = 3 };
constexpr int64_t kGrain = 1 << 16;  // tokens per task: below this, waking the OpenMP pool does not pay

template <int E>
inline float kl_value(float x) {
  if constexpr (E == K1) return x;
  else if constexpr (E == K2) return 0.5f * x * x;
  else if constexpr (E == K3) return std::exp(-x) + x - 1.f;
  else return std::fabs(x);
}

template <int E>
inline float kl_grad(float x) {  // d value / d logp
  if constexpr (E == K1) return 1.f;
  else if constexpr (E == K2) return x;
  else if constexpr (E == K3) return 1.f - std::exp(-x);
  else return static_cast<float>((x > 0.f) - (x < 0.f));
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
inline float clampf(float v, float c) { return v < -c ? -c : (v > c ? c : v); }

at::Tensor kl_forward(const at::Tensor& logp, const at::Tensor& ref_logp, int64_t est, std::optional<double> clamp) {
  auto lp = as_float(logp), rp = as_float(ref_logp);
  auto out = at::empty(lp.sizes(), lp.options());
  const float* a = lp.data_ptr<float>();
  const float* b = rp.data_ptr<float>();
  float* o = out.data_ptr<float>();
  const float c = bound(clamp);
  dispatch_est(est, [&](auto e) {
    at::parallel_for(0, lp.numel(), kGrain, [&](int64_t begin, int64_t end) {
#pragma omp simd
      for (int64_t i = begin; i < end; ++i) o[i] = clampf(kl_value<e()>(a[i] - b[i]), c);
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
#pragma omp simd
      for (int64_t i = begin; i < end; ++i) {
        const float x = a[i] - b[i];
        float d = gp[i] * kl_grad<e()>(x);
        if (!straight) {  // torch.clamp passes the gradient where the value lies within [-c, c]
          const float v = kl_value<e()>(x);
          d = (v >= -c && v <= c) ? d : 0.f;
        }
        o[i] = d;
      }
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
#pragma omp simd
        for (int64_t t = 0; t < T; ++t) {
          const float k = mp[o + t] ? clampf(kl_value<e()>(a[o + t] - b[o + t]), c) : 0.f;
          kp[o + t] = k;
          rw[o + t] = -coef * k;
        }
        int64_t last = T - 1;
        while (last >= 0 && !mp[o + last]) --last;
        if (last >= 0) rw[o + last] += clampf(s[r], rc);
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
