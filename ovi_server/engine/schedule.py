"""Ovi's flow-matching noise schedules, as pure functions of (steps, shift).

sigma is the noise level (1 = pure noise); the model is fed int64(1000 * sigma) for unipc and dpm++,
as the reference does (it truncates, so t = 999 for sigma 0.9999...).
"""

from __future__ import annotations

import numpy as np

NUM_TRAIN_TIMESTEPS = 1000
# The reference's FlowUniPCMultistepScheduler starts from sigma_max = float32(0.999), not 1.0.
UNIPC_SIGMA_MAX = float(np.float32(0.999))


def shift_sigmas(sigmas: np.ndarray, shift: float) -> np.ndarray:
    """s*sigma / (1 + (s-1)*sigma): spends more steps at high noise for shift > 1."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def unshifted_sigmas(solver: str, steps: int) -> np.ndarray:
    """The linear sigma grid (without the final 0) the reference builds for each solver, float64."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    start = UNIPC_SIGMA_MAX if solver == "unipc" else 1.0
    return np.linspace(start, 0.0, steps + 1)[:steps]


def ovi_sigmas(solver: str, steps: int, shift: float) -> np.ndarray:
    """Shifted sigmas, `steps` values, no final zero (float64)."""
    return shift_sigmas(unshifted_sigmas(solver, steps), shift)


def model_timesteps(sigmas: np.ndarray) -> np.ndarray:
    """int64(1000 * sigma), truncated as the reference's `.to(torch.int64)`."""
    return (sigmas * NUM_TRAIN_TIMESTEPS).astype(np.int64)
