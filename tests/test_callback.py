from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from helpers import DictDataset, PlainClassifier, PlainDictClassifier, SmallCNN, blobs, loader, trainer
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from tolerances import assert_within, gamma, replay_tolerance
from torch import Tensor
from torch.utils.data import TensorDataset

from lightning_sbp import Scores, Selection, SelectiveBackprop, Selector, register_selector
from lightning_sbp.tracking import loggers_write_this_step


@register_selector("test-half-weights")
class HalfWeights(Selector):
    """A user-defined weighted selector: the first k examples, weights alternating 0.5 and 1.5."""

    weighted = True

    def select(self, scores: Scores, k: int, generator: torch.Generator) -> Selection:
        weights = torch.tensor([0.5, 1.5], device=scores.losses.device).repeat(k)[:k]
        return Selection(torch.arange(k, device=scores.losses.device), weights)


class Recorder(pl.Callback):
    """Records, per training batch, whether the step selected and which rows it kept."""

    def __init__(self, sbp: SelectiveBackprop) -> None:
        self.sbp = sbp
        self.steps: list[tuple[int, bool, list[int] | None]] = []

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        self.sbp.last_selection = None

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        selection = self.sbp.last_selection
        indices = None if selection is None else selection.indices.tolist()
        self.steps.append((trainer.global_step - 1, selection is not None, indices))


def test_every_selective_step_builds_and_backpropagates_exactly_k_examples() -> None:
    model = SmallCNN()
    sbp = SelectiveBackprop("topk", keep=0.25)
    trainer(callbacks=[sbp], max_epochs=2).fit(model, loader(blobs(256), 32))
    assert model.graph_sizes == [8] * 16
    assert model.backward_sizes == [8] * 16
    assert sbp.examples_seen == 512 and sbp.examples_backpropagated == 128


class SkipsEveryOtherBatch(PlainClassifier):
    """Returns no loss on odd batches, as a step that skips a bad batch does."""

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        loss = super().training_step(batch, batch_idx)
        return loss if batch_idx % 2 == 0 else None


def test_steps_that_return_no_loss_backpropagate_nothing() -> None:
    # 8 batches of 16 a fit; keep 0.25 selects 4. Only the 4 even batches return a loss, and start=0.5 makes the
    # second half of the steps selective: batches 0 and 2 train whole, 4 and 6 train 4 examples each.
    data = TensorDataset(torch.randn(128, 16), torch.randint(3, (128,)))
    sbp = SelectiveBackprop("topk", keep=0.25, start=0.5, track_grad_error=False)
    trainer(callbacks=[sbp], max_epochs=1).fit(SkipsEveryOtherBatch(), loader(data, 16))
    assert sbp.examples_seen == 128
    assert sbp.examples_backpropagated == 16 + 16 + 4 + 4


def test_scoring_pass_changes_no_buffer_and_no_grad() -> None:
    torch.manual_seed(0)
    model = SmallCNN(lr=0.0, dropout=0.0)
    reference = copy.deepcopy(model)
    sbp = SelectiveBackprop("topk", keep=0.5)
    data = blobs(32)
    trainer(callbacks=[sbp], max_steps=1).fit(model, loader(data, 32))
    assert sbp.last_selection is not None
    # Only the subset pass may have moved the running statistics or made gradients: replay it alone on a copy.
    reference.train()
    subset = sbp.last_selection.indices
    torch.nn.functional.cross_entropy(reference(data.tensors[0][subset]), data.tensors[1][subset]).backward()
    # The same float32 graph on the same 16 images of 8 × 8 pixels (a conv weight sums over 16 · 64 · 9 products);
    # a scoring pass that leaked into .grad or the statistics would differ by their own size.
    terms = 16 * 64 * 9
    for (name, param), ref_param in zip(model.named_parameters(), reference.parameters(), strict=True):
        assert param.grad is not None and ref_param.grad is not None, f"{name} has no gradient"
        tolerance = replay_tolerance(ref_param.grad, terms)
        assert_within(param.grad, ref_param.grad, tolerance, f"{name}: the scoring pass added to .grad")
    bn, ref_bn = model.body[1], reference.body[1]
    assert torch.equal(bn.num_batches_tracked, ref_bn.num_batches_tracked)
    assert bn.num_batches_tracked.item() == 1
    assert_within(bn.running_mean, ref_bn.running_mean, replay_tolerance(ref_bn.running_mean, terms), "mean")
    assert_within(bn.running_var, ref_bn.running_var, replay_tolerance(ref_bn.running_var, terms), "variance")


def test_scoring_pass_runs_under_trainer_precision() -> None:
    dtypes: list[torch.dtype] = []

    class Probe(SmallCNN):
        def forward(self, x: Tensor) -> Tensor:
            out = super().forward(x)
            if not torch.is_grad_enabled():
                dtypes.append(out.dtype)
            return out

    trainer(callbacks=[SelectiveBackprop("topk", keep=0.5)], max_steps=2, precision="bf16-mixed").fit(
        Probe(), loader(blobs(64), 32)
    )
    assert dtypes == [torch.bfloat16, torch.bfloat16]


def test_batch_norm_needs_two_examples_and_tiny_batches_take_a_full_step() -> None:
    model = SmallCNN()
    sbp = SelectiveBackprop("random", keep=0.01)
    # 34 examples in batches of 16: two batches keep 2 of 16, the last batch of 2 is a full step.
    with pytest.warns(UserWarning, match="cannot select from a batch of 2 examples"):
        trainer(callbacks=[sbp]).fit(model, loader(blobs(34), 16))
    assert model.graph_sizes == [2, 2, 2]
    assert sbp.examples_backpropagated == 6


def test_patch_path_with_tuple_batches_hands_the_subset_to_the_original_step() -> None:
    model = PlainClassifier()
    data = TensorDataset(torch.randn(64, 16), torch.randint(3, (64,)))
    sbp = SelectiveBackprop("random", keep=0.25)
    trainer(callbacks=[sbp]).fit(model, loader(data, 16))
    assert model.seen == [4, 4, 4, 4]
    assert "training_step" not in model.__dict__, "the original training_step is restored after fit"


def test_patch_path_with_dict_batches_and_a_step_without_batch_idx() -> None:
    model = PlainDictClassifier()
    sbp = SelectiveBackprop("topk", keep=0.5)
    trainer(callbacks=[sbp]).fit(model, loader(DictDataset(64), 16))
    assert model.seen == [8, 8, 8, 8]


def test_weighted_selector_on_an_unmodified_module_is_refused() -> None:
    data = TensorDataset(torch.randn(32, 16), torch.randint(3, (32,)))
    with pytest.raises(ValueError, match="SelectiveBackpropMixin"):
        trainer(callbacks=[SelectiveBackprop("test-half-weights")]).fit(PlainClassifier(), loader(data, 16))


def test_user_registered_weighted_selector_weighs_the_subset_loss() -> None:
    torch.manual_seed(0)
    model = SmallCNN(lr=0.0, dropout=0.0)
    data = blobs(8)
    losses: list[Tensor] = []

    class Spy(pl.Callback):
        def on_train_batch_end(self, trainer: pl.Trainer, module: Any, outputs: Any, *args: Any) -> None:
            losses.append(outputs["loss"].detach())

    trainer(callbacks=[SelectiveBackprop("test-half-weights", keep=0.5), Spy()], max_steps=1).fit(
        model, loader(data, 8)
    )
    # lr=0 leaves the weights as they were; replay the subset in train mode with batch statistics.
    model.body[1].track_running_stats = False
    with torch.no_grad():
        per_example = torch.nn.functional.cross_entropy(
            model(data.tensors[0][:4]), data.tensors[1][:4], reduction="none"
        )
    expected = (torch.tensor([0.5, 1.5, 0.5, 1.5]) * per_example).mean()
    # The same float32 forward on 4 images (8 × 8 pixels, 9 taps), then a weighted mean of 4 positive losses.
    assert_within(losses[0], expected, replay_tolerance(expected, 4 * 64 * 9), "weighted subset loss")


def test_schedule_window_and_interrupt_in_a_real_run() -> None:
    sbp = SelectiveBackprop("random", keep=0.5, start=0.25, end=0.75, interrupt=2)
    recorder = Recorder(sbp)
    trainer(callbacks=[sbp, recorder], max_steps=8).fit(SmallCNN(), loader(blobs(256), 16))
    active = [selected for _, selected, _ in recorder.steps]
    # window [2, 6): steps 2 and 4 select, 3 and 5 are interrupted by full steps.
    assert active == [False, False, True, False, True, False, False, False]


@pytest.mark.parametrize("selector", ["random", "topk", "test-half-weights"])
def test_resume_in_the_window_makes_the_same_selections(tmp_path: Path, selector: str) -> None:
    def run(ckpt_path: str | None, save_at: int | None) -> list[tuple[int, bool, list[int] | None]]:
        torch.manual_seed(0)
        sbp = SelectiveBackprop(selector, keep=0.25, start=0.2, end=0.9, seed=3)
        recorder = Recorder(sbp)
        callbacks: list[pl.Callback] = [sbp, recorder]
        if save_at is not None:

            class SaveAt(pl.Callback):
                def on_train_epoch_end(self, trainer: pl.Trainer, module: Any) -> None:
                    if trainer.global_step == save_at:
                        trainer.save_checkpoint(tmp_path / "mid.ckpt")

            callbacks.append(SaveAt())
        trainer(callbacks=callbacks, max_epochs=4).fit(
            SmallCNN(dropout=0.0), loader(blobs(64), 16), ckpt_path=ckpt_path
        )
        return recorder.steps

    uninterrupted = run(None, save_at=8)
    resumed = run(str(tmp_path / "mid.ckpt"), save_at=None)
    assert [step for step, _, _ in resumed] == list(range(8, 16))
    assert resumed == uninterrupted[8:]
    assert any(selected for _, selected, _ in resumed)


def test_nonfinite_losses_warn_once_and_training_goes_on() -> None:
    def nan_first(logits: Tensor, targets: Tensor) -> Tensor:
        losses = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
        return torch.cat([torch.full_like(losses[:2], float("nan")), losses[2:3] * float("inf"), losses[3:]])

    model = PlainClassifier()
    sbp = SelectiveBackprop("topk", keep=0.5, loss_fn=nan_first)
    data = TensorDataset(torch.randn(64, 16), torch.randint(3, (64,)))
    with pytest.warns(UserWarning, match="NaN or inf") as record:
        trainer(callbacks=[sbp], max_epochs=2).fit(model, loader(data, 16))
    assert sum("NaN or inf" in str(w.message) for w in record) == 1
    assert sbp.last_selection is not None
    assert not set(sbp.last_selection.indices.tolist()) & {0, 1, 2}


def test_metrics_reach_csv_and_tensorboard_loggers(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    csv = CSVLogger(tmp_path, name="csv")
    tb = TensorBoardLogger(tmp_path, name="tb")
    trainer(callbacks=[SelectiveBackprop("topk", keep=0.5)], logger=[csv, tb], log_every_n_steps=1, max_steps=4).fit(
        SmallCNN(), loader(blobs(128), 16)
    )
    header = (Path(csv.log_dir) / "metrics.csv").read_text().splitlines()[0].split(",")
    expected = {
        "sbp/active",
        "sbp/k",
        "sbp/full_loss",
        "sbp/selected_loss",
        "sbp/score_ms",
        "sbp/select_ms",
        "sbp/backprop_fraction",
    }
    assert expected <= set(header)
    events = EventAccumulator(tb.log_dir)
    events.Reload()
    assert expected <= set(events.Tags()["scalars"])
    assert [e.value for e in events.Scalars("sbp/k")] == [8.0] * 4


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"selector": "nope"}, "registered selectors: .*random.*topk"),
        ({"selector": 3}, "registered name"),
        ({"keep": 0.0}, r"\(0, 1\]"),
        ({"keep": 1.5}, r"\(0, 1\]"),
        ({"keep": True}, r"\(0, 1\]"),
        ({"start": 0.5, "end": 0.5}, "start < end"),
        ({"start": -0.1}, "0 <= start"),
        ({"end": 1.1}, "end <= 1"),
        ({"interrupt": -1}, "integer >= 2"),
        ({"interrupt": 1}, "integer >= 2"),
        ({"interrupt": 2.5}, "integer >= 2"),
        ({"score_mode": "test"}, "'train' or 'eval'"),
        ({"seed": 1.5}, "integer"),
        ({"loss_fn": "cross_entropy"}, "callable"),
        ({"last_layer": 3}, "nn.Linear"),
    ],
)
def test_bad_arguments_are_refused_at_construction(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SelectiveBackprop(**kwargs)


def test_unknown_last_layer_is_refused_at_setup_naming_the_linear_layers() -> None:
    with pytest.raises(ValueError, match="head"):
        trainer(callbacks=[SelectiveBackprop("test-needs-features", last_layer="nope")]).fit(
            SmallCNN(), loader(blobs(32), 16)
        )


@register_selector("test-needs-features")
class NeedsFeatures(Selector):
    needs_last_layer = True

    def select(self, scores: Scores, k: int, generator: torch.Generator) -> Selection:
        features, grads = scores.require_last_layer("test")
        return Selection.uniform(torch.topk(grads.norm(dim=1) * features.norm(dim=1), k).indices)


def test_features_are_captured_only_for_selectors_that_need_them() -> None:
    captured: list[Scores] = []

    class Keep(NeedsFeatures):
        def select(self, scores: Scores, k: int, generator: torch.Generator) -> Selection:
            captured.append(scores)
            return super().select(scores, k, generator)

    trainer(callbacks=[SelectiveBackprop(Keep(), keep=0.5)], max_steps=1).fit(SmallCNN(), loader(blobs(32), 16))
    scores = captured[0]
    assert scores.features is not None and scores.features.shape == (16, 32)
    assert scores.logit_grads is not None and scores.logits is not None
    # cross-entropy's logit gradients are softmax minus one-hot: positive off the target, rows summing to zero
    softmax = torch.softmax(scores.logits.float(), dim=1)
    off_target = scores.logit_grads > 0
    # Each entry of a float32 softmax over 4 classes: a few roundings relative to itself (autograd's and this
    # one's); the rows of softmax − onehot, entries at most 1, sum to 0 but for the rounding of 4 + 1 terms.
    expected = softmax[off_target]
    assert_within(scores.logit_grads[off_target], expected, 2 * gamma(4 + 4, torch.float32) * expected, "softmax")
    assert_within(scores.logit_grads.sum(dim=1), torch.zeros(16), 2 * gamma(4 + 4, torch.float32), "row sums")


def test_features_are_not_captured_when_nothing_needs_them() -> None:
    captured: list[Scores] = []

    class Spy(Selector):
        def select(self, scores: Scores, k: int, generator: torch.Generator) -> Selection:
            captured.append(scores)
            return Selection.uniform(torch.arange(k))

    sbp = SelectiveBackprop(Spy(), keep=0.5, track_grad_error=False)
    trainer(callbacks=[sbp], max_steps=1).fit(SmallCNN(), loader(blobs(32), 16))
    assert captured[0].features is None and captured[0].logit_grads is None


def test_step_values_are_logged_on_the_steps_the_loggers_write(tmp_path: Path) -> None:
    csv = CSVLogger(tmp_path)
    trainer(callbacks=[SelectiveBackprop("random", keep=0.5)], logger=csv, log_every_n_steps=3, max_steps=9).fit(
        SmallCNN(), loader(blobs(256), 16)
    )
    lines = (Path(csv.log_dir) / "metrics.csv").read_text().splitlines()
    header = lines[0].split(",")
    rows = [dict(zip(header, line.split(","), strict=True)) for line in lines[1:]]
    assert [int(r["step"]) for r in rows if r["sbp/k"]] == [2, 5, 8]
    assert [float(r["sbp/backprop_fraction"]) for r in rows if r["sbp/k"]] == [0.5] * 3


def test_the_private_lightning_attribute_behind_step_logging_still_exists() -> None:
    # loggers_write_this_step reads Trainer._logger_connector.should_update_logs, which Lightning does not promise.
    answers: list[bool] = []

    class Probe(pl.Callback):
        def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
            assert isinstance(trainer._logger_connector.should_update_logs, bool), "Lightning renamed it"
            answers.append(loggers_write_this_step(trainer))

    data = TensorDataset(torch.randn(64, 16), torch.randint(3, (64,)))
    trainer(callbacks=[Probe()], log_every_n_steps=3, max_steps=6).fit(PlainClassifier(), loader(data, 8))
    assert answers == [False, False, True, False, False, True]


def test_random_selection_without_tracking_runs_no_scoring_pass_on_either_path() -> None:
    model = SmallCNN()
    trainer(callbacks=[SelectiveBackprop("random", keep=0.25, track_grad_error=False)], max_steps=2).fit(
        model, loader(blobs(64), 32)
    )
    assert model.scoring_shapes == [], "no forward without a graph"
    assert model.graph_sizes == [8, 8] and model.backward_sizes == [8, 8]

    forwards: list[bool] = []

    class Counting(PlainClassifier):
        def forward(self, x: Tensor) -> Tensor:
            forwards.append(torch.is_grad_enabled())
            return super().forward(x)

    plain = Counting()
    data = TensorDataset(torch.randn(64, 16), torch.randint(3, (64,)))
    trainer(callbacks=[SelectiveBackprop("random", keep=0.25, track_grad_error=False)]).fit(plain, loader(data, 16))
    assert forwards == [True] * 4 and plain.seen == [4] * 4


def test_a_selections_stats_are_logged_under_sbp() -> None:
    reported: list[Tensor] = []

    class WithStats(Selector):
        def select(self, scores: Scores, k: int, generator: torch.Generator) -> Selection:
            reported.append(scores.losses[1:].max())
            return Selection(torch.arange(k), torch.ones(k), stats={"rest_max_loss": reported[-1]})

    model = SmallCNN(lr=0.0)
    t = trainer(callbacks=[SelectiveBackprop(WithStats(), keep=0.5)], max_steps=1, log_every_n_steps=1)
    t.fit(model, loader(blobs(16), 16))
    assert t.callback_metrics["sbp/rest_max_loss"] == reported[0]


def test_a_fit_that_raises_gives_the_module_its_own_training_step_back() -> None:
    class Failing(PlainClassifier):
        def training_step(self, batch: Any, batch_idx: int) -> Tensor:
            if batch_idx == 1:
                raise KeyError("boom")
            return super().training_step(batch, batch_idx)

    model = Failing()
    data = TensorDataset(torch.randn(64, 16), torch.randint(3, (64,)))
    with pytest.raises(KeyError, match="boom"):
        trainer(callbacks=[SelectiveBackprop("random", keep=0.25)]).fit(model, loader(data, 16))
    assert "training_step" not in model.__dict__
    model.seen.clear()
    trainer(max_steps=1).fit(model, loader(data, 16))
    assert model.seen == [16], "a later fit without the callback trains on whole batches"


def test_a_batch_too_small_to_select_from_is_reported_once_per_fit() -> None:
    data = TensorDataset(torch.randn(8, 16), torch.randint(3, (8,)))
    with pytest.warns(UserWarning, match=r"batch of 1 examples with keep=0\.5: k = 1") as record:
        trainer(callbacks=[SelectiveBackprop("random", keep=0.5)]).fit(PlainClassifier(), loader(data, 1))
    assert sum("cannot select" in str(w.message) for w in record) == 1


def test_score_mode_eval_scores_without_dropout_and_batch_statistics() -> None:
    captured: list[Tensor] = []

    class Spy(Selector):
        def select(self, scores: Scores, k: int, generator: torch.Generator) -> Selection:
            captured.append(scores.losses)
            return Selection.uniform(torch.arange(k))

    torch.manual_seed(0)
    model = SmallCNN(lr=0.0, dropout=0.5)
    data = blobs(16)
    before = copy.deepcopy(model).eval()
    sbp = SelectiveBackprop(Spy(), keep=0.5, score_mode="eval", track_grad_error=False)
    trainer(callbacks=[sbp], max_steps=1).fit(model, loader(data, 16))
    with torch.no_grad():
        expected = torch.nn.functional.cross_entropy(before(data.tensors[0]), data.tensors[1], reduction="none")
    # The same float32 eval-mode forward on the same 16 images; with dropout or batch statistics instead, the
    # losses would differ by tens of per cent.
    assert_within(captured[0], expected, replay_tolerance(expected, 64 * 9 + 32), "eval-mode losses")
    assert model.body[1].num_batches_tracked.item() == 1, "only the subset pass updated batch norm"


def test_a_valid_last_layer_name_is_the_layer_whose_inputs_are_captured() -> None:
    captured: list[Scores] = []

    class Keep(NeedsFeatures):
        def select(self, scores: Scores, k: int, generator: torch.Generator) -> Selection:
            captured.append(scores)
            return super().select(scores, k, generator)

    model = PlainClassifier(features=16, classes=3)
    before = copy.deepcopy(model)
    data = TensorDataset(torch.randn(16, 16), torch.randint(3, (16,)))
    trainer(callbacks=[SelectiveBackprop(Keep(), keep=0.5, last_layer="net.2")], max_steps=1).fit(
        model, loader(data, 16)
    )
    assert captured[0].features is not None and captured[0].features.shape == (16, 32)
    with torch.no_grad():
        hidden = before.net[1](before.net[0](data.tensors[0]))
    # The same float32 layers on the same inputs: each feature sums 16 products (another layer's inputs would
    # not even have this shape's values).
    assert_within(captured[0].features, hidden, replay_tolerance(hidden, 16 + 1), "captured features")


def test_score_fn_is_reachable_from_yaml_as_a_dotted_path() -> None:
    from helpers import sequence_losses
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(SelectiveBackprop, "sbp")
    config = parser.parse_string("sbp:\n  selector: topk\n  score_fn: helpers.sequence_losses\n")
    sbp = parser.instantiate_classes(config).sbp
    assert sbp.scorer.score_fn is sequence_losses


def test_a_ddp_ranks_short_last_batch_is_not_reported_but_a_small_batch_size_is() -> None:
    from types import SimpleNamespace

    two_ranks: Any = SimpleNamespace(world_size=2)
    sbp = SelectiveBackprop("random", keep=0.5)
    sbp._largest_batch = 16  # the rank has seen full batches of 16
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sbp._report_small_batch(two_ranks, 1, 1)
    sbp._largest_batch = 1  # every batch holds one example: selection never happens
    with pytest.warns(UserWarning, match="batch of 1 examples"):
        sbp._report_small_batch(two_ranks, 1, 1)


def test_random_selection_scores_only_the_steps_that_measure_the_gradient_errors() -> None:
    model = PlainClassifier()
    forwards: list[int] = []
    model.net.register_forward_hook(lambda module, inputs, output: forwards.append(inputs[0].shape[0]))
    sbp = SelectiveBackprop("random", keep=0.25, grad_error_every=3)
    data = TensorDataset(torch.randn(112, 16), torch.randint(3, (112,)))
    trainer(callbacks=[sbp], max_steps=7, log_every_n_steps=1).fit(model, loader(data, 16))
    # Selective steps 0, 3 and 6 score all 16 rows; every step trains on 4.
    assert forwards == [16, 4, 4, 4, 16, 4, 4, 4, 16, 4]
    assert model.seen == [4] * 7
