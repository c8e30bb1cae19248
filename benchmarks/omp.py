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

A second table sets the eager loop against the compiled one (``omp_gram(..., fused=True)``), timed back
to back on the same device: its ``fused`` column counts the kernels one compiled pick launches, read
from the code that ``torch.compile`` generates for the device (C++ on the CPU, Triton on a GPU), and
``compile (s)`` is the time of the first call of each shape. ``--no-fused`` skips it.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import tqdm
from sklearn.linear_model import orthogonal_mp_gram
from torch._inductor.utils import run_and_get_code

from lightning_sbp.functional.omp import _omp_gram, omp_gram

# The test suite's counters: operators at the dispatcher, kernels in generated code.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from dispatch import DispatchRecorder, generated_launches


def ops_per_pick(gram: torch.Tensor, target: torch.Tensor, k: int) -> float:
    """Kernels per pick of the eager greedy loop (as a CUDA graph captures it), counted at the dispatcher."""
    counts = []
    for picks in (k // 2, k):
        with torch.inference_mode(), DispatchRecorder() as recorder:
            _omp_gram(gram, target, picks, False, False)
        counts.append(recorder.kernels())
    return (counts[1] - counts[0]) / (k - k // 2)


def fused_launches_per_pick(gram: torch.Tensor, target: torch.Tensor, k: int) -> tuple[int, float]:
    """Kernels one compiled pick launches, read from the code ``torch.compile`` generates, and the compile time."""
    started = time.perf_counter()
    _, codes = run_and_get_code(omp_gram, gram, target, k, False, True)
    return generated_launches(codes[-1]), time.perf_counter() - started


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


def run_fused(sizes: list[int], dtypes: list[torch.dtype], repeats: int, device: torch.device) -> str:
    """The eager greedy loop against the compiled one (``fused=True``), timed back to back on ``device``."""
    rows = [
        "| dtype | N | k | t_eager (ms) | t_fused (ms) | fused / eager | kernels / pick, eager | fused | compile (s) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for dtype in dtypes:
        for n in tqdm.tqdm(sizes, desc=f"fused {str(dtype).removeprefix('torch.')}", disable=None, leave=False):
            k = n // 2
            gram, target = (tensor.to(device) for tensor in _problem(n, dtype, seed=n))
            launches, compile_seconds = fused_launches_per_pick(gram, target, k)
            t_eager, t_fused = [], []
            for repeat in range(repeats):
                pair = [(t_eager, False), (t_fused, True)]
                for times, fused in pair[:: 1 if repeat % 2 else -1]:
                    times.append(_time(functools.partial(omp_gram, gram, target, k, fused=fused), device))
            ratio = float(np.median(np.array(t_fused) / np.array(t_eager)))
            rows.append(
                f"| {str(dtype).removeprefix('torch.')} | {n} | {k} | {_median_ms(t_eager):.1f} "
                f"| {_median_ms(t_fused):.1f} | {ratio:.2f} | {ops_per_pick(gram, target, k):.1f} | {launches} "
                f"| {compile_seconds:.0f} |"
            )
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 256, 512, 1024], help="N; k is N / 2")
    parser.add_argument("--dtypes", nargs="+", default=["float64", "float32"], choices=["float64", "float32"])
    parser.add_argument("--repeats", type=int, default=15, help="timed runs of each implementation per row")
    parser.add_argument("--device", default="cpu", help="device of omp_gram: cpu, cuda, cuda:1, ...")
    parser.add_argument("--no-fused", action="store_true", help="skip the table of the compiled loop (fused=True)")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda needs a CUDA device, and torch sees none")
    load = ", ".join(f"{value:.2f}" for value in os.getloadavg())
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {load}, omp_gram on {where}")
    dtypes = [getattr(torch, name) for name in args.dtypes]
    print(run(args.sizes, dtypes, args.repeats, device))
    if not args.no_fused:
        print(f"\n{run_fused(args.sizes, dtypes, args.repeats, device)}")


if __name__ == "__main__":
    main()
