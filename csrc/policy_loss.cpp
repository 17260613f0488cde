// Clipped PPO policy loss on CPU: one fused pass per direction, rows over torch's OpenMP pool.
// Per token (fp32; see rlhf_fast/ops/policy_loss.py for the full statement):
//   lr = clamp(logp - old, -20, 20);  r = exp(lr);  pg = max(-A r, -A clamp(r, 1-cl, 1+ch))
//   A < 0: pg = min(pg, -A * dual);   with rollout_logp: pg *= w = min(exp(clamp(old - rollout, -20, 20)), cap)
// forward:  per-row partials [B, 10] = (sum m*pg, n, #clip, #dual, sum -lr, sum r, max r, min r, sum w, #w>cap)
//           and, for agg="none", the per-token matrix m*pg.
// backward: dlogp = coef * m * w * (-A r) where no clip is active and |logp - old| <= 20, else 0;
//           coef is the per-row g*s_b [B] or the per-token upstream gradient [B, T].
#include "loss_common.h"
#include "ops.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <limits>
#include <optional>

namespace {

constexpr float kBound = 20.f;
constexpr int kParts = 10;

struct Params {
  float lo, hi, dual, cap;
};

struct Token {
  float pg;         // w * clipped surrogate
  float dpg;        // d pg / d logp
  float ratio, log_ratio, w;
  bool clip, dual_on, w_clip;
};

template <bool HAS_TIS>
inline Token policy_token(float lp, float olp, float a, float rlp, const Params& p) {
  const float raw = lp - olp;
  const float lr = std::min(std::max(raw, -kBound), kBound);
  const float r = rlhf_fast::exp_simd(lr);
  const float pg1 = -a * r;
  const float pg2 = -a * std::min(std::max(r, p.lo), p.hi);
  const bool clip = pg2 > pg1;
  float pg = clip ? pg2 : pg1;
  const float pg3 = -a * p.dual;
  const bool dual_on = a < 0.f && pg > pg3;
  pg = dual_on ? pg3 : pg;
  float w = 1.f;
  bool w_clip = false;
  if (HAS_TIS) {
    const float w_raw = rlhf_fast::exp_simd(std::min(std::max(olp - rlp, -kBound), kBound));
    w_clip = w_raw > p.cap;
    w = w_clip ? p.cap : w_raw;
  }
  const bool pass = !clip && !dual_on && raw >= -kBound && raw <= kBound;
  return {w * pg, pass ? w * pg1 : 0.f, r, lr, w, clip, dual_on, w_clip};
}

template <typename scalar_t, bool HAS_TIS, bool TOKEN_OUT>
void forward_rows(const scalar_t* lp, const scalar_t* op, const scalar_t* ap, const scalar_t* rp, const bool* mp,
                  int64_t B, int64_t T, const Params& p, float* parts, float* tok) {
  constexpr float inf = std::numeric_limits<float>::infinity();
  at::parallel_for(0, B, rlhf_fast::row_grain(T), [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t o = b * T;
      float loss = 0.f, n = 0.f, clip = 0.f, dual = 0.f, nkl = 0.f, rsum = 0.f, wsum = 0.f, wclip = 0.f;
      float rmax = -inf, rmin = inf;
#pragma omp simd reduction(+ : loss, n, clip, dual, nkl, rsum, wsum, wclip) reduction(max : rmax) reduction(min : rmin)
      for (int64_t t = 0; t < T; ++t) {
        const bool m = mp[o + t];
        const Token k = policy_token<HAS_TIS>(static_cast<float>(lp[o + t]), static_cast<float>(op[o + t]),
                                              static_cast<float>(ap[o + t]),
                                              HAS_TIS ? static_cast<float>(rp[o + t]) : 0.f, p);
        const float pg = m ? k.pg : 0.f;
        if (TOKEN_OUT) tok[o + t] = pg;
        loss += pg;
        n += m ? 1.f : 0.f;
        clip += (m && k.clip) ? 1.f : 0.f;
        dual += (m && k.dual_on) ? 1.f : 0.f;
        nkl -= m ? k.log_ratio : 0.f;
        rsum += m ? k.ratio : 0.f;
        wsum += m ? k.w : 0.f;
        wclip += (m && k.w_clip) ? 1.f : 0.f;
        rmax = std::max(rmax, m ? k.ratio : -inf);
        rmin = std::min(rmin, m ? k.ratio : inf);
      }
      float* out = parts + b * kParts;
      out[0] = loss; out[1] = n; out[2] = clip; out[3] = dual; out[4] = nkl;
      out[5] = rsum; out[6] = rmax; out[7] = rmin; out[8] = wsum; out[9] = wclip;
    }
  });
}

template <typename scalar_t, bool HAS_TIS, bool PER_TOKEN>
void backward_rows(const scalar_t* lp, const scalar_t* op, const scalar_t* ap, const scalar_t* rp, const bool* mp,
                   const float* coef, int64_t B, int64_t T, const Params& p, scalar_t* grad) {
  at::parallel_for(0, B, rlhf_fast::row_grain(T), [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t o = b * T;
      const float row_c = PER_TOKEN ? 0.f : coef[b];
#pragma omp simd
      for (int64_t t = 0; t < T; ++t) {
        const Token k = policy_token<HAS_TIS>(static_cast<float>(lp[o + t]), static_cast<float>(op[o + t]),
                                              static_cast<float>(ap[o + t]),
                                              HAS_TIS ? static_cast<float>(rp[o + t]) : 0.f, p);
        const float g = PER_TOKEN ? coef[o + t] : row_c;
        grad[o + t] = static_cast<scalar_t>(mp[o + t] ? g * k.dpg : 0.f);
      }
    }
  });
}

Params make_params(double clip_low, double clip_high, double dual_clip, double tis_cap) {
  return {static_cast<float>(1.0 - clip_low), static_cast<float>(1.0 + clip_high), static_cast<float>(dual_clip),
          static_cast<float>(tis_cap)};
}

std::tuple<at::Tensor, at::Tensor> policy_loss_forward(const at::Tensor& logp, const at::Tensor& old_logp,
                                                       const at::Tensor& advantages, const at::Tensor& mask,
                                                       const std::optional<at::Tensor>& rollout_logp,
                                                       double clip_low, double clip_high, double dual_clip,
                                                       double tis_cap, bool token_out) {
  TORCH_CHECK(logp.dim() == 2 && mask.scalar_type() == at::kBool, "logp must be [B, T], mask bool");
  auto in = rlhf_fast::one_float_dtype({logp, old_logp, advantages, rollout_logp.value_or(at::Tensor())});
  auto m = mask.contiguous();
  const int64_t B = logp.size(0), T = logp.size(1);
  auto opts = logp.options().dtype(at::kFloat);
  auto parts = at::empty({B, kParts}, opts);
  at::Tensor tok = token_out ? at::empty({B, T}, opts) : at::Tensor();
  const Params p = make_params(clip_low, clip_high, dual_clip, tis_cap);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, in[0].scalar_type(), "policy_loss_forward", [&] {
    rlhf_fast::with_flag(in[3].defined(), [&](auto tis) {
      rlhf_fast::with_flag(token_out, [&](auto out) {
        forward_rows<scalar_t, decltype(tis)::value, decltype(out)::value>(
            in[0].data_ptr<scalar_t>(), in[1].data_ptr<scalar_t>(), in[2].data_ptr<scalar_t>(),
            tis ? in[3].data_ptr<scalar_t>() : nullptr, m.data_ptr<bool>(), B, T, p, parts.data_ptr<float>(),
            out ? tok.data_ptr<float>() : nullptr);
      });
    });
  });
  return {parts, tok};
}

at::Tensor policy_loss_backward(const at::Tensor& logp, const at::Tensor& old_logp, const at::Tensor& advantages,
                                const at::Tensor& mask, const std::optional<at::Tensor>& rollout_logp,
                                const at::Tensor& coef, double clip_low, double clip_high, double dual_clip,
                                double tis_cap) {
  auto in = rlhf_fast::one_float_dtype({logp, old_logp, advantages, rollout_logp.value_or(at::Tensor())});
  auto m = mask.contiguous();
  auto c = coef.to(at::kFloat).contiguous();
  const int64_t B = logp.size(0), T = logp.size(1);
  TORCH_CHECK(c.numel() == B || c.numel() == B * T, "coef must be [B] or [B, T]");
  const bool per_token = c.numel() == B * T && c.dim() == 2;
  // Written in the kernel's input dtype, returned in the dtype of logp (autograd requires it).
  auto grad = at::empty({B, T}, in[0].options());
  const Params p = make_params(clip_low, clip_high, dual_clip, tis_cap);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, in[0].scalar_type(), "policy_loss_backward", [&] {
    rlhf_fast::with_flag(in[3].defined(), [&](auto tis) {
      rlhf_fast::with_flag(per_token, [&](auto per_tok) {
        backward_rows<scalar_t, decltype(tis)::value, decltype(per_tok)::value>(
            in[0].data_ptr<scalar_t>(), in[1].data_ptr<scalar_t>(), in[2].data_ptr<scalar_t>(),
            tis ? in[3].data_ptr<scalar_t>() : nullptr, m.data_ptr<bool>(), c.data_ptr<float>(), B, T, p,
            grad.data_ptr<scalar_t>());
      });
    });
  });
  return grad.to(logp.scalar_type());
}

}  // namespace

void register_policy_loss(pybind11::module_& m) {
  m.def("policy_loss_forward", &policy_loss_forward,
        "fused clipped PPO policy loss: per-row partials fp32 [B, 10] and (token_out) the masked per-token loss",
        pybind11::arg("logp"), pybind11::arg("old_logp"), pybind11::arg("advantages"), pybind11::arg("mask"),
        pybind11::arg("rollout_logp"), pybind11::arg("clip_low"), pybind11::arg("clip_high"),
        pybind11::arg("dual_clip"), pybind11::arg("tis_cap"), pybind11::arg("token_out"));
  m.def("policy_loss_backward", &policy_loss_backward, "d loss / d logp of the fused policy loss, dtype of logp",
        pybind11::arg("logp"), pybind11::arg("old_logp"), pybind11::arg("advantages"), pybind11::arg("mask"),
        pybind11::arg("rollout_logp"), pybind11::arg("coef"), pybind11::arg("clip_low"),
        pybind11::arg("clip_high"), pybind11::arg("dual_clip"), pybind11::arg("tis_cap"));
}
