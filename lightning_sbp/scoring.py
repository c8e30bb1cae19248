"""The scoring pass: a forward over the whole batch that leaves the model exactly as it was."""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

from lightning_sbp.batches import INPUT_KEYS, LABEL_KEYS, BatchAdapter, default_forward, defines_forward
from lightning_sbp.default_loss import NEXT_TOKEN, DefaultLoss, NoDefaultLoss, describe_targets, labels_are_the_inputs
from lightning_sbp.functional._inputs import DEFAULT_CHUNK_ELEMENTS, autocast_off, row_blocks
from lightning_sbp.mixin import SelectiveBackpropMixin
from lightning_sbp.selectors.base import Scores

__all__ = [
    "SCORE_DTYPES",
    "BufferGuard",
    "Forward",
    "ForwardScores",
    "LastLayerCapture",
    "LossFn",
    "ScoreFn",
    "ScoreMode",
    "ScorePrecision",
    "Scorer",
    "ScoringError",
    "as_columns",
    "cpu_has_fast_kernels",
    "find_last_linear",
    "frozen_running_stats",
    "has_batch_norm",
    "scoring_mode",
    "untouched_rng",
]

# The functions return per-example losses [N]. The return type is left open because jsonargparse checks a
# function given by its dotted path in YAML against it, and would refuse any function without a return annotation.
LossFn = Callable[[Tensor, Tensor], Any]
ScoreFn = Callable[[Any, Any], Any]
Forward = Callable[[Any], tuple[Tensor, Tensor]]
ScoreMode = Literal["train", "eval"]
ScorePrecision = Literal["same", "bf16", "16"]
SCORE_DTYPES: dict[str, torch.dtype | None] = {"same": None, "bf16": torch.bfloat16, "16": torch.float16}

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


@contextmanager
def untouched_rng(device: torch.device) -> Iterator[None]:
    """The global CPU random stream, and that of ``device`` when it is a GPU, are as before after the block.

    Dropout in the scoring pass would otherwise advance them, and a sampler without its own
    generator would then shuffle the next epochs differently from a run without Selective Backprop.
    """
    devices = []
    if device.type == "cuda":
        devices = [device.index if device.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=devices):
        yield


class BufferGuard:
    """Puts back every module buffer a forward pass changed, copying only those that change.

    The first pass it guards copies every buffer and learns which ones the forward changes (an
    in-place update bumps a tensor's version counter; a reassigned buffer is another object);
    later passes copy only those. Normalisation layers are left to :func:`frozen_running_stats`,
    which keeps them from updating at all. A buffer that starts changing only later is restored
    from then on, with a warning for the pass that changed it first.
    """

    def __init__(self) -> None:
        self._changing: set[tuple[int, str]] | None = None
        self._warned = False

    @contextmanager
    def untouched(self, model: nn.Module) -> Iterator[None]:
        """Restore, on exit, every buffer of ``model`` that the block changed."""
        entries = [
            (module, name, buffer)
            for module in model.modules()
            for name, buffer in module._buffers.items()
            if buffer is not None
        ]
        versions = [buffer._version for _, _, buffer in entries]
        changing = self._changing
        saved = {
            (id(module), name): buffer.clone()
            for module, name, buffer in entries
            if changing is None or (id(module), name) in changing
        }
        try:
            yield
        finally:
            changed, lost = self._restore(entries, versions, saved)
            self._changing = changed if changing is None else changing | changed
            if lost and not self._warned:
                self._warned = True
                rank_zero_warn(
                    f"the scoring pass changed the buffers {', '.join(lost)}, which had not changed in earlier scoring "
                    "passes, so this once they keep the change; they are restored from now on"
                )

    @staticmethod
    def _restore(
        entries: list[tuple[nn.Module, str, Tensor]], versions: list[int], saved: dict[tuple[int, str], Tensor]
    ) -> tuple[set[tuple[int, str]], list[str]]:
        changed: set[tuple[int, str]] = set()
        lost: list[str] = []
        with torch.no_grad():
            for (module, name, buffer), version in zip(entries, versions, strict=True):
                key = (id(module), name)
                if module._buffers.get(name) is not buffer:
                    module._buffers[name] = buffer
                    changed.add(key)
                if buffer._version != version:
                    changed.add(key)
                    if key in saved:
                        buffer.copy_(saved[key])
                    else:
                        lost.append(f"{type(module).__name__}.{name}")
        return changed, lost


class ScoringError(RuntimeError):
    """The scoring pass cannot score a module as configured; the message says which option fixes it."""


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
    verified: bool = field(default=False, init=False)
    normaliser: Callable[[Tensor], Tensor] | None = field(default=None, init=False)

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

        Logits of shape ``[N]`` are the ``[N, 1]`` output of a layer with ``out_features == 1`` that the
        model squeezed (a regression or binary head).

        Raises:
            ScoringError: if the layer did not run, or its output is not the logits; the message names the
                option that fixes the case.
        """
        if self.features is None or self.outputs is None:
            raise ScoringError(
                f"the final linear layer {self.name!r} did not run in the forward pass; name the one that produces "
                "the outputs with SelectiveBackprop(last_layer=...)"
            )
        outputs = self.outputs.squeeze(-1) if logits.dim() == 1 and self.outputs.dim() == 2 else self.outputs
        pooled = outputs.dim() == logits.dim() + 1 and outputs.shape[0] == logits.shape[0]
        if pooled and outputs.shape[-1] == logits.shape[-1]:
            raise ScoringError(
                f"the output of {self.name!r} has shape {tuple(self.outputs.shape)}, one row per position, and the "
                f"model pools it into the outputs the loss reads, of shape {tuple(logits.shape)} (as decoder "
                "classifiers do, reading the last token's row): no layer produces those outputs, so their "
                "last-layer gradients have no closed form. To fix it, with SelectiveBackpropMixin override "
                "sbp_forward to return the layer's per-position outputs and targets of shape [N, T] that are -100 "
                "except at the pooled position (the same loss); or, with a selector that reads losses only (random, "
                "topk, loss), set track_grad_error=False"
            )
        if outputs.shape != logits.shape or self.features.dim() != as_columns(logits).dim() or logits.dim() > 3:
            layout = (
                f"the output of {self.name!r} has shape {tuple(self.outputs.shape)} and its input "
                f"{tuple(self.features.shape)}, but the outputs the loss reads have shape {tuple(logits.shape)}; "
                "last-layer gradients need [N, D] inputs and [N, C] outputs, or [N, T, D] and [N, T, C] for a head "
                "applied per position"
            )
            if outputs.numel() == logits.numel():
                fix = (
                    "the model reshapes that layer's output: return it as the layer gives it (in forward, or in "
                    "sbp_forward with SelectiveBackpropMixin)"
                )
            else:
                fix = "name the layer that produces the outputs with SelectiveBackprop(last_layer=...)"
            raise ScoringError(
                f"{layout}. To fix it, {fix}; or, with a selector that reads losses only (random, topk, loss), set "
                "track_grad_error=False"
            )
        if not self.verified:
            self._verify(outputs, logits)
        return self.features

    def _verify(self, outputs: Tensor, logits: Tensor) -> None:
        """Check, once per fit, that the loss reads the layer's output itself, or its (log-)probabilities.

        The same memory is the common case and costs nothing. Otherwise (a model that returns
        ``logits.float()`` under mixed precision, say) equal values pass too, and so do the layer's
        log-probabilities or probabilities (``log_softmax`` or ``softmax`` after the head), through which the
        gradients are then formed; comparing reads the device once, on the first scoring pass only. A soft cap, a
        temperature, or another ``nn.Linear`` of the same shape running after this one would make every
        last-layer gradient wrong without a word.

        Raises:
            ScoringError: if the outputs the loss reads are none of these.
        """
        same = outputs.data_ptr() == logits.data_ptr() and outputs.stride() == logits.stride()
        if same or torch.equal(outputs.to(logits.dtype), logits):
            self.verified = True
            return
        for normaliser in _NORMALISERS:
            if logits.dim() > 1 and _is_normalised(logits, outputs, normaliser):
                # log_softmax or softmax after the head (PyTorch's MNIST example, Lightning's demo Net): the loss
                # is a function of the layer's outputs through it, and the gradients are formed through it too.
                self.normaliser = normaliser
                self.verified = True
                return
        raise ScoringError(
            f"the outputs the loss reads are not those of {self.name!r}, the layer whose gradients selectors and "
            "metrics read: the model changes them after it (an activation, a scale or temperature, a soft cap), "
            "or another layer of the same shape runs after it. Last-layer gradients need the layer whose output "
            "the loss reads as it is (or its softmax or log_softmax). To fix it: for a function applied after the "
            "layer, move it into the scoring loss (with SelectiveBackpropMixin, return the layer's output from "
            "sbp_forward and apply the function in sbp_loss, e.g. cross_entropy(5 * tanh(z / 5), y, "
            "reduction='none'), so that the examples are scored by the loss the module trains on); for another "
            "layer that produces the outputs, name it with SelectiveBackprop(last_layer=...); or, with a selector "
            "that reads losses only (random, topk, loss), set track_grad_error=False"
        )

    def head(self, logits: Tensor, loss_fn: LossFn) -> tuple[Tensor, LossFn] | None:
        """The layer's outputs and the loss as a function of them, when the model normalises them after the layer.

        ``None`` when the model returns the layer's outputs as they are (then the logits are those outputs).
        """
        normaliser = self.normaliser
        if normaliser is None or self.outputs is None:
            return None

        def through_normaliser(outputs: Tensor, targets: Any) -> Tensor:
            return loss_fn(normaliser(outputs.float()), targets)

        return self.outputs.reshape(logits.shape), through_normaliser


def _log_softmax(outputs: Tensor) -> Tensor:
    return torch.log_softmax(outputs, dim=-1)


def _softmax(outputs: Tensor) -> Tensor:
    return torch.softmax(outputs, dim=-1)


_NORMALISERS = (_log_softmax, _softmax)
"""What models apply after their head that the last-layer gradients can be formed through."""


def _is_normalised(logits: Tensor, outputs: Tensor, normaliser: Callable[[Tensor], Tensor]) -> bool:
    """Whether ``logits`` are ``normaliser(outputs)`` over the last dimension, to the rounding of their dtype.

    Both subtract a log-sum-exp of the row from every entry (softmax then exponentiates values at most 0): each
    result errs by a few roundings of the row's largest magnitude and of ``log C``.
    """
    expected = normaliser(outputs.float())
    scale = outputs.float().abs().amax(dim=-1, keepdim=True) + math.log(max(2, outputs.shape[-1]))
    bound = 8 * torch.finfo(logits.dtype).eps * scale
    return bool(((logits.float() - expected).abs() <= bound).all())


def as_columns(logits: Tensor) -> Tensor:
    """Outputs ``[N]`` as the ``[N, 1]`` they are to the last layer; other shapes unchanged."""
    return logits.unsqueeze(-1) if logits.dim() == 1 else logits


def logit_gradients_by_autograd(
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    logits: Tensor,
    targets: Tensor,
    *,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
) -> Tensor:
    """Each example's loss gradient with respect to its own logits, in float32, for any per-example loss.

    A per-example loss depends only on its own row of logits, so the gradient of the summed losses holds
    every example's gradient in its row. The graph spans the logits alone, and it is built with autocast
    off, on float32 logits: the gradients are exact for the logits the scoring forward produced, whatever
    the training precision. A block of examples at a time is converted and differentiated, so that the
    float32 copy and the loss's own intermediates never hold more than ``chunk_elements`` elements beyond
    the result (a language model's ``[N, T, V]`` head is the case that matters).
    """
    n = logits.shape[0]
    blocks = row_blocks(n, logits[0].numel() if n else 1, chunk_elements)
    if not isinstance(targets, Tensor) or targets.shape[:1] != logits.shape[:1]:
        blocks = [slice(0, n)]
    grads = torch.empty(logits.shape, dtype=torch.float32, device=logits.device)
    with autocast_off(logits.device), torch.enable_grad():
        for block in blocks:
            leaf = logits[block].detach().float().requires_grad_(True)
            block_targets = targets[block] if len(blocks) > 1 else targets
            (grads[block],) = torch.autograd.grad(loss_fn(leaf, block_targets).sum(), leaf)
    return grads


@dataclass
class ForwardScores:
    """What the scoring forward measured, before the last layer's gradients are formed from it.

    Forming the logit gradients is separate from the forward so that a step can tell their cost from the
    forward's (they are only needed when a selector or a measurement reads the last layer).

    Attributes:
        losses: per-example losses ``[N]``, float32.
        logits: the outputs the losses were computed from, or ``None`` for a ``score_fn``.
        targets: the targets of the batch, or ``None`` for a ``score_fn``.
        loss_fn: the per-example loss, or ``None`` for a ``score_fn``.
        features: the final linear layer's inputs, when they were captured.
        bias: whether the final linear layer has a bias.
        head: the final layer's outputs and the per-example loss as a function of them, when the model
            returns a function of those outputs (log-probabilities); ``None`` when it returns them as they are.
    """

    losses: Tensor
    logits: Tensor | None = None
    targets: Any = None
    loss_fn: LossFn | None = None
    features: Tensor | None = None
    bias: bool = True
    head: tuple[Tensor, LossFn] | None = None

    @property
    def has_last_layer(self) -> bool:
        """Whether the final layer's inputs were captured, so that its gradients can be formed."""
        return self.features is not None

    def without_last_layer(self) -> Scores:
        """The losses (and logits), without the final layer's inputs and gradients."""
        return Scores(losses=self.losses, logits=self.logits)

    def with_last_layer(self) -> Scores:
        """The scores with the final layer's float32 inputs and logit gradients (autocast off).

        Outputs ``[N]`` (a squeezed one-output head) are given as ``[N, 1]``, as the layer produced them.
        """
        if self.features is None or self.logits is None or self.loss_fn is None:
            return self.without_last_layer()
        outputs, loss_fn = self.head if self.head is not None else (self.logits, self.loss_fn)
        logit_grads = logit_gradients_by_autograd(loss_fn, outputs, self.targets)
        return Scores(
            losses=self.losses,
            logits=as_columns(self.logits),
            logit_grads=as_columns(logit_grads),
            features=self.features.float(),
            bias=self.bias,
        )


class Scorer:
    """Scores every example of a batch: picks the forward and the loss, the precision and the scale.

    A module with :class:`~lightning_sbp.SelectiveBackpropMixin` is scored with its
    ``sbp_forward`` and ``sbp_loss``; any other with :func:`~lightning_sbp.batches.default_forward`
    and ``loss_fn``; ``score_fn``, when given, replaces both for any module.

    Args:
        mode: ``"train"`` or ``"eval"``, the mode of the modules during the pass (see :func:`scoring_mode`).
        precision: ``"same"`` for the trainer's precision, ``"bf16"`` or ``"16"`` for autocast to that dtype.
        scale: fraction of their spatial size the inputs are resampled to, ``0 < scale <= 1``.
        loss_fn: per-example loss of a module without the mixin; chosen from the targets at the first pass
            when ``None`` (see :mod:`lightning_sbp.default_loss`).
        last_layer: qualified name of the final ``nn.Linear``; the last one registered when ``None``.
        score_fn: ``(module, batch) -> per-example losses [N]``, for modules whose batch or ``forward``
            the defaults cannot read; it gives losses only, for the selectors that need nothing else.

    Attributes:
        capture: the hook on the final linear layer, when something reads its gradients.
        default_loss: the loss chosen from the targets, used when no ``loss_fn`` is given to a module without the
            mixin.
    """

    def __init__(
        self,
        mode: ScoreMode = "train",
        precision: ScorePrecision = "same",
        scale: float = 1.0,
        loss_fn: LossFn | None = None,
        last_layer: str | None = None,
        score_fn: ScoreFn | None = None,
    ) -> None:
        self.mode = mode
        self.precision = precision
        self.scale = scale
        self.loss_fn = loss_fn
        self.last_layer = last_layer
        self.score_fn = score_fn
        self.capture: LastLayerCapture | None = None
        self.buffers = BufferGuard()
        self.default_loss = _default_loss("the module")
        self._scored_once = False

    @property
    def cheap(self) -> bool:
        """Whether the scores differ from what the trainer's precision at full scale would give."""
        return self.precision != "same" or self.scale < 1.0

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, needs_last_layer: bool, track: bool) -> None:
        """Find the final linear layer when a selector (``needs_last_layer``) or tracking (``track``) reads it.

        Raises:
            ValueError: if ``needs_last_layer`` or ``last_layer`` names a layer and there is no such layer,
                or if ``needs_last_layer`` and ``score_fn`` gives losses only.
        """
        self.capture = None
        self.default_loss = _default_loss(type(pl_module).__name__)
        self._scored_once = False
        if self.score_fn is not None:
            if needs_last_layer:
                raise ValueError(
                    "score_fn gives per-example losses only, but the selector needs the last layer's inputs and "
                    "gradients: inherit lightning_sbp.SelectiveBackpropMixin and override sbp_forward (and sbp_loss) "
                    "instead of score_fn, or use a selector that reads losses only (random, topk, loss)"
                )
            if track:
                rank_zero_warn(
                    "SelectiveBackprop does not track gradient errors: score_fn gives per-example losses only, and "
                    "the errors need the last layer; set track_grad_error=False to silence this"
                )
            track = False
        if needs_last_layer or track:
            try:
                name, layer = find_last_linear(pl_module, self.last_layer)
            except ValueError as error:
                if needs_last_layer or self.last_layer is not None:
                    raise
                rank_zero_warn(f"SelectiveBackprop does not track gradient errors: {error}")
            else:
                self.capture = LastLayerCapture(layer, name)
        self._warn_slow_precision(trainer)

    def _warn_slow_precision(self, trainer: pl.Trainer) -> None:
        dtype = SCORE_DTYPES[self.precision]
        if dtype is None or trainer.strategy.root_device.type != "cpu" or cpu_has_fast_kernels(dtype) is not False:
            return
        rank_zero_warn(
            f"score_precision={self.precision!r}: this CPU has no fast {dtype} kernels "
            f"({torch.backends.cpu.get_cpu_capability()}), so the scoring pass will likely be slower than in "
            "float32, not faster; low-precision scoring pays off on GPUs and on CPUs with AVX-512 or AMX"
        )

    def forward_and_loss(self, pl_module: pl.LightningModule) -> tuple[Forward, LossFn]:
        """The functions that turn a batch into ``(logits, targets)`` and those into per-example losses."""
        if isinstance(pl_module, SelectiveBackpropMixin):
            return pl_module.sbp_forward, pl_module.sbp_loss
        return functools.partial(default_forward, pl_module), self.loss_fn or self.default_loss

    def forward_cheaply(
        self, pl_module: pl.LightningModule, batch: Any, batches: BatchAdapter, last_layer: bool = True
    ) -> ForwardScores:
        """The scoring forward at the configured precision and scale; ``batches.scale_inputs`` downscales."""
        scaled = batches.scale_inputs(batch, self.scale) if self.scale < 1.0 else batch
        dtype = SCORE_DTYPES[self.precision]
        with torch.autocast(pl_module.device.type, dtype=dtype) if dtype else contextlib.nullcontext():
            return self.forward(pl_module, scaled, last_layer)

    def score_cheaply(
        self, pl_module: pl.LightningModule, batch: Any, batches: BatchAdapter, last_layer: bool = True
    ) -> Scores:
        """Scores at the configured precision and scale; ``batches.scale_inputs`` downscales the batch."""
        return self.forward_cheaply(pl_module, batch, batches, last_layer).with_last_layer()

    def score(self, pl_module: pl.LightningModule, batch: Any, last_layer: bool = True) -> Scores:
        """Scores of every example of ``batch`` under the current precision, with the last layer when captured.

        See :meth:`forward`; the logit gradients are formed with autocast off, in float32.
        """
        return self.forward(pl_module, batch, last_layer).with_last_layer()

    def forward(self, pl_module: pl.LightningModule, batch: Any, last_layer: bool = True) -> ForwardScores:
        """The scoring forward over every example of ``batch``, under the current precision.

        The first pass checks what later passes take on trust: that the module can be scored as configured
        (it stops with the option that fixes it when not), that the losses are one per example, and that
        they are not all 0 (said once). Those checks read the losses on the host, once per fit.

        Args:
            pl_module: the module to score with.
            batch: the batch, as the training step receives it.
            last_layer: capture the final layer's inputs (when a layer was found at setup); ``False`` when
                nothing on this step reads them, which spares their cost.

        Raises:
            ScoringError: at the first pass, when the module cannot be scored as configured.
        """
        capture = self.capture if last_layer else None
        with (
            untouched_rng(pl_module.device),
            self.buffers.untouched(pl_module),
            scoring_mode(pl_module, self.mode),
            capture.armed() if capture else contextlib.nullcontext(),
        ):
            if self.score_fn is not None:
                given = ForwardScores(losses=self.score_fn(pl_module, batch).detach().float())
            else:
                forward, loss_fn = self.forward_and_loss(pl_module)
                logits, targets, losses = self._forward(pl_module, batch, forward, loss_fn)
        if torch.is_autocast_enabled() or torch.is_autocast_enabled("cpu"):
            torch.clear_autocast_cache()
        if not self._scored_once:
            scored = given.losses if self.score_fn is not None else losses
            self._check_first_losses(pl_module, scored, None if self.score_fn is not None else logits.shape[0])
            self._scored_once = True
        if self.score_fn is not None:
            return given
        logits = logits.detach()
        if capture is None:
            return ForwardScores(losses, logits, targets, loss_fn)
        features = capture.take(logits)
        head = capture.head(logits, loss_fn)
        return ForwardScores(losses, logits, targets, loss_fn, features, capture.layer.bias is not None, head)

    def _forward(
        self, pl_module: pl.LightningModule, batch: Any, forward: Forward, loss_fn: LossFn
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Logits, targets and per-example losses; the first time, a failure of a default explains the fix."""
        if self._scored_once:
            logits, targets = forward(batch)
            return logits, targets, loss_fn(logits, targets).detach().float()
        default_forward_used = _forwards_by_default(pl_module)
        if default_forward_used and not defines_forward(pl_module):
            raise ScoringError(_no_forward(pl_module))
        try:
            logits, targets = forward(batch)
        except torch.OutOfMemoryError:
            raise
        except _READING_ERRORS as error:
            if not default_forward_used:
                raise
            raise ScoringError(_cannot_read(pl_module, batch, error)) from None
        if self._loss_by_default(pl_module) and labels_are_the_inputs(batch, logits, targets):
            if isinstance(pl_module, SelectiveBackpropMixin):
                raise ScoringError(_unshifted_labels(pl_module))
            self.default_loss.choose(NEXT_TOKEN)
        try:
            losses = loss_fn(logits, targets).detach().float()
        except torch.OutOfMemoryError:
            raise
        except _READING_ERRORS as error:
            if not self._loss_by_default(pl_module):
                raise
            raise ScoringError(_cannot_apply_loss(pl_module, logits, targets, error)) from None
        return logits, targets, losses

    def _loss_by_default(self, pl_module: pl.LightningModule) -> bool:
        """Whether the module is scored with a default loss rather than one the user gave."""
        if isinstance(pl_module, SelectiveBackpropMixin):
            return type(pl_module).sbp_loss is SelectiveBackpropMixin.sbp_loss
        return self.loss_fn is None

    def _check_first_losses(self, pl_module: pl.LightningModule, losses: Tensor, rows: int | None) -> None:
        """Stop on losses that are not one per example; say once when every loss is exactly 0.

        Raises:
            ScoringError: if ``losses`` is not ``[N]``, ``N`` the number of rows of the outputs when known.
        """
        name = type(pl_module).__name__
        source = self._loss_source(pl_module)
        if losses.dim() != 1 or (rows is not None and losses.shape[0] != rows):
            expected = f"({rows},)" if rows is not None else "[N]"
            raise ScoringError(
                f"SelectiveBackprop needs one loss per example of {name}'s batch, shape {expected}, but {source} "
                f"gave shape {tuple(losses.shape)}: return per-example losses (reduction='none'), with each "
                "example's outputs reduced to one number"
            )
        size = losses.shape[0]
        if size > 0 and bool((losses == 0).all()):
            rank_zero_warn(
                f"SelectiveBackprop: every one of the {size} losses of {name}'s first scoring pass is exactly 0, so "
                f"they rank nothing: topk keeps the same rows of every batch and the last-layer gradients are 0. A "
                f"loss that is 0 whatever the model does (cross-entropy over a single output) is the usual cause; "
                f"{source} scored them, and {self._loss_fix(pl_module)} gives the loss the module trains on"
            )

    def _loss_source(self, pl_module: pl.LightningModule) -> str:
        """What computed the losses, for messages."""
        if self.score_fn is not None:
            return f"score_fn {getattr(self.score_fn, '__name__', repr(self.score_fn))}"
        if isinstance(pl_module, SelectiveBackpropMixin):
            return f"{type(pl_module).__name__}.sbp_loss"
        if self.loss_fn is not None:
            return f"loss_fn {getattr(self.loss_fn, '__name__', repr(self.loss_fn))}"
        return f"the default loss ({self.default_loss.name})"

    def _loss_fix(self, pl_module: pl.LightningModule) -> str:
        """The option that sets the scoring loss of ``pl_module``."""
        if self.score_fn is not None:
            return "a score_fn that"
        if isinstance(pl_module, SelectiveBackpropMixin):
            return f"overriding {type(pl_module).__name__}.sbp_loss with a per-example loss that"
        return "SelectiveBackprop(loss_fn=...), a per-example loss (outputs, targets) -> [N] that"


_READING_ERRORS = (TypeError, ValueError, KeyError, IndexError, AttributeError, RuntimeError)
"""What a forward or a loss raises on a batch or targets it cannot read."""


def _unshifted_labels(pl_module: pl.LightningModule) -> str:
    """One paragraph: a mixin module's default loss would score (and train) a causal LM's labels unshifted."""
    name = type(pl_module).__name__
    return (
        f"{name}'s batch holds labels equal to its input_ids and its outputs have one row per position: the labels "
        "of a causal language model, which transformers shifts inside its loss. SelectiveBackpropMixin's default "
        f"sbp_loss would score every position against the token it reads, and {name}'s training_step, if it "
        "reduces sbp_loss, would train on that too. To fix it, override sbp_loss with the next-token loss: "
        "`def sbp_loss(self, logits, targets): return "
        "lightning_sbp.functional.per_example_next_token_cross_entropy(logits, targets)`"
    )


def _default_loss(module: str) -> DefaultLoss:
    return DefaultLoss(f"SelectiveBackprop scores {module} with the", "SelectiveBackprop(loss_fn=...)")


def _forwards_by_default(pl_module: pl.LightningModule) -> bool:
    """Whether the module's batches are read by the default forward rather than by code the user wrote."""
    if isinstance(pl_module, SelectiveBackpropMixin):
        return type(pl_module).sbp_forward is SelectiveBackpropMixin.sbp_forward
    return True


def _layout(batch: Any) -> str:
    if isinstance(batch, dict):
        return f"a dict with keys {', '.join(map(repr, batch))}"
    if isinstance(batch, list | tuple):
        return f"a {type(batch).__name__} of {len(batch)} items"
    return f"a {type(batch).__name__}"


_OTHER_OPTIONS = (
    "pass score_fn, a function (module, batch) -> per-example losses [N] (in YAML its dotted import path, e.g. "
    "score_fn: my_package.scoring.losses), which serves the selectors that read losses only (random, topk, "
    "loss); or inherit lightning_sbp.SelectiveBackpropMixin and override sbp_forward(batch) -> (logits, targets) "
    "(and sbp_loss), which serves every selector. Random selection with track_grad_error=False needs no "
    "scoring pass at all."
)


def _no_forward(pl_module: pl.LightningModule) -> str:
    """One paragraph: the module has no ``forward`` for the default scoring pass to call, and the fixes."""
    name = type(pl_module).__name__
    return (
        f"SelectiveBackprop cannot score the batches of {name}: {name} has no forward method (its training_step "
        "calls its model itself), and the default scoring pass calls forward. Define one, e.g. "
        "`def forward(self, **inputs): return self.model(**inputs)` for a transformers model fed dict batches, "
        f"or `def forward(self, x): return self.model(x)`; or {_OTHER_OPTIONS}"
    )


def _cannot_read(pl_module: pl.LightningModule, batch: Any, error: BaseException) -> str:
    """One paragraph: which module, what the default forward tried, what failed, and the options that fix it."""
    name = type(pl_module).__name__
    return (
        f"SelectiveBackprop cannot score the batches of {name}. Its default scoring pass takes a batch as "
        f"(inputs, targets, ...) and calls forward(inputs), or as a dict with a label key ({', '.join(LABEL_KEYS)}) "
        "and calls forward with the other entries by name, or with the single input "
        f"({', '.join(INPUT_KEYS)}) when forward takes one argument; on this batch ({_layout(batch)}) that failed "
        f"with {type(error).__name__}: {error}. Tell it how to score {name}: {_OTHER_OPTIONS}"
    )


def _cannot_apply_loss(pl_module: pl.LightningModule, logits: Any, targets: Any, error: BaseException) -> str:
    """One paragraph: the default loss does not fit the module's outputs and targets, and how to give one."""
    name = type(pl_module).__name__
    if isinstance(pl_module, SelectiveBackpropMixin):
        fix = f"override {name}.sbp_loss(logits, targets) -> per-example losses [N]"
    else:
        fix = (
            "pass SelectiveBackprop(loss_fn=...), a per-example loss (outputs, targets) -> [N] such as "
            "functools.partial(torch.nn.functional.mse_loss, reduction='none') for outputs shaped like the targets "
            "(in YAML its dotted import path)"
        )
    if isinstance(error, NoDefaultLoss):
        failure = error.reason
    else:
        outputs = f"outputs of shape {tuple(logits.shape)}" if isinstance(logits, Tensor) else "outputs"
        failure = f"on {outputs} and {describe_targets(targets)} it failed with {type(error).__name__}: {error}"
    return (
        f"SelectiveBackprop cannot score the batches of {name} with its default loss: {failure}. Give it the loss "
        f"{name} trains on: {fix}."
    )
