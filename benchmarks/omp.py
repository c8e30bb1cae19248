"""Speed of ``omp_gram`` against scikit-learn's ``orthogonal_mp_gram``, and the operators it runs per pick.

Run from the project root (scikit-learn must be installed)::

    python benchmarks/omp.py [--repeats 15] [--sizes 128 256 512 1024] [--device cuda]

Both implementations solve the same problems: ``N`` random atoms in ``2N`` dimensions (so the Gram
matrix is well conditioned), the signal is the mean of the atoms (as for gradient matching), and
``k = N / 2`` atoms are selected. The two are timed back to back on the same inputs, alternating which
goes first; the table reports median times over the repeats, the median ratio of back-to-back times
(below 1 means ``omp_gram`` is faster), and the Jaccard index of the two supports. Each implementation
uses its default threading. On a shared machine, run it when the machine is otherwise idle.

``omp_gram`` runs on ``--device`` (scikit-learn always on the CPU), timed between two device
synchronisations. The ``ops / pick`` column counts, at the dispatcher, the operators that launch a
kernel in the greedy loop: the difference between runs with ``k`` and ``k / 2`` picks, divided by
``k / 2``. On a CUDA device the loop is captured once as a CUDA graph and replayed, so the count is
what one replay launches from the graph, not from the host.
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
from torch.utils._python_dispatch import TorchDispatchMode

from lightning_sbp.functional.omp import _omp_gram, omp_gram

# Operators that only make views or read metadata: no kernel runs.
_VIEWS = {"aten.slice", "aten.select", "aten.view", "aten.unsqueeze", "aten.squeeze", "aten.t", "aten.transpose"}
_VIEWS |= {"aten.numpy_T", "aten.diagonal", "aten.unbind", "aten.expand", "aten.alias", "aten.detach"}


class KernelCounter(TorchDispatchMode):
    """Counts the operators that reach the dispatcher and launch a kernel."""

    def __init__(self) -> None:
        super().__init__()
        self.kernels = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        self.kernels += str(func.overloadpacket) not in _VIEWS
        return func(*args, **(kwargs or {}))


def ops_per_pick(gram: torch.Tensor, target: torch.Tensor, k: int) -> float:
    """Kernels per pick of the greedy loop (run eagerly, as a CUDA graph captures it)."""
    counts = []
    for picks in (k // 2, k):
        with torch.inference_mode(), KernelCounter() as counter:
            _omp_gram(gram, target, picks, False)
        counts.append(counter.kernels)
    return (counts[1] - counts[0]) / (k - k // 2)


def _median_ms(times: list[float]) -> float:
    return float(np.median(times)) * 1e3


def _problem(n: int, dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    atoms = torch.randn(2 * n, n, generator=generator, dtype=torch.float64) / (2 * n) ** 0.5
    gram = atoms.T @ atoms
    return gram.to(dtype), gram.mean(dim=1).to(dtype)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn: Callable[[], object], device: torch.device | None = None) -> float:
    _synchronize(device or torch.device("cpu"))
    start = time.perf_counter()
    fn()
    _synchronize(device or torch.device("cpu"))
    return time.perf_counter() - start


def run(sizes: list[int], dtypes: list[torch.dtype], repeats: int, device: torch.device) -> str:
    rows = [
        "| dtype | N | k | t_ours (ms) | t_sklearn (ms) | ours / sklearn | support Jaccard | ops / pick |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for dtype in dtypes:
        for n in sizes:
            k = n // 2
            gram_cpu, target_cpu = _problem(n, dtype, seed=n)
            gram_np, target_np = gram_cpu.numpy(), target_cpu.numpy()
            gram, target = gram_cpu.to(device), target_cpu.to(device)

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
                        t_ours.append(_time(ours, device))
                    else:
                        t_ours.append(_time(ours, device))
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
                f"| {_median_ms(t_sklearn):.1f} | {ratio:.2f} | {jaccard:.3f} | {ops_per_pick(gram, target, k):.1f} |"
            )
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 256, 512, 1024])
    parser.add_argument("--dtypes", nargs="+", default=["float64", "float32"], choices=["float64", "float32"])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--device", default="cpu", help="device of omp_gram: cpu, cuda, cuda:1, ...")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda needs a CUDA device, and torch sees none")
    load = ", ".join(f"{value:.2f}" for value in os.getloadavg())
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {load}, omp_gram on {where}")
    print(run(args.sizes, [getattr(torch, name) for name in args.dtypes], args.repeats, device))


if __name__ == "__main__":
    main()
