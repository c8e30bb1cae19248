from __future__ import annotations

import math
import random
import sys
from pathlib import Path
from typing import Any

import pytest

from lightning_sbp.compare import Grid
from lightning_sbp.compare.multiplicity import adjust, benjamini_hochberg, holm
from lightning_sbp.compare.report import select_best_lr, summarise
from lightning_sbp.compare.significance import (
    adjust_families,
    compare_rows,
    paired_interval,
    reading,
    significance_tables,
    t_quantile,
    t_test_p,
)
from lightning_sbp.compare.time_to_accuracy import first_reach, markdown_table, time_to_target

stats = pytest.importorskip("scipy.stats")

# Means and differences of a few dozen float64 values of order 1, summed in any order: a few dozen roundings.
ARITHMETIC = 64 * sys.float_info.epsilon

ROOT = Path(__file__).resolve().parents[1]


def _grid(methods: list[str], **values: Any) -> Grid:
    """A grid of ``methods`` at keep 0.5 on the digits base (only its settings are read, nothing trains)."""
    base = str(ROOT / "examples" / "configs" / "digits_full.yaml")
    return Grid.from_values({"base": base, "output": "unused", "methods": methods, "keep": [0.5], **values})


@pytest.mark.parametrize("df", [1, 2, 3, 4, 5, 8, 13, 30])
@pytest.mark.parametrize("probability", [0.6, 0.9, 0.975, 0.995, 0.025])
def test_t_quantile_matches_scipy(df: int, probability: float) -> None:
    expected = stats.t.ppf(probability, df)
    # Bisection stops at a bracket of 1e-13 relative; the distribution function it inverts sums about df terms
    # of a few roundings each, an error in probability that moves the quantile by that over the density.
    bracket = 1e-13 * max(1.0, abs(expected))
    inversion = 8 * (df + 4) * sys.float_info.epsilon / stats.t.pdf(expected, df)
    assert t_quantile(probability, df) == pytest.approx(expected, rel=0, abs=bracket + inversion)


def test_t_quantile_refuses_bad_input() -> None:
    with pytest.raises(ValueError, match="probability"):
        t_quantile(1.0, 3)
    with pytest.raises(ValueError, match="df"):
        t_quantile(0.9, 0)


@pytest.mark.parametrize(
    "differences", [[0.012, -0.004, 0.021], [1.5, 2.25], [-0.3, -0.1, -0.2, -0.45, 0.05], [3.0, 3.0, 3.1, 2.9]]
)
def test_paired_interval_matches_scipy(differences: list[float]) -> None:
    interval = paired_interval(differences)
    low, high = stats.t.interval(0.95, len(differences) - 1, loc=stats.tmean(differences), scale=stats.sem(differences))
    # A mean and a standard error of at most 5 values (a few dozen roundings of their magnitudes) and a quantile
    # good to 1e-12 relative: 1e-11 of the interval's scale covers both.
    scale = max(abs(value) for value in differences)
    assert interval.mean == pytest.approx(sum(differences) / len(differences), rel=0, abs=ARITHMETIC * scale)
    assert interval.low == pytest.approx(low, rel=0, abs=1e-11 * scale)
    assert interval.high == pytest.approx(high, rel=0, abs=1e-11 * scale)
    # excluding 0 is the same decision as a paired t-test at the 5% level
    assert interval.significant == (stats.ttest_1samp(differences, 0.0).pvalue < 0.05)
    assert interval.p_value == pytest.approx(stats.ttest_1samp(differences, 0.0).pvalue, rel=1e-9)


@pytest.mark.parametrize("count", [2, 3, 5, 12])
def test_t_test_p_matches_scipy(count: int) -> None:
    generator = random.Random(count)
    for _ in range(20):
        values = [generator.gauss(0.3, 1.0) for _ in range(count)]
        mean = sum(values) / count
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / (count - 1))
        assert t_test_p(mean, std, count) == pytest.approx(stats.ttest_1samp(values, 0.0).pvalue, rel=1e-9, abs=1e-12)
    # no spread at all: nothing to test for a zero mean, and no estimate of the noise for another one
    assert t_test_p(0.0, 0.0, 3) == 1.0 and math.isnan(t_test_p(0.5, 0.0, 3))


def test_holm_rejects_what_the_step_down_procedure_rejects() -> None:
    generator = random.Random(0)
    for _ in range(200):
        p_values = [generator.random() ** 3 for _ in range(generator.randint(1, 12))]
        adjusted = holm(p_values)
        for alpha in (0.01, 0.05, 0.2):
            # Holm's procedure itself: walk up the sorted p-values, rejecting while p_(i) <= alpha / (m - i).
            rejected = set()
            for rank, index in enumerate(sorted(range(len(p_values)), key=lambda i: p_values[i])):
                if p_values[index] > alpha / (len(p_values) - rank):
                    break
                rejected.add(index)
            assert {i for i, value in enumerate(adjusted) if value <= alpha} == rejected
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06], rel=ARITHMETIC)


def test_benjamini_hochberg_matches_scipy() -> None:
    generator = random.Random(1)
    for _ in range(100):
        p_values = [generator.random() ** 2 for _ in range(generator.randint(1, 15))]
        expected = stats.false_discovery_control(p_values, method="bh")
        assert benjamini_hochberg(p_values) == pytest.approx(list(expected), rel=1e-12)
    assert adjust([0.2, 0.01], "none") == [0.2, 0.01]
    with pytest.raises(ValueError, match="correction"):
        adjust([0.5], "bonferroni")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        adjust([1.5], "holm")


def test_one_pair_has_no_interval() -> None:
    interval = paired_interval([0.5])
    assert math.isnan(interval.low) and not interval.significant
    with pytest.raises(ValueError):
        paired_interval([])


def _record(method: str, seed: int, final: float, seconds: float, keep: float | None = 0.5) -> dict[str, Any]:
    curve = [final - 0.1, final - 0.02, final]
    return {
        "run_id": f"{method}-{seed}",
        "status": "finished",
        "label_noise": 0.0,
        "method": method,
        "keep": None if method == "full" else keep,
        "lr": None,
        "seed": seed,
        "final": final,
        "best": max(curve),
        "train_seconds": seconds,
        "fit_seconds": seconds + 1.0,
        "examples_backpropagated": 1000 if method == "full" else 500,
        "optimizer_steps": 30,
        "validation": [
            {"value": value, "train_seconds": seconds * (i + 1) / 3, "examples_backpropagated": 100 * (i + 1)}
            for i, value in enumerate(curve)
        ],
    }


@pytest.fixture()
def synthetic() -> tuple[Grid, list[Any], list[dict[str, Any]]]:
    """Five seeds: topk is clearly worse than random, omp differs from it by noise only; random is faster than full."""
    seeds = range(5)
    noise = [0.004, -0.006, 0.002, -0.001, 0.005]
    records = []
    for seed in seeds:
        base = 0.90 + 0.01 * seed  # seeds differ a lot; pairing removes it
        records.append(_record("full", seed, base + 0.01, 10.0 + seed))
        records.append(_record("random", seed, base, 6.0 + seed + noise[seed]))
        records.append(_record("topk", seed, base - 0.08 + noise[seed] / 4, 6.1 + seed))
        records.append(_record("omp", seed, base + noise[seed], 9.0 + seed + noise[seed] * 100))
    grid = _grid(["full", "random", "topk", "omp"], label_noise=[0.0], seeds=list(seeds))
    rows = select_best_lr(summarise(records, grid), grid.mode)
    return grid, rows, records


def test_significance_column_separates_a_real_difference_from_noise(synthetic: Any) -> None:
    grid, rows, records = synthetic
    differences = compare_rows(rows, records)
    found = {(d.method, d.reference, d.quantity): d.interval for d in differences}
    assert found[("topk", "random", "final")].significant
    assert found[("topk", "random", "final")].mean == pytest.approx(
        -0.08 + sum([0.004, -0.006, 0.002, -0.001, 0.005]) / 20, rel=0, abs=ARITHMETIC
    )
    assert not found[("omp", "random", "final")].significant
    assert found[("random", "full", "train_seconds")].significant  # about 4 s faster on every seed
    assert ("full", "random", "final") not in found and ("random", "random", "final") not in found

    tables = significance_tables(rows, differences, grid.metric)
    topk_line = next(line for line in tables.splitlines() if line.startswith("| 0 | topk |"))
    omp_line = next(line for line in tables.splitlines() if line.startswith("| 0 | omp |"))
    assert "**yes, lower** (p < 0.001)" in topk_line
    assert omp_line.split(" | ")[4].startswith("no (p = ")

    text = " ".join(reading(rows, differences, grid.metric, grid.mode))
    assert text.startswith("Beyond seed noise: adjusted p-value below 0.05, with Holm's step-down adjustment")
    assert "topk at keep 0.5 (-0.0798) reached a worse final val/acc than random beyond seed noise" in text
    assert "omp at keep 0.5 does not differ from random" in text
    assert "random at keep 0.5 (" in text and "took less train time than full beyond seed noise" in text


def test_reading_says_when_one_seed_cannot_tell(synthetic: Any) -> None:
    grid, _, records = synthetic
    single = [record for record in records if record["seed"] == 0]
    rows = select_best_lr(summarise(single, grid), grid.mode)
    sentences = reading(rows, compare_rows(rows, single), grid.metric, grid.mode)
    assert sentences == [
        "With one seed per setting there is no estimate of seed noise: run two or more seeds to tell which "
        "differences are real."
    ]


def _curve(method: str, seed: int, values: list[float], every: float) -> dict[str, Any]:
    """A run validated every ``every`` seconds of training, with the given values."""
    record = _record(method, seed, values[-1], every * len(values))
    record["validation"] = [
        {"value": value, "train_seconds": every * (i + 1), "examples_backpropagated": 100 * (i + 1)}
        for i, value in enumerate(values)
    ]
    return record


def test_time_to_accuracy_is_paired_by_seed_and_counts_censored_runs() -> None:
    # full reaches 0.9 at its third validation on every seed; steady at its second or third, on runs that
    # validate faster; lucky reaches it once, early, and never on the other two seeds.
    records = []
    for seed, pace in enumerate([3.0, 4.0, 5.0]):
        records.append(_curve("full", seed, [0.5, 0.8, 0.91, 0.92], pace))
        steady = [0.6, 0.91, 0.92, 0.92] if seed == 1 else [0.6, 0.85, 0.91, 0.92]
        records.append(_curve("steady", seed, steady, pace / (2 + seed)))
        records.append(_curve("lucky", seed, [0.95, 0.95, 0.95] if seed == 0 else [0.6, 0.7, 0.8], pace / 3))
    grid = _grid(["full", "random", "topk"], seeds=[0, 1, 2])
    for record in records:  # the grid knows registered names only: steady and lucky run as random and topk
        record["method"] = {"steady": "random", "lucky": "topk"}.get(record["method"], record["method"])
    rows = select_best_lr(summarise(records, grid), grid.mode)
    results = {r.method: r for r in time_to_target(rows, records, grid.mode, tolerance=0.02)}
    assert results["full"].target == pytest.approx(0.92 - 0.02, rel=ARITHMETIC)

    steady = results["random"]
    full_times = [3.0 * 3, 4.0 * 3, 5.0 * 3]
    steady_times = [3.0 / 2 * 3, 4.0 / 3 * 2, 5.0 / 4 * 3]
    logs = [math.log(f / t) for f, t in zip(full_times, steady_times, strict=True)]
    assert [t.seconds for t in steady.times] == pytest.approx(steady_times, rel=ARITHMETIC)
    assert steady.bound is None and steady.reached == 3
    assert steady.speedup == pytest.approx(math.exp(sum(logs) / 3), rel=ARITHMETIC)
    low, high = stats.t.interval(0.95, 2, loc=sum(logs) / 3, scale=stats.sem(logs))
    assert steady.log_interval is not None
    # As in test_paired_interval_matches_scipy: three values and a quantile good to 1e-12 relative.
    scale = max(abs(value) for value in logs)
    assert (steady.log_interval.low, steady.log_interval.high) == pytest.approx((low, high), rel=0, abs=1e-11 * scale)
    # The only tested row, so its adjusted p-value is its own: as in test_t_test_p_matches_scipy.
    assert steady.adjusted_p == pytest.approx(stats.ttest_1samp(logs, 0.0).pvalue, rel=1e-9)

    lucky = results["topk"]
    assert lucky.reached == 1 and [t.censored for t in lucky.times] == [False, True, True]
    # censored runs count at their whole training time: the speedup is an upper bound and is not tested
    lucky_times = [1.0, 4.0 / 3 * 3, 5.0 / 3 * 3]
    assert lucky.bound == "upper" and lucky.adjusted_p is None
    assert lucky.speedup == pytest.approx(
        math.exp(sum(math.log(f / t) for f, t in zip(full_times, lucky_times, strict=True)) / 3), rel=ARITHMETIC
    )
    # averaging the runs that reached the target alone would credit lucky with its luckiest seed
    assert lucky.speedup < (sum(full_times) / 3) / 1.0

    table = markdown_table(list(results.values()), grid.metric)
    lucky_line = next(line for line in table.splitlines() if "| topk |" in line)
    assert "| 1/3 | 1.0, >4.0, >5.0 |" in lucky_line
    assert f"| ≤ {lucky.speedup:.2f}× | not tested: 2 of 3 never reached it |" in lucky_line
    steady_line = next(line for line in table.splitlines() if "| random |" in line)
    assert f"| {steady.speedup:.2f}× [{math.exp(low):.2f}, {math.exp(high):.2f}] |" in steady_line


def test_a_seed_that_full_never_finishes_makes_the_speedup_a_lower_bound() -> None:
    records = [
        _curve("full", 0, [0.5, 0.91], 2.0),
        _curve("full", 1, [0.5, 0.85], 2.0),  # full's mean final is 0.88; this seed ends below it
        _curve("random", 0, [0.9, 0.9], 1.0),
        _curve("random", 1, [0.9, 0.9], 1.0),
    ]
    grid = _grid(["full", "random"], seeds=[0, 1])
    rows = select_best_lr(summarise(records, grid), grid.mode)
    results = {r.method: r for r in time_to_target(rows, records, grid.mode, tolerance=0.0)}
    assert results["random"].bound == "lower" and results["random"].adjusted_p is None
    assert "not tested: full did not reach it on every seed" in markdown_table(list(results.values()), "val/acc")


def test_first_reach_respects_the_mode() -> None:
    curve = [{"value": 0.5}, {"value": None}, {"value": 0.2}, {"value": 0.8}]
    assert first_reach(curve, 0.7, "max") is curve[3]
    assert first_reach(curve, 0.3, "min") is curve[2]
    assert first_reach(curve, 0.9, "max") is None


NULL_METHODS = ["full", "random", "loss", "topk", "omp", "random:seed_offset=1"]


def null_records(generator: random.Random, noises: list[float], seeds: int) -> list[dict[str, Any]]:
    """Runs of methods that differ by seed noise alone: any difference found beyond noise is false."""
    records = []
    for noise in noises:
        for seed in range(seeds):
            level, pace = generator.gauss(0.9, 0.02), generator.gauss(10.0, 1.0)  # shared by the seed's runs
            for method in NULL_METHODS:
                record = _record(method, seed, level + generator.gauss(0, 0.005), pace + generator.gauss(0, 0.3))
                record.update(run_id=f"{method}-{noise}-{seed}", label_noise=noise)
                records.append(record)
    return records


def test_each_table_keeps_its_family_wise_error_rate_under_pure_noise() -> None:
    noises, seeds, simulations = [0.0, 0.3], 3, 1000
    grid = _grid(NULL_METHODS, label_noise=noises, seeds=list(range(seeds)))
    generator = random.Random(2024)
    any_false = {"holm": 0, "bh": 0, "none": 0}
    for _ in range(simulations):
        records = null_records(generator, noises, seeds)
        rows = select_best_lr(summarise(records, grid), grid.mode)
        finals = [d for d in compare_rows(rows, records, "none") if d.quantity == "final"]
        assert len(finals) == 18  # per noise level: 4 methods against random, 5 against full
        for correction in any_false:
            any_false[correction] += any(d.beyond_noise for d in adjust_families(finals, correction))
    rates = {correction: count / simulations for correction, count in any_false.items()}
    # Holm keeps P(any false finding) <= 0.05 under any dependence; under the complete null the false-discovery
    # rate BH controls is that same probability. Allowance: three binomial standard errors of a rate of 0.05.
    allowance = 0.05 + 3 * math.sqrt(0.05 * 0.95 / simulations)
    assert rates["holm"] <= allowance and rates["bh"] <= allowance
    # Unadjusted, 18 tests at 5% find something most of the time: the check above can fail.
    assert rates["none"] > 0.3


@pytest.mark.parametrize("shift", [0.0, 0.05])
def test_the_aa_row_is_labelled_and_read_as_a_calibration(shift: float) -> None:
    wobble = [0.003, -0.002, 0.001, -0.004]
    records = []
    for seed in range(4):
        base = 0.9 + 0.01 * seed
        records.append(_record("full", seed, base + 0.01, 10.0 + seed))
        records.append(_record("random", seed, base, 6.0 + seed))
        records.append(_record("random:seed_offset=1", seed, base + wobble[seed] + shift, 6.0 + seed + wobble[seed]))
    grid = _grid(["full", "random", "random:seed_offset=1"], seeds=[0, 1, 2, 3])
    rows = select_best_lr(summarise(records, grid), grid.mode)
    differences = compare_rows(rows, records)
    assert "| 0 | random:seed_offset=1 (A/A) | 0.5 |" in significance_tables(rows, differences, grid.metric)
    sentences = reading(rows, differences, grid.metric, grid.mode)
    # the A/A row is read as a check of the test, not as a finding about selection
    assert not any("random:seed_offset=1 at keep 0.5 does not differ" in sentence for sentence in sentences)
    if shift == 0.0:
        assert sentences[-1].startswith("Calibration: the A/A row (random:seed_offset=1: random selection with")
    else:  # a shift no chance explains: the sentence says the test cannot be trusted here
        assert sentences[-1].startswith("Calibration failed: the A/A row (random:seed_offset=1) differs from random")
        assert "final at label noise 0" in sentences[-1]


def test_a_difference_equal_on_every_seed_is_not_a_finding() -> None:
    # A metric at its resolution: one validation image (1/359) on each of three seeds.
    image = 1 / 359
    records = []
    for seed in range(3):
        records.append(_record("full", seed, 0.9972, 10.0 + seed))
        records.append(_record("random", seed, 0.9972 - image, 4.0 + seed))
        records.append(_record("omp", seed, 0.9972, 6.0 + 1.1 * seed))
    grid = _grid(["full", "random", "omp"], seeds=[0, 1, 2])
    rows = select_best_lr(summarise(records, grid), grid.mode)
    differences = compare_rows(rows, records)
    found = {(d.method, d.reference, d.quantity): d for d in differences}
    constant = found[("omp", "random", "final")]
    assert constant.interval.mean == pytest.approx(image, rel=0, abs=ARITHMETIC) and constant.adjusted_p is None
    assert not constant.beyond_noise
    level = found[("omp", "full", "final")]  # equal on every seed: tested, and no difference
    assert level.adjusted_p == 1.0 and not level.beyond_noise
    table = significance_tables(rows, differences, grid.metric)
    assert "| 0 | omp | 0.5 | +0.0028 [+0.0028, +0.0028] | no spread over seeds |" in table
    text = " ".join(reading(rows, differences, grid.metric, grid.mode))
    assert "omp at keep 0.5 (+0.0028) differed from random by the same amount on every seed" in text
    assert "better final val/acc than random" not in text
    # constant non-zero differences stay out of the families: of the three comparisons per table, one is tested in
    # final val/acc (omp level with full on every seed, a tested zero), two in train time (random is 6 s faster on
    # every seed)
    assert "over each table (1 and 2 comparisons)" in text
