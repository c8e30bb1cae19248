"""Speed of ``omp_gram`` against scikit-learn's ``orthogonal_mp_gram`` on CPU.

Run from the project root (scikit-learn must be installed)::

    python benchmarks/omp.py [--repeats 15] [--sizes 128 256 512 1024]

Both implementations solve the same problems: ``N`` random atoms in ``2N`` dimensions (so the Gram
matrix is well conditioned), the signal is the mean of the atoms (as for gradient matching), and
``k = N / 2`` atoms are selected. The two are timed back to back on the same inputs, alternating which
goes first; the table reports median times over the repeats, the median ratio of back-to-back times
(below 1 means ``omp_gram`` is faster), and the Jaccard index of the two supports. Each implementation
uses its default threading. On a shared machine, run it when the machine is otherwise idle.
"""

from __future__ import annotations

import argparse
import os
import time
import warnings
from collections.abc import Callable

import numpy as np
import torch
from sklearn.linear_model import orthogonal_mp_gram

from lightning_sbp.functional.omp import omp_gram


def _median_ms(times: list[float]) -> float:
    return float(np.median(times)) * 1e3


def _problem(n: int, dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    atoms = torch.randn(2 * n, n, generator=generator, dtype=torch.float64) / (2 * n) ** 0.5
    gram = atoms.T @ atoms
    return gram.to(dtype), gram.mean(dim=1).to(dtype)


def _time(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run(sizes: list[int], dtypes: list[torch.dtype], repeats: int) -> str:
    rows = [
        "| dtype | N | k | t_ours (ms) | t_sklearn (ms) | ours / sklearn | support Jaccard |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for dtype in dtypes:
        for n in sizes:
            k = n // 2
            gram, target = _problem(n, dtype, seed=n)
            gram_np, target_np = gram.numpy(), target.numpy()

            def ours(gram: torch.Tensor = gram, target: torch.Tensor = target, k: int = k) -> object:
                return omp_gram(gram, target, k)

            def sklearn(gram_np: np.ndarray = gram_np, target_np: np.ndarray = target_np, k: int = k) -> object:
                return orthogonal_mp_gram(gram_np, target_np, n_nonzero_coefs=k)

            ours()  # warm-up
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                sklearn()
                t_ours, t_sklearn = [], []
                for repeat in range(repeats):
                    # Alternate which one runs first, so that neither always inherits the other's cache state.
                    if repeat % 2:
                        t_sklearn.append(_time(sklearn))
                        t_ours.append(_time(ours))
                    else:
                        t_ours.append(_time(ours))
                        t_sklearn.append(_time(sklearn))
                reference = orthogonal_mp_gram(gram_np, target_np, n_nonzero_coefs=k)
            indices, _ = omp_gram(gram, target, k)
            mine = set(indices.tolist())
            theirs = set(np.flatnonzero(reference).tolist())
            jaccard = len(mine & theirs) / len(mine | theirs)
            # The ratio is the median of the ratios of back-to-back runs, which share the machine's load.
            ratio = float(np.median(np.array(t_ours) / np.array(t_sklearn)))
            rows.append(
                f"| {str(dtype).removeprefix('torch.')} | {n} | {k} | {_median_ms(t_ours):.1f} "
                f"| {_median_ms(t_sklearn):.1f} | {ratio:.2f} | {jaccard:.3f} |"
            )
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 256, 512, 1024])
    parser.add_argument("--dtypes", nargs="+", default=["float64", "float32"], choices=["float64", "float32"])
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    load = ", ".join(f"{value:.2f}" for value in os.getloadavg())
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {load}")
    print(run(args.sizes, [getattr(torch, name) for name in args.dtypes], args.repeats))


if __name__ == "__main__":
    main()
