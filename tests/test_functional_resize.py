import pytest
import torch
import torch.nn.functional as F
from tolerances import assert_within, gamma

from lightning_sbp.functional.resize import downscale


@pytest.mark.parametrize(
    ("shape", "expected"),
    [
        ((2, 3, 10), (2, 3, 5)),
        ((2, 3, 8, 6), (2, 3, 4, 3)),
        ((1, 1, 4, 4, 4), (1, 1, 2, 2, 2)),
        ((2, 1, 1, 9), (2, 1, 1, 4)),
    ],
)
def test_downscale_resamples_every_spatial_dimension(shape: tuple[int, ...], expected: tuple[int, ...]) -> None:
    assert downscale(torch.randn(shape), 0.5).shape == expected


def test_bilinear_halving_of_a_smooth_image_averages_neighbours() -> None:
    image = torch.arange(16.0).view(1, 1, 4, 4)
    out = downscale(image, 0.5)
    # Interpolation weights of 1/2 in each dimension on integers below 16: a few float32 roundings of 16 at most.
    assert_within(out, F.avg_pool2d(image, 2), gamma(4, torch.float32) * 16)


def test_scale_one_is_the_identity_and_bad_inputs_are_named() -> None:
    x = torch.randn(3, 5)
    assert downscale(x, 1.0) is x
    with pytest.raises(ValueError, match=r"shape \(3, 5\)"):
        downscale(x, 0.5)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        downscale(torch.randn(1, 1, 4, 4), 0.0)
