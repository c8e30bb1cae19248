"""How the default forward reads dict batches: by name, or the single input positionally, else forward's own error."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch import Tensor, nn

from lightning_sbp.batches import INPUT_KEYS, LABEL_KEYS, BatchAdapter, default_forward, defines_forward


class Recorder(nn.Module):
    """Returns its first input's rows as logits and records how it was called."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[int, tuple[str, ...]]] = []

    def record(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor:
        self.calls.append((len(args), tuple(sorted(kwargs))))
        first = args[0] if args else next(iter(kwargs.values()))
        return first.flatten(1)


class OneArgument(Recorder):
    def forward(self, x: Tensor) -> Tensor:
        return self.record((x,), {})


class Passthrough(Recorder):
    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        return self.record(args, kwargs)


class Named(Recorder):
    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        return self.record((), {"input_ids": input_ids, "attention_mask": attention_mask})


class TwoRequired(Recorder):
    def forward(self, image: Tensor, mask: Tensor) -> Tensor:
        return self.record((), {"image": image, "mask": mask})


def batch(**entries: Tensor) -> dict[str, Tensor]:
    return {"labels": torch.arange(4), **entries}


@pytest.mark.parametrize("key", INPUT_KEYS)
def test_a_single_input_goes_positionally_to_a_one_argument_forward(key: str) -> None:
    model, images = OneArgument(), torch.randn(4, 3, 2, 2)
    logits, targets = default_forward(model, batch(**{key: images}))
    assert torch.equal(logits, images.flatten(1)) and torch.equal(targets, torch.arange(4))
    assert model.calls == [(1, ())]


@pytest.mark.parametrize("label", LABEL_KEYS)
def test_every_label_key_is_read_and_kept_from_forward(label: str) -> None:
    model, images = OneArgument(), torch.randn(4, 5)
    logits, targets = default_forward(model, {"image": images, label: torch.ones(4), "index": torch.arange(4)})
    assert torch.equal(logits, images) and torch.equal(targets, torch.ones(4)) and model.calls == [(1, ())]


def test_entries_that_name_forwards_parameters_go_by_name() -> None:
    model = Named()
    default_forward(model, batch(input_ids=torch.ones(4, 3), attention_mask=torch.ones(4, 3)))
    assert model.calls == [(0, ("attention_mask", "input_ids"))]


def test_a_passthrough_forward_gets_the_single_input_and_not_the_other_entries() -> None:
    model = Passthrough()
    default_forward(model, batch(pixel_values=torch.ones(4, 3), index=torch.arange(4)))
    assert model.calls == [(1, ())]
    default_forward(model, batch(input_ids=torch.ones(4, 3), attention_mask=torch.ones(4, 3)))
    assert model.calls[-1] == (0, ("attention_mask", "input_ids")), "no input key: everything by name"


def test_a_forward_that_needs_two_inputs_gets_forwards_own_error() -> None:
    with pytest.raises(TypeError, match="unexpected keyword argument 'index'"):
        default_forward(TwoRequired(), batch(image=torch.ones(4, 3), index=torch.arange(4)))


def test_two_input_keys_are_not_guessed_between() -> None:
    with pytest.raises(TypeError, match="unexpected keyword argument"):
        default_forward(OneArgument(), batch(image=torch.ones(4, 3), x=torch.ones(4, 3)))


def test_a_dict_without_a_label_key_names_the_keys_it_looked_for() -> None:
    with pytest.raises(ValueError, match=r"no label key \(looked for labels, label, targets, target, y; found image\)"):
        default_forward(OneArgument(), {"image": torch.ones(4, 3)})


class WithoutForward(pl.LightningModule):
    pass


class WithForward(pl.LightningModule):
    def forward(self, x: Tensor) -> Tensor:
        return x


class Inherited(WithForward):
    pass


def test_defines_forward_tells_a_module_whose_forward_is_the_placeholder() -> None:
    assert not defines_forward(WithoutForward())
    assert not defines_forward(nn.Module())
    assert defines_forward(WithForward()) and defines_forward(Inherited()) and defines_forward(nn.Linear(2, 2))


def test_downscaling_a_dict_batch_picks_the_input_key_over_other_floating_entries() -> None:
    images, weights = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    scaled = BatchAdapter().scale_inputs({"weights": weights, "image": images, "label": torch.zeros(2)}, 0.5)
    assert scaled["image"].shape == (2, 3, 4, 4) and scaled["weights"] is weights
