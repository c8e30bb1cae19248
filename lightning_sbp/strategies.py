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

__all__ = ["check_strategy"]


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
