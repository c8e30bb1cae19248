"""Every example configuration, alone and as a base with each selector snippet, through ``profile`` and ``compare``.

The configurations are the users' starting points: callbacks (learning-rate monitors, checkpoints,
SelectiveBackprop), loggers and progress bars of every kind must not stop either tool. Each one runs
offline and small: its dataset is replaced by a few generated examples of the same kind (random
images, a tiny tokenizer and review folder, a tiny BERT from a config), everything else is as
written. ``profile`` times one step per fit; ``compare`` trains ``full`` and ``random`` for one step.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from helpers import fake_data, tiny_tokenizer

from lightning_sbp import recipes
from lightning_sbp.compare import command
from lightning_sbp.compare.command import main as compare
from lightning_sbp.compare.grid import merge
from lightning_sbp.profile import main as profile

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "examples" / "configs"
BASES = sorted(CONFIGS.glob("*.yaml"))
SNIPPETS = sorted((CONFIGS / "sbp").glob("*.yaml"))
CASES = [(base,) for base in BASES] + [(CONFIGS / "digits_full.yaml", snippet) for snippet in SNIPPETS]


def _tiny_images(folder: Path) -> None:
    from PIL import Image

    generator = torch.Generator().manual_seed(0)
    for split in ("train", "val"):
        for label in ("a", "b"):
            (folder / split / label).mkdir(parents=True)
            for i in range(4):
                pixels = torch.randint(0, 256, (8, 8, 3), generator=generator, dtype=torch.uint8).numpy()
                Image.fromarray(pixels).save(folder / split / label / f"{i}.png")


def _tiny_reviews(folder: Path) -> None:
    for split in ("train", "test"):
        for label, words in (("neg", "bad awful poor"), ("pos", "good great fine")):
            (folder / split / label).mkdir(parents=True)
            for i in range(4):
                (folder / split / label / f"{i}_1.txt").write_text(f"the movie was {words}")


def offline(config: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """``config`` with its data made small and local, written to ``tmp_path``; everything else as written."""
    spec = yaml.safe_load(config.read_text())
    data = spec["data"]["class_path"].rsplit(".", 1)[-1]
    data_args = spec["data"].setdefault("init_args", {})
    model_args = spec["model"].setdefault("init_args", {})
    spec["trainer"]["accelerator"] = "cpu"
    if data in ("CIFAR10DataModule", "CIFAR100DataModule", "SVHNDataModule"):
        from torchvision.transforms import v2

        to_tensor = v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True)])
        monkeypatch.setattr(getattr(recipes, data), "make_dataset", fake_data((3, 8, 8), size=16, transform=to_tensor))
        data_args.update(batch_size=4, num_workers=0, download=False)
    elif data == "ImageFolderDataModule":
        _tiny_images(tmp_path / "images")
        data_args.update(data_dir=str(tmp_path / "images"), image_size=8, batch_size=4, num_workers=0)
        model_args["num_classes"] = 2
    elif data == "TextClassificationDataModule":
        _tiny_reviews(tmp_path / "aclImdb")
        data_args.update(
            tokenizer_name_or_path=tiny_tokenizer(tmp_path),
            data_dir=str(tmp_path / "aclImdb"),
            max_length=8,
            batch_size=4,
            num_workers=0,
        )
        model_args.update(
            model_name_or_path=None,
            config={
                "model_type": "bert",
                "vocab_size": 17,
                "hidden_size": 16,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
                "intermediate_size": 32,
                "max_position_embeddings": 32,
            },
        )
    path = tmp_path / f"offline_{config.name}"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.mark.parametrize("configs", CASES, ids=lambda configs: "+".join(path.stem for path in configs))
def test_profile_and_compare_run_every_example(
    configs: tuple[Path, ...], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    base = offline(configs[0], tmp_path, monkeypatch)
    profile_and_compare(base, list(configs[1:]), tmp_path, monkeypatch, capsys)


EVERY_KIND = """\
trainer:
  logger:
    class_path: lightning.pytorch.loggers.TensorBoardLogger
    init_args: {save_dir: runs}
  callbacks+:
    - class_path: lightning.pytorch.callbacks.TQDMProgressBar
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {monitor: val/acc, mode: max, save_last: true}
    - class_path: lightning.pytorch.callbacks.EarlyStopping
      init_args: {monitor: val/acc, mode: max, patience: 1}
    - class_path: lightning.pytorch.callbacks.LearningRateMonitor
    - class_path: lightning.pytorch.callbacks.RichModelSummary
    - class_path: lightning.pytorch.callbacks.LearningRateFinder
      init_args: {num_training_steps: 2}
"""


def test_profile_and_compare_run_a_configuration_with_every_kind_of_callback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    extra = tmp_path / "every_kind.yaml"
    extra.write_text(EVERY_KIND)
    base = offline(CONFIGS / "digits_full.yaml", tmp_path, monkeypatch)
    profile_and_compare(base, [extra], tmp_path, monkeypatch, capsys, methods=["full", "omp"])


def profile_and_compare(
    base: Path,
    snippets: list[Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    methods: tuple[str, ...] | list[str] = ("full", "random"),
) -> None:
    """``profile`` in a fast mode, then ``compare`` of ``methods`` for one step, on ``base`` and ``snippets``."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(command, "plot_all", lambda *args, **kwargs: [])  # plots have tests of their own
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)  # the configurations log and save checkpoints under runs/

    fast = ["--keep", "0.5", "--steps", "1", "--rounds", "1", "--warmup", "0", "--threads", "1", "--no-progress"]
    output = tmp_path / "profile.json"
    config_args = [item for config in [base, *snippets] for item in ("--config", str(config))]
    assert profile([*config_args, *fast, "--json", str(output)]) == 0, capsys.readouterr().err
    (row,) = json.loads(output.read_text())
    assert row["full_step_ms"] > 0 and row["selective_step_ms"] > 0 and row["scoring_pass_ms"] > 0
    assert not any(work.iterdir())  # profile writes nothing: no log, no checkpoint

    grid: dict[str, Any] = {
        "base": str(base),
        "methods": list(methods),
        "keep": [0.5],
        "seeds": [0],
        "threads": 1,
        "overrides": {
            "trainer": {"max_epochs": 1, "limit_train_batches": 1, "limit_val_batches": 1, "num_sanity_val_steps": 0}
        },
    }
    for snippet in snippets:
        merge(grid["overrides"], yaml.safe_load(snippet.read_text()))
    (tmp_path / "grid.yaml").write_text(yaml.safe_dump(grid))
    status = compare(["--config", str(tmp_path / "grid.yaml"), "--output", str(tmp_path / "out"), "--no-progress"])
    assert status == 0, capsys.readouterr().err
    records = [json.loads(path.read_text()) for path in (tmp_path / "out" / "runs").glob("*/record.json")]
    assert sorted(record["method"] for record in records) == sorted(methods)
    assert all(record["optimizer_steps"] == 1 for record in records)
