from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from lightning_sbp.profile import RoundTimes, analyse, format_report, json_rows, main, verdict

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "examples" / "configs" / "digits_full.yaml"
# The cost model fits a line through exact step times and divides float64 times: a few roundings amplified by
# a condition number of order 100, far below 1e-12 relative.
ARITHMETIC = 1e-12


def known_costs(
    overhead: float, per_example: float, score_per_example: float, batch: int, ks: dict[float, int], jitter: float = 0.0
) -> RoundTimes:
    """Step times of a model whose costs are exactly known: a fixed overhead plus a cost per example trained on."""

    def step(examples: int) -> float:
        return overhead + per_example * examples

    score = score_per_example * batch
    return RoundTimes(
        full=step(batch) * (1 + jitter),
        score=score,
        subset={keep: step(k) for keep, k in ks.items()},
        selective={keep: score + step(k) for keep, k in ks.items()},
    )


def test_cost_model_recovers_known_costs() -> None:
    batch, ks = 128, {0.1: 12, 0.25: 32, 0.5: 64}
    # 2 ms overhead, 0.3 ms per example trained on, scoring 0.1 ms per example (a third of a training step's)
    rounds = [known_costs(2e-3, 3e-4, 1e-4, batch, ks, jitter) for jitter in (0.0, 0.0, 0.0)]
    profile = analyse(rounds, batch, ks)
    full = 2e-3 + 3e-4 * batch
    assert profile.full_step_ms == pytest.approx(1e3 * full, rel=ARITHMETIC)
    assert profile.overhead_ms == pytest.approx(2.0, rel=ARITHMETIC)
    assert profile.overhead_share == pytest.approx(2e-3 / full, rel=ARITHMETIC)
    # score + a + c k = a + c N  <=>  keep = 1 - score / (c N) = 1 - 1/3
    assert profile.break_even_keep == pytest.approx(2 / 3, rel=ARITHMETIC)
    assert profile.ceiling_speedup == pytest.approx(full / (1e-4 * batch + 2e-3), rel=ARITHMETIC)
    for result in profile.keeps:
        expected = full / (1e-4 * batch + 2e-3 + 3e-4 * result.k)
        assert result.predicted_speedup == pytest.approx(expected, rel=ARITHMETIC)
        assert result.measured_speedup == pytest.approx(expected, rel=ARITHMETIC)
        assert result.agreement == pytest.approx(1.0, rel=ARITHMETIC)
    assert verdict(profile).startswith("Selective Backprop can save time on this model: at keep 0.1")


def test_ratios_are_paired_within_rounds() -> None:
    batch, ks = 64, {0.5: 32}
    # The machine is twice as slow in the second round; a round's ratios are unchanged by it.
    fast = known_costs(1e-3, 1e-4, 5e-5, batch, ks)
    slow = RoundTimes(
        full=2 * fast.full,
        score=2 * fast.score,
        subset={0.5: 2 * fast.subset[0.5]},
        selective={0.5: 2 * fast.selective[0.5]},
    )
    profile = analyse([fast, slow, fast], batch, ks)
    assert profile.keeps[0].measured_speedup == pytest.approx(fast.full / fast.selective[0.5], rel=ARITHMETIC)


def test_the_scoring_ratio_and_the_ceiling_are_paired_within_rounds() -> None:
    # The load changes between the fits of a round: each round's own ratio counts, not a ratio of medians
    # taken from different rounds (here 20 / 10 = 2.0, though no round had a ratio of 2).
    ks = {0.5: 32}
    rounds = [
        RoundTimes(full=full, score=score, subset={0.5: full / 2}, selective={0.5: score + full / 2})
        for full, score in ((10.0, 4.0), (30.0, 10.0), (20.0, 12.0))
    ]
    profile = analyse(rounds, 64, ks)
    assert profile.full_over_score == pytest.approx(2.5)
    overhead = profile.overhead_ms / 1e3
    expected = sorted(r.full / (r.score + overhead) for r in rounds)[1]
    assert profile.ceiling_speedup == pytest.approx(expected)


def test_verdict_when_the_scoring_pass_eats_the_saving() -> None:
    batch, ks = 64, {0.25: 16, 0.5: 32}
    # overhead dominates and scoring costs as much as a training step per example: no keep pays off
    rounds = [known_costs(8e-3, 1e-5, 1e-5, batch, ks)]
    profile = analyse(rounds, batch, ks)
    assert profile.break_even_keep is None
    assert all(result.predicted_speedup < 1 for result in profile.keeps)
    text = format_report(profile)
    assert "break-even keep: none" in text
    assert text.rstrip().splitlines()[-1].startswith("Selective Backprop cannot pay off on this model")


def test_verdict_when_the_measured_steps_are_slower_than_the_model_predicts() -> None:
    # The cost model breaks even (scoring and subset steps are cheap) but the measured selective steps took
    # longer than full ones, as on a busy machine: the verdict says so, it does not call that paying off.
    ks = {0.25: 16, 0.5: 32}
    rounds = [RoundTimes(full=10.0, score=3.0, subset={0.25: 2.5, 0.5: 5.0}, selective={0.25: 12.5, 0.5: 14.0})]
    profile = analyse(rounds, 64, ks)
    assert profile.break_even_keep is not None and max(r.measured_speedup for r in profile.keeps) < 1
    last = format_report(profile).rstrip().splitlines()[-1]
    assert last.startswith("Selective Backprop did not save time in these fits: at best 0.80×")


def test_json_rows_hold_one_object_per_keep() -> None:
    batch, ks = 64, {0.25: 16, 0.5: 32}
    rows = json_rows(analyse([known_costs(1e-3, 1e-4, 3e-5, batch, ks)], batch, ks))
    assert [row["keep"] for row in rows] == [0.25, 0.5]
    assert all({"keep", "predicted_speedup", "measured_speedup", "k", "verdict"} <= set(row) for row in rows)


def test_bad_arguments_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stop:
        main(["--config", str(DIGITS), "--keep", "1.5"])
    assert stop.value.code == 2
    assert "keep fractions must be in (0, 1)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--config", "no-such.yaml"])
    assert "no such file" in capsys.readouterr().err


def test_json_output_of_a_tiny_real_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    output = tmp_path / "profile.json"
    status = main(
        [
            "--config",
            str(DIGITS),
            "--keep",
            "0.5",
            "--steps",
            "2",
            "--rounds",
            "1",
            "--warmup",
            "1",
            "--threads",
            "1",
            "--no-progress",
            "--json",
            str(output),
            "--data.init_args.batch_size=16",
        ]
    )
    assert status == 0
    printed = capsys.readouterr().out
    rows = json.loads(output.read_text())
    assert len(rows) == 1
    row = rows[0]
    assert row["keep"] == 0.5 and row["k"] == 8 and row["batch_size"] == 16
    # one round: the prediction is exactly the cost model on the printed inputs
    predicted = row["full_step_ms"] / (row["scoring_pass_ms"] + row["subset_step_ms"])
    assert row["predicted_speedup"] == pytest.approx(predicted, rel=ARITHMETIC)
    assert row["measured_speedup"] == pytest.approx(row["full_step_ms"] / row["selective_step_ms"], rel=ARITHMETIC)
    assert f"| 0.5 | 8 | {row['predicted_speedup']:.2f}× | {row['measured_speedup']:.2f}× |" in printed
    assert printed.rstrip().splitlines()[-2] == row["verdict"]


def test_the_report_gives_the_load_and_warns_when_the_machine_was_busy() -> None:
    batch, ks = 64, {0.5: 32}
    profile = analyse([known_costs(1e-3, 1e-4, 3e-5, batch, ks)], batch, ks)
    assert "load average" not in format_report(profile)
    calm = format_report(dataclasses.replace(profile, load_average=(0.4, 1.2), cpus=2))
    assert "1-minute load average during the fits: 0.4 to 1.2 on 2 CPUs." in calm and "busier" not in calm
    busy = format_report(dataclasses.replace(profile, load_average=(1.5, 4.5), cpus=2, threads=2))
    assert "1.5 to 4.5 on 2 CPUs; the machine was busier than its CPUs" in busy and "--threads 1" in busy
    single = format_report(dataclasses.replace(profile, load_average=(1.5, 4.5), cpus=2, threads=1))
    assert "busier than its CPUs" in single and "--threads" not in single, "advice the run already follows"
