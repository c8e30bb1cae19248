"""The original Selective Backprop rule: keep high-loss examples with a probability from their loss percentile."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from lightning_sbp.selectors.base import Scores, Selection, Selector
from lightning_sbp.selectors.registry import register_selector

__all__ = ["LossSelector"]

# Sampling keys of examples that must come after every example with a positive probability: a zero
# probability (percentile 0, or underflow) and, below that, a non-finite loss. Gumbel noise stays in
# the single digits to tens, so these offsets keep the tiers apart while leaving each tier random.
_ZERO_PROBABILITY_OFFSET = 1.0e6
_NON_FINITE_OFFSET = 2.0e6


@register_selector("loss")
class LossSelector(Selector):
    """Selective Backprop (Jiang et al. 2019): the higher an example's loss percentile, the likelier it is kept.

    Each example's loss is compared with a reference set made of the ``history`` most recent losses
    and the losses of the current batch (so that the first batch has a reference too). Its
    percentile ``r`` is the share of the reference set strictly below it, and its selection
    probability is ``r ** beta``. Exactly ``k`` distinct examples are then drawn without
    replacement with these probabilities (successive sampling, as ``torch.multinomial`` without
    replacement, implemented with Gumbel top-k so that it needs no host-device synchronisation).
    Examples whose probability is zero are taken, uniformly at random, only when fewer than ``k``
    examples have a positive probability; examples with a non-finite loss come last of all and never
    enter the history. All selected examples weigh one.

    ``beta=None`` derives the exponent from the fraction kept in the current batch,
    ``beta = N / k - 1``: with percentiles uniform on ``[0, 1]``, ``E[r ** beta] = 1 / (beta + 1)``
    equals the keep fraction ``k / N``, the calibration of the original paper (``beta = 3`` for 25%)
    and of Composer. Deriving it from ``k`` and ``N`` keeps the selector independent of how the
    callback computes ``k`` (rounding, the BatchNorm minimum of 2). Because exactly ``k`` examples
    are kept either way, ``beta`` only sets how strongly selection favours high losses.

    The history is a ring buffer of losses, part of the checkpoint (see :meth:`state_dict`).
    Slots written by non-finite losses are ignored, so such a batch shortens the effective history
    for a while instead of polluting it.

    Args:
        history: number of recent losses kept as the reference set; ``0`` ranks within the batch only.
        beta: exponent applied to the percentile, ``>= 0``; ``None`` for ``N / k - 1``.

    Raises:
        ValueError: if ``history`` is negative or ``beta`` is negative or not finite.
    """

    def __init__(self, history: int = 1024, beta: float | None = None) -> None:
        if isinstance(history, bool) or not isinstance(history, int) or history < 0:
            raise ValueError(f"history must be an int >= 0 (0 ranks within the batch only), got {history!r}")
        if beta is not None and not (isinstance(beta, (int, float)) and math.isfinite(beta) and beta >= 0):
            raise ValueError(f"beta must be a finite number >= 0, or None for N / k - 1; got {beta!r}")
        self.history = history
        self.beta = None if beta is None else float(beta)
        self._buffer: Tensor | None = None
        self._fill = 0
        self._position = 0

    def select(self, scores: Scores, k: int, generator: torch.Generator) -> Selection:
        """Draw ``k`` distinct examples with probabilities ``percentile ** beta``."""
        losses = scores.losses.detach().float()
        n = losses.shape[0]
        beta = n / k - 1.0 if self.beta is None else self.beta
        finite = torch.isfinite(losses)

        # Non-finite entries become +inf: they are never strictly below a finite loss, and the
        # denominator counts finite entries only.
        reference = torch.where(finite, losses, torch.full_like(losses, math.inf))
        count = finite.sum()
        past = self._past(losses.device)
        if past is not None:
            past_finite = torch.isfinite(past)
            reference = torch.cat([torch.where(past_finite, past, torch.full_like(past, math.inf)), reference])
            count = count + past_finite.sum()

        query = torch.where(finite, losses, torch.zeros_like(losses))
        below = torch.searchsorted(torch.sort(reference).values, query, right=False)
        percentile = below.float() / count.clamp_min(1).float()
        # xlogy gives 0 * log(0) = 0, so beta = 0 keeps every finite example with probability one.
        log_prob = torch.xlogy(beta, percentile)

        gumbel = -torch.log(torch.empty_like(losses).exponential_(generator=generator))
        keys = torch.where(
            finite,
            torch.where(torch.isfinite(log_prob), log_prob + gumbel, gumbel - _ZERO_PROBABILITY_OFFSET),
            gumbel - _NON_FINITE_OFFSET,
        )
        indices = torch.topk(keys, k, sorted=False).indices

        self._remember(losses)
        return Selection.uniform(indices)

    def _past(self, device: torch.device) -> Tensor | None:
        """The written slots of the history on ``device``, or ``None`` when there are none."""
        if self._buffer is None or self._fill == 0:
            return None
        if self._buffer.device != device:
            self._buffer = self._buffer.to(device)
        return self._buffer[: self._fill]

    def _remember(self, losses: Tensor) -> None:
        """Write the batch's losses into the ring buffer; non-finite ones are stored as NaN and ignored."""
        if self.history == 0:
            return
        if self._buffer is None or self._buffer.device != losses.device:
            self._buffer = torch.full((self.history,), math.nan, device=losses.device)
        recent = losses[-self.history :]
        m = recent.shape[0]
        slots = (self._position + torch.arange(m, device=losses.device)) % self.history
        self._buffer[slots] = torch.where(torch.isfinite(recent), recent, torch.full_like(recent, math.nan))
        self._position = (self._position + m) % self.history
        self._fill = min(self._fill + m, self.history)

    def state_dict(self) -> dict[str, Any]:
        """The finite losses of the history, oldest first, as a CPU tensor, and their count.

        Returns:
            ``{"losses": Tensor[fill], "fill": int}``.
        """
        if self._buffer is None or self._fill == 0:
            return {"losses": torch.empty(0), "fill": 0}
        start = self._position if self._fill == self.history else 0
        ordered = torch.roll(self._buffer[: self._fill], -start).cpu()
        ordered = ordered[torch.isfinite(ordered)]
        return {"losses": ordered, "fill": int(ordered.shape[0])}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a history saved by :meth:`state_dict`; it moves to the scores' device at the next select.

        When the saved history is longer than ``history``, its most recent losses are kept.
        """
        losses = torch.as_tensor(state.get("losses", torch.empty(0)), dtype=torch.float32).flatten().cpu()
        if self.history == 0 or losses.numel() == 0:
            self._buffer, self._fill, self._position = None, 0, 0
            return
        losses = losses[-self.history :]
        m = losses.shape[0]
        self._buffer = torch.full((self.history,), math.nan)
        self._buffer[:m] = losses
        self._fill = m
        self._position = m % self.history
