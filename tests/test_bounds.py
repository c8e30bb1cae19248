"""Weight bounds: checked at construction, compared exactly in the weights' dtype, their hits counted on the device."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_sbp.selectors.bounds import RunningCount, bound_in, check_max_weight

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("max_weight", [1.0, 3.3, 7.9999999, 8.0, 8.0000001, 1000.1, 1e30])
def test_the_bound_in_a_dtype_is_its_largest_value_not_above_the_bound(dtype: torch.dtype, max_weight: float) -> None:
    bound = bound_in(dtype, max_weight)
    value = torch.tensor(bound, dtype=dtype)
    assert float(value) == bound  # representable
    assert bound <= max_weight
    above = torch.nextafter(value, torch.tensor(math.inf, dtype=dtype))
    # The next value of the dtype is above the bound (or infinite past the dtype's largest value).
    assert float(above) > max_weight or bound == torch.finfo(dtype).max


def test_a_float32_weight_of_eight_breaks_a_bound_of_7_9999999() -> None:
    eight = torch.tensor(8.0)
    # The trap: the bound itself rounds to 8.0 in float32, so comparing with it lets 8.0 through.
    assert bool(eight <= torch.tensor(7.9999999, dtype=torch.float32))
    assert not bool(eight <= bound_in(torch.float32, 7.9999999))
    assert bool(eight <= bound_in(torch.float32, 8.0))


@pytest.mark.parametrize("value", [0.5, 0.0, -1.0, math.inf, math.nan, True, "8", None])
def test_a_bound_below_one_or_not_a_finite_number_is_refused(value: object) -> None:
    with pytest.raises(ValueError, match="max_weight must be a finite number >= 1"):
        check_max_weight(value)


def test_none_is_a_bound_only_where_allowed() -> None:
    check_max_weight(None, allow_none=True)
    check_max_weight(1)
    with pytest.raises(ValueError, match="or None for no bound"):
        check_max_weight(0.5, allow_none=True)


def test_the_running_count_adds_flags_and_restores() -> None:
    count = RunningCount()
    assert count.value() == 0
    values = [float(count.add(torch.tensor(flag))) for flag in (True, False, True, True)]
    assert values == [1.0, 1.0, 2.0, 3.0] and count.value() == 3
    count.restore(10)
    assert float(count.add(torch.tensor(False))) == 10.0 and count.value() == 10
