// Torch wrapper of csrc/cuda/gae.cu: rlhf_fast._C.gae_forward_cuda (built only with a CUDA torch).
#ifdef RLHF_FAST_WITH_CUDA
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "../ops.h"

void gae_cuda_launch(const float* r, const float* v, const bool* m, float* adv, float* ret, int64_t B, int64_t T,
                     float gamma, float lam, cudaStream_t s);

namespace {

std::tuple<at::Tensor, at::Tensor> gae_forward_cuda(const at::Tensor& rewards, const at::Tensor& values,
                                                    const at::Tensor& mask, double gamma, double lam) {
  TORCH_CHECK(rewards.is_cuda() && rewards.dim() == 2, "rewards must be a CUDA [B, T] tensor");
  const c10::cuda::CUDAGuard guard(rewards.device());
  auto r = rewards.to(at::kFloat).contiguous();
  auto v = values.to(at::kFloat).contiguous();
  auto m = mask.to(at::kBool).contiguous();
  auto adv = at::empty_like(r);
  auto ret = at::empty_like(r);
  gae_cuda_launch(r.data_ptr<float>(), v.data_ptr<float>(), m.data_ptr<bool>(), adv.data_ptr<float>(),
                  ret.data_ptr<float>(), r.size(0), r.size(1), static_cast<float>(gamma), static_cast<float>(lam),
                  c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {adv, ret};
}

}  // namespace

void register_gae_cuda(pybind11::module_& m) {
  m.def("gae_forward_cuda", &gae_forward_cuda, "GAE advantages and returns on CUDA (warp scan), fp32 [B, T]",
        pybind11::arg("rewards"), pybind11::arg("values"), pybind11::arg("mask"), pybind11::arg("gamma"),
        pybind11::arg("lam"));
}
#endif  // RLHF_FAST_WITH_CUDA
