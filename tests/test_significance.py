from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

import pytest

from lightning_sbp.compare import Grid
from lightning_sbp.compare.report import select_best_lr, summarise
from lightning_sbp.compare.significance import compare_rows, paired_interval, reading, significance_tables, t_quantile
from lightning_sbp.compare.time_to_accuracy import first_reach, markdown_table, time_to_target

stats = pytest.importorskip("scipy.stats")

# Means and differences of a few dozen float64 values of order 1, summed in any order: a few dozen roundings.
ARITHMETIC = 64 * sys.float_info.epsilon

ROOT = Path(__file__).resolve().parents[1]


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
        records.append(_record("random", seed, base, 6.0 + seed))
        records.append(_record("topk", seed, base - 0.08 + noise[seed] / 4, 6.1 + seed))
        records.append(_record("omp", seed, base + noise[seed], 9.0 + seed + noise[seed] * 100))
    grid = Grid.from_values(
        {
            "base": str(ROOT / "examples" / "configs" / "digits_full.yaml"),
            "output": "unused",
            "methods": ["full", "random", "topk", "omp"],
            "keep": [0.5],
            "label_noise": [0.0],
            "seeds": list(seeds),
        }
    )
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
    assert found[("random", "full", "train_seconds")].significant  # 4 s faster on every seed
    assert ("full", "random", "final") not in found and ("random", "random", "final") not in found

    tables = significance_tables(rows, differences, grid.metric)
    topk_line = next(line for line in tables.splitlines() if line.startswith("| 0 | topk |"))
    omp_line = next(line for line in tables.splitlines() if line.startswith("| 0 | omp |"))
    assert "**yes, lower**" in topk_line
    assert omp_line.split(" | ")[4] == "no"

    text = " ".join(reading(rows, differences, grid.metric, grid.mode))
    assert "topk at keep 0.5 (-0.0798) reached a worse final val/acc than random beyond seed noise" in text
    assert "omp at keep 0.5 does not differ from random" in text
    assert "random at keep 0.5 (" in text and "trained faster than full beyond seed noise" in text


def test_reading_says_when_one_seed_cannot_tell(synthetic: Any) -> None:
    grid, _, records = synthetic
    single = [record for record in records if record["seed"] == 0]
    rows = select_best_lr(summarise(single, grid), grid.mode)
    sentences = reading(rows, compare_rows(rows, single), grid.metric, grid.mode)
    assert sentences == [
        "With one seed per setting there is no estimate of seed noise: run two or more seeds to tell which "
        "differences are real."
    ]


def test_time_to_target_counts_runs_that_never_reach_it(synthetic: Any) -> None:
    grid, rows, records = synthetic
    results = {r.method: r for r in time_to_target(rows, records, grid.mode, tolerance=0.01)}
    full_final = sum(0.91 + 0.01 * seed for seed in range(5)) / 5
    assert results["full"].target == pytest.approx(full_final - 0.01, rel=0, abs=ARITHMETIC)
    # topk ends 0.09 below full on every seed: never there
    assert results["topk"].reached == 0 and results["topk"].seconds is None
    # random ends 0.01 below full: each seed counts at its first validation that reaches the target
    hits = [first_reach(r["validation"], full_final - 0.01, "max") for r in records if r["method"] == "random"]
    reached = [hit for hit in hits if hit is not None]
    assert len(reached) > 0 and results["random"].reached == len(reached)
    seconds = sum(hit["train_seconds"] for hit in reached) / len(reached)
    assert results["random"].seconds == pytest.approx(seconds, rel=ARITHMETIC)
    speedup = results["full"].seconds / results["random"].seconds
    assert results["random"].speedup == pytest.approx(speedup, rel=ARITHMETIC)
    table = markdown_table(list(results.values()), grid.metric)
    assert "| 0 | topk | 0.5 |" in table and "| 0/5 | never | never | – |" in table


def test_first_reach_respects_the_mode() -> None:
    curve = [{"value": 0.5}, {"value": None}, {"value": 0.2}, {"value": 0.8}]
    assert first_reach(curve, 0.7, "max") is curve[3]
    assert first_reach(curve, 0.3, "min") is curve[2]
    assert first_reach(curve, 0.9, "max") is None
