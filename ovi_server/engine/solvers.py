"""The three solvers Ovi offers, built from diffusers' schedulers configured to reproduce the reference.

diffusers reproduces the reference's own scheduler classes exactly once its schedule matches Ovi's
(tests/golden/sampler records max |diff| = 0.0), so no solver math is written here; only the
schedule is imposed:
* unipc: `set_timesteps(sigmas=linspace(0.999, 0, n+1)[:-1])` — plain `set_timesteps(n)` starts at
  sigma 1.0 instead of 0.999 and is off by up to 5 timesteps;
* dpm++: after `set_timesteps(n)` the sigmas and timesteps are replaced by Ovi's (`linspace(1, 0)`
  shifted); diffusers' own schedule is off by one timestep;
* euler: Ovi already uses diffusers' FlowMatchEulerDiscreteScheduler (float timesteps).
"""

from __future__ import annotations

from typing import Literal

import torch
from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from torch import Tensor

from ovi_server.engine.schedule import NUM_TRAIN_TIMESTEPS, model_timesteps, ovi_sigmas, unshifted_sigmas
from ovi_server.request import SOLVERS  # one list of solver names, torch-free (the CLI checks early)

SolverName = Literal["unipc", "dpm++", "euler"]

_FLOW = dict(
    num_train_timesteps=NUM_TRAIN_TIMESTEPS,
    solver_order=2,
    prediction_type="flow_prediction",
    use_flow_sigmas=True,
    lower_order_final=True,
    final_sigmas_type="zero",
)


class Solver:
    """One modality's solver state for one generation: `timesteps`, then `step()` once per timestep."""

    def __init__(self, scheduler: SchedulerMixin):
        self.scheduler = scheduler

    @property
    def timesteps(self) -> Tensor:
        return self.scheduler.timesteps

    @property
    def sigmas(self) -> Tensor:
        return self.scheduler.sigmas

    def step(self, velocity: Tensor, t: Tensor, x: Tensor) -> Tensor:
        """x at the next timestep from the model's velocity at t (same shape as x, no batch dim needed)."""
        return self.scheduler.step(velocity[None], t, x[None], return_dict=False)[0][0]


def make_solver(name: str, steps: int, shift: float, device: torch.device | str = "cpu") -> Solver:
    if name == "unipc":
        scheduler = UniPCMultistepScheduler(**_FLOW, flow_shift=shift, predict_x0=True, solver_type="bh2")
        scheduler.set_timesteps(sigmas=unshifted_sigmas("unipc", steps), device=device)
    elif name == "dpm++":
        scheduler = DPMSolverMultistepScheduler(
            **_FLOW, flow_shift=shift, algorithm_type="dpmsolver++", solver_type="midpoint"
        )
        scheduler.set_timesteps(steps, device=device)
        sigmas = ovi_sigmas("dpm++", steps, shift)
        scheduler.sigmas = torch.cat([torch.from_numpy(sigmas).float(), torch.zeros(1)])
        scheduler.timesteps = torch.from_numpy(model_timesteps(sigmas)).to(device)
    elif name == "euler":
        scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
        scheduler.set_timesteps(steps, device=device)
    else:
        raise ValueError(f"unknown solver {name!r}; expected one of {', '.join(SOLVERS)}")
    return Solver(scheduler)
