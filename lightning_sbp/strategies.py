"""Which of Lightning's strategies Selective Backprop serves."""

from __future__ import annotations

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
from torch import nn

__all__ = ["check_private_parameters", "check_strategy"]


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
