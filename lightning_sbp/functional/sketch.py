"""A randomised sketch of per-example last-layer gradients, for heads too large for the exact Gram matrix.

Example ``i``'s gradient with respect to a final linear layer is the ``[C, D + 1]`` matrix
``G_i = Σ_t p_it ⊗ [h_it, 1]`` (drop the ``1`` without bias). A TensorSketch (Pham and Pagh, 2013) maps it
to ``m`` numbers without ever forming it: two count sketches, one over the ``C`` logits and one over the
``D + 1`` features, are drawn from a seed; the sketch of one outer product ``p ⊗ h`` is the circular
convolution of the count sketches of ``p`` and ``h``, computed with an FFT; and since the sketch is linear,
the sketch of ``G_i`` is the sum over positions of the sketches of its terms, accumulated in the frequency
domain. Its cost is ``O(N T (C + D + m log m))`` for ``N`` examples of ``T`` positions.

Inner products of sketches estimate those of gradients without bias: ``E[s_i · s_j] = g_i · g_j``, with
variance at most ``(‖g_i‖² ‖g_j‖² + (g_i · g_j)²) / m`` to leading order in ``1/m`` (the count sketch
bound) and at most ``11 ‖g_i‖² ‖g_j‖² / m`` in all (the degree-two TensorSketch bound, ``(2 + 3²) / m``, of
Avron, Nguyen and Woodruff, 2014). The error of each entry therefore falls like ``1 / sqrt(m)``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_sbp.functional._inputs import DEFAULT_CHUNK_ELEMENTS, as_sequences, compute_dtype, outside_autocast

__all__ = ["FFT_WEIGHT", "SCATTER_WEIGHT", "gradient_sketch", "sketch_cost"]


SCATTER_WEIGHT = 64
"""Cost of one scattered addition of a count sketch, in multiply-adds of a matrix product (measured on CPU)."""
FFT_WEIGHT = 16
"""Cost of one ``m log m`` unit of a real FFT, in multiply-adds of a matrix product (measured on CPU)."""


def sketch_cost(n: int, positions: int, features: int, classes: int, sketch_dim: int) -> int:
    """Cost of :func:`gradient_sketch` and of the Gram matrix of its result, in multiply-adds of a matrix product.

    ``N T (C + D)`` scattered additions and ``2 N T m log m`` FFT operations, weighted by how much slower
    than a matrix product's multiply-add each is (:data:`SCATTER_WEIGHT`, :data:`FFT_WEIGHT`), plus the
    ``N² m`` of the Gram matrix.
    """
    log_m = max(1, sketch_dim.bit_length())
    per_position = SCATTER_WEIGHT * (classes + features) + FFT_WEIGHT * 2 * sketch_dim * log_m
    return n * positions * per_position + n * n * sketch_dim


def _hashes(size: int, buckets: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """A bucket in ``[0, buckets)`` and a sign ``±1`` for each of ``size`` coordinates."""
    device = generator.device
    bucket = torch.randint(0, buckets, (size,), generator=generator, device=device)
    sign = torch.randint(0, 2, (size,), generator=generator, device=device) * 2 - 1
    return bucket, sign


def _generator(seed: int | torch.Generator, device: torch.device) -> torch.Generator:
    if isinstance(seed, torch.Generator):
        if seed.device.type != device.type:
            raise ValueError(f"the generator is on {seed.device} but the inputs are on {device}")
        return seed
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an integer or a torch.Generator, got {seed!r}")
    return torch.Generator(device=device).manual_seed(seed)


@outside_autocast
def gradient_sketch(
    features: Tensor,
    logit_grads: Tensor,
    sketch_dim: int,
    bias: bool = True,
    seed: int | torch.Generator = 0,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """TensorSketch of each example's gradient with respect to a final linear layer, ``[N, sketch_dim]``.

    ``S Sᵀ`` is an unbiased estimate of the Gram matrix of :func:`~lightning_sbp.functional.gradient_gram`
    (see the module docstring for the error bound). The same seed gives the same projection, so sketches
    made with one seed are comparable.

    Memory: besides the inputs and the ``[N, sketch_dim]`` result, the positions are processed in chunks
    of at most ``chunk_elements`` elements of ``[positions, C + sketch_dim]`` (at least one position).

    Args:
        features: ``[N, D]`` or ``[N, T, D]`` inputs of the final linear layer.
        logit_grads: ``[N, C]`` or ``[N, T, C]`` gradients of each example's loss with respect to its logits;
            masked positions have zero rows.
        sketch_dim: the sketch dimension ``m >= 1``; a power of two is fastest.
        bias: whether the layer has a bias.
        seed: an integer that seeds the projection, or a generator on the device of the inputs to draw it from.
        chunk_elements: the memory budget of one chunk, in elements.
        dtype: the floating dtype of the arithmetic and the result; by default that of the inputs, at least
            ``float32``.

    Returns:
        ``[N, sketch_dim]`` sketches in ``dtype``.

    Raises:
        ValueError: on shapes that do not match, non-floating inputs or a ``sketch_dim`` below 1.
    """
    if isinstance(sketch_dim, bool) or not isinstance(sketch_dim, int) or sketch_dim < 1:
        raise ValueError(f"sketch_dim must be a positive integer, got {sketch_dim!r}")
    h, p = as_sequences(features, logit_grads)
    n, positions, dim = h.shape
    classes = p.shape[2]
    dtype = dtype or compute_dtype(h, p)
    device = h.device
    generator = _generator(seed, device)
    class_bucket, class_sign = _hashes(classes, sketch_dim, generator)
    feature_bucket, feature_sign = _hashes(dim + 1, sketch_dim, generator)
    class_sign, feature_sign = class_sign.to(dtype), feature_sign.to(dtype)

    flat_h, flat_p = h.reshape(n * positions, dim), p.reshape(n * positions, classes)
    example = torch.arange(n, device=device).repeat_interleave(positions)
    spectrum = torch.zeros(n, sketch_dim // 2 + 1, dtype=torch.promote_types(dtype, torch.complex64), device=device)
    step = max(1, chunk_elements // (classes + dim + sketch_dim))
    for start in range(0, n * positions, step):
        rows = slice(start, start + step)
        p_rows = flat_p[rows].to(dtype) * class_sign
        h_rows = flat_h[rows].to(dtype) * feature_sign[:dim]
        p_sketch = p_rows.new_zeros(p_rows.shape[0], sketch_dim).index_add_(1, class_bucket, p_rows)
        h_sketch = h_rows.new_zeros(h_rows.shape[0], sketch_dim).index_add_(1, feature_bucket[:dim], h_rows)
        if bias:  # the constant feature 1 of every position
            h_sketch.index_add_(1, feature_bucket[dim:], feature_sign[dim:].expand(h_sketch.shape[0], 1))
        product = torch.fft.rfft(p_sketch, dim=1) * torch.fft.rfft(h_sketch, dim=1)
        spectrum.index_add_(0, example[rows], product)
    return torch.fft.irfft(spectrum, n=sketch_dim, dim=1)
