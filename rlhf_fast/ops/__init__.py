"""Public functional ops. Each takes ``backend="auto" | "triton" | "native" | "torch"``."""
from rlhf_fast.ops.gae import gae
