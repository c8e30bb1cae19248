"""Per-example gradients at the final linear layer, in closed form.

For a final layer ``z = W h + b`` and a per-example loss ``ℓ(z)``, the gradient of example ``i`` with
respect to ``(W, b)`` is ``(p_i h_iᵀ, p_i)`` with ``p_i = ∂ℓ_i/∂z_i``. Inner products of two such
gradients factor as ``(h_i · h_j + 1)(p_i · p_j)``, so the Gram matrix of all ``N`` of them costs two
small matrix products and never materialises an ``[N, C, D]`` tensor. A layer applied at every position
of a sequence sums such terms over positions; :func:`gradient_gram` handles both, in bounded memory.
"""

from __future__ import annotations

import math
from typing import Literal, get_args

import torch
from torch import Tensor

from lightning_sbp.functional._inputs import DEFAULT_CHUNK_ELEMENTS, as_sequences, compute_dtype, outside_autocast
from lightning_sbp.functional.sketch import gradient_sketch, sketch_cost

__all__ = [
    "Form",
    "choose_form",
    "gradient_gram",
    "gradient_norm_bound",
    "gram_costs",
    "last_layer_gram",
    "logit_gradients",
]


@outside_autocast
def logit_gradients(
    logits: Tensor, targets: Tensor, label_smoothing: float = 0.0, weight: Tensor | None = None
) -> Tensor:
    """Gradient of each example's softmax cross-entropy with respect to its own logits.

    The loss is that of ``torch.nn.functional.cross_entropy(logits, targets, reduction="none",
    label_smoothing=label_smoothing, weight=weight)``: ``ℓ_i = -Σ_c a_ic log softmax(z_i)_c`` with
    ``a_ic = w_c q_ic``, ``q_i = (1 - ε) onehot(y_i) + ε / C`` and ``w`` the class weights (ones when
    ``weight`` is None). Its gradient is ``(Σ_c a_ic) softmax(z_i) - a_i``, which reduces to
    ``softmax(z_i) - onehot(y_i)`` for the plain loss.

    Args:
        logits: ``[N, C]`` floating logits. Half-precision inputs are computed in ``float32``.
        targets: ``[N]`` integer class indices in ``[0, C)``. The range is checked for CPU tensors only,
            since checking it on an accelerator would synchronise with the host (out-of-range targets
            there give a row without its one-hot part).
        label_smoothing: ``ε`` in ``[0, 1]``.
        weight: optional ``[C]`` class weights.

    Returns:
        ``[N, C]`` gradients in the floating dtype of the inputs, at least ``float32``.

    Raises:
        ValueError: on shapes that do not match, non-floating logits, non-integer targets, targets out
            of range (CPU), or ``label_smoothing`` outside ``[0, 1]``.
    """
    if logits.ndim != 2:
        raise ValueError(f"logits must have shape [N, C], got shape {tuple(logits.shape)}")
    n, num_classes = logits.shape
    if not logits.is_floating_point():
        raise ValueError(f"logits must be floating point, got {logits.dtype}")
    if targets.shape != (n,):
        raise ValueError(f"targets must have shape [N] = [{n}] to match logits, got shape {tuple(targets.shape)}")
    if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
        raise ValueError(f"targets must hold integer class indices, got {targets.dtype}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    if weight is not None and weight.shape != (num_classes,):
        raise ValueError(f"weight must have shape [C] = [{num_classes}], got shape {tuple(weight.shape)}")
    if targets.device.type == "cpu" and n > 0 and not bool(((targets >= 0) & (targets < num_classes)).all()):
        bad = targets[(targets < 0) | (targets >= num_classes)]
        raise ValueError(f"targets must be class indices in [0, {num_classes}), got {bad[:5].tolist()}")

    dtype = compute_dtype(logits) if weight is None else compute_dtype(logits, weight)
    probs = torch.softmax(logits.to(dtype), dim=1)
    classes = torch.arange(num_classes, device=logits.device)
    onehot = (targets.unsqueeze(1) == classes).to(dtype)
    smoothed = onehot * (1.0 - label_smoothing) + label_smoothing / num_classes
    if weight is None:
        # Σ_c q_ic = 1 for in-range targets.
        return probs - smoothed
    mass = smoothed * weight.to(device=logits.device, dtype=dtype)
    return mass.sum(dim=1, keepdim=True) * probs - mass


Form = Literal["auto", "token_pairs", "per_example", "sketch"]
FORMS: tuple[str, ...] = get_args(Form)


def gram_costs(n: int, positions: int, features: int, classes: int) -> dict[str, int]:
    """Multiply-adds of the two exact forms of :func:`gradient_gram`, up to constants.

    ``token_pairs``: ``N² T² (D + C)``; ``per_example``: ``N T C D + N² C D``.
    """
    return {
        "token_pairs": n * n * positions * positions * (features + classes),
        "per_example": n * positions * classes * features + n * n * classes * features,
    }


def choose_form(
    n: int, positions: int, features: int, classes: int, sketch_dim: int | None = None
) -> Literal["token_pairs", "per_example", "sketch"]:
    """The form ``form="auto"`` takes: the cheapest exact form, or the sketch when it is cheaper still."""
    exact = gram_costs(n, positions, features, classes)
    form: Literal["token_pairs", "per_example", "sketch"] = (
        "token_pairs" if exact["token_pairs"] <= exact["per_example"] else "per_example"
    )
    if sketch_dim is not None and sketch_cost(n, positions, features, classes, sketch_dim) < exact[form]:
        form = "sketch"
    return form


@outside_autocast
def gradient_gram(
    features: Tensor,
    logit_grads: Tensor,
    bias: bool = True,
    *,
    form: Form = "auto",
    sketch_dim: int | None = None,
    seed: int | torch.Generator = 0,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """Gram matrix of the per-example gradients with respect to a final linear layer.

    For a layer applied once per example (``[N, D]`` inputs, ``[N, C]`` outputs),
    ``K = (H Hᵀ + 1) ∘ (P Pᵀ)``, or ``K = (H Hᵀ) ∘ (P Pᵀ)`` without bias, where the rows of ``H`` are the
    layer's inputs and those of ``P`` the gradients of the losses with respect to its outputs. For a layer
    applied at every position (``[N, T, D]`` and ``[N, T, C]``: language models, token classifiers),
    example ``i``'s gradient is ``g_i = Σ_t p_it ⊗ [h_it, 1]`` and
    ``K_ij = Σ_{t,s} (h_it · h_js + 1)(p_it · p_js)``. Positions without a loss (padding, ``ignore_index``)
    have zero logit gradients and drop out. ``K[i, j]`` is the inner product of the gradients of examples
    ``i`` and ``j`` with respect to the layer's weight (and bias). No per-example gradient is materialised.

    Forms (``form="auto"`` takes the cheapest, see :func:`choose_form`):

    * ``"token_pairs"``: the identity above over blocks of position pairs, ``O(N² T² (D + C))``; the only
      form for ``[N, D]`` inputs that is ever chosen.
    * ``"per_example"``: ``G_i = P_iᵀ H_i`` over blocks of classes and ``K = Σ_blocks G Gᵀ`` plus the bias
      term, ``O(N T C D + N² C D)``: cheaper for long sequences and moderate vocabularies.
    * ``"sketch"``: ``S Sᵀ`` with ``S`` the TensorSketch of :func:`~lightning_sbp.functional.gradient_sketch`,
      ``O(N T (C + D + m log m) + N² m)``: an unbiased estimate whose entries err by
      ``O(‖g_i‖ ‖g_j‖ / sqrt(m))``, for vocabularies where the exact forms cost more than the forward
      pass. Needs ``sketch_dim``; ``"auto"`` considers it only when ``sketch_dim`` is given.

    Memory: besides the inputs and the ``[N, N]`` result, every form holds at most a few blocks of
    ``chunk_elements`` elements (``token_pairs``: two ``[b, b]`` products of ``b = sqrt(chunk_elements)``
    positions; ``per_example``: one ``[N, c, D]`` block of ``c = chunk_elements / (N D)`` classes, at least
    one; ``sketch``: ``[r, C + m]`` for ``r`` positions) plus ``O(N C)`` for the bias term.

    Args:
        features: ``[N, D]`` or ``[N, T, D]`` inputs of the final linear layer.
        logit_grads: ``[N, C]`` or ``[N, T, C]`` gradient of each example's loss with respect to its own
            logits (see :func:`logit_gradients`, or autograd for any per-example loss).
        bias: whether the layer has a bias.
        form: ``"auto"``, ``"token_pairs"``, ``"per_example"`` or ``"sketch"``.
        sketch_dim: dimension ``m`` of the sketch; ``None`` keeps the result exact.
        seed: seeds the sketch's projection (an integer, or a generator on the device of the inputs).
        chunk_elements: the memory budget of one intermediate block, in elements.
        dtype: the floating dtype of the arithmetic and the result; by default that of the inputs, at least
            ``float32``. The logit gradients are converted a block at a time, never as a whole.

    Returns:
        ``[N, N]`` symmetric positive semi-definite matrix in ``dtype``. Autocast is off inside, so a Gram
        matrix formed inside a mixed-precision training step is still computed in ``dtype``.

    Raises:
        ValueError: on shapes that do not match, non-floating inputs, an unknown ``form``, or
            ``form="sketch"`` without ``sketch_dim``.
    """
    h, p = as_sequences(features, logit_grads)
    if form not in FORMS:
        raise ValueError(f"form must be one of {', '.join(map(repr, FORMS))}; got {form!r}")
    if form == "sketch" and sketch_dim is None:
        raise ValueError("form='sketch' needs a sketch_dim, e.g. sketch_dim=4096")
    if isinstance(chunk_elements, bool) or not isinstance(chunk_elements, int) or chunk_elements < 1:
        raise ValueError(f"chunk_elements must be a positive integer, got {chunk_elements!r}")
    n, positions, dim = h.shape
    if form == "auto":
        form = choose_form(n, positions, dim, p.shape[2], sketch_dim)
    if form == "sketch":
        assert sketch_dim is not None
        sketch = gradient_sketch(h, p, sketch_dim, bias=bias, seed=seed, chunk_elements=chunk_elements, dtype=dtype)
        return sketch @ sketch.T
    dtype = dtype or compute_dtype(h, p)
    if form == "per_example":
        return _per_example_gram(h, p, bias, dtype, chunk_elements)
    return _token_pair_gram(h, p, bias, dtype, chunk_elements)


def _token_pair_gram(h: Tensor, p: Tensor, bias: bool, dtype: torch.dtype, chunk_elements: int) -> Tensor:
    """``K_ij = Σ_{t,s} (h_it · h_js + 1)(p_it · p_js)`` over square blocks of positions, by symmetry."""
    n, positions, _ = h.shape
    flat_h, flat_p = h.reshape(n * positions, -1), p.reshape(n * positions, -1)
    example = torch.arange(n, device=h.device).repeat_interleave(positions)
    gram = torch.zeros(n, n, dtype=dtype, device=h.device)
    rows = n * positions
    step = max(1, math.isqrt(chunk_elements))
    for a in range(0, rows, step):
        block_a = slice(a, a + step)
        h_a, p_a, example_a = flat_h[block_a].to(dtype), flat_p[block_a].to(dtype), example[block_a]
        for b in range(a, rows, step):
            block_b = slice(b, b + step)
            h_b, p_b, example_b = flat_h[block_b].to(dtype), flat_p[block_b].to(dtype), example[block_b]
            pairs = h_a @ h_b.T
            if bias:
                pairs += 1.0
            pairs.mul_(p_a @ p_b.T)
            if positions == 1:  # one position per example: the block is a block of K itself
                gram[block_a, block_b] = pairs
                if b != a:
                    gram[block_b, block_a] = pairs.T
                continue
            gram.index_add_(0, example_a, pairs.new_zeros(pairs.shape[0], n).index_add_(1, example_b, pairs))
            if b != a:
                mirrored = pairs.new_zeros(pairs.shape[1], n).index_add_(1, example_a, pairs.T)
                gram.index_add_(0, example_b, mirrored)
    return gram


def _per_example_gram(h: Tensor, p: Tensor, bias: bool, dtype: torch.dtype, chunk_elements: int) -> Tensor:
    """``K = Σ_blocks vec(P_iᵀ H_i) · vec(P_jᵀ H_j)`` over blocks of classes, plus the bias term."""
    n, _, dim = h.shape
    classes = p.shape[2]
    h = h.to(dtype)
    gram = torch.zeros(n, n, dtype=dtype, device=h.device)
    step = max(1, chunk_elements // max(1, n * dim))
    for start in range(0, classes, step):
        block = torch.bmm(p[:, :, start : start + step].to(dtype).transpose(1, 2), h).reshape(n, -1)
        gram.addmm_(block, block.T)
    if bias:
        summed = p.sum(dim=1, dtype=dtype)
        gram.addmm_(summed, summed.T)
    return gram


@outside_autocast
def last_layer_gram(
    features: Tensor,
    logits: Tensor,
    targets: Tensor,
    bias: bool = True,
    label_smoothing: float = 0.0,
    weight: Tensor | None = None,
) -> Tensor:
    """Gram matrix of the per-example gradients of softmax cross-entropy at the final linear layer.

    ``K = (H Hᵀ + 1) ∘ (P Pᵀ)`` with ``P`` from :func:`logit_gradients` (``softmax(logits) -
    onehot(targets)`` for the plain loss); drop the ``+ 1`` when the layer has no bias.

    Args:
        features: ``[N, D]`` inputs of the final linear layer.
        logits: ``[N, C]`` its outputs.
        targets: ``[N]`` class indices.
        bias: whether the layer has a bias.
        label_smoothing: as in ``torch.nn.functional.cross_entropy``.
        weight: optional ``[C]`` class weights, as in ``torch.nn.functional.cross_entropy``.

    Returns:
        ``[N, N]`` Gram matrix, at least ``float32``.

    Raises:
        ValueError: on invalid inputs (see :func:`logit_gradients` and :func:`gradient_gram`).
    """
    return gradient_gram(features, logit_gradients(logits, targets, label_smoothing, weight), bias=bias)


@outside_autocast
def gradient_norm_bound(
    features: Tensor, logit_grads: Tensor, bias: bool = True, *, chunk_elements: int = DEFAULT_CHUNK_ELEMENTS
) -> Tensor:
    """Norm of each example's gradient with respect to a final linear layer, without the Gram matrix.

    ``sqrt(K[i, i])`` of :func:`gradient_gram`: ``‖p_i‖ · sqrt(‖h_i‖² + 1)`` (no ``+ 1`` without bias) for
    ``[N, D]`` inputs, and ``sqrt(Σ_{t,s} (h_it · h_is + 1)(p_it · p_is))`` for ``[N, T, D]`` inputs, computed
    exactly by the cheaper of ``O(N T² (D + C))`` position pairs within each example and
    ``O(N T C D)`` for ``‖P_iᵀ H_i‖``. Up to a factor that does not depend on the example, it bounds the norm
    of the example's gradient with respect to all parameters, hence the name.

    Memory: besides the inputs, blocks of at most ``chunk_elements`` elements (``[b, T, T]`` for ``b``
    examples, or ``[N, c, D]`` for ``c`` classes) plus ``O(N C)`` for the bias term.

    Args:
        features: ``[N, D]`` or ``[N, T, D]`` inputs of the final linear layer.
        logit_grads: ``[N, C]`` or ``[N, T, C]`` gradient of each example's loss with respect to its own logits.
        bias: whether the layer has a bias.
        chunk_elements: the memory budget of one intermediate block, in elements.

    Returns:
        ``[N]`` non-negative norms, at least ``float32``.

    Raises:
        ValueError: on shapes that do not match or non-floating inputs.
    """
    h, p = as_sequences(features, logit_grads)
    dtype = compute_dtype(h, p)
    n, positions, dim = h.shape
    classes = p.shape[2]
    if positions == 1:
        h_sq = h[:, 0].to(dtype).square().sum(dim=1)
        if bias:
            h_sq += 1.0
        return torch.linalg.vector_norm(p[:, 0].to(dtype), dim=1) * h_sq.sqrt()
    squared = torch.zeros(n, dtype=dtype, device=h.device)
    if positions * (dim + classes) <= classes * dim:
        step = max(1, chunk_elements // (positions * positions))
        for start in range(0, n, step):
            h_block, p_block = h[start : start + step].to(dtype), p[start : start + step].to(dtype)
            pairs = torch.bmm(h_block, h_block.transpose(1, 2))
            if bias:
                pairs += 1.0
            squared[start : start + step] = (pairs * torch.bmm(p_block, p_block.transpose(1, 2))).sum(dim=(1, 2))
    else:
        h = h.to(dtype)
        step = max(1, chunk_elements // max(1, n * dim))
        for start in range(0, classes, step):
            squared += torch.bmm(p[:, :, start : start + step].to(dtype).transpose(1, 2), h).square().sum(dim=(1, 2))
        if bias:
            squared += p.sum(dim=1, dtype=dtype).square().sum(dim=1)
    return squared.clamp_min(0.0).sqrt()
