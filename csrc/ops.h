// Registration hooks: each csrc/<op>.cpp defines one register_<op>(m) that adds its functions.
#pragma once
#include <torch/extension.h>

void register_gae(pybind11::module_& m);
