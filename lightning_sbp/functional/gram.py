"""Per-example gradients of softmax cross-entropy at the final linear layer, in closed form.

For a final layer ``z = W h + b`` and a per-example loss ``ℓ(z)``, the gradient of example ``i`` with
respect to ``(W, b)`` is ``(p_i h_iᵀ, p_i)`` with ``p_i = ∂ℓ_i/∂z_i``. Inner products of two such
gradients factor as ``(h_i · h_j + 1)(p_i · p_j)``, so the Gram matrix of all ``N`` of them costs two
small matrix products and never materialises an ``[N, C, D]`` tensor.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["gradient_gram", "gradient_norm_bound", "last_layer_gram", "logit_gradients"]


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    """The common floating dtype of ``tensors``, at least ``float32``."""
    dtype = torch.float32
    for tensor in tensors:
        dtype = torch.promote_types(dtype, tensor.dtype)
    return dtype


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

    dtype = _compute_dtype(logits) if weight is None else _compute_dtype(logits, weight)
    probs = torch.softmax(logits.to(dtype), dim=1)
    classes = torch.arange(num_classes, device=logits.device)
    onehot = (targets.unsqueeze(1) == classes).to(dtype)
    smoothed = onehot * (1.0 - label_smoothing) + label_smoothing / num_classes
    if weight is None:
        # Σ_c q_ic = 1 for in-range targets.
        return probs - smoothed
    mass = smoothed * weight.to(device=logits.device, dtype=dtype)
    return mass.sum(dim=1, keepdim=True) * probs - mass


def _check_last_layer(features: Tensor, logit_grads: Tensor) -> None:
    if features.ndim != 2 or logit_grads.ndim != 2:
        raise ValueError(
            f"features must have shape [N, D] and logit_grads shape [N, C], "
            f"got {tuple(features.shape)} and {tuple(logit_grads.shape)}"
        )
    if features.shape[0] != logit_grads.shape[0]:
        raise ValueError(
            f"features and logit_grads must have the same number of rows, "
            f"got {features.shape[0]} and {logit_grads.shape[0]}"
        )
    if not (features.is_floating_point() and logit_grads.is_floating_point()):
        raise ValueError(
            f"features and logit_grads must be floating point, got {features.dtype} and {logit_grads.dtype}"
        )


def gradient_gram(features: Tensor, logit_grads: Tensor, bias: bool = True) -> Tensor:
    """Gram matrix of the per-example gradients with respect to a final linear layer.

    ``K = (H Hᵀ + 1) ∘ (P Pᵀ)``, or ``K = (H Hᵀ) ∘ (P Pᵀ)`` when the layer has no bias, where the rows
    of ``H`` are the layer's inputs and those of ``P`` the gradients of the losses with respect to the
    layer's outputs. ``K[i, j]`` is the inner product of the gradients of examples ``i`` and ``j`` with
    respect to the layer's weight (and bias).

    Args:
        features: ``[N, D]`` inputs of the final linear layer.
        logit_grads: ``[N, C]`` gradient of each example's loss with respect to its own logits (see
            :func:`logit_gradients`).
        bias: whether the layer has a bias.

    Returns:
        ``[N, N]`` symmetric positive semi-definite matrix in the floating dtype of the inputs, at least
        ``float32``.

    Raises:
        ValueError: on shapes that do not match or non-floating inputs.
    """
    _check_last_layer(features, logit_grads)
    dtype = _compute_dtype(features, logit_grads)
    h = features.to(dtype)
    p = logit_grads.to(dtype)
    feature_gram = h @ h.T
    if bias:
        feature_gram += 1.0
    return feature_gram.mul_(p @ p.T)


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


def gradient_norm_bound(features: Tensor, logit_grads: Tensor, bias: bool = True) -> Tensor:
    """Norm of each example's gradient with respect to a final linear layer, without the Gram matrix.

    ``‖p_i‖ · sqrt(‖h_i‖² + 1)`` (no ``+ 1`` without bias), which equals ``sqrt(K[i, i])`` of
    :func:`gradient_gram`. Up to a factor that does not depend on the example, it bounds the norm of
    the example's gradient with respect to all parameters, hence the name.

    Args:
        features: ``[N, D]`` inputs of the final linear layer.
        logit_grads: ``[N, C]`` gradient of each example's loss with respect to its own logits.
        bias: whether the layer has a bias.

    Returns:
        ``[N]`` non-negative norms, at least ``float32``.

    Raises:
        ValueError: on shapes that do not match or non-floating inputs.
    """
    _check_last_layer(features, logit_grads)
    dtype = _compute_dtype(features, logit_grads)
    h_sq = features.to(dtype).square().sum(dim=1)
    if bias:
        h_sq += 1.0
    return torch.linalg.vector_norm(logit_grads.to(dtype), dim=1) * h_sq.sqrt()
