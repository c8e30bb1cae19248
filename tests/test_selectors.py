from __future__ import annotations

import math
import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from dispatch import DispatchRecorder
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
    assert freq[-5:].mean() > 4 * freq[:5].mean()
    assert freq[-1] > 0.5 and freq[0] < 0.02
    # Frequencies grow with the loss, up to sampling noise.
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
    torch.testing.assert_close(fused.weights, eager.weights, rtol=1e-4, atol=1e-5)


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
    assert torch.allclose(gradient_norm_bound(features, grads, bias=True), bounds)
    freq = inclusion_frequencies(GradNormSelector(), scores, 1, 1000)
    assert torch.allclose(freq, bounds / bounds.sum(), atol=0.035)

    # k > 1: inclusion probabilities k * b / sum(b) while these stay below one ...
    many = torch.rand(24, generator=generator(4)) + 0.5
    freq = inclusion_frequencies(GradNormSelector(), scores_with_bounds(many), 4, 600)
    assert torch.allclose(freq, 4 * many / many.sum(), atol=0.05)
    # ... and examples whose share would exceed one are always kept.
    capped = torch.tensor([50.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    freq = inclusion_frequencies(GradNormSelector(), scores_with_bounds(capped), 3, 400, seed=1)
    assert freq[0] == 1.0
    assert torch.allclose(freq[1:], torch.full((8,), 2 / 8), atol=0.06)


def test_gradnorm_weights_are_horvitz_thompson_and_unbiased() -> None:
    bounds = torch.tensor([1.0, 2.0, 4.0, 8.0, 1.0, 2.0, 4.0, 8.0])
    n, k = 8, 3
    inclusion = k * bounds / bounds.sum()  # all below one
    selection = GradNormSelector().select(scores_with_bounds(bounds), k, generator(1))
    assert torch.allclose(selection.weights, k / (n * inclusion[selection.indices]))

    # The weighted subset mean of any per-example quantity is an unbiased estimate of the batch mean.
    values = torch.randn(n, generator=generator(2))
    estimates, sums = [], []
    g = generator(3)
    for _ in range(1000):
        selection = GradNormSelector().select(scores_with_bounds(bounds), k, g)
        estimates.append(float((selection.weights * values[selection.indices]).mean()))
        sums.append(float(selection.weights.sum()))
    assert sum(estimates) / len(estimates) == pytest.approx(float(values.mean()), abs=0.03)
    assert sum(sums) / len(sums) == pytest.approx(k, rel=0.02)

    # Equal bounds: a uniform subset with unit weights.
    selection = GradNormSelector().select(scores_with_bounds(torch.full((10,), 2.0)), 4, generator(1))
    assert torch.allclose(selection.weights, torch.ones(4))


def test_gradnorm_normalized_weights_sum_to_k() -> None:
    bounds = torch.tensor([1.0, 2.0, 4.0, 8.0, 1.0, 2.0, 4.0, 8.0])
    selection = GradNormSelector(normalize=True).select(scores_with_bounds(bounds), 3, generator(1))
    assert float(selection.weights.sum()) == pytest.approx(3.0)
    inverse = 1 / bounds[selection.indices]
    assert torch.allclose(selection.weights, 3 * inverse / inverse.sum())


def test_gradnorm_zero_bounds() -> None:
    # All zero: uniform selection, unit weights.
    scores = scores_with_bounds(torch.zeros(6))
    freq = inclusion_frequencies(GradNormSelector(), scores, 2, 400)
    assert torch.allclose(freq, torch.full((6,), 2 / 6), atol=0.05)
    assert torch.allclose(GradNormSelector().select(scores, 2, generator()).weights, torch.ones(2))

    # Zero-bound examples have a zero gradient: never drawn while enough others have a positive bound ...
    bounds = torch.tensor([0.0, 1.0, 0.0, 3.0, 2.0, 0.0])
    freq = inclusion_frequencies(GradNormSelector(), scores_with_bounds(bounds), 3, 50)
    assert torch.equal(freq[bounds == 0], torch.zeros(3))
    # ... and drawn uniformly to fill the subset otherwise.
    freq = inclusion_frequencies(GradNormSelector(), scores_with_bounds(bounds), 4, 400)
    assert torch.equal(freq[bounds > 0], torch.ones(3))
    assert torch.allclose(freq[bounds == 0], torch.full((3,), 1 / 3), atol=0.05)


def test_gradnorm_smoothing_mixes_in_the_uniform_distribution() -> None:
    bounds = torch.tensor([0.0, 1.0, 3.0, 0.0])
    freq = inclusion_frequencies(GradNormSelector(smoothing=0.5), scores_with_bounds(bounds), 1, 1000)
    expected = 0.5 * bounds / bounds.sum() + 0.5 / 4
    assert torch.allclose(freq, expected, atol=0.035)
    # smoothing = 1 is uniform random selection with unit weights.
    selection = GradNormSelector(smoothing=1.0).select(scores_with_bounds(bounds), 2, generator())
    assert torch.allclose(selection.weights, torch.ones(2))


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
            if normalize:
                assert float(selection.weights.sum()) == pytest.approx(k)
            else:
                # The design's largest weight: k / (N * pi) with pi = 1 for every drawable example.
                assert torch.allclose(selection.weights[~zero], torch.full((k - int(zero.sum()),), k / n))
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
    assert float(normalized.weights.sum()) == pytest.approx(k, rel=1e-5)

    uniform = OMPSelector(weights="uniform").select(scores, k, generator())
    assert torch.equal(uniform.indices, normalized.indices)
    assert torch.equal(uniform.weights, torch.ones(k))

    gram = gradient_gram(*scores.require_last_layer("test"), bias=True)
    indices, coef = omp_gram(gram, gram.mean(dim=1), k)
    raw = OMPSelector(weights="raw", nonnegative=False).select(scores, k, generator())
    assert torch.equal(raw.indices, indices)
    assert torch.allclose(raw.weights, k * coef)
    assert torch.allclose(normalized.weights, k * coef / coef.sum())

    nonneg = OMPSelector(weights="normalized", nonnegative=True, dtype="float64").select(scores, k, generator())
    assert_valid(nonneg, 32, k)
    assert (nonneg.weights >= 0).all()
    assert float(nonneg.weights.sum()) == pytest.approx(k, rel=1e-5)


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
        rms_random = math.sqrt(sum(e * e for e in random_errors) / len(random_errors))
        assert rms_random == pytest.approx(float(random_subset_gradient_error(gram, k)), rel=0.15)

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


def test_registry_knows_the_built_in_selectors() -> None:
    assert set(NAMES) <= set(available_selectors())
    assert isinstance(get_selector("random"), RandomSelector)
    assert isinstance(get_selector("topk"), TopKSelector)
    assert isinstance(get_selector("loss", history=16), LossSelector)
    assert isinstance(get_selector("gradnorm"), GradNormSelector)
    assert isinstance(get_selector("omp", weights="uniform"), OMPSelector)
    assert GradNormSelector.needs_last_layer and GradNormSelector.weighted
    assert OMPSelector.needs_last_layer and OMPSelector.weighted
    assert not LossSelector.needs_last_layer and not LossSelector.weighted


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


def test_repr_shows_the_arguments() -> None:
    assert repr(LossSelector(history=8, beta=2.0)) == "LossSelector(history=8, beta=2.0)"
    assert repr(OMPSelector(weights="raw", ridge=0.5, fused=True)) == (
        "OMPSelector(weights='raw', nonnegative=False, dtype='float32', ridge=0.5, max_weight=8.0, sketch_dim=None, "
        "fused=True, cuda_graph=True)"
    )
