"""Pure tensor functions: batch arithmetic, last-layer Gram matrices, Gram-OMP, gradient errors."""

from lightning_sbp.functional.batch import batch_size, index_batch, subset_size

__all__ = ["batch_size", "index_batch", "subset_size"]
