"""Pure tensor functions: batch arithmetic, last-layer Gram matrices, Gram-OMP, gradient errors.

Nothing here knows Lightning; every function runs on the device of its inputs.
"""

from lightning_sbp.functional.batch import batch_size, example_indices, index_batch, subset_size
from lightning_sbp.functional.grad_error import (
    random_subset_gradient_error,
    relative_gradient_error,
    subset_gradient_error,
)
from lightning_sbp.functional.gram import gradient_gram, gradient_norm_bound, last_layer_gram, logit_gradients
from lightning_sbp.functional.loss import (
    per_example_binary_cross_entropy,
    per_example_cross_entropy,
    per_example_next_token_cross_entropy,
    per_example_squared_error,
)
from lightning_sbp.functional.omp import omp_gram
from lightning_sbp.functional.resize import downscale
from lightning_sbp.functional.sketch import gradient_sketch

__all__ = [
    "batch_size",
    "downscale",
    "example_indices",
    "gradient_gram",
    "gradient_norm_bound",
    "gradient_sketch",
    "index_batch",
    "last_layer_gram",
    "logit_gradients",
    "omp_gram",
    "per_example_binary_cross_entropy",
    "per_example_cross_entropy",
    "per_example_next_token_cross_entropy",
    "per_example_squared_error",
    "random_subset_gradient_error",
    "relative_gradient_error",
    "subset_gradient_error",
    "subset_size",
]
