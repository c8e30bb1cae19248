import math

import pytest

from lightning_sbp import Schedule


def test_window_is_a_fraction_of_the_run() -> None:
    schedule = Schedule(start=0.25, end=0.5)
    assert [step for step in range(20) if schedule.is_active(step, 20)] == [5, 6, 7, 8, 9]


def test_interrupt_makes_every_nth_step_of_the_window_a_full_step() -> None:
    schedule = Schedule(start=0.1, end=1.0, interrupt=3)
    active = [schedule.is_active(step, 10) for step in range(10)]
    assert active == [False, True, True, False, True, True, False, True, True, False]


def test_unbounded_run_selects_throughout_only_with_the_whole_window() -> None:
    assert Schedule().is_active(10**9, math.inf)
    with pytest.raises(ValueError, match="unbounded"):
        Schedule(start=0.1).window(math.inf)


@pytest.mark.parametrize(
    ("start", "end", "interrupt"),
    [(0.5, 0.5, 0), (0.6, 0.5, 0), (-0.1, 1, 0), (0, 1.2, 0), (0, 1, 1), (0, 1, -2), (0, 1, True)],
)
def test_bad_schedules_are_refused(start: float, end: float, interrupt: int) -> None:
    with pytest.raises(ValueError):
        Schedule(start, end, interrupt)
