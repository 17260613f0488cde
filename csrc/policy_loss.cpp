// Clipped PPO policy loss on CPU: one fused pass, rows over torch's OpenMP pool.
// Per token (fp32; see rlhf_fast/ops/policy_loss.py for the full statement):
//   lr = clamp(logp - old, -20, 20);  r = exp(lr);  pg = max(-A r, -A clamp(r, 1-cl, 1+ch))
//   A < 0: pg = min(pg, -A * dual);   with rollout_logp: pg *= w = min(exp(clamp(old - rollout, -20, 20)), cap)
//   with weight: pg *= weight (a per-token multiplier; the counts are the mask's)
// forward:  per-row partials [B, 10] = (sum m*pg, n, #clip, #dual, sum -lr, sum r, max r, min r, sum w, #w>cap)
//           and, for agg="none", the per-token matrix m*pg.
//           with grad_out also d = m * weight * w * (-A r) where no clip is active and |logp - old| <= 20, else 0,
//           [B, T]: the backward is then dlogp = coef * d (coef = g*s_b per row, or the upstream [B, T] grad),
//           one multiply instead of a second pass that re-reads the inputs and recomputes the exp.
#include "loss_common.h"
#include "ops.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <limits>
#include <optional>

namespace {

using rlhf_fast::kLanes;
using rlhf_fast::splat;
using rlhf_fast::vf;
using rlhf_fast::vi;

constexpr float kBound = 20.f;
constexpr int kParts = 10;

struct Params {
  float lo, hi, dual, cap;
};

// kLanes tokens' terms in fp32 lanes, branch-free: comparisons give lane masks, `m ? x : y` blends.
// (GCC 12 will not vectorise the scalar form: it jump-threads the +-20 clamp into branches around the exp.)
struct Lanes {
  vf pg;   // w * clipped surrogate
  vf dpg;  // d pg / d logp
  vf ratio, log_ratio, w;
  vi clip, dual_on, w_clip;
};

// std::min / std::max semantics lane-wise (a NaN first operand propagates, as in the torch reference's clamp).
inline vf clamp(vf x, vf lo, vf hi) {
  x = x < lo ? lo : x;
  return hi < x ? hi : x;
}

template <bool HAS_TIS>
inline Lanes policy_lanes(vf lp, vf olp, vf a, vf rlp, const Params& p) {
  const vf zero = splat(0.f), bound = splat(kBound);
  const vf raw = lp - olp;
  const vf lr = clamp(raw, -bound, bound);
  const vf r = rlhf_fast::exp_simd(lr);
  const vf pg1 = -a * r;
  const vf pg2 = -a * clamp(r, splat(p.lo), splat(p.hi));
  const vf pg3 = -a * p.dual;
  const vi clip = pg2 > pg1;
  const vf pg12 = clip ? pg2 : pg1;
  const vi dual_on = (a < 0.f) & (pg12 > pg3);
  const vf pg = dual_on ? pg3 : pg12;
  vf w = splat(1.f);
  vi w_clip = vi{};
  if (HAS_TIS) {
    const vf w_raw = rlhf_fast::exp_simd(clamp(olp - rlp, -bound, bound));
    w_clip = w_raw > p.cap;
    w = w_clip ? splat(p.cap) : w_raw;
  }
  // The gradient flows through the unclipped branch only, and not where the log-ratio clamp binds (raw != lr).
  const vi pass = ~clip & ~dual_on & (raw == lr);
  return {w * pg, w * (pass ? pg1 : zero), r, lr, w, clip, dual_on, w_clip};
}

// Per-row partial sums, one per lane, reduced at the row end.
// Counts are integer lanes (a true mask lane is -1: count -= mask).
struct Partials {
  vf loss{}, nkl{}, rsum{}, wsum{};
  vi n{}, clip{}, dual{}, wclip{};
  vf rmax = splat(-std::numeric_limits<float>::infinity()), rmin = splat(std::numeric_limits<float>::infinity());
};

// Tokens t..t+kLanes-1 of one row (masked lanes contribute nothing, whatever their values: NaN padding included).
template <bool HAS_TIS, bool HAS_W, bool TOKEN_OUT, bool GRAD_OUT, typename scalar_t>
inline void policy_step(const scalar_t* lp, const scalar_t* op, const scalar_t* ap, const scalar_t* rp,
                        const scalar_t* wp, const bool* mp, int64_t t, const Params& p, Partials& s, float* tok,
                        float* dtok) {
  using rlhf_fast::loadv;
  const vi m = rlhf_fast::load_maskv(mp + t);
  const vf zero = splat(0.f);
  const Lanes k = policy_lanes<HAS_TIS>(loadv(lp + t), loadv(op + t), loadv(ap + t),
                                        HAS_TIS ? loadv(rp + t) : zero, p);
  const vf wu = HAS_W ? loadv(wp + t) : splat(1.f);
  const vf pg = m ? wu * k.pg : zero;
  if (TOKEN_OUT) rlhf_fast::storev(tok + t, pg);
  if (GRAD_OUT) rlhf_fast::storev(dtok + t, m ? wu * k.dpg : zero);
  s.loss += pg;
  s.n -= m;
  s.clip -= m & k.clip;
  s.dual -= m & k.dual_on;
  s.nkl -= m ? k.log_ratio : zero;
  s.rsum += m ? k.ratio : zero;
  if (HAS_TIS) {
    s.wsum += m ? k.w : zero;
    s.wclip -= m & k.w_clip;
  }
  const vf rmax = m ? k.ratio : splat(-std::numeric_limits<float>::infinity());
  const vf rmin = m ? k.ratio : splat(std::numeric_limits<float>::infinity());
  s.rmax = s.rmax < rmax ? rmax : s.rmax;
  s.rmin = rmin < s.rmin ? rmin : s.rmin;
}

// One row: T tokens from the given offsets, its 10 partials to row. Everything by value, so that the stores to
// tok / dtok cannot alias the parameters and pointers (which then stay in registers).
template <bool HAS_TIS, bool HAS_W, bool TOKEN_OUT, bool GRAD_OUT, typename scalar_t>
void policy_row(const scalar_t* lp, const scalar_t* op, const scalar_t* ap, const scalar_t* rp, const scalar_t* wp,
                const bool* mp, int64_t T, const Params p, float* row, float* tok, float* dtok) {
  Partials s;
  int64_t t = 0;
  for (; t + kLanes <= T; t += kLanes) {
    policy_step<HAS_TIS, HAS_W, TOKEN_OUT, GRAD_OUT>(lp, op, ap, rp, wp, mp, t, p, s, tok, dtok);
  }
  if (t < T) {  // the last T % kLanes tokens, through the same lanes: copied into zero-padded, masked-off lanes
    const int64_t n = T - t;
    float in[5][kLanes] = {}, out[2][kLanes];
    bool m[kLanes] = {};
    for (int64_t i = 0; i < n; ++i) {
      in[0][i] = static_cast<float>(lp[t + i]);
      in[1][i] = static_cast<float>(op[t + i]);
      in[2][i] = static_cast<float>(ap[t + i]);
      if (HAS_TIS) in[3][i] = static_cast<float>(rp[t + i]);
      if (HAS_W) in[4][i] = static_cast<float>(wp[t + i]);
      m[i] = mp[t + i];
    }
    policy_step<HAS_TIS, HAS_W, TOKEN_OUT, GRAD_OUT>(in[0], in[1], in[2], in[3], in[4], m, 0, p, s, out[0],
                                                     out[1]);
    if (TOKEN_OUT) std::copy(out[0], out[0] + n, tok + t);
    if (GRAD_OUT) std::copy(out[1], out[1] + n, dtok + t);
  }
  using rlhf_fast::hsum;
  const float n = hsum(s.n);
  row[0] = hsum(s.loss); row[1] = n; row[2] = hsum(s.clip); row[3] = hsum(s.dual); row[4] = hsum(s.nkl);
  row[5] = hsum(s.rsum);
  row[6] = rlhf_fast::hmax(s.rmax);
  row[7] = rlhf_fast::hmin(s.rmin);
  row[8] = HAS_TIS ? hsum(s.wsum) : n; row[9] = hsum(s.wclip);
}

template <typename scalar_t, bool HAS_TIS, bool HAS_W, bool TOKEN_OUT, bool GRAD_OUT>
void forward_rows(const scalar_t* lp, const scalar_t* op, const scalar_t* ap, const scalar_t* rp,
                  const scalar_t* wp, const bool* mp, int64_t B, int64_t T, const Params& p, float* parts, float* tok,
                  float* dtok) {
  at::parallel_for(0, B, rlhf_fast::row_grain(T), [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t o = b * T;
      policy_row<HAS_TIS, HAS_W, TOKEN_OUT, GRAD_OUT>(lp + o, op + o, ap + o, HAS_TIS ? rp + o : nullptr,
                                                      HAS_W ? wp + o : nullptr, mp + o, T, p, parts + b * kParts,
                                                      TOKEN_OUT ? tok + o : nullptr, GRAD_OUT ? dtok + o : nullptr);
    }
  });
}

Params make_params(double clip_low, double clip_high, double dual_clip, double tis_cap) {
  return {static_cast<float>(1.0 - clip_low), static_cast<float>(1.0 + clip_high), static_cast<float>(dual_clip),
          static_cast<float>(tis_cap)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> policy_loss_forward(
    const at::Tensor& logp, const at::Tensor& old_logp, const at::Tensor& advantages, const at::Tensor& mask,
    const std::optional<at::Tensor>& rollout_logp, const std::optional<at::Tensor>& weight, double clip_low, double clip_high, double dual_clip,
    double tis_cap, bool token_out, bool grad_out) {
  TORCH_CHECK(logp.dim() == 2 && mask.scalar_type() == at::kBool, "logp must be [B, T], mask bool");
  auto in = rlhf_fast::one_float_dtype(
      {logp, old_logp, advantages, rollout_logp.value_or(at::Tensor()), weight.value_or(at::Tensor())});
  auto m = mask.contiguous();
  const int64_t B = logp.size(0), T = logp.size(1);
  auto opts = logp.options().dtype(at::kFloat);
  auto parts = at::empty({B, kParts}, opts);
  at::Tensor tok = token_out ? at::empty({B, T}, opts) : at::Tensor();
  at::Tensor dtok = grad_out ? at::empty({B, T}, opts) : at::Tensor();
  const Params p = make_params(clip_low, clip_high, dual_clip, tis_cap);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, in[0].scalar_type(), "policy_loss_forward", [&] {
    rlhf_fast::with_flag(in[3].defined(), [&](auto tis) {
      rlhf_fast::with_flag(in[4].defined(), [&](auto has_w) {
        rlhf_fast::with_flag(token_out, [&](auto out) {
          rlhf_fast::with_flag(grad_out, [&](auto dout) {
            forward_rows<scalar_t, decltype(tis)::value, decltype(has_w)::value, decltype(out)::value,
                         decltype(dout)::value>(
                in[0].data_ptr<scalar_t>(), in[1].data_ptr<scalar_t>(), in[2].data_ptr<scalar_t>(),
                tis ? in[3].data_ptr<scalar_t>() : nullptr, has_w ? in[4].data_ptr<scalar_t>() : nullptr,
                m.data_ptr<bool>(), B, T, p, parts.data_ptr<float>(), out ? tok.data_ptr<float>() : nullptr,
                dout ? dtok.data_ptr<float>() : nullptr);
          });
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
        pybind11::arg("rollout_logp"), pybind11::arg("weight"), pybind11::arg("clip_low"), pybind11::arg("clip_high"),
        pybind11::arg("dual_clip"), pybind11::arg("tis_cap"), pybind11::arg("token_out"), pybind11::arg("grad_out"));
}
