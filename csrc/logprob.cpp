// Per-token log-prob and entropy from logits on CPU (see rlhf_fast/ops/logprob.py for the math).
// Rows are spread over torch's OpenMP pool; each row (V floats, in L2) is swept twice:
//   forward:  m = max_j z_j ;  d_j = max((z_j - m) / tau, -87)  ;  Z = sum_j e^{d_j} ;  D = sum_j e^{d_j} d_j
//             logp = d_y - log Z (<= 0) ;  H = max(log Z - D / Z, 0) ;  lse = m / tau + log Z
//   backward: [H = -sum_j p_j log p_j if needed and not given] ;  with lp_j = z_j / tau - lse, p_j = e^{lp_j}:
//             dz_j = (-g_logp p_j - g_H p_j (lp_j + H)) / tau, plus g_logp / tau at j = y.
// The clamp at -87 keeps e^{d} >= FLT_MIN, so -inf logits give p = 0 and p * d = 0 instead of NaN.
// bf16/fp16 rows are converted into a per-thread fp32 row buffer; fp32 rows are read in place.
// Logits may be [N, V] or [B, T, V] with any row strides as long as stride(-1) == 1.
#include "ops.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <optional>
#include <vector>

namespace {

constexpr float kMinExpArg = -87.0f;  // e^-87 ~ 1.6e-38 > FLT_MIN: no denormals, no -inf * 0

// GCC if-converts (and so vectorises) float selects only without -ftrapping-math; clang's default already.
// The vector width is the build target's (setup.py: -march=native unless RLHF_FAST_MARCH says otherwise).
// No target_clones: a clone for a narrower target than the build's cannot inline exp_f32 (GCC refuses to inline
// across a target-feature mismatch), so its loops would call it per element and not vectorise at all.
#if defined(__GNUC__) && !defined(__clang__)
#define RLHF_VECTORIZE __attribute__((optimize("no-trapping-math")))
#else
#define RLHF_VECTORIZE
#endif
#define RLHF_ROW_LOOP RLHF_VECTORIZE

RLHF_VECTORIZE inline float max_f32(float a, float b) { return a > b ? a : b; }

// e^x for x in [-87, 88]: Cody-Waite range reduction + Cephes' degree-6 polynomial (~1 ulp).
// Branch-free so `#pragma omp simd` loops calling it vectorise.
RLHF_VECTORIZE inline float exp_f32(float x) {
  x = x < kMinExpArg ? kMinExpArg : (x > 88.0f ? 88.0f : x);
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest: + 1.5 * 2^23
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

// Row i of a [N, V] or [B, T, V] tensor with unit stride along V starts at element offset(i).
struct RowOffsets {
  int64_t T, sb, st;
  explicit RowOffsets(const at::Tensor& t) {
    if (t.dim() == 2) {
      T = std::max<int64_t>(t.size(0), 1), sb = 0, st = t.stride(0);
    } else {
      T = std::max<int64_t>(t.size(1), 1), sb = t.stride(0), st = t.stride(1);
    }
  }
  int64_t operator()(int64_t i) const { return (i / T) * sb + (i % T) * st; }
};

RLHF_ROW_LOOP float row_max(const float* x, int64_t V) {
  float m = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : m)
  for (int64_t j = 0; j < V; ++j) m = max_f32(m, x[j]);
  return m;
}

// Sums run over chunks of kChunk elements (vectorised, fp32 lanes) added into double totals, so the
// rounding error stays ~(kChunk / lanes + V / kChunk) ulps even for 150k+ vocabularies.
constexpr int64_t kChunk = 1024;

// Z = sum e^{d_j}, D = sum e^{d_j} d_j with d_j = max((x_j - m) * inv_tau, -87).
RLHF_ROW_LOOP void row_sums(const float* x, int64_t V, float m, float inv_tau, bool need_d, float& Z_out,
                             float& D_out) {
  double Z_tot = 0.0, D_tot = 0.0;
  for (int64_t c = 0; c < V; c += kChunk) {
    const int64_t n = std::min(kChunk, V - c);
    const float* xc = x + c;
    float Z = 0.f, D = 0.f;
    if (need_d) {
#pragma omp simd reduction(+ : Z, D)
      for (int64_t j = 0; j < n; ++j) {
        const float d = max_f32((xc[j] - m) * inv_tau, kMinExpArg);
        const float e = exp_f32(d);
        Z += e;
        D += e * d;
      }
    } else {
#pragma omp simd reduction(+ : Z)
      for (int64_t j = 0; j < n; ++j) Z += exp_f32((xc[j] - m) * inv_tau);
    }
    Z_tot += Z, D_tot += D;
  }
  Z_out = static_cast<float>(Z_tot), D_out = static_cast<float>(D_tot);
}

// -sum_j p_j lp_j with lp_j = max(x_j * inv_tau - lse, -87).
RLHF_ROW_LOOP float row_entropy(const float* x, int64_t V, float inv_tau, float lse) {
  double H_tot = 0.0;
  for (int64_t c = 0; c < V; c += kChunk) {
    const int64_t n = std::min(kChunk, V - c);
    const float* xc = x + c;
    float H = 0.f;
#pragma omp simd reduction(+ : H)
    for (int64_t j = 0; j < n; ++j) {
      const float lp = max_f32(xc[j] * inv_tau - lse, kMinExpArg);
      H -= exp_f32(lp) * lp;
    }
    H_tot += H;
  }
  return std::max(static_cast<float>(H_tot), 0.f);
}

// g_j = (-a p_j - b p_j (lp_j + H)) with a = g_logp / tau, b = g_H / tau (written to `g`, which may alias x).
RLHF_ROW_LOOP void row_grad(const float* x, float* g, int64_t V, float inv_tau, float lse, float a, float b, float H) {
#pragma omp simd
  for (int64_t j = 0; j < V; ++j) {
    const float lp = max_f32(x[j] * inv_tau - lse, kMinExpArg);
    const float p = exp_f32(lp);
    g[j] = -p * (a + b * (lp + H));
  }
}

template <typename scalar_t>
inline const float* as_float_row(const scalar_t* src, int64_t V, std::vector<float>& buf) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return src;
  } else {
    for (int64_t j = 0; j < V; ++j) buf[j] = static_cast<float>(src[j]);
    return buf.data();
  }
}

void check_logits(const at::Tensor& logits, const char* name) {
  TORCH_CHECK(logits.dim() == 2 || logits.dim() == 3, name, " must be [N, V] or [B, T, V]");
  TORCH_CHECK(logits.size(-1) == 1 || logits.stride(-1) == 1, name, " must have unit stride along V");
  TORCH_CHECK(logits.scalar_type() == at::kFloat || logits.scalar_type() == at::kBFloat16 ||
                  logits.scalar_type() == at::kHalf,
              name, " must be fp32, bf16 or fp16");
}

int64_t grain_rows(int64_t V) { return std::max<int64_t>(1, 65536 / std::max<int64_t>(V, 1)); }

std::tuple<at::Tensor, at::Tensor, at::Tensor> logprob_forward(const at::Tensor& logits, const at::Tensor& labels,
                                                               double temperature, int64_t ignore_index,
                                                               bool need_entropy) {
  check_logits(logits, "logits");
  const int64_t V = logits.size(-1), N = logits.numel() / std::max<int64_t>(V, 1);
  TORCH_CHECK(labels.scalar_type() == at::kLong && labels.is_contiguous() && labels.numel() == N,
              "labels must be contiguous int64 with one entry per row");
  auto opts = logits.options().dtype(at::kFloat);
  auto logp = at::empty({N}, opts), lse = at::empty({N}, opts);
  auto entropy = need_entropy ? at::empty({N}, opts) : at::empty({0}, opts);
  const RowOffsets row(logits);
  const int64_t* lab = labels.data_ptr<int64_t>();
  float *lp_out = logp.data_ptr<float>(), *lse_out = lse.data_ptr<float>();
  float* h_out = need_entropy ? entropy.data_ptr<float>() : nullptr;
  const float inv_tau = static_cast<float>(1.0 / temperature);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "logprob_forward", [&] {
    const scalar_t* base = logits.const_data_ptr<scalar_t>();
    at::parallel_for(0, N, grain_rows(V), [&](int64_t begin, int64_t end) {
      std::vector<float> buf(std::is_same_v<scalar_t, float> ? 0 : V);
      for (int64_t i = begin; i < end; ++i) {
        const float* x = as_float_row(base + row(i), V, buf);
        const float m = row_max(x, V);
        float Z, D;
        row_sums(x, V, m, inv_tau, need_entropy, Z, D);
        const float logZ = std::log(Z);
        lse_out[i] = m * inv_tau + logZ;
        const bool valid = lab[i] != ignore_index, hit = valid && lab[i] >= 0 && lab[i] < V;
        lp_out[i] = hit ? std::min((x[lab[i]] - m) * inv_tau - logZ, 0.f) : 0.f;
        if (need_entropy) h_out[i] = valid ? std::max(logZ - D / Z, 0.f) : 0.f;
      }
    });
  });
  return {logp, entropy, lse};
}

void logprob_backward(const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& lse,
                      const std::optional<at::Tensor>& grad_logp, const std::optional<at::Tensor>& grad_entropy,
                      double temperature, int64_t ignore_index, at::Tensor out,
                      const std::optional<at::Tensor>& entropy) {
  check_logits(logits, "logits");
  check_logits(out, "out");
  TORCH_CHECK(out.sizes() == logits.sizes() && out.scalar_type() == logits.scalar_type(),
              "out must have the shape and dtype of logits");
  const int64_t V = logits.size(-1), N = logits.numel() / std::max<int64_t>(V, 1);
  auto fp32_rows = [&](const std::optional<at::Tensor>& t, const char* name) -> const float* {
    if (!t.has_value()) return nullptr;
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->numel() == N, name,
                " must be contiguous fp32 [N]");
    return t->const_data_ptr<float>();
  };
  const float* g_lp = fp32_rows(grad_logp, "grad_logp");
  const float* g_h = fp32_rows(grad_entropy, "grad_entropy");
  const float* h_in = fp32_rows(entropy, "entropy");
  const float* lse_p = fp32_rows(lse, "lse");
  TORCH_CHECK(labels.scalar_type() == at::kLong && labels.is_contiguous() && labels.numel() == N,
              "labels must be contiguous int64 with one entry per row");
  const int64_t* lab = labels.data_ptr<int64_t>();
  const RowOffsets in_row(logits), out_row(out);
  const float inv_tau = static_cast<float>(1.0 / temperature);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "logprob_backward", [&] {
    const scalar_t* in_base = logits.const_data_ptr<scalar_t>();
    scalar_t* out_base = out.data_ptr<scalar_t>();
    at::parallel_for(0, N, grain_rows(V), [&](int64_t begin, int64_t end) {
      std::vector<float> buf(std::is_same_v<scalar_t, float> ? 0 : V);
      for (int64_t i = begin; i < end; ++i) {
        scalar_t* o = out_base + out_row(i);
        if (lab[i] == ignore_index) {
          std::fill(o, o + V, scalar_t(0.f));
          continue;
        }
        const float* x = as_float_row(in_base + in_row(i), V, buf);
        const float a = g_lp ? g_lp[i] * inv_tau : 0.f, b = g_h ? g_h[i] * inv_tau : 0.f;
        const float H = b == 0.f ? 0.f : (h_in ? h_in[i] : row_entropy(x, V, inv_tau, lse_p[i]));
        const int64_t y = lab[i];
        const bool hit = y >= 0 && y < V;  // a label outside the row (another vocab slice): no one-hot term
        if constexpr (std::is_same_v<scalar_t, float>) {
          float* g = reinterpret_cast<float*>(o);  // may alias x: each index is read, then written
          row_grad(x, g, V, inv_tau, lse_p[i], a, b, H);
          if (hit) g[y] += a;
        } else {
          row_grad(x, buf.data(), V, inv_tau, lse_p[i], a, b, H);
          if (hit) buf[y] += a;
          for (int64_t j = 0; j < V; ++j) o[j] = static_cast<scalar_t>(buf[j]);
        }
      }
    });
  });
}

}  // namespace

void register_logprob(pybind11::module_& m) {
  m.def("logprob_forward", &logprob_forward,
        "Per-row (logp, entropy or empty, lse), fp32 [N], from logits [N, V] or [B, T, V]",
        pybind11::arg("logits"), pybind11::arg("labels"), pybind11::arg("temperature"),
        pybind11::arg("ignore_index"), pybind11::arg("need_entropy"));
  m.def("logprob_backward", &logprob_backward, "Writes d(g_logp.logp + g_H.H)/dlogits into out (may alias logits)",
        pybind11::arg("logits"), pybind11::arg("labels"), pybind11::arg("lse"), pybind11::arg("grad_logp"),
        pybind11::arg("grad_entropy"), pybind11::arg("temperature"), pybind11::arg("ignore_index"),
        pybind11::arg("out"), pybind11::arg("entropy") = pybind11::none());
}
