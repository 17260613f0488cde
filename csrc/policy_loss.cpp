// Clipped PPO policy loss on CPU: one fused pass, rows over torch's OpenMP pool.
// Per token (fp32; see rlhf_fast/ops/policy_loss.py for the full statement):
//   lr = clamp(logp - old, -20, 20);  r = exp(lr);  pg = max(-A r, -A clamp(r, 1-cl, 1+ch))
//   A < 0: pg = min(pg, -A * dual);   with rollout_logp: pg *= w = min(exp(clamp(old - rollout, -20, 20)), cap)
// forward:  per-row partials [B, 10] = (sum m*pg, n, #clip, #dual, sum -lr, sum r, max r, min r, sum w, #w>cap)
//           and, for agg="none", the per-token matrix m*pg.
//           with grad_out also d = m * w * (-A r) where no clip is active and |logp - old| <= 20, else 0,
//           [B, T]: the backward is then dlogp = coef * d (coef = g*s_b per row, or the upstream [B, T] grad),
//           one multiply instead of re-reading the inputs (and a non-vectorising recompute).
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

// The token's terms. Branch-free for the vectoriser: only selects, and no arithmetic inside a select's arm
// (without -fno-trapping-math GCC will not if-convert an arm that computes a float product).
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
  const float pg3 = -a * p.dual;
  const bool clip = pg2 > pg1;
  const float pg12 = clip ? pg2 : pg1;
  const bool dual_on = (a < 0.f) & (pg12 > pg3);
  const float pg = dual_on ? pg3 : pg12;
  float w = 1.f;
  bool w_clip = false;
  if (HAS_TIS) {
    const float w_raw = rlhf_fast::exp_simd(std::min(std::max(olp - rlp, -kBound), kBound));
    w_clip = w_raw > p.cap;
    w = w_clip ? p.cap : w_raw;
  }
  // The gradient flows through the unclipped branch only, and not where the log-ratio clamp binds (raw != lr).
  const bool pass = !clip & !dual_on & (raw == lr);
  return {w * pg, w * (pass ? pg1 : 0.f), r, lr, w, clip, dual_on, w_clip};
}

template <typename scalar_t, bool HAS_TIS, bool TOKEN_OUT, bool GRAD_OUT>
void forward_rows(const scalar_t* lp, const scalar_t* op, const scalar_t* ap, const scalar_t* rp, const bool* mp,
                  int64_t B, int64_t T, const Params& p, float* parts, float* tok, float* dtok) {
  constexpr float inf = std::numeric_limits<float>::infinity();
  const auto* mb = reinterpret_cast<const uint8_t*>(mp);
  at::parallel_for(0, B, rlhf_fast::row_grain(T), [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t o = b * T;
      float loss = 0.f, n = 0.f, clip = 0.f, dual = 0.f, nkl = 0.f, rsum = 0.f, wsum = 0.f, wclip = 0.f;
      float rmax = -inf, rmin = inf;
#pragma omp simd reduction(+ : loss, n, clip, dual, nkl, rsum, wsum, wclip) reduction(max : rmax) reduction(min : rmin)
      for (int64_t t = 0; t < T; ++t) {
        const bool m = mb[o + t] != 0;
        const Token k = policy_token<HAS_TIS>(static_cast<float>(lp[o + t]), static_cast<float>(op[o + t]),
                                              static_cast<float>(ap[o + t]),
                                              HAS_TIS ? static_cast<float>(rp[o + t]) : 0.f, p);
        const float pg = m ? k.pg : 0.f;
        if (TOKEN_OUT) tok[o + t] = pg;
        if (GRAD_OUT) dtok[o + t] = m ? k.dpg : 0.f;
        loss += pg;
        n += m ? 1.f : 0.f;
        clip += (m & k.clip) ? 1.f : 0.f;
        dual += (m & k.dual_on) ? 1.f : 0.f;
        nkl -= m ? k.log_ratio : 0.f;
        rsum += m ? k.ratio : 0.f;
        if (HAS_TIS) {
          wsum += m ? k.w : 0.f;
          wclip += (m & k.w_clip) ? 1.f : 0.f;
        }
        rmax = std::max(rmax, m ? k.ratio : -inf);
        rmin = std::min(rmin, m ? k.ratio : inf);
      }
      if (!HAS_TIS) wsum = n;
      float* out = parts + b * kParts;
      out[0] = loss; out[1] = n; out[2] = clip; out[3] = dual; out[4] = nkl;
      out[5] = rsum; out[6] = rmax; out[7] = rmin; out[8] = wsum; out[9] = wclip;
    }
  });
}

Params make_params(double clip_low, double clip_high, double dual_clip, double tis_cap) {
  return {static_cast<float>(1.0 - clip_low), static_cast<float>(1.0 + clip_high), static_cast<float>(dual_clip),
          static_cast<float>(tis_cap)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> policy_loss_forward(
    const at::Tensor& logp, const at::Tensor& old_logp, const at::Tensor& advantages, const at::Tensor& mask,
    const std::optional<at::Tensor>& rollout_logp, double clip_low, double clip_high, double dual_clip,
    double tis_cap, bool token_out, bool grad_out) {
  TORCH_CHECK(logp.dim() == 2 && mask.scalar_type() == at::kBool, "logp must be [B, T], mask bool");
  auto in = rlhf_fast::one_float_dtype({logp, old_logp, advantages, rollout_logp.value_or(at::Tensor())});
  auto m = mask.contiguous();
  const int64_t B = logp.size(0), T = logp.size(1);
  auto opts = logp.options().dtype(at::kFloat);
  auto parts = at::empty({B, kParts}, opts);
  at::Tensor tok = token_out ? at::empty({B, T}, opts) : at::Tensor();
  at::Tensor dtok = grad_out ? at::empty({B, T}, opts) : at::Tensor();
  const Params p = make_params(clip_low, clip_high, dual_clip, tis_cap);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, in[0].scalar_type(), "policy_loss_forward", [&] {
    rlhf_fast::with_flag(in[3].defined(), [&](auto tis) {
      rlhf_fast::with_flag(token_out, [&](auto out) {
        rlhf_fast::with_flag(grad_out, [&](auto dout) {
          forward_rows<scalar_t, decltype(tis)::value, decltype(out)::value, decltype(dout)::value>(
              in[0].data_ptr<scalar_t>(), in[1].data_ptr<scalar_t>(), in[2].data_ptr<scalar_t>(),
              tis ? in[3].data_ptr<scalar_t>() : nullptr, m.data_ptr<bool>(), B, T, p, parts.data_ptr<float>(),
              out ? tok.data_ptr<float>() : nullptr, dout ? dtok.data_ptr<float>() : nullptr);
        });
      });
    });
  });
  return {parts, tok, dtok};
}

}  // namespace

void register_policy_loss(pybind11::module_& m) {
  m.def("policy_loss_forward", &policy_loss_forward,
        "fused clipped PPO policy loss: per-row partials fp32 [B, 10], (token_out) the masked per-token loss and "
        "(grad_out) its per-token derivative m * d pg / d logp, both fp32 [B, T]",
        pybind11::arg("logp"), pybind11::arg("old_logp"), pybind11::arg("advantages"), pybind11::arg("mask"),
        pybind11::arg("rollout_logp"), pybind11::arg("clip_low"), pybind11::arg("clip_high"),
        pybind11::arg("dual_clip"), pybind11::arg("tis_cap"), pybind11::arg("token_out"), pybind11::arg("grad_out"));
}
