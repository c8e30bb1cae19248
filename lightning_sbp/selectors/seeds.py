"""Per-step generators for random selectors: reproducible per rank and step, with no saved state."""

from __future__ import annotations

import torch

__all__ = ["mix_seed", "step_generator"]


def mix_seed(*parts: int) -> int:
    """A 63-bit seed that depends on every part, the same in every process (no salted ``hash``)."""
    state = 0x9E3779B97F4A7C15
    for part in parts:
        state = ((state ^ (part & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        state ^= state >> 31
    return state & 0x7FFFFFFFFFFFFFFF


def step_generator(seed: int, rank: int, step: int, batch: int, device: torch.device) -> torch.Generator:
    """The generator a selector draws from on one rank at one step.

    Derived from the run's ``seed``, the global ``rank``, the global optimiser ``step`` and the
    ``batch`` index within the epoch (which tells accumulation micro-steps apart), so a resumed
    run draws what the uninterrupted one drew without checkpointing any generator state.
    """
    return torch.Generator(device=device).manual_seed(mix_seed(seed, rank, step, batch))
