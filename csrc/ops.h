// Registration hooks: each csrc/<op>.cpp defines one register_<op>(m) that adds its functions.
#pragma once
#include <torch/extension.h>

void register_gae(pybind11::module_& m);
#ifdef RLHF_FAST_WITH_CUDA
void register_gae_cuda(pybind11::module_& m);
#endif
void register_kl(pybind11::module_& m);
void register_masked(pybind11::module_& m);
void register_logprob(pybind11::module_& m);
void register_policy_loss(pybind11::module_& m);
void register_value_loss(pybind11::module_& m);
