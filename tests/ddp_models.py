"""Modules, callbacks and plugins for the distributed tests.

``ddp_spawn`` pickles the trainer, its callbacks and the module into fresh processes, so every
class here lives at module level, creates nothing unpicklable in ``__init__``, and hands its
results back by writing one file per rank into a directory the test gives it.
"""

from __future__ import annotations

import multiprocessing
import os
import socket
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal, cast

import lightning.pytorch as pl
import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
import torch.nn.functional as F
from lightning.pytorch.plugins.layer_sync import TorchSyncBatchNorm
from lightning.pytorch.strategies import DDPStrategy
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.data import DataLoader, TensorDataset

from lightning_sbp import SelectiveBackprop, SelectiveBackpropMixin
from lightning_sbp.selectors import Scores

FEATURES = 8
CLASSES = 3

# Ranks start from a fork server that imports torch, Lightning and this module once per test session
# instead of once per process; the trainer, module and callbacks still reach every rank pickled, exactly
# as with "ddp_spawn" (see PrivateParametersDDP). SBP_TEST_START_METHOD=spawn runs the same tests with
# "ddp_spawn" itself (slower).
START_METHOD = cast(Literal["spawn", "forkserver"], os.environ.get("SBP_TEST_START_METHOD", "forkserver"))
if START_METHOD == "forkserver":
    multiprocessing.get_context("forkserver").set_forkserver_preload(["lightning_sbp", "ddp_models"])


def run_two_processes(worker: Callable[..., None], *args: Any) -> None:
    """Run ``worker(rank, 2, port, *args)`` in two processes (see ``START_METHOD``) on a free local port."""
    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.start_processes(worker, args=(2, port, *args), nprocs=2, join=True, start_method=START_METHOD)


def points(n: int, seed: int = 0, shift: float = 1.0) -> TensorDataset:
    """Gaussian points whose class shifts their mean by ``shift`` per class: learnable in a few steps."""
    generator = torch.Generator().manual_seed(seed)
    targets = torch.randint(CLASSES, (n,), generator=generator)
    inputs = torch.randn(n, FEATURES, generator=generator) + shift * targets.view(-1, 1).float()
    return TensorDataset(inputs, targets)


class DDPClassifier(SelectiveBackpropMixin, pl.LightningModule):
    """A small MLP classifier that logs synced epoch metrics.

    Args:
        lr: SGD learning rate.
        batch_norm: put a ``BatchNorm1d`` after the hidden layer.
        rank_sizes: when given, each rank builds its own dataset of ``rank_sizes[rank]`` examples
            (run with ``use_distributed_sampler=False``), so that ranks see different batch sizes.
        batch_size: batch size of the per-rank loaders.
    """

    def __init__(
        self, lr: float = 0.2, batch_norm: bool = False, rank_sizes: tuple[int, ...] = (), batch_size: int = 16
    ) -> None:
        super().__init__()
        self.lr = lr
        self.rank_sizes = rank_sizes
        self.loader_batch_size = batch_size
        norm: nn.Module = nn.BatchNorm1d(16) if batch_norm else nn.Identity()
        self.body = nn.Sequential(nn.Linear(FEATURES, 16), norm, nn.ReLU())
        self.head = nn.Linear(16, CLASSES)
        self.forwards: list[tuple[bool, int]] = []
        self.buffers_before_subset: dict[str, Tensor] | None = None

    def setup(self, stage: str) -> None:
        # Two processes share two cores.
        torch.set_num_threads(1)

    def forward(self, x: Tensor) -> Tensor:
        if torch.is_grad_enabled():
            self.buffers_before_subset = {name: b.detach().clone() for name, b in self.named_buffers()}
        self.forwards.append((torch.is_grad_enabled(), x.shape[0]))
        return self.head(self.body(x))

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        logits, targets = self.sbp_forward(batch)
        loss = self.sbp_reduce(self.sbp_loss(logits, targets))
        self.log("train/loss", loss, on_step=False, on_epoch=True, sync_dist=True)
        self.log("train/kept", float(targets.shape[0]), on_step=False, on_epoch=True, reduce_fx="sum", sync_dist=True)
        return loss

    def train_dataloader(self) -> DataLoader:
        rank = self.trainer.global_rank
        return DataLoader(points(self.rank_sizes[rank], seed=10 + rank), batch_size=self.loader_batch_size)

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class Recorder(pl.Callback):
    """Records, on each rank, every batch, selection, loss and the gradients, then writes ``rank{r}.pt``.

    Args:
        out_dir: where to write the per-rank records.
        grads_at: global steps after whose backward the averaged gradients are kept.
    """

    def __init__(self, out_dir: str, grads_at: tuple[int, ...] = (0,)) -> None:
        self.out_dir = out_dir
        self.grads_at = grads_at
        self.steps: list[dict[str, Any]] = []
        self.module_types: list[str] = []
        self._current: dict[str, Any] = {}

    @staticmethod
    def _sbp(trainer: pl.Trainer) -> SelectiveBackprop:
        return next(cb for cb in trainer.callbacks if isinstance(cb, SelectiveBackprop))  # type: ignore[attr-defined]

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.module_types = sorted({type(m).__name__ for m in pl_module.modules()})

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, *args: Any) -> None:
        self._sbp(trainer).last_selection = None
        buffers = {name: b.detach().clone() for name, b in pl_module.named_buffers()}
        self._current = {"step": trainer.global_step, "batch": [t.clone() for t in batch], "buffers_before": buffers}
        pl_module.forwards = []  # type: ignore[assignment]

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.global_step in self.grads_at:
            grads = {name: p.grad.detach().clone() for name, p in pl_module.named_parameters() if p.grad is not None}
            self._current["grads"] = grads

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, *args: Any) -> None:
        selection = self._sbp(trainer).last_selection
        self._current["indices"] = None if selection is None else selection.indices.clone()
        self._current["weights"] = None if selection is None else selection.weights.clone()
        self._current["loss"] = outputs["loss"].detach().clone()
        self._current["forwards"] = list(pl_module.forwards)  # type: ignore[arg-type]
        self._current["buffers_before_subset"] = pl_module.buffers_before_subset
        self._current["buffers_after"] = {name: b.detach().clone() for name, b in pl_module.named_buffers()}
        # This step's values of the callback's step metrics (keys not logged this step keep older values).
        metrics = trainer.callback_metrics
        self._current["metrics"] = {key: float(value) for key, value in metrics.items() if key.startswith("sbp/")}
        self.steps.append(self._current)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        record = {
            "rank": trainer.global_rank,
            "steps": self.steps,
            "params": {name: p.detach().clone() for name, p in pl_module.named_parameters()},
            "metrics": {key: float(value) for key, value in trainer.callback_metrics.items()},
            "module_types": self.module_types,
        }
        torch.save(record, Path(self.out_dir) / f"rank{trainer.global_rank}.pt")


class SaveAt(pl.Callback):
    """Saves a checkpoint at the end of the epoch that reaches ``step`` (all ranks call it; rank 0 writes)."""

    def __init__(self, path: str, step: int) -> None:
        self.path = path
        self.step = step

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.global_step == self.step:
            trainer.save_checkpoint(self.path)


class FailOnRank(pl.Callback):
    """Raises on one rank at its second training batch, in fits that have a SelectiveBackprop callback.

    Named in a comparison's configuration, it fails the selective runs of a grid mid-fit, on one
    rank only, and leaves its ``full`` runs alone.
    """

    def __init__(self, rank: int = 1, message: str = "this rank fails on purpose") -> None:
        self.rank = rank
        self.message = message

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        selective = any(isinstance(callback, SelectiveBackprop) for callback in trainer.callbacks)  # type: ignore[attr-defined]
        if selective and batch_idx == 1 and trainer.global_rank == self.rank:
            raise RuntimeError(self.message)


class GlooSyncBatchNorm(_BatchNorm):
    """Synchronised batch norm that runs on CPU: batch statistics summed over ranks with a differentiable all-reduce.

    ``torch.nn.SyncBatchNorm`` has no CPU kernels, and DDP refuses it in a CPU model. This layer keeps
    its semantics (statistics over the examples of every rank, running statistics updated only in train
    mode with ``track_running_stats``, collectives in forward and backward), so that the distributed tests
    can check that every rank issues the same collectives. Outside a process group it is a batch norm.
    """

    def __init__(self, like: _BatchNorm) -> None:
        super().__init__(like.num_features, like.eps, like.momentum, like.affine, like.track_running_stats)
        self.load_state_dict(like.state_dict())
        self.train(like.training)
        self.original_type = type(like)

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input, got {input.dim()}D")

    def forward(self, input: Tensor) -> Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(input)
        dims = [0, *range(2, input.dim())]
        count = torch.full((1,), input.numel() / input.shape[1], dtype=input.dtype)
        total = dist_nn.all_reduce(torch.cat([input.sum(dims), (input * input).sum(dims), count]))
        c = self.num_features
        n = total[-1]
        mean = total[:c] / n
        var = total[c : 2 * c] / n - mean * mean
        if self.track_running_stats and self.running_mean is not None and self.running_var is not None:
            assert self.num_batches_tracked is not None
            momentum = 0.1 if self.momentum is None else self.momentum
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                self.running_mean.lerp_(mean.detach(), momentum)
                self.running_var.lerp_((var * n / (n - 1)).detach(), momentum)
        shape = [1, c] + [1] * (input.dim() - 2)
        out = (input - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out


class GlooSyncBatchNormPlugin(TorchSyncBatchNorm):
    """``Trainer(sync_batchnorm=True)`` on CPU: converts batch norm layers to :class:`GlooSyncBatchNorm` and back."""

    def apply(self, model: nn.Module) -> nn.Module:
        for name, child in list(model.named_children()):
            if isinstance(child, _BatchNorm) and not isinstance(child, GlooSyncBatchNorm):
                setattr(model, name, GlooSyncBatchNorm(child))
            else:
                self.apply(child)
        return model

    def revert(self, model: nn.Module) -> nn.Module:
        for name, child in list(model.named_children()):
            if isinstance(child, GlooSyncBatchNorm):
                plain = child.original_type(child.num_features, child.eps, child.momentum, child.affine)
                plain.load_state_dict(child.state_dict())
                plain.train(child.training)
                setattr(model, name, plain)
            else:
                self.revert(child)
        return model


class PrivateParametersDDP(DDPStrategy):
    """DDP that gives each rank its own copy of the module's tensors, as Lightning does for ``"spawn"``.

    Pickling moves the module's CPU tensors into memory shared by all ranks; Lightning copies them out
    only in ranks started with ``"spawn"``. Under ``"forkserver"`` the ranks would otherwise all step
    one set of weights (which :func:`lightning_sbp.distributed.check_private_parameters` refuses).
    """

    def setup_environment(self) -> None:
        with torch.no_grad():
            for tensor in [*self.lightning_module.parameters(), *self.lightning_module.buffers()]:
                tensor.data = tensor.data.clone()
        super().setup_environment()


def ddp_trainer(out_dir: Path, **kwargs: Any) -> pl.Trainer:
    """Two CPU processes with gloo (see ``START_METHOD``); collectives time out instead of hanging a test."""
    options: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 2,
        "strategy": PrivateParametersDDP(
            start_method=START_METHOD, process_group_backend="gloo", timeout=timedelta(seconds=60)
        ),
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "max_epochs": 1,
        "log_every_n_steps": 1,
        "default_root_dir": str(out_dir),
    }
    options.update(kwargs)
    return pl.Trainer(**options)


def load_ranks(out_dir: Path, world_size: int = 2) -> list[dict[str, Any]]:
    """The records :class:`Recorder` wrote, in rank order."""
    return [torch.load(out_dir / f"rank{rank}.pt", weights_only=False) for rank in range(world_size)]


def weighted_subset_loss(model: nn.Module, batch: list[Tensor], indices: Tensor, weights: Tensor) -> Tensor:
    """The loss a rank returns on a selective step: ``(1/k) sum_i w_i loss_i`` over its subset."""
    inputs, targets = batch[0][indices], batch[1][indices]
    return (weights * F.cross_entropy(model(inputs), targets, reduction="none")).mean()


def random_gram(n: int, seed: int) -> Tensor:
    """A positive semi-definite Gram matrix of rank 5 in float64."""
    g = torch.randn(n, 5, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return g @ g.T


def reduce_worker(rank: int, world: int, port: int, out: str) -> None:
    """Rank 0 measures two batches and rank 1 one; each saves the synced epoch value of the metric."""
    from lightning_sbp.metrics import GradientApproximationError

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    metric = GradientApproximationError()
    for seed in [0, 1] if rank == 0 else [2]:
        metric.update(random_gram(6, seed), torch.tensor([1, 2]), torch.ones(2, dtype=torch.float64))
    torch.save(metric.compute(), Path(out) / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()


def default_loss_worker(rank: int, world: int, port: int, out: str) -> None:
    """Each rank chooses default losses from first batches that differ between the ranks, and saves the names.

    Rank 0's targets are all 0 or 1 and its labels are its input ids; rank 1's are counts and other labels.
    Both also choose from targets that are 0 or 1 on both ranks, which must stay binary.
    """
    from lightning_sbp.default_loss import choose_loss, labels_are_the_inputs

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    generator = torch.Generator().manual_seed(rank)
    binary = torch.randint(2, (8,), generator=generator).float()
    counts = binary if rank == 0 else binary + 2 * torch.randint(3, (8,), generator=generator)
    inputs = torch.randint(50, (2, 5), generator=generator)
    labels = inputs if rank == 0 else (inputs + 1) % 50
    names = {
        "one output": choose_loss(torch.randn(8), counts).name,
        "multi-hot": choose_loss(torch.randn(8, 3), counts[:, None].expand(8, 3).contiguous()).name,
        "binary everywhere": choose_loss(torch.randn(8), binary).name,
        "shifted labels": labels_are_the_inputs({"input_ids": inputs}, torch.randn(2, 5, 50), labels),
    }
    torch.save(names, Path(out) / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()


def rank_scores(rank: int) -> tuple[Tensor, Scores]:
    """Rank ``r``'s batch for the score-gathering test: ``3 + 2r`` examples with every kind of score."""
    generator = torch.Generator().manual_seed(rank)
    n = 3 + 2 * rank
    indices = torch.randperm(20, generator=generator)[:n]
    scores = Scores(
        losses=torch.rand(n, generator=generator),
        logits=torch.randn(n, CLASSES, generator=generator).bfloat16(),
        logit_grads=torch.randn(n, CLASSES, generator=generator),
        features=torch.randn(n, 2, 4, generator=generator),
        bias=False,
    )
    return indices, scores


def gather_worker(
    rank: int, world: int, port: int, out: str, capacity: int | None = None, storage: str | None = None
) -> None:
    """Each rank gathers every rank's :func:`rank_scores` (padded to ``capacity`` if given) and saves what it got.

    With ``storage`` (a dtype name), only the losses and logit gradients travel, in that dtype, and the example
    indices are beyond what any floating dtype holds exactly.
    """
    from lightning_sbp.score_cache import gather_scores

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    indices, scores = rank_scores(rank)
    options: dict[str, Any] = {}
    if storage is not None:
        indices = indices + 2**53 + 1
        options = {"fields": ("losses", "logit_grads"), "dtype": getattr(torch, storage)}
    torch.save(gather_scores(indices, scores, capacity=capacity, **options), Path(out) / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()
