"""Many ranks: which strategies Selective Backprop serves, and what the ranks exchange."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from lightning.pytorch.strategies import (
    DDPStrategy,
    DeepSpeedStrategy,
    FSDPStrategy,
    ModelParallelStrategy,
    SingleDeviceStrategy,
    SingleDeviceXLAStrategy,
    Strategy,
    XLAStrategy,
)
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from lightning_sbp.selectors.base import Scores

__all__ = [
    "SCORE_FIELDS",
    "check_private_parameters",
    "check_strategy",
    "gather_rank_states",
    "gather_scores",
    "own_rank_state",
]

SCORE_FIELDS = ("losses", "logits", "logit_grads", "features")


def check_strategy(strategy: Strategy) -> None:
    """Refuse the strategies Selective Backprop cannot serve; warn about those it was not tested with.

    Supported: one device, and DDP in all its launch modes (``ddp``, ``ddp_spawn``, ``ddp_fork``,
    ``ddp_notebook``), where every rank holds the whole model.

    Raises:
        ValueError: for FSDP, DeepSpeed and model-parallel strategies, which shard the model.
    """
    if isinstance(strategy, FSDPStrategy | DeepSpeedStrategy | ModelParallelStrategy):
        raise ValueError(
            f"SelectiveBackprop does not support {type(strategy).__name__}: it shards the model and gathers the "
            "parameters around each forward, and the scoring pass adds a second forward to every step, which "
            "this strategy's parameter gathering and gradient handling are not tested with. Supported strategies: "
            "single device and DDP ('ddp', 'ddp_spawn', 'ddp_fork', 'ddp_notebook'); use strategy='ddp' or drop "
            "the SelectiveBackprop callback"
        )
    tested = isinstance(strategy, SingleDeviceStrategy | DDPStrategy)
    if not tested or isinstance(strategy, XLAStrategy | SingleDeviceXLAStrategy):
        rank_zero_warn(
            f"SelectiveBackprop is tested on a single device and with DDP, not with {type(strategy).__name__}"
        )


def check_private_parameters(strategy: Strategy, module: nn.Module) -> None:
    """Refuse a multi-process run whose ranks all write one shared copy of the parameters.

    A tensor handed to a process that ``torch.multiprocessing`` starts moves into shared memory.
    Lightning copies the module back out of it in ranks started with ``"spawn"`` on CPU, but not in
    ranks started with ``"forkserver"``: there every rank's optimiser step writes the same CPU
    weights, racing the others, and training is silently wrong with or without Selective Backprop.

    Ranks on GPUs are not concerned: the strategy moves the module to each rank's device, which
    gives every rank its own copy.

    Raises:
        ValueError: when the ranks train on the CPU, there is more than one, and a parameter is in
            shared memory.
    """
    if getattr(strategy, "world_size", 1) <= 1 or strategy.root_device.type != "cpu":
        return
    shared = [name for name, p in module.named_parameters() if p.device.type == "cpu" and p.is_shared()]
    if shared:
        raise ValueError(
            f"{len(shared)} parameters of {type(module).__name__} (first: {shared[0]!r}) are in memory shared by "
            "all ranks, so every rank's optimiser step would write the same weights. Lightning copies them out "
            "of shared memory only for ranks started with start_method='spawn'; on CPU use strategy='ddp_spawn' "
            "or 'ddp', or give each rank its own copy before training (p.data = p.data.clone())"
        )


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def gather_rank_states(state: dict[str, Any]) -> dict[str, Any]:
    """Every rank's ``state`` as ``{"ranks": [...]}`` under DDP, or ``state`` itself on one process.

    Lightning writes rank 0's checkpoint only, so per-rank state (a selector's loss history, the
    example counts) is gathered first: a collective, as ``Trainer.save_checkpoint`` runs on every rank.
    """
    if _world_size() <= 1:
        return state
    ranks: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(ranks, state)
    return {"ranks": ranks}


def own_rank_state(state: dict[str, Any]) -> dict[str, Any]:
    """This rank's part of what :func:`gather_rank_states` saved.

    A run resumed on a different number of ranks gives rank ``r`` the state of saved rank ``r``
    modulo the saved count; a state saved on one process is every rank's.
    """
    ranks = state.get("ranks")
    if not ranks:
        return state
    rank = dist.get_rank() if _world_size() > 1 else 0
    return ranks[rank % len(ranks)]


def gather_scores(
    indices: Tensor,
    scores: Scores,
    capacity: int | None = None,
    *,
    fields: tuple[str, ...] = SCORE_FIELDS,
    dtype: torch.dtype = torch.float32,
) -> tuple[Tensor, Scores]:
    """The example indices and scores of every rank's batch, in rank order: a collective.

    Only ``fields`` travel (those the caller keeps), each in ``dtype``. With ``capacity``, a bound on every
    rank's batch size known to all ranks (the loader's batch size), each rank pads its rows to it and one
    gather moves the indices and all score columns, without reading anything on the host: the indices
    travel bit for bit in the same tensor, their 64-bit integers reinterpreted as ``dtype`` elements, and
    padding rows carry the index ``-1``. Without it, ranks may score batches of any size: the sizes are
    gathered first and read on the host, then the rows, padded to the largest batch, in one gather for the
    indices and one for the score columns.

    Args:
        indices: this rank's example indices, shape ``[N]``.
        scores: this rank's scores of those examples.
        capacity: the most examples any rank's batch holds, or ``None``.
        fields: the score fields to gather, among ``losses``, ``logits``, ``logit_grads`` and ``features``.
        dtype: the floating dtype the scores travel (and come back) in.

    Returns:
        The indices ``[M]`` and scores of all ranks' examples, ``M`` the sum of the batch sizes
        (``capacity`` times the world size, padding included, with ``capacity``); the score fields are
        those of ``fields`` that this rank's scores hold, in ``dtype``.

    Raises:
        ValueError: if this rank's batch holds more than ``capacity`` examples.
    """
    values = {name: getattr(scores, name) for name in fields if getattr(scores, name) is not None}
    widths = [math.prod(value.shape[1:]) for value in values.values()]
    columns = torch.cat([value.to(dtype).reshape(len(value), -1) for value in values.values()], dim=1)
    ranks = dist.get_world_size()
    if capacity is not None:
        if len(indices) > capacity:
            raise ValueError(f"a batch of {len(indices)} examples exceeds the gather capacity of {capacity}")
        padding = capacity - len(indices)
        index_bits = F.pad(indices.to(torch.int64), (0, padding), value=-1).unsqueeze(1).view(dtype)
        packed = torch.cat([index_bits, F.pad(columns, (0, 0, 0, padding))], dim=1)
        every = [torch.empty_like(packed) for _ in range(ranks)]
        dist.all_gather(every, packed)
        rows = torch.cat(every)
        index_width = index_bits.shape[1]
        all_indices = rows[:, :index_width].contiguous().view(torch.int64).squeeze(1)
        parts = rows[:, index_width:].split(widths, dim=1)
    else:
        size = torch.tensor([len(indices)], device=indices.device)
        sizes = [torch.empty_like(size) for _ in range(ranks)]
        dist.all_gather(sizes, size)
        counts = torch.cat(sizes).tolist()
        all_indices = _gather_rows(indices.to(torch.int64).unsqueeze(1), counts).squeeze(1)
        parts = _gather_rows(columns, counts).split(widths, dim=1)
    gathered = {
        name: part.reshape(-1, *value.shape[1:]) for (name, value), part in zip(values.items(), parts, strict=True)
    }
    return all_indices, Scores(bias=scores.bias, **gathered)


def _gather_rows(rows: Tensor, counts: list[int]) -> Tensor:
    """Every rank's ``rows``, ``counts[r]`` of them on rank ``r``, concatenated in rank order."""
    most = max(counts)
    padded = F.pad(rows, (0, 0) * (rows.dim() - 1) + (0, most - len(rows)))
    every = [padded.new_empty(padded.shape) for _ in counts]
    dist.all_gather(every, padded)
    return torch.cat([ranked[:count] for ranked, count in zip(every, counts, strict=True)])
