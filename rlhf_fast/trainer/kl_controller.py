"""KL coefficient controllers for the penalty R = r - beta * KL (Ziegler et al. 2019, section 2.2).

Fixed: beta constant. Adaptive (proportional controller towards a target KL per sequence)::

    e      = clip(KL_t / KL_target - 1, -0.2, 0.2)
    beta  <- beta * (1 + e * n_steps / horizon)

where KL_t is the measured KL of the last batch and n_steps the number of samples (episodes) in it.
"""
from __future__ import annotations

from rlhf_fast._validation import check_positive


class FixedKLController:
    def __init__(self, init_kl_coef: float):
        self.value = float(init_kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        pass

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


class AdaptiveKLController(FixedKLController):
    def __init__(self, init_kl_coef: float, target: float, horizon: float):
        super().__init__(init_kl_coef)
        self.target = check_positive("kl_target", target)
        self.horizon = check_positive("kl_horizon", horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon


def make_kl_controller(init_kl_coef: float, target: float | None, horizon: float) -> FixedKLController:
    """Adaptive when ``target`` is set, fixed otherwise."""
    if target is None:
        return FixedKLController(init_kl_coef)
    return AdaptiveKLController(init_kl_coef, target, horizon)
