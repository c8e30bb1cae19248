from __future__ import annotations

import copy
import csv
import sys
import types
from pathlib import Path
from typing import Any

import pytest
import yaml

from lightning_sbp.cli import main
from lightning_sbp.recipes import DigitsDataModule, ImageClassifier

CONFIGS = Path(__file__).resolve().parents[1] / "examples" / "configs"
BASES = sorted(CONFIGS.glob("*.yaml"))
SNIPPETS = sorted((CONFIGS / "sbp").glob("*.yaml"))
SELECTORS = ["random", "loss", "topk", "omp", "gradnorm"]


def run(args: list[str]) -> int:
    """The exit status of ``lightning-sbp ARGS``, run in this process through the console script's ``main``."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sys, "argv", ["lightning-sbp", *args])
        try:
            main()
        except SystemExit as stop:
            return stop.code if isinstance(stop.code, int) else 1
    return 0


def printed_config(capsys: pytest.CaptureFixture[str], *configs: Path) -> dict[str, Any]:
    """What ``lightning-sbp fit --config A --config B ... --print_config`` prints, parsed (cached per run)."""
    if configs not in _PRINTED:
        args = ["fit"]
        for config in configs:
            args += ["--config", str(config)]
        assert run([*args, "--print_config"]) == 0, capsys.readouterr().err
        _PRINTED[configs] = yaml.safe_load(capsys.readouterr().out)
    return copy.deepcopy(_PRINTED[configs])


_PRINTED: dict[tuple[Path, ...], dict[str, Any]] = {}


def test_the_examples_cover_every_setting() -> None:
    names = {path.stem for path in BASES}
    assert {f"digits_{name}" for name in ["full", *SELECTORS]} <= names
    for setting in ("cifar10", "cifar100", "svhn"):
        assert {f"{setting}_resnet18"} <= names and any(n.startswith(f"{setting}_wrn") for n in names)
    assert "imdb_bert" in names
    assert {path.stem for path in SNIPPETS} == set(SELECTORS)


@pytest.mark.parametrize("config", BASES, ids=lambda path: path.stem)
def test_every_example_parses(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    printed = printed_config(capsys, config)
    assert printed["model"]["class_path"].startswith("lightning_sbp.recipes.")
    assert printed["data"]["class_path"].startswith("lightning_sbp.recipes.")


@pytest.mark.parametrize("snippet", SNIPPETS, ids=lambda path: path.stem)
def test_every_selector_snippet_appends_its_callback(snippet: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = printed_config(capsys, CONFIGS / "cifar10_resnet18.yaml")["trainer"]["callbacks"]
    callbacks = printed_config(capsys, CONFIGS / "cifar10_resnet18.yaml", snippet)["trainer"]["callbacks"]
    assert callbacks[:-1] == base
    assert callbacks[-1]["class_path"] == "lightning_sbp.SelectiveBackprop"
    assert callbacks[-1]["init_args"]["selector"] == snippet.stem


@pytest.mark.parametrize(
    "configs", [("digits_omp.yaml",), ("cifar10_resnet18.yaml", "sbp/omp.yaml")], ids=["digits_omp", "composed"]
)
def test_print_config_round_trips(configs: tuple[str, ...], capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    printed = printed_config(capsys, *(CONFIGS / name for name in configs))
    dumped = tmp_path / "printed.yaml"
    dumped.write_text(yaml.safe_dump(printed))
    assert printed_config(capsys, dumped) == printed


@pytest.mark.parametrize("selector", SELECTORS)
def test_digits_configs_are_the_full_config_plus_the_selector_snippet(selector: str) -> None:
    single = yaml.safe_load((CONFIGS / f"digits_{selector}.yaml").read_text())
    full = yaml.safe_load((CONFIGS / "digits_full.yaml").read_text())
    snippet = yaml.safe_load((CONFIGS / "sbp" / f"{selector}.yaml").read_text())
    assert single.pop("model") == full.pop("model") and single.pop("data") == full.pop("data")
    assert single["trainer"].pop("callbacks") == snippet["trainer"]["callbacks+"]
    assert single["trainer"].pop("logger")["init_args"]["name"] == f"digits_{selector}"
    full["trainer"].pop("logger")
    assert single == full


def test_selector_accepts_a_nested_class_path(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    nested = tmp_path / "nested.yaml"
    nested.write_text(
        "trainer:\n  callbacks:\n    - class_path: lightning_sbp.SelectiveBackprop\n      init_args:\n"
        "        selector:\n          class_path: lightning_sbp.selectors.TopKSelector\n        keep: 0.25\n"
    )
    printed = printed_config(capsys, CONFIGS / "digits_full.yaml", nested)
    selector = printed["trainer"]["callbacks"][0]["init_args"]["selector"]
    assert selector["class_path"] == "lightning_sbp.selectors.TopKSelector"


def test_fit_digits_for_one_epoch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    status = run(
        [
            "fit",
            "--config",
            str(CONFIGS / "digits_omp.yaml"),
            "--trainer.max_epochs=1",
            f"--trainer.default_root_dir={tmp_path}",
            "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
            f"--trainer.logger.save_dir={tmp_path / 'logs'}",
            "--trainer.logger.name=digits",
            "--trainer.enable_progress_bar=false",
        ]
    )
    assert status == 0
    run_dir = tmp_path / "logs" / "digits" / "version_0"
    rows = list(csv.DictReader((run_dir / "metrics.csv").open()))
    accuracy = [float(row["val/acc"]) for row in rows if row.get("val/acc")]
    assert accuracy and accuracy[-1] > 0.5  # one epoch; the five of the config reach about 0.99
    assert any(row.get("sbp/k") for row in rows)
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["trainer"]["callbacks"][0]["init_args"]["selector"] == "omp"


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        (["--trainer.callbacks.init_args.selector=nope"], ["unknown selector 'nope'", "random", "topk"]),
        (["--trainer.callbacks.init_args.keep=0"], ["keep", "(0, 1]"]),
        (["--trainer.callbacks.init_args.keep=1.5"], ["keep", "(0, 1]"]),
        (["--trainer.callbacks.init_args.start=0.5", "--trainer.callbacks.init_args.end=0.5"], ["start < end"]),
    ],
)
def test_configuration_errors_stop_before_anything_is_built(
    override: list[str], expected: list[str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def untouchable(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("built or read before the configuration was checked")

    monkeypatch.setattr(ImageClassifier, "__init__", untouchable)
    monkeypatch.setattr(DigitsDataModule, "setup", untouchable)
    assert run(["fit", "--config", str(CONFIGS / "digits_random.yaml"), *override]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("error: trainer.callbacks[0]")
    for text in expected:
        assert text in error


def test_a_bad_model_argument_is_a_clean_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["fit", "--config", str(CONFIGS / "digits_full.yaml"), "--model.init_args.backbone=vgg"]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "available backbones" in err and "Traceback" not in err


def test_a_missing_dataset_is_a_clean_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    args = [
        "fit",
        "--config",
        str(CONFIGS / "cifar10_resnet18.yaml"),
        f"--data.init_args.data_dir={tmp_path / 'nothing'}",
        "--data.init_args.download=false",
        "--data.init_args.num_workers=0",
        "--trainer.logger=false",
        "--trainer.accelerator=cpu",
        f"--trainer.default_root_dir={tmp_path}",
    ]
    assert run(args) == 1
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("error: CIFAR-10")
    assert str(tmp_path / "nothing" / "cifar-10-batches-py") in error and "download: true" in error


def test_only_fit_validate_and_test(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["--help"]) == 0
    out = capsys.readouterr().out
    assert "fit" in out and "validate" in out and "test" in out and "compare" in out
    assert run(["predict", "--help"]) == 2


def test_compare_is_dispatched_to_its_module(monkeypatch: pytest.MonkeyPatch) -> None:
    received: list[list[str]] = []

    def compare_main(args: list[str]) -> int:
        received.append(args)
        return 0

    module: Any = types.ModuleType("lightning_sbp.compare")
    module.main = compare_main
    monkeypatch.setitem(sys.modules, "lightning_sbp.compare", module)
    monkeypatch.setattr(sys, "argv", ["lightning-sbp", "compare", "--config", "base.yaml"])
    assert main() == 0
    assert received == [["--config", "base.yaml"]]


def test_compare_without_its_module_is_a_clear_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "lightning_sbp.compare", None)
    assert run(["compare"]) == 2
    assert "compare` is not available" in capsys.readouterr().err


def test_test_subcommand_runs_on_the_digits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    args = ["test", "--config", str(CONFIGS / "digits_omp.yaml"), "--trainer.logger=false"]
    assert run([*args, "--trainer.limit_test_batches=1", "--trainer.enable_progress_bar=false"]) == 0
