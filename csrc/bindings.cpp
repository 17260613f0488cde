// rlhf_fast._C: the native CPU backend (and CUDA kernels where built with CUDA).
#include "ops.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "rlhf_fast native kernels (C++/OpenMP CPU backend)";
  register_gae(m);
#ifdef RLHF_FAST_WITH_CUDA
  register_gae_cuda(m);
#endif
  register_kl(m);
  register_masked(m);
  register_logprob(m);
  register_policy_loss(m);
  register_value_loss(m);
}
