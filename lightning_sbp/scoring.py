"""The scoring pass: a forward over the whole batch that leaves the model exactly as it was."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

__all__ = [
    "LastLayerCapture",
    "cpu_has_fast_kernels",
    "find_last_linear",
    "frozen_running_stats",
    "has_batch_norm",
    "scoring_mode",
]

_RUNNING_STATS_NORMS = (_BatchNorm, _InstanceNorm)


def has_batch_norm(model: nn.Module) -> bool:
    """Whether ``model`` holds a batch-norm layer, which needs at least two examples in train mode."""
    return any(isinstance(module, _BatchNorm) for module in model.modules())


def cpu_has_fast_kernels(dtype: torch.dtype) -> bool | None:
    """Whether oneDNN has fast CPU kernels for ``dtype`` on this machine; ``None`` when torch cannot tell.

    Without them (bfloat16 before AVX-512, float16 before AVX-512 FP16 or AMX) the CPU converts to
    float32 around every operation, and a low-precision forward is several times slower than a
    float32 one.
    """
    probes = {torch.bfloat16: "_is_mkldnn_bf16_supported", torch.float16: "_is_mkldnn_fp16_supported"}
    if dtype not in probes:
        return None
    try:
        return bool(getattr(torch.ops.mkldnn, probes[dtype])())
    except (AttributeError, RuntimeError):
        return None


def find_last_linear(model: nn.Module, name: str | None = None) -> tuple[str, nn.Linear]:
    """The final ``nn.Linear`` of ``model``: the one named ``name``, or the last one registered.

    Raises:
        ValueError: if there is no such layer, with the names of the linear layers there are.
    """
    linears = [(key, module) for key, module in model.named_modules() if isinstance(module, nn.Linear)]
    if name is not None:
        for key, module in linears:
            if key == name:
                return key, module
        known = ", ".join(key for key, _ in linears) or "none"
        raise ValueError(f"last_layer={name!r} is not an nn.Linear of the model; its nn.Linear layers: {known}")
    if not linears:
        raise ValueError(
            f"{type(model).__name__} has no nn.Linear layer, so its last-layer gradients cannot be formed; "
            "use a selector that needs only losses (random, topk, loss) or end the model with an nn.Linear"
        )
    return linears[-1]


@contextmanager
def frozen_running_stats(model: nn.Module) -> Iterator[None]:
    """Normalisation layers use batch statistics as in training but update no running statistic.

    With ``track_running_stats`` off, a layer in train mode normalises with the batch's own
    statistics and skips both the running averages and ``num_batches_tracked``: nothing is
    copied, and the buffers stay bit-identical.
    """
    switched = [
        module
        for module in model.modules()
        if isinstance(module, _RUNNING_STATS_NORMS) and module.training and module.track_running_stats
    ]
    for module in switched:
        module.track_running_stats = False
    try:
        yield
    finally:
        for module in switched:
            module.track_running_stats = True


@contextmanager
def scoring_mode(model: nn.Module, mode: str) -> Iterator[None]:
    """No graph, no buffer change, and train or eval mode for the duration of the scoring pass."""
    if mode == "eval":
        training = {module: module.training for module in model.modules()}
        model.eval()
        try:
            with torch.no_grad():
                yield
        finally:
            for module, was_training in training.items():
                module.training = was_training
    else:
        with torch.no_grad(), frozen_running_stats(model):
            yield


@dataclass
class LastLayerCapture:
    """Records the inputs and outputs of a linear layer while armed.

    Attributes:
        layer: the final linear layer of the model.
        name: its qualified name, for messages.
    """

    layer: nn.Linear
    name: str
    features: Tensor | None = field(default=None, init=False)
    outputs: Tensor | None = field(default=None, init=False)

    @contextmanager
    def armed(self) -> Iterator[LastLayerCapture]:
        """Capture during the ``with`` block; the hook is removed on exit."""
        self.features = self.outputs = None
        handle = self.layer.register_forward_hook(self._record)
        try:
            yield self
        finally:
            handle.remove()

    def _record(self, module: nn.Module, inputs: tuple[Any, ...], output: Tensor) -> None:
        self.features = inputs[0].detach()
        self.outputs = output.detach()

    def take(self, logits: Tensor) -> Tensor:
        """The captured features, checked against the logits the loss was computed from.

        Raises:
            RuntimeError: if the layer did not run, or its output is not the logits.
        """
        if self.features is None or self.outputs is None:
            raise RuntimeError(
                f"the final linear layer {self.name!r} did not run in the forward pass; name the right "
                "one with SelectiveBackprop(last_layer=...)"
            )
        if self.outputs.shape != logits.shape or self.features.dim() != logits.dim() or logits.dim() not in (2, 3):
            raise RuntimeError(
                f"the output of {self.name!r} has shape {tuple(self.outputs.shape)} and its input "
                f"{tuple(self.features.shape)}, but last-layer gradients need [N, D] inputs and [N, C] logits, or "
                f"[N, T, D] and [N, T, C] for a head applied per position, and the logits have shape "
                f"{tuple(logits.shape)}; name the layer that produces the logits with SelectiveBackprop(last_layer=...)"
            )
        return self.features


def logit_gradients_by_autograd(loss_fn: Callable[[Tensor, Tensor], Tensor], logits: Tensor, targets: Tensor) -> Tensor:
    """Each example's loss gradient with respect to its own logits, for any per-example loss.

    A per-example loss depends only on its own row of logits, so the gradient of the summed
    losses holds every example's gradient in its row. The graph spans the logits alone.
    """
    with torch.enable_grad():
        leaf = logits.detach().float().requires_grad_(True)
        (grads,) = torch.autograd.grad(loss_fn(leaf, targets).sum(), leaf)
    return grads
