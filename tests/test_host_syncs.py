"""A selective step makes no host-device synchronisation that a full step does not, for every selector and option.

The operators that make the host wait for the device (``.item()``, ``bool(t)``, ``nonzero``, boolean-mask
indexing, ``unique``, ``equal``, ...) reach the dispatcher on the CPU exactly as they would on a GPU, so a
dispatch mode counts them over real ``Trainer`` steps. Steps that do not log are compared (logging reads
values on the host by design); the first step of each fit is left out as warm-up.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, ClassVar

import lightning.pytorch as pl
import pytest
import torch
from dispatch import DispatchRecorder
from helpers import Indexed, PlainClassifier, SmallCNN, blobs, loader, trainer
from torch.utils.data import TensorDataset

from lightning_sbp import SelectiveBackprop, available_selectors
from lightning_sbp.selectors import Scores, get_selector

BATCH, STEPS = 16, 4
# The selectors the package registers (other test modules register test selectors of their own).
SELECTORS = [name for name in available_selectors() if type(get_selector(name)).__module__.startswith("lightning_sbp.")]
# Options of the callback, each tried with every registered selector.
OPTIONS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "no tracking": {"track_grad_error": False},
    "exact error": {"exact_grad_error_every": 1},
    "bf16 scoring": {"score_precision": "bf16"},
    "downscaled scoring": {"score_scale": 0.5},
    "eval-mode scoring": {"score_mode": "eval"},
    "interrupted": {"interrupt": 2},
    "stale scores": {"stale_epochs": 1},
    "stale scores, no tracking": {"stale_epochs": 1, "track_grad_error": False},
}


class StepSyncs(pl.Callback):
    """Host syncs per training batch, from batch start to the end of the optimiser step."""

    def __init__(self) -> None:
        self.per_step: list[Counter[str]] = []
        self.kernels: list[Counter[str]] = []
        self._recorder: DispatchRecorder | None = None

    def on_train_batch_start(self, *args: Any) -> None:
        self._recorder = DispatchRecorder()
        self._recorder.__enter__()

    def on_train_batch_end(self, *args: Any) -> None:
        assert self._recorder is not None
        self._recorder.__exit__(None, None, None)
        self.per_step.append(self._recorder.host_syncs())
        self.kernels.append(Counter(call.op for call in self._recorder.calls if call.launches_kernel))
        self._recorder = None

    def after_warm_up(self) -> list[Counter[str]]:
        """Every step but the first of each epoch."""
        return [syncs for step, syncs in enumerate(self.per_step) if step % STEPS]


def _fit(module: pl.LightningModule, dataset: Any, *callbacks: pl.Callback, epochs: int = 1) -> StepSyncs:
    counter = StepSyncs()
    torch.manual_seed(0)
    # log_every_n_steps beyond the run: no step logs, so what is left are the syncs of the step itself.
    trainer(max_epochs=epochs, log_every_n_steps=10_000, callbacks=[counter, *callbacks]).fit(
        module, loader(dataset, batch_size=BATCH)
    )
    assert len(counter.per_step) == STEPS * epochs
    return counter


def _images() -> Indexed:
    return Indexed(blobs(n=BATCH * STEPS, size=8))


def _features() -> Indexed:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(BATCH * STEPS, 16, generator=generator)
    return Indexed(TensorDataset(x, torch.randint(3, (BATCH * STEPS,), generator=generator)))


class IndexedPlainClassifier(PlainClassifier):
    """The plain module of the patch path, on batches that carry example indices."""

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return super().training_step(batch[:2], batch_idx)


@pytest.fixture(scope="module")
def full_step_syncs() -> Counter[str]:
    """The most syncs of any full step of the mixin module, the same module and data the selective runs use."""
    counter = _fit(SmallCNN(), _images(), epochs=2)
    return max(counter.after_warm_up(), key=lambda syncs: sum(syncs.values()))


def _excess(selective: list[Counter[str]], full: Counter[str]) -> list[Counter[str]]:
    return [syncs - full for syncs in selective]


@pytest.mark.parametrize("selector", SELECTORS)
@pytest.mark.parametrize("option", list(OPTIONS))
def test_selective_steps_add_no_host_syncs(selector: str, option: str, full_step_syncs: Counter[str]) -> None:
    options = OPTIONS[option]
    epochs = 2 if "stale_epochs" in options else 1
    callback = SelectiveBackprop(selector, keep=0.5, **options)
    counter = _fit(SmallCNN(), _images(), callback, epochs=epochs)
    # The batches carry their example indices on the host, so even the skip-or-score decision of stale
    # scores has no reason to read the device.
    assert _excess(counter.after_warm_up(), full_step_syncs) == [Counter()] * len(counter.after_warm_up())


@pytest.mark.parametrize("selector", ["random", "topk", "loss"])
def test_patch_path_adds_no_host_syncs(selector: str) -> None:
    full = _fit(IndexedPlainClassifier(), _features())
    baseline = max(full.after_warm_up(), key=lambda syncs: sum(syncs.values()))
    counter = _fit(IndexedPlainClassifier(), _features(), SelectiveBackprop(selector, keep=0.5))
    assert _excess(counter.after_warm_up(), baseline) == [Counter()] * len(counter.after_warm_up())


@pytest.mark.parametrize("selector", SELECTORS)
def test_selectors_make_no_host_syncs(selector: str) -> None:
    generator = torch.Generator().manual_seed(0)
    features, logits = torch.randn(32, 6, generator=generator), torch.randn(32, 4, generator=generator)
    targets = torch.randint(4, (32,), generator=generator)
    losses = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
    losses[3] = torch.nan
    grads = torch.softmax(logits, dim=1) - torch.nn.functional.one_hot(targets, 4)
    scores = Scores(losses, logits, grads, features)
    chosen = get_selector(selector)
    chosen.select(scores, 8, generator)  # a first call may set up state
    with DispatchRecorder() as recorder:
        chosen.select(Scores(losses, logits, grads, features), 8, generator)
    assert recorder.host_syncs() == {}


@pytest.mark.parametrize("selector", SELECTORS)
@pytest.mark.parametrize("option", ["defaults", "stale scores"])
def test_steps_that_do_not_measure_launch_what_untracked_steps_launch(selector: str, option: str) -> None:
    # With the default grad_error_every only the first selective step of these fits measures, and it is
    # the warm-up: every later step must cost what it costs with tracking off, operator for operator.
    # This is the part of tracking's price that timings on a shared machine cannot resolve.
    options = OPTIONS[option]
    epochs = 2 if "stale_epochs" in options else 1
    runs = [
        _fit(
            SmallCNN(),
            _images(),
            SelectiveBackprop(selector, keep=0.5, track_grad_error=track, **options),
            epochs=epochs,
        )
        for track in (True, False)
    ]
    tracked, untracked = ([kernels for step, kernels in enumerate(run.kernels) if step % STEPS] for run in runs)
    assert tracked == untracked


class DeviceResident(torch.Tensor):
    """A CPU tensor standing for one on an accelerator: it records every read of its values on the host.

    ``.cpu()``, ``.numpy()``, ``.tolist()``, ``.item()``, ``bool()``, ``int()`` and a copy ``.to("cpu")`` are what
    would copy it from a GPU to the host, a synchronisation that the dispatcher count cannot see on a CPU, where
    such copies do nothing. Results are plain tensors: the spy watches the batch's own index tensor, not the
    scores and subsets computed from it (the dispatcher count covers those).
    """

    reads: ClassVar[list[str]] = []
    _HOST_READS = frozenset({"cpu", "numpy", "tolist", "item", "__bool__", "__int__", "__float__", "__index__"})

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        to_host = name == "to" and any(
            isinstance(value, str | torch.device) and torch.device(value).type == "cpu"
            for value in (*args[1:], *kwargs.values())
        )
        if name in cls._HOST_READS or to_host:
            cls.reads.append(name)
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **kwargs)


class IndicesOnTheDevice(SmallCNN):
    """The batch arrives with its example indices on the 'device', as Lightning's transfer leaves them on a GPU."""

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        images, targets, indices = batch
        return images, targets, indices.as_subclass(DeviceResident)


@pytest.mark.parametrize("selector", ["topk", "omp"])
@pytest.mark.parametrize("track", [False, True])
def test_stale_scores_never_copy_example_indices_from_the_device(selector: str, track: bool) -> None:
    DeviceResident.reads.clear()
    sbp = SelectiveBackprop(selector, keep=0.5, stale_epochs=1, track_grad_error=track)
    counter = _fit(IndicesOnTheDevice(), _images(), sbp, epochs=3)
    assert sbp.score_cache is not None and len(counter.per_step) == 3 * STEPS
    assert DeviceResident.reads == [], "the indices were read on the host before the batch moved"


def test_the_spy_sees_a_copy_of_device_indices_to_the_host() -> None:
    # Without the host copy taken before the transfer, the cache must read the device indices back: the spy sees it.
    DeviceResident.reads.clear()
    indices = torch.tensor([1, 2]).as_subclass(DeviceResident)
    from lightning_sbp.score_cache import ScoreCache

    cache = ScoreCache(size=4, stale_epochs=1)
    cache.store(indices, Scores(losses=torch.ones(2)), epoch=0)
    assert DeviceResident.reads
