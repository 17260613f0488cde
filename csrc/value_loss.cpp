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

struct Token {
  float loss, dloss;
  bool clip;
};

inline Token value_token(float v, float old, float ret, float c) {
  const float vc = std::min(std::max(v, old - c), old + c);
  const float d1 = v - ret, d2 = vc - ret;
  const float l1 = d1 * d1, l2 = d2 * d2;
  const bool clip = l2 > l1;
  return {0.5f * (clip ? l2 : l1), clip ? 0.f : d1, clip};
}

template <typename scalar_t, bool TOKEN_OUT>
void forward_rows(const scalar_t* vp, const scalar_t* op, const scalar_t* rp, const bool* mp, int64_t B, int64_t T,
                  float c, float* parts, float* tok) {
  at::parallel_for(0, B, rlhf_fast::row_grain(T), [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t o = b * T;
      float loss = 0.f, n = 0.f, clip = 0.f, sv = 0.f, sr = 0.f, sr2 = 0.f, se = 0.f, se2 = 0.f;
#pragma omp simd reduction(+ : loss, n, clip, sv, sr, sr2, se, se2)
      for (int64_t t = 0; t < T; ++t) {
        const bool m = mp[o + t];
        const float v = static_cast<float>(vp[o + t]), ret = static_cast<float>(rp[o + t]);
        const Token k = value_token(v, static_cast<float>(op[o + t]), ret, c);
        const float l = m ? k.loss : 0.f;
        if (TOKEN_OUT) tok[o + t] = l;
        const float vm = m ? v : 0.f, rm = m ? ret : 0.f, e = rm - vm;
        loss += l;
        n += m ? 1.f : 0.f;
        clip += (m && k.clip) ? 1.f : 0.f;
        sv += vm;
        sr += rm;
        sr2 += rm * rm;
        se += e;
        se2 += e * e;
      }
      float* out = parts + b * kParts;
      out[0] = loss; out[1] = n; out[2] = clip; out[3] = sv; out[4] = sr; out[5] = sr2; out[6] = se; out[7] = se2;
    }
  });
}

template <typename scalar_t, bool PER_TOKEN>
void backward_rows(const scalar_t* vp, const scalar_t* op, const scalar_t* rp, const bool* mp, const float* coef,
                   int64_t B, int64_t T, float c, scalar_t* grad) {
  at::parallel_for(0, B, rlhf_fast::row_grain(T), [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t o = b * T;
      const float row_c = PER_TOKEN ? 0.f : coef[b];
#pragma omp simd
      for (int64_t t = 0; t < T; ++t) {
        const Token k = value_token(static_cast<float>(vp[o + t]), static_cast<float>(op[o + t]),
                                    static_cast<float>(rp[o + t]), c);
        const float g = PER_TOKEN ? coef[o + t] : row_c;
        grad[o + t] = static_cast<scalar_t>(mp[o + t] ? g * k.dloss : 0.f);
      }
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
