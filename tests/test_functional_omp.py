import itertools
import math
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from dispatch import DispatchRecorder, generated_launches
from scipy.optimize import nnls
from sklearn.linear_model import orthogonal_mp_gram
from torch._dynamo.utils import counters
from torch._inductor.utils import run_and_get_code

import lightning_sbp.functional.omp as omp_module
from lightning_sbp.functional.omp import omp_gram


def _atoms(d: int, n: int, seed: int, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """Random atoms X [d, n] (full column rank when d > n) and a random signal y [d]."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(d, n, generator=generator, dtype=torch.float64)
    y = torch.randn(d, generator=generator, dtype=torch.float64)
    return x.to(dtype), y.to(dtype)


def _sklearn_path(gram: torch.Tensor, target: torch.Tensor, k: int) -> tuple[list[int], np.ndarray]:
    """scikit-learn's support in selection order, and its final coefficients [N]."""
    path = orthogonal_mp_gram(gram.numpy(), target.numpy(), n_nonzero_coefs=k, return_path=True)
    path = path.reshape(gram.shape[0], -1)
    order: list[int] = []
    for step in range(k):
        (new,) = set(np.flatnonzero(path[:, step]).tolist()) - set(order)
        order.append(new)
    return order, path[:, k - 1]


def _residual_norm(x: torch.Tensor, y: torch.Tensor, indices: torch.Tensor, coef: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(y - x[:, indices] @ coef))


@pytest.mark.parametrize(("d", "n", "k", "seed"), [(40, 20, 1, 0), (40, 20, 7, 1), (60, 30, 30, 2), (90, 64, 32, 3)])
def test_matches_sklearn(d: int, n: int, k: int, seed: int) -> None:
    x, y = _atoms(d, n, seed)
    gram, target = x.T @ x, x.T @ y
    indices, coef = omp_gram(gram, target, k)
    order, reference = _sklearn_path(gram, target, k)
    assert indices.tolist() == order
    assert indices.dtype == torch.long
    assert coef.dtype == torch.float64
    np.testing.assert_allclose(coef.numpy(), reference[order], rtol=1e-9, atol=1e-12)


def test_matches_sklearn_for_the_mean_gradient_target() -> None:
    x, _ = _atoms(80, 48, seed=4)
    gram = x.T @ x
    target = gram.mean(dim=1)
    indices, coef = omp_gram(gram, target, 24)
    order, reference = _sklearn_path(gram, target, 24)
    assert indices.tolist() == order
    np.testing.assert_allclose(coef.numpy(), reference[order], rtol=1e-9, atol=1e-12)


def test_coefficients_are_least_squares_on_the_support_and_residual_never_grows() -> None:
    x, y = _atoms(50, 25, seed=5)
    gram, target = x.T @ x, x.T @ y
    previous = float(torch.linalg.vector_norm(y))
    previous_indices: list[int] = []
    for k in range(1, 26):
        indices, coef = omp_gram(gram, target, k)
        assert indices.tolist()[:-1] == previous_indices  # the support grows one atom at a time
        expected = torch.linalg.lstsq(x[:, indices], y.unsqueeze(1)).solution.squeeze(1)
        torch.testing.assert_close(coef, expected, rtol=1e-8, atol=1e-10)
        residual = _residual_norm(x, y, indices, coef)
        assert residual <= previous + 1e-12
        previous, previous_indices = residual, indices.tolist()
    # With every atom selected, the fit is the least-squares fit on all of them.
    full = torch.linalg.lstsq(x, y.unsqueeze(1)).solution.squeeze(1)
    assert previous == pytest.approx(float(torch.linalg.vector_norm(y - x @ full)), rel=1e-9)


def test_duplicated_atoms_are_picked_at_most_once() -> None:
    x, _ = _atoms(60, 30, seed=6)
    x[:, 11] = x[:, 3]
    x[:, 20] = x[:, 3]
    x[:, 25] = x[:, 7]
    gram = x.T @ x
    target = gram.mean(dim=1)  # the signal is the mean atom, as for gradient matching
    indices, coef = omp_gram(gram, target, 20)
    chosen = set(indices.tolist())
    assert len(chosen) == 20
    assert len(chosen & {3, 11, 20}) <= 1
    assert len(chosen & {7, 25}) <= 1
    assert torch.isfinite(coef).all()


@pytest.mark.parametrize("nonnegative", [False, True])
def test_rank_deficient_gram_still_returns_k_distinct_indices(nonnegative: bool) -> None:
    rank = 5
    x, _ = _atoms(rank, 24, seed=7)  # every one of the 24 atoms must be placed
    x[:, 2] = 0.0
    x[:, 9] = x[:, 4]
    gram = x.T @ x
    target = gram.mean(dim=1)
    indices, coef = omp_gram(gram, target, 24, nonnegative=nonnegative)
    assert sorted(indices.tolist()) == list(range(24))
    assert torch.isfinite(coef).all()
    # The signal lies in the span of the first `rank` atoms picked; the others add no direction.
    assert torch.equal(coef[rank:], torch.zeros(24 - rank, dtype=torch.float64))
    signal = x.mean(dim=1)
    if nonnegative:
        assert (coef >= 0).all()
    else:
        expected = torch.linalg.solve(x[:, indices[:rank]], signal)
        torch.testing.assert_close(coef[:rank], expected, rtol=1e-8, atol=1e-10)
        assert _residual_norm(x, signal, indices, coef) < 1e-8 * float(torch.linalg.vector_norm(signal))


def test_nearly_dependent_atom_gets_no_coefficient() -> None:
    x, _ = _atoms(20, 6, seed=14)
    x[:, 5] = x[:, 0] + x[:, 1] + 1e-6 * x[:, 5]  # barely outside the span of atoms 0 and 1
    gram = x.T @ x
    indices, coef = omp_gram(gram, gram.mean(dim=1), 6)
    position = indices.tolist().index(5)
    if position > max(indices.tolist().index(0), indices.tolist().index(1)):
        assert float(coef[position]) == 0.0
    else:  # picked before one of its parents: then that parent adds no direction
        later = max(indices.tolist().index(0), indices.tolist().index(1))
        assert float(coef[later]) == 0.0
    assert float(coef.abs().max()) < 10.0


@pytest.mark.parametrize("nonnegative", [False, True])
def test_all_zero_gram_fills_with_lowest_indices(nonnegative: bool) -> None:
    gram = torch.zeros(10, 10)
    indices, coef = omp_gram(gram, torch.zeros(10), 6, nonnegative=nonnegative)
    assert indices.tolist() == [0, 1, 2, 3, 4, 5]
    assert torch.equal(coef, torch.zeros(6))


def test_exhausted_correlations_fill_with_lowest_unselected_indices() -> None:
    # Atoms 0, 1 and 2 are orthogonal unit vectors and the signal is atom 1: one pick explains it all.
    gram = torch.eye(5, dtype=torch.float64)
    target = torch.tensor([0.0, 1.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    indices, coef = omp_gram(gram, target, 4)
    assert indices.tolist() == [1, 0, 2, 3]
    torch.testing.assert_close(coef, torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=torch.float64))


@pytest.mark.parametrize("nonnegative", [False, True])
def test_non_finite_entries_still_give_k_distinct_indices(nonnegative: bool) -> None:
    x, _ = _atoms(30, 12, seed=8)
    gram = x.T @ x
    target = gram.mean(dim=1)
    gram[4, :] = torch.nan
    gram[:, 4] = torch.nan
    target[7] = torch.inf
    indices, _ = omp_gram(gram, target, 12, nonnegative=nonnegative)
    assert sorted(indices.tolist()) == list(range(12))


def test_float32_agrees_with_float64() -> None:
    x, y = _atoms(96, 48, seed=9)
    gram, target = x.T @ x, x.T @ y
    indices64, coef64 = omp_gram(gram, target, 24)
    indices32, coef32 = omp_gram(gram.float(), target.float(), 24)
    assert coef32.dtype == torch.float32
    assert indices32.tolist() == indices64.tolist()
    torch.testing.assert_close(coef32.double(), coef64, rtol=1e-4, atol=1e-5)


def test_half_precision_is_computed_in_float32() -> None:
    x, _ = _atoms(20, 10, seed=10)
    gram = (x.T @ x).half()
    _, coef = omp_gram(gram, gram.float().mean(dim=1).half(), 5)
    assert coef.dtype == torch.float32


def test_nonnegative_coefficients() -> None:
    # Strongly correlated atoms, so that the unconstrained fit has negative coefficients.
    generator = torch.Generator().manual_seed(0)
    common = torch.randn(40, 1, generator=generator, dtype=torch.float64)
    x = common + 0.5 * torch.randn(40, 30, generator=generator, dtype=torch.float64)
    y = torch.randn(40, generator=generator, dtype=torch.float64) + 2 * common[:, 0]
    indices, coef = omp_gram(x.T @ x, x.T @ y, 15, nonnegative=True)
    assert len(set(indices.tolist())) == 15
    assert (coef >= 0).all()
    assert (coef > 0).any()
    support = x[:, indices]
    unconstrained = torch.linalg.lstsq(support, y.unsqueeze(1)).solution.squeeze(1)
    assert (unconstrained < 0).any()  # the constraint is active in this problem
    # At least as good as clipping the unconstrained fit, and close to the exact non-negative fit.
    residual = _residual_norm(x, y, indices, coef)
    assert residual <= _residual_norm(x, y, indices, unconstrained.clamp(min=0)) + 1e-12
    _, nnls_residual = nnls(support.numpy(), y.numpy())
    assert nnls_residual - 1e-9 <= residual <= 1.01 * nnls_residual


def test_nonnegative_picks_positive_correlations_first() -> None:
    gram = torch.eye(4, dtype=torch.float64)
    target = torch.tensor([-5.0, 1.0, -3.0, 2.0], dtype=torch.float64)
    indices, coef = omp_gram(gram, target, 3, nonnegative=True)
    assert indices.tolist() == [3, 1, 0]  # then no positive correlation is left: lowest index
    torch.testing.assert_close(coef, torch.tensor([2.0, 1.0, 0.0], dtype=torch.float64))
    indices, coef = omp_gram(gram, target, 3)
    assert indices.tolist() == [0, 2, 3]


@pytest.mark.parametrize("seed", range(4))
def test_nonnegative_rounds_never_increase_the_residual(seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    generator = torch.Generator().manual_seed(seed)
    common = torch.randn(30, 1, generator=generator, dtype=torch.float64)
    x = common + 0.4 * torch.randn(30, 12, generator=generator, dtype=torch.float64)
    y = torch.randn(30, generator=generator, dtype=torch.float64) + 2 * common[:, 0]
    gram, target = x.T @ x, x.T @ y
    residuals = []
    for rounds in range(6):  # zero rounds: the clipped least-squares fit
        monkeypatch.setattr(omp_module, "_NONNEGATIVE_ROUNDS", rounds)
        indices, coef = omp_gram(gram, target, 12, nonnegative=True)
        assert (coef >= 0).all()
        residuals.append(_residual_norm(x, y, indices, coef))
    assert all(later <= earlier + 1e-12 for earlier, later in itertools.pairwise(residuals))
    assert residuals[-1] < residuals[0]


def test_nonnegative_keeps_an_already_nonnegative_fit() -> None:
    x, _ = _atoms(50, 20, seed=12)
    weights = torch.zeros(20, dtype=torch.float64)
    weights[[2, 5, 13]] = torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)
    y = x @ weights
    indices, coef = omp_gram(x.T @ x, x.T @ y, 3, nonnegative=True)
    assert sorted(indices.tolist()) == [2, 5, 13]
    torch.testing.assert_close(coef, weights[indices], rtol=1e-9, atol=1e-12)


def test_outputs_are_usable_in_autograd_and_inputs_untouched() -> None:
    x, _ = _atoms(30, 10, seed=13)
    gram = x.T @ x
    target = gram.mean(dim=1)
    gram_before, target_before = gram.clone(), target.clone()
    indices, coef = omp_gram(gram, target, 4)
    losses = torch.rand(10, dtype=torch.float64, requires_grad=True)
    (coef * losses[indices]).sum().backward()
    assert losses.grad is not None
    assert torch.equal(gram, gram_before)
    assert torch.equal(target, target_before)


def test_argument_validation() -> None:
    gram = torch.eye(5)
    target = torch.ones(5)
    for k in (0, 6, -1):
        with pytest.raises(ValueError, match="k must be"):
            omp_gram(gram, target, k)
    for bad in (2.0, True):
        with pytest.raises(ValueError, match="k must be"):
            omp_gram(gram, target, bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="square"):
        omp_gram(torch.ones(5, 4), target, 2)
    with pytest.raises(ValueError, match="target must have shape"):
        omp_gram(gram, torch.ones(4), 2)
    with pytest.raises(ValueError, match="floating point"):
        omp_gram(gram.long(), target, 2)


def _recorded(n: int, k: int, seed: int, nonnegative: bool = False) -> DispatchRecorder:
    x, _ = _atoms(n + 8, n, seed, torch.float32)
    gram = x.T @ x
    with DispatchRecorder() as recorder:
        omp_gram(gram, gram.mean(dim=1), k, nonnegative=nonnegative)
    return recorder


@pytest.mark.parametrize("nonnegative", [False, True])
def test_static_shapes_and_no_host_syncs(nonnegative: bool) -> None:
    # Two different problems of the same size run the same operators on tensors of the same shapes: the
    # sequence a CUDA graph captures. No operator reads device data on the host.
    first, second = _recorded(40, 12, 0, nonnegative), _recorded(40, 12, 1, nonnegative)
    assert first.calls == second.calls
    assert first.host_syncs() == {}


@pytest.mark.parametrize("nonnegative", [False, True])
def test_few_kernels_per_pick(nonnegative: bool) -> None:
    # The greedy loop's kernels per pick, from the difference of two runs that differ only in k.
    per_pick = (_recorded(96, 48, 0, nonnegative).kernels() - _recorded(96, 16, 0, nonnegative).kernels()) / 32
    assert per_pick <= 13.5


def _hard_problems(n: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """A well-conditioned problem, one with duplicated and all-zero atoms, and one with a NaN."""
    x, y = _atoms(n + 8, n, 3, torch.float32)
    yield x.T @ x, x.T @ y
    degenerate = x.clone()
    degenerate[:, 1::5] = degenerate[:, ::5][:, : degenerate[:, 1::5].shape[1]]
    degenerate[:, 2::7] = 0.0
    yield degenerate.T @ degenerate, degenerate.T @ y
    gram = x.T @ x
    gram[4, 4] = math.nan
    yield gram, gram.mean(dim=1)


@pytest.mark.parametrize("nonnegative", [False, True])
def test_fused_picks_match_the_eager_loop_in_three_kernels(nonnegative: bool) -> None:
    # One shape for every problem: compiled at the first, reused for the others. The compiled pick reads
    # and writes the same tensors as the eager loop, so the two agree on degenerate inputs too.
    problems = list(_hard_problems(40))
    (indices, coef), codes = run_and_get_code(omp_gram, *problems[0], 12, nonnegative, True)
    graphs = counters["stats"]["unique_graphs"]
    assert graphs >= 1
    for position, (gram, target) in enumerate(problems):
        if position:
            indices, coef = omp_gram(gram, target, 12, nonnegative=nonnegative, fused=True)
        expected_indices, expected_coef = omp_gram(gram, target, 12, nonnegative=nonnegative)
        assert torch.equal(indices, expected_indices)
        assert len(set(indices.tolist())) == 12
        finite = expected_coef.isfinite()
        torch.testing.assert_close(coef[finite], expected_coef[finite], rtol=1e-4, atol=1e-5)
    assert counters["stats"]["unique_graphs"] == graphs
    # The eager loop's dozen operators per pick (test_few_kernels_per_pick) become three kernels: the
    # scores with their argmax and the gather of the picked column, the product, and every update after it.
    assert len(codes) == 1
    assert generated_launches(codes[0]) <= 3


def test_replayed_runner_reuses_its_buffers_and_matches_eager() -> None:
    captures = []

    def eager_capture(run, device):  # what a CUDA graph does, run eagerly: once at capture, then per replay
        captures.append(device)
        run()
        return run

    runner = omp_module._ReplayedOMP(30, 9, torch.float64, False, False, torch.device("cpu"), capture=eager_capture)
    buffers = runner.gram.data_ptr(), runner.indices.data_ptr()
    for seed in range(3):
        x, y = _atoms(40, 30, seed)
        gram, target = x.T @ x, x.T @ y
        indices, coef = runner(gram, target)
        expected = omp_gram(gram, target, 9)
        assert torch.equal(indices, expected[0])
        torch.testing.assert_close(coef, expected[1], rtol=0, atol=0)
    assert captures == [torch.device("cpu")]
    assert (runner.gram.data_ptr(), runner.indices.data_ptr()) == buffers


def test_fused_falls_back_to_the_eager_loop_under_a_dispatch_mode() -> None:
    # torch.compile cannot run under a dispatch mode (FlopCounterMode, an operator recorder); the eager
    # loop runs instead, operator by operator, with the same picks.
    gram, target = next(_hard_problems(40))
    with DispatchRecorder() as recorder:
        indices, coef = omp_gram(gram, target, 12, fused=True)
    expected = omp_gram(gram, target, 12)
    assert torch.equal(indices, expected[0]) and torch.equal(coef, expected[1])
    assert sum(call.op == "aten.argmax" for call in recorder.calls) == 12


def test_replayed_runner_replays_the_fused_picks() -> None:
    # The CUDA-graph path with fused=True, captured (here: run) through the same runner: its compiled
    # picks write into the runner's static buffers like the eager ones.
    runner = omp_module._ReplayedOMP(
        40, 12, torch.float32, False, True, torch.device("cpu"), capture=lambda run, device: run() or run
    )
    for gram, target in _hard_problems(40):
        indices, coef = runner(gram, target)
        expected = omp_gram(gram, target, 12)
        assert torch.equal(indices, expected[0])
        finite = expected[1].isfinite()
        torch.testing.assert_close(coef[finite], expected[1][finite], rtol=1e-4, atol=1e-5)


def test_cpu_inputs_never_reach_the_graph_path(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object) -> None:
        raise AssertionError("no CUDA graph on the CPU")

    monkeypatch.setattr(omp_module._GRAPHS, "get", refuse)
    x, y = _atoms(20, 10, 0)
    omp_gram(x.T @ x, x.T @ y, 5)
