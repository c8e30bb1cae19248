from __future__ import annotations

import math
import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from dispatch import DispatchRecorder
from tolerances import assert_within, frequency_tolerance, gamma, mean_tolerance, solve_tolerance
from torch import Tensor, nn

from lightning_sbp.functional.grad_error import random_subset_gradient_error, subset_gradient_error
from lightning_sbp.functional.gram import gradient_gram, gradient_norm_bound, logit_gradients
from lightning_sbp.functional.omp import omp_gram
from lightning_sbp.selectors.base import Scores, Selection, Selector
from lightning_sbp.selectors.gradnorm import GradNormSelector
from lightning_sbp.selectors.loss import LossSelector
from lightning_sbp.selectors.omp import OMPSelector
from lightning_sbp.selectors.random import RandomSelector
from lightning_sbp.selectors.registry import available_selectors, get_selector, register_selector
from lightning_sbp.selectors.topk import TopKSelector

NAMES = ["random", "topk", "loss", "gradnorm", "omp"]


def generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_scores(n: int, classes: int = 4, dim: int = 6, seed: int = 0, bias: bool = True) -> Scores:
    g = generator(seed)
    features = torch.randn(n, dim, generator=g)
    logits = torch.randn(n, classes, generator=g) * 2
    targets = torch.randint(classes, (n,), generator=g)
    losses = F.cross_entropy(logits, targets, reduction="none")
    return Scores(losses, logits, logit_gradients(logits, targets), features, bias)


def with_bad_rows(scores: Scores, rows: Tensor) -> Scores:
    """The same scores where ``rows`` went NaN or inf, as they do after an overflow in the forward pass."""
    assert scores.logit_grads is not None and scores.features is not None
    losses, grads, features = scores.losses.clone(), scores.logit_grads.clone(), scores.features.clone()
    losses[rows] = torch.tensor([math.nan, math.inf, -math.inf])[torch.arange(rows.numel()) % 3]
    grads[rows] = math.nan
    features[rows[::2]] = math.inf
    return Scores(losses, scores.logits, grads, features, scores.bias)


def assert_valid(selection: Selection, n: int, k: int) -> None:
    assert selection.indices.dtype == torch.long
    assert selection.indices.shape == (k,)
    assert selection.weights.shape == (k,)
    assert selection.indices.unique().numel() == k
    assert int(selection.indices.min()) >= 0 and int(selection.indices.max()) < n
    assert torch.isfinite(selection.weights).all()


# --- every selector --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize(("n", "k"), [(1, 1), (7, 1), (7, 3), (16, 8), (16, 16), (33, 32), (64, 5)])
def test_every_selector_gives_k_distinct_indices_in_range(name: str, n: int, k: int) -> None:
    selector = get_selector(name)
    for seed in range(2):
        selection = selector.select(random_scores(n, seed=seed), k, generator(seed))
        assert_valid(selection, n, k)
        if isinstance(selector, OMPSelector):  # raw least-squares weights by default, within the bound
            assert torch.isfinite(selection.weights).all()
            assert float(selection.weights.abs().max()) <= selector.max_weight
        if not selector.weighted:
            assert torch.equal(selection.weights, torch.ones(k))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("k", [1, 4, 9, 12])
def test_some_non_finite_losses_still_give_k_distinct_indices_finite_ones_first(name: str, k: int) -> None:
    n = 12
    bad = torch.tensor([0, 3, 4, 10])
    scores = with_bad_rows(random_scores(n, seed=1), bad)
    selection = get_selector(name).select(scores, k, generator(1))
    assert_valid(selection, n, k)
    picked_bad = torch.isin(selection.indices, bad).sum()
    if name != "random":
        # Non-finite rows are the lowest priority of every informed selector.
        assert int(picked_bad) == max(0, k - (n - bad.numel()))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("k", [1, 5, 8])
def test_all_non_finite_losses_still_give_k_distinct_indices(name: str, k: int) -> None:
    n = 8
    scores = with_bad_rows(random_scores(n, seed=2), torch.arange(n))
    selection = get_selector(name).select(scores, k, generator(2))
    assert_valid(selection, n, k)


@pytest.mark.parametrize("name", NAMES)
def test_selection_is_a_pure_function_of_the_generator(name: str) -> None:
    scores = random_scores(40, seed=3)
    first = get_selector(name).select(scores, 10, generator(7))
    second = get_selector(name).select(scores, 10, generator(7))
    assert torch.equal(first.indices, second.indices)
    assert torch.equal(first.weights, second.weights)


# --- topk and loss ---------------------------------------------------------------------------------


def test_topk_takes_the_largest_losses() -> None:
    losses = torch.tensor([0.3, 5.0, 0.1, math.nan, 2.0, 4.0, 0.2])
    selection = TopKSelector().select(Scores(losses), 3, generator())
    assert sorted(selection.indices.tolist()) == [1, 4, 5]


def test_loss_selector_keeps_high_losses_more_often_than_low_ones() -> None:
    n, k, draws = 20, 5, 2000
    losses = torch.linspace(0.1, 3.0, n)
    counts = torch.zeros(n)
    selector = LossSelector(history=0)
    g = generator(11)
    for _ in range(draws):
        counts[selector.select(Scores(losses), k, g).indices] += 1
    freq = counts / draws
    # Frequencies over 2000 draws have standard errors of at most 0.011 (0.016 for a difference of two); these
    # draws give 0.62 against 0.004, 0.75 and 0: every margin is many standard errors wide.
    assert freq[-5:].mean() > 4 * freq[:5].mean()
    assert freq[-1] > 0.5 and freq[0] < 0.02
    # Frequencies grow with the loss, up to sampling noise: three standard errors of a difference.
    assert torch.all(freq[1:] - freq[:-1] > -0.05)


def test_loss_selector_ranks_against_the_history() -> None:
    # Ranked within the batch, the lowest losses are almost never kept; after a history of tiny
    # losses every example of the batch sits near the top, and selection is close to uniform.
    history = LossSelector(history=256, beta=3.0)
    g = generator(5)
    for _ in range(10):
        history.select(Scores(torch.rand(32, generator=g) * 0.01), 4, g)
    assert history.state_dict()["fill"] == 256
    batch = Scores(torch.linspace(1.0, 2.0, 16))
    with_history, batch_only = torch.zeros(16), torch.zeros(16)
    for seed in range(300):
        probe = LossSelector(history=256, beta=3.0)
        probe.load_state_dict(history.state_dict())
        with_history[probe.select(batch, 4, generator(seed)).indices] += 1
        batch_only[LossSelector(history=0, beta=3.0).select(batch, 4, generator(seed)).indices] += 1
    assert with_history.min() > 0.4 * with_history.max()
    assert batch_only[:3].sum() < 0.1 * batch_only[-3:].sum()


@pytest.mark.parametrize(("n", "k"), [(20, 5), (30, 10), (8, 8)])
def test_loss_selector_default_beta_is_n_over_k_minus_one(n: int, k: int) -> None:
    scores = Scores(torch.rand(n, generator=generator(n)))
    for seed in range(5):
        default = LossSelector(history=0).select(scores, k, generator(seed))
        explicit = LossSelector(history=0, beta=n / k - 1).select(scores, k, generator(seed))
        assert torch.equal(default.indices, explicit.indices)


def test_loss_history_state_dict_round_trip_reproduces_the_draws() -> None:
    original = LossSelector(history=50)
    g = generator(3)
    for step in range(6):
        original.select(Scores(torch.rand(16, generator=g) * (step + 1)), 4, g)
    state = original.state_dict()
    assert state["losses"].device.type == "cpu"
    assert state["fill"] == 50 and state["losses"].shape == (50,)

    restored = LossSelector(history=50)
    restored.load_state_dict(state)
    for step in range(4):
        batch = Scores(torch.rand(16, generator=generator(100 + step)) * 4)
        a = original.select(batch, 5, generator(step))
        b = restored.select(batch, 5, generator(step))
        assert torch.equal(a.indices, b.indices)
    assert torch.equal(original.state_dict()["losses"], restored.state_dict()["losses"])

    # A shorter history keeps the most recent losses.
    short = LossSelector(history=10)
    short.load_state_dict(state)
    assert torch.equal(short.state_dict()["losses"], state["losses"][-10:])
    empty = LossSelector(history=0)
    empty.load_state_dict(state)
    assert empty.state_dict()["fill"] == 0


def test_loss_history_keeps_non_finite_losses_out() -> None:
    selector = LossSelector(history=8)
    selector.select(Scores(torch.tensor([1.0, math.nan, 2.0, math.inf])), 2, generator())
    state = selector.state_dict()
    assert state["losses"].tolist() == [1.0, 2.0]


# --- gradnorm --------------------------------------------------------------------------------------


def test_omp_fused_selects_what_the_eager_loop_selects() -> None:
    scores = random_scores(40, seed=5)
    eager = OMPSelector().select(scores, 12, generator())
    selector = OMPSelector(fused=True)
    with pytest.warns(UserWarning, match="fused=True. on the CPU"):
        fused = selector.select(scores, 12, generator())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        selector.select(scores, 12, generator())  # once per selector
    assert torch.equal(fused.indices, eager.indices)
    # The same float32 fit summed in another order: weights k c within two forward errors of the solve.
    gram = gradient_gram(*scores.require_last_layer("test"), bias=True)
    support = eager.indices[eager.weights != 0]
    tolerance = 2 * solve_tolerance(gram[support][:, support], eager.weights[eager.weights != 0], torch.float32)
    assert_within(fused.weights, eager.weights, tolerance, "fused weights")


def scores_with_bounds(bounds: Tensor, classes: int = 3) -> Scores:
    """Scores whose gradient-norm bound is exactly ``bounds`` (zero features, bias on)."""
    n = bounds.shape[0]
    grads = torch.zeros(n, classes)
    grads[:, 0] = bounds
    return Scores(torch.rand(n, generator=generator(9)) + 0.1, None, grads, torch.zeros(n, 5), True)


def inclusion_frequencies(selector: Selector, scores: Scores, k: int, draws: int, seed: int = 0) -> Tensor:
    counts = torch.zeros(scores.size)
    g = generator(seed)
    for _ in range(draws):
        selection = selector.select(scores, k, g)
        assert selection.indices.unique().numel() == k
        counts[selection.indices] += 1
    return counts / draws


def test_gradnorm_samples_in_proportion_to_the_norm_bound() -> None:
    bounds = torch.tensor([1.0, 2.0, 3.0, 4.0, 0.5, 5.5])
    scores = scores_with_bounds(bounds)
    features, grads = scores.require_last_layer("test")
    # sqrt(b² (0 + 1)): a few float32 roundings of b.
    assert_within(gradient_norm_bound(features, grads, bias=True), bounds, gamma(4, torch.float32) * bounds)
    # Frequencies against inclusion probabilities, within SIGMAS binomial standard errors of each.
    probability = bounds / bounds.sum()
    freq = inclusion_frequencies(GradNormSelector(), scores, 1, 1000)
    assert_within(freq, probability, frequency_tolerance(probability, 1000), "k = 1")

    # k > 1: inclusion probabilities k * b / sum(b) while these stay below one ...
    many = torch.rand(24, generator=generator(4)) + 0.5
    freq = inclusion_frequencies(GradNormSelector(), scores_with_bounds(many), 4, 600)
    probability = 4 * many / many.sum()
    assert_within(freq, probability, frequency_tolerance(probability, 600), "k = 4")
    # ... and examples whose share would exceed one are always kept.
    capped = torch.tensor([50.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    freq = inclusion_frequencies(GradNormSelector(), scores_with_bounds(capped), 3, 400, seed=1)
    assert freq[0] == 1.0
    probability = torch.full((8,), 2 / 8)
    assert_within(freq[1:], probability, frequency_tolerance(probability, 400), "capped")


def test_gradnorm_weights_are_horvitz_thompson_and_unbiased() -> None:
    bounds = torch.tensor([1.0, 2.0, 4.0, 8.0, 1.0, 2.0, 4.0, 8.0])
    n, k = 8, 3
    inclusion = k * bounds / bounds.sum()  # all below one
    selection = GradNormSelector().select(scores_with_bounds(bounds), k, generator(1))
    expected = k / (n * inclusion[selection.indices])
    # Probabilities from a float32 sum over n bounds, then a product and a division.
    assert_within(selection.weights, expected, gamma(n + 4, torch.float32) * expected, "Horvitz-Thompson")

    # The weighted subset mean of any per-example quantity is an unbiased estimate of the batch mean.
    values = torch.randn(n, generator=generator(2))
    estimates, sums = [], []
    g = generator(3)
    for _ in range(1000):
        selection = GradNormSelector().select(scores_with_bounds(bounds), k, g)
        estimates.append(float((selection.weights * values[selection.indices]).mean()))
        sums.append(float(selection.weights.sum()))
    # Means over 1000 draws, within SIGMAS standard errors estimated from the draws.
    estimates_tensor, sums_tensor = torch.tensor(estimates), torch.tensor(sums)
    assert abs(float(estimates_tensor.mean() - values.mean())) <= mean_tolerance(estimates_tensor)
    assert abs(float(sums_tensor.mean()) - k) <= mean_tolerance(sums_tensor)

    # Equal bounds: a uniform subset with unit weights, k / (n · k/n) to a few float32 roundings.
    selection = GradNormSelector().select(scores_with_bounds(torch.full((10,), 2.0)), 4, generator(1))
    assert_within(selection.weights, torch.ones(4), gamma(10 + 4, torch.float32))


def test_gradnorm_normalized_weights_sum_to_k() -> None:
    bounds = torch.tensor([1.0, 2.0, 4.0, 8.0, 1.0, 2.0, 4.0, 8.0])
    selection = GradNormSelector(normalize=True).select(scores_with_bounds(bounds), 3, generator(1))
    # Weights 3 (1/π_i) / Σ (1/π_j) from float32 sums over n = 8 bounds and k = 3 weights: γ_{8 + 3 + 4}.
    relative = gamma(8 + 3 + 4, torch.float32)
    assert abs(float(selection.weights.sum()) - 3.0) <= 3.0 * relative
    inverse = 1 / bounds[selection.indices]
    expected = 3 * inverse / inverse.sum()
    assert_within(selection.weights, expected, relative * expected, "Hájek weights")


def test_gradnorm_zero_bounds() -> None:
    # All zero: uniform selection, unit weights.
    scores = scores_with_bounds(torch.zeros(6))
    freq = inclusion_frequencies(GradNormSelector(), scores, 2, 400)
    uniform = torch.full((6,), 2 / 6)
    assert_within(freq, uniform, frequency_tolerance(uniform, 400), "all zero")
    assert torch.equal(GradNormSelector().select(scores, 2, generator()).weights, torch.ones(2))

    # Zero-bound examples have a zero gradient: never drawn while enough others have a positive bound ...
    bounds = torch.tensor([0.0, 1.0, 0.0, 3.0, 2.0, 0.0])
    freq = inclusion_frequencies(GradNormSelector(), scores_with_bounds(bounds), 3, 50)
    assert torch.equal(freq[bounds == 0], torch.zeros(3))
    # ... and drawn uniformly to fill the subset otherwise.
    freq = inclusion_frequencies(GradNormSelector(), scores_with_bounds(bounds), 4, 400)
    assert torch.equal(freq[bounds > 0], torch.ones(3))
    third = torch.full((3,), 1 / 3)
    assert_within(freq[bounds == 0], third, frequency_tolerance(third, 400), "zero bounds fill the subset")


def test_gradnorm_smoothing_mixes_in_the_uniform_distribution() -> None:
    bounds = torch.tensor([0.0, 1.0, 3.0, 0.0])
    freq = inclusion_frequencies(GradNormSelector(smoothing=0.5), scores_with_bounds(bounds), 1, 1000)
    expected = 0.5 * bounds / bounds.sum() + 0.5 / 4
    assert_within(freq, expected, frequency_tolerance(expected, 1000), "smoothed")
    # smoothing = 1 is uniform random selection with unit weights, k / (n · k/n) to a few float32 roundings.
    selection = GradNormSelector(smoothing=1.0).select(scores_with_bounds(bounds), 2, generator())
    assert_within(selection.weights, torch.ones(2), gamma(4 + 4, torch.float32))


def test_gradnorm_gives_a_pick_of_zero_probability_no_weight(monkeypatch: pytest.MonkeyPatch) -> None:
    # Four examples share the budget k = 4 (probability one each), four have a zero bound. The largest
    # float32 start below one makes the points u + s round up to the next integer, so the systematic draw
    # skips a sure example and its last point falls past the end, onto an example of probability zero.
    bounds = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0])
    n, k = 8, 4
    below_one = torch.nextafter(torch.tensor(1.0), torch.tensor(0.0)).item()
    real_rand = torch.rand

    def start_below_one(*size: int, **kwargs: object) -> Tensor:
        return torch.full_like(real_rand(*size, **kwargs), below_one)

    monkeypatch.setattr(torch, "rand", start_below_one)
    for normalize in (False, True):
        hits = 0
        for seed in range(20):
            selection = GradNormSelector(normalize=normalize).select(scores_with_bounds(bounds), k, generator(seed))
            assert selection.indices.unique().numel() == k
            zero = bounds[selection.indices] == 0
            hits += int(zero.any())
            assert torch.isfinite(selection.weights).all()
            assert torch.equal(selection.weights[zero], torch.zeros(int(zero.sum())))
            relative = gamma(n + k + 4, torch.float32)  # float32 sums over the n bounds and the k weights
            if normalize:
                assert abs(float(selection.weights.sum()) - k) <= k * relative
            else:
                # The design's largest weight: k / (N * pi) with pi = 1 for every drawable example.
                largest = torch.full((k - int(zero.sum()),), k / n)
                assert_within(selection.weights[~zero], largest, relative * largest)
        assert hits > 0  # the rounding case did occur


def test_gradnorm_selects_without_host_syncs() -> None:
    bounds = torch.rand(64, generator=generator(5)) * torch.tensor([0.0, 1.0]).repeat(32)
    for selector in (GradNormSelector(), GradNormSelector(smoothing=0.3), GradNormSelector(normalize=True)):
        with DispatchRecorder() as recorder:
            selector.select(scores_with_bounds(bounds), 16, generator(1))
        assert recorder.host_syncs() == {}, selector


# --- omp -------------------------------------------------------------------------------------------


def test_omp_weights_options() -> None:
    scores = random_scores(32, seed=4)
    k = 8
    normalized = OMPSelector(weights="normalized").select(scores, k, generator())
    # k c / Σc in float32: the sum of k weights and the division, γ_{2k + 2} relative to k.
    assert abs(float(normalized.weights.sum()) - k) <= k * gamma(2 * k + 2, torch.float32)

    uniform = OMPSelector(weights="uniform").select(scores, k, generator())
    assert torch.equal(uniform.indices, normalized.indices)
    assert torch.equal(uniform.weights, torch.ones(k))

    gram = gradient_gram(*scores.require_last_layer("test"), bias=True)
    indices, coef = omp_gram(gram, gram.mean(dim=1), k)
    raw = OMPSelector(weights="raw", nonnegative=False).select(scores, k, generator())
    assert torch.equal(raw.indices, indices)
    # The selector's fit against this one: two float32 forward errors of the solve, scaled by k, and for the
    # normalised weights their relative error again through Σc (which does not cancel here: all c > 0 or not,
    # the sum is near 1).
    tolerance = 2 * k * solve_tolerance(gram[indices][:, indices], coef, torch.float32)
    assert_within(raw.weights, k * coef, tolerance, "raw")
    assert_within(normalized.weights, k * coef / coef.sum(), 2 * tolerance / float(coef.sum()), "normalized")

    nonneg = OMPSelector(weights="normalized", nonnegative=True, dtype="float64").select(scores, k, generator())
    assert_valid(nonneg, 32, k)
    assert (nonneg.weights >= 0).all()
    # Fitted in float64, returned in float32 like the losses they weigh: the float32 bound.
    assert abs(float(nonneg.weights.sum()) - k) <= k * gamma(2 * k + 2, nonneg.weights.dtype)


def test_omp_normalized_falls_back_to_uniform_when_coefficients_do_not_sum_to_a_positive_number() -> None:
    # All-zero gradients: every coefficient is 0.
    n = 6
    scores = Scores(torch.zeros(n), None, torch.zeros(n, 3), torch.randn(n, 4), True)
    selection = OMPSelector(weights="normalized").select(scores, 3, generator())
    assert_valid(selection, n, 3)
    assert torch.equal(selection.weights, torch.ones(3))


def test_omp_bias_free_layer_uses_the_gram_without_the_constant() -> None:
    scores = random_scores(20, seed=6, bias=False)
    gram = gradient_gram(*scores.require_last_layer("test"), bias=False)
    indices, _ = omp_gram(gram, gram.mean(dim=1), 5)
    assert torch.equal(OMPSelector().select(scores, 5, generator()).indices, indices)


def trained_batch(n: int = 64, classes: int = 4, dim: int = 8, steps: int = 40) -> Scores:
    """Last-layer scores of a batch under an MLP trained for a few SGD steps on Gaussian clusters."""
    g = generator(21)
    centers = torch.randn(classes, dim, generator=g) * 1.5

    def sample(m: int) -> tuple[Tensor, Tensor]:
        y = torch.randint(classes, (m,), generator=g)
        return centers[y] + torch.randn(m, dim, generator=g), y

    with torch.random.fork_rng():
        torch.manual_seed(0)
        body = nn.Sequential(nn.Linear(dim, 32), nn.ReLU())
        head = nn.Linear(32, classes)
    optimizer = torch.optim.SGD([*body.parameters(), *head.parameters()], lr=0.1)
    for _ in range(steps):
        x, y = sample(64)
        optimizer.zero_grad()
        F.cross_entropy(head(body(x)), y).backward()
        optimizer.step()
    with torch.no_grad():
        x, y = sample(n)
        features = body(x)
        logits = head(features)
        losses = F.cross_entropy(logits, y, reduction="none")
    assert losses.mean() < math.log(classes)  # it did learn something
    return Scores(losses, logits, logit_gradients(logits, y), features, True)


def error_of(gram: Tensor, selection: Selection) -> float:
    return float(subset_gradient_error(gram, selection.indices, selection.weights))


def test_omp_matches_the_batch_gradient_better_than_random_subsets() -> None:
    scores = trained_batch()
    gram = gradient_gram(*scores.require_last_layer("test"), bias=True)
    n = scores.size
    for k in (8, 16, 32):
        g = generator(k)
        random_errors = [
            float(subset_gradient_error(gram, torch.randperm(n, generator=g)[:k], torch.ones(k))) for _ in range(100)
        ]
        mean_random = sum(random_errors) / len(random_errors)
        # The mean squared error of 100 random subsets against the closed form's square, within SIGMAS standard
        # errors estimated from the draws (about 6% of it).
        squared = torch.tensor(random_errors).square()
        assert abs(float(squared.mean()) - float(random_subset_gradient_error(gram, k)) ** 2) <= mean_tolerance(squared)

        # Selection quality on this batch, with wide margins (measured: raw weights 0.04 to 0.24 of the random mean
        # error, normalised 0.42 to 0.95, gradnorm 0.45 to 0.75, three or more standard errors of its 20 draws
        # below 1; the random mean itself carries a 5% sampling error).
        # The least-squares weights themselves match the batch gradient far better than random ...
        raw = error_of(gram, OMPSelector(weights="raw", nonnegative=False).select(scores, k, generator()))
        assert raw < 0.5 * mean_random, (k, raw, mean_random)
        # ... and so do the weights rescaled to sum to k, once the subset is not tiny (at k = N/8 they
        # are only on a par with random here: the rescaling undoes part of the fit).
        if k >= 16:
            normalized = error_of(gram, OMPSelector(weights="normalized").select(scores, k, generator()))
            assert normalized < mean_random, (k, normalized, mean_random)

        # Unbiased importance sampling beats random on average too.
        gradnorm = [error_of(gram, GradNormSelector().select(scores, k, generator(seed))) for seed in range(20)]
        assert all(math.isfinite(e) for e in gradnorm)
        assert sum(gradnorm) / len(gradnorm) < mean_random, (k, gradnorm, mean_random)


# --- registry and arguments ------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_a_selector_reads_the_last_layer_only_when_it_says_so(name: str) -> None:
    # The scoring pass captures the last layer only for selectors that declare needs_last_layer: the others
    # must select from the losses alone, and those that declare it must say what is missing.
    assert name in available_selectors()
    selector = get_selector(name)
    losses_only = Scores(random_scores(16, seed=8).losses)
    if selector.needs_last_layer:
        with pytest.raises(RuntimeError, match="needs the inputs of the final linear layer"):
            selector.select(losses_only, 4, generator())
    else:
        assert_valid(selector.select(losses_only, 4, generator()), 16, 4)


def test_get_selector_passes_its_arguments_to_the_selector() -> None:
    selector = get_selector("loss", history=16)
    selector.select(Scores(torch.rand(40, generator=generator(1))), 4, generator())
    assert selector.state_dict()["losses"].shape == (16,), "the history keeps the 16 most recent losses"
    raw, uniform = get_selector("omp"), get_selector("omp", weights="uniform")
    scores = random_scores(24, seed=9)
    assert torch.equal(uniform.select(scores, 6, generator()).weights, torch.ones(6))
    assert not torch.equal(raw.select(scores, 6, generator()).weights, torch.ones(6))


def test_unknown_selector_name_lists_the_registered_ones() -> None:
    with pytest.raises(ValueError, match="nope") as info:
        get_selector("nope")
    for name in NAMES:
        assert name in str(info.value)


@register_selector("test-first-example")
class FirstExampleSelector(Selector):
    def select(self, scores: Scores, k: int, generator: torch.Generator) -> Selection:
        return Selection.uniform(torch.arange(k, device=scores.losses.device))


def test_a_user_selector_is_retrievable_by_name() -> None:
    assert "test-first-example" in available_selectors()
    selector = get_selector("test-first-example")
    assert isinstance(selector, FirstExampleSelector)
    assert selector.select(Scores(torch.zeros(5)), 2, generator()).indices.tolist() == [0, 1]


@pytest.mark.parametrize(
    ("name", "kwargs", "match"),
    [
        ("loss", {"history": -1}, "history"),
        ("loss", {"history": 2.5}, "history"),
        ("loss", {"beta": -1.0}, "beta"),
        ("loss", {"beta": math.nan}, "beta"),
        ("gradnorm", {"smoothing": 1.5}, "smoothing"),
        ("gradnorm", {"smoothing": -0.1}, "smoothing"),
        ("gradnorm", {"normalize": 1}, "normalize"),
        ("omp", {"weights": "sum"}, "'normalized', 'uniform', 'raw'"),
        ("omp", {"dtype": "float16"}, "'float32', 'float64'"),
        ("omp", {"nonnegative": "yes"}, "nonnegative"),
        ("omp", {"fused": 1}, "fused must be True or False"),
        ("omp", {"sketch_dim": 0}, "sketch_dim must be None"),
        ("omp", {"ridge": -0.1}, "ridge"),
        ("omp", {"ridge": math.inf}, "ridge"),
        ("omp", {"max_weight": 0.5}, "max_weight"),
        ("omp", {"max_weight": math.nan}, "max_weight"),
    ],
)
def test_bad_constructor_arguments_raise_value_error(name: str, kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        get_selector(name, **kwargs)


def test_a_misspelled_selector_argument_names_the_closest_one() -> None:
    with pytest.raises(ValueError, match=re.escape("LossSelector has no argument 'histroy'; did you mean 'history'?")):
        get_selector("loss", histroy=8)
    with pytest.raises(ValueError, match=r"RandomSelector has no argument 'zzz'; its arguments: none"):
        get_selector("random", zzz=1)


@pytest.mark.parametrize(
    "selector",
    [
        RandomSelector(),
        TopKSelector(),
        LossSelector(history=8, beta=2.0),
        GradNormSelector(smoothing=0.25, normalize=True),
        OMPSelector(weights="normalized", nonnegative=True, dtype="float64", ridge=0.5, max_weight=4.0),
    ],
    ids=repr,
)
def test_the_repr_is_a_constructor_call_that_rebuilds_the_selector(selector: Selector) -> None:
    # A selector prints as the constructor call that rebuilds it: with every argument, so that a printed
    # configuration reproduces the same selections.
    classes = {cls.__name__: cls for cls in (RandomSelector, TopKSelector, LossSelector, GradNormSelector, OMPSelector)}
    rebuilt = eval(repr(selector), classes)
    assert repr(rebuilt) == repr(selector)
    scores = random_scores(30, seed=10)
    first, second = selector.select(scores, 8, generator(3)), rebuilt.select(scores, 8, generator(3))
    assert torch.equal(first.indices, second.indices)
    assert torch.equal(first.weights, second.weights)
