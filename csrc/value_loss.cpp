// Clipped PPO value loss on CPU: one fused pass per direction, rows over torch's OpenMP pool.
// Per token (fp32; see rlhf_fast/ops/value_loss.py):
//   vc = clamp(v, old - c, old + c);  l1 = (v - R)^2;  l2 = (vc - R)^2;  l = 0.5 * max(l1, l2)
// forward:  per-row partials [B, 8] = (sum m*l, n, #(l2 > l1), sum v, sum R, sum R^2, sum e, sum e^2), e = R - v,
//           and, for agg="none", the per-token matrix m*l.
// backward: dv = coef * m * (v - R) where l1 >= l2 (the unclipped branch), else 0;
//           coef is the per-row g*s_b [B] or the per-token upstream gradient [B, T].
#include "loss_common.h"
#include "ops.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

namespace {

constexpr int kParts = 8;

using rlhf_fast::kLanes;
using rlhf_fast::splat;
using rlhf_fast::vf;
using rlhf_fast::vi;

// kLanes tokens' terms in fp32 lanes, branch-free (comparisons give lane masks, `m ? x : y` blends).
struct Lanes {
  vf loss, dloss;
  vi clip;
};

inline Lanes value_lanes(vf v, vf old, vf ret, float c) {
  vf vc = v < old - c ? old - c : v;  // std::min(std::max(v, old - c), old + c) lane-wise
  vc = old + c < vc ? old + c : vc;
  const vf d1 = v - ret, d2 = vc - ret;
  const vf l1 = d1 * d1, l2 = d2 * d2;
  const vi clip = l2 > l1;
  return {0.5f * (clip ? l2 : l1), clip ? splat(0.f) : d1, clip};
}

// Per-row partial sums, one per lane (counts as integer lanes: count -= mask), reduced at the row end.
struct Partials {
  vf loss{}, sv{}, sr{}, sr2{}, se{}, se2{};
  vi n{}, clip{};
};

// Tokens t..t+kLanes-1 of one row: masked lanes contribute nothing, whatever their values.
template <bool TOKEN_OUT, typename scalar_t>
inline void forward_step(const scalar_t* vp, const scalar_t* op, const scalar_t* rp, const bool* mp, int64_t t,
                         float c, Partials& s, float* tok) {
  using rlhf_fast::loadv;
  const vi m = rlhf_fast::load_maskv(mp + t);
  const vf zero = splat(0.f), v = loadv(vp + t), ret = loadv(rp + t);
  const Lanes k = value_lanes(v, loadv(op + t), ret, c);
  const vf l = m ? k.loss : zero;
  if (TOKEN_OUT) rlhf_fast::storev(tok + t, l);
  const vf vm = m ? v : zero, rm = m ? ret : zero, e = rm - vm;
  s.loss += l;
  s.n -= m;
  s.clip -= m & k.clip;
  s.sv += vm;
  s.sr += rm;
  s.sr2 += rm * rm;
  s.se += e;
  s.se2 += e * e;
}

template <typename scalar_t, bool TOKEN_OUT>
void forward_row(const scalar_t* vp, const scalar_t* op, const scalar_t* rp, const bool* mp, int64_t T, float c,
                 float* row, float* tok) {
  Partials s;
  int64_t t = 0;
  for (; t + kLanes <= T; t += kLanes) forward_step<TOKEN_OUT>(vp, op, rp, mp, t, c, s, tok);
  if (t < T) {  // the last T % kLanes tokens, through the same lanes: copied into zero-padded, masked-off lanes
    const int64_t n = T - t;
    float in[3][kLanes] = {}, out[kLanes];
    bool m[kLanes] = {};
    for (int64_t i = 0; i < n; ++i) {
      in[0][i] = static_cast<float>(vp[t + i]);
      in[1][i] = static_cast<float>(op[t + i]);
      in[2][i] = static_cast<float>(rp[t + i]);
      m[i] = mp[t + i];
    }
    forward_step<TOKEN_OUT>(in[0], in[1], in[2], m, 0, c, s, out);
    if (TOKEN_OUT) std::copy(out, out + n, tok + t);
  }
  using rlhf_fast::hsum;
  row[0] = hsum(s.loss); row[1] = hsum(s.n); row[2] = hsum(s.clip); row[3] = hsum(s.sv); row[4] = hsum(s.sr);
  row[5] = hsum(s.sr2); row[6] = hsum(s.se); row[7] = hsum(s.se2);
}

template <typename scalar_t, bool TOKEN_OUT>
void forward_rows(const scalar_t* vp, const scalar_t* op, const scalar_t* rp, const bool* mp, int64_t B, int64_t T,
                  float c, float* parts, float* tok) {
  at::parallel_for(0, B, rlhf_fast::row_grain(T), [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t o = b * T;
      forward_row<scalar_t, TOKEN_OUT>(vp + o, op + o, rp + o, mp + o, T, c, parts + b * kParts,
                                       TOKEN_OUT ? tok + o : nullptr);
    }
  });
}

// dv for tokens t..t+kLanes-1: coef * m * d loss / dv.
template <bool PER_TOKEN, typename scalar_t>
inline vf backward_step(const scalar_t* vp, const scalar_t* op, const scalar_t* rp, const bool* mp,
                         const float* coef, float row_c, int64_t t, float c) {
  using rlhf_fast::loadv;
  const Lanes k = value_lanes(loadv(vp + t), loadv(op + t), loadv(rp + t), c);
  const vf g = PER_TOKEN ? loadv(coef + t) : splat(row_c);
  return rlhf_fast::load_maskv(mp + t) ? g * k.dloss : splat(0.f);
}

template <typename scalar_t, bool PER_TOKEN>
void backward_row(const scalar_t* vp, const scalar_t* op, const scalar_t* rp, const bool* mp, const float* coef,
                  float row_c, int64_t T, float c, scalar_t* grad) {
  int64_t t = 0;
  for (; t + kLanes <= T; t += kLanes) {
    const vf d = backward_step<PER_TOKEN>(vp, op, rp, mp, coef, row_c, t, c);
    for (int i = 0; i < kLanes; ++i) grad[t + i] = static_cast<scalar_t>(d[i]);
  }
  if (t < T) {  // the last T % kLanes tokens, zero-padded and masked off
    const int64_t n = T - t;
    float in[4][kLanes] = {};
    bool m[kLanes] = {};
    for (int64_t i = 0; i < n; ++i) {
      in[0][i] = static_cast<float>(vp[t + i]);
      in[1][i] = static_cast<float>(op[t + i]);
      in[2][i] = static_cast<float>(rp[t + i]);
      if (PER_TOKEN) in[3][i] = coef[t + i];
      m[i] = mp[t + i];
    }
    const vf d = backward_step<PER_TOKEN>(in[0], in[1], in[2], m, in[3], row_c, 0, c);
    for (int64_t i = 0; i < n; ++i) grad[t + i] = static_cast<scalar_t>(d[i]);
  }
}

template <typename scalar_t, bool PER_TOKEN>
void backward_rows(const scalar_t* vp, const scalar_t* op, const scalar_t* rp, const bool* mp, const float* coef,
                   int64_t B, int64_t T, float c, scalar_t* grad) {
  at::parallel_for(0, B, rlhf_fast::row_grain(T), [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t o = b * T;
      backward_row<scalar_t, PER_TOKEN>(vp + o, op + o, rp + o, mp + o, PER_TOKEN ? coef + o : nullptr,
                                        PER_TOKEN ? 0.f : coef[b], T, c, grad + o);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> value_loss_forward(const at::Tensor& values, const at::Tensor& old_values,
                                                      const at::Tensor& returns, const at::Tensor& mask, double clip,
                                                      bool token_out) {
  TORCH_CHECK(values.dim() == 2 && mask.scalar_type() == at::kBool, "values must be [B, T], mask bool");
  auto in = rlhf_fast::one_float_dtype({values, old_values, returns});
  auto m = mask.contiguous();
  const int64_t B = values.size(0), T = values.size(1);
  auto opts = values.options().dtype(at::kFloat);
  auto parts = at::empty({B, kParts}, opts);
  at::Tensor tok = token_out ? at::empty({B, T}, opts) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, in[0].scalar_type(), "value_loss_forward", [&] {
    rlhf_fast::with_flag(token_out, [&](auto out) {
      forward_rows<scalar_t, decltype(out)::value>(in[0].data_ptr<scalar_t>(), in[1].data_ptr<scalar_t>(),
                                                   in[2].data_ptr<scalar_t>(), m.data_ptr<bool>(), B, T,
                                                   static_cast<float>(clip), parts.data_ptr<float>(),
                                                   out ? tok.data_ptr<float>() : nullptr);
    });
  });
  return {parts, tok};
}

at::Tensor value_loss_backward(const at::Tensor& values, const at::Tensor& old_values, const at::Tensor& returns,
                               const at::Tensor& mask, const at::Tensor& coef, double clip) {
  auto in = rlhf_fast::one_float_dtype({values, old_values, returns});
  auto m = mask.contiguous();
  auto c = coef.to(at::kFloat).contiguous();
  const int64_t B = values.size(0), T = values.size(1);
  TORCH_CHECK(c.numel() == B || c.numel() == B * T, "coef must be [B] or [B, T]");
  const bool per_token = c.numel() == B * T && c.dim() == 2;
  // Written in the kernel's input dtype, returned in the dtype of values (autograd requires it).
  auto grad = at::empty({B, T}, in[0].options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, in[0].scalar_type(), "value_loss_backward", [&] {
    rlhf_fast::with_flag(per_token, [&](auto per_tok) {
      backward_rows<scalar_t, decltype(per_tok)::value>(in[0].data_ptr<scalar_t>(), in[1].data_ptr<scalar_t>(),
                                                        in[2].data_ptr<scalar_t>(), m.data_ptr<bool>(),
                                                        c.data_ptr<float>(), B, T, static_cast<float>(clip),
                                                        grad.data_ptr<scalar_t>());
    });
  });
  return grad.to(values.scalar_type());
}

}  // namespace

void register_value_loss(pybind11::module_& m) {
  m.def("value_loss_forward", &value_loss_forward,
        "fused clipped PPO value loss: per-row partials fp32 [B, 8] and (token_out) the masked per-token loss",
        pybind11::arg("values"), pybind11::arg("old_values"), pybind11::arg("returns"), pybind11::arg("mask"),
        pybind11::arg("clip"), pybind11::arg("token_out"));
  m.def("value_loss_backward", &value_loss_backward, "d loss / d values of the fused value loss, dtype of values",
        pybind11::arg("values"), pybind11::arg("old_values"), pybind11::arg("returns"), pybind11::arg("mask"),
        pybind11::arg("coef"), pybind11::arg("clip"));
}
