from __future__ import annotations

import copy
import csv
import importlib
import importlib.util
import inspect
import math
import re
import runpy
import sys
import types
from pathlib import Path
from typing import Any

import pytest
import tomllib
import yaml
from lightning.pytorch.demos.boring_classes import BoringModel, RandomDataset
from torch.utils.data import DataLoader

from lightning_sbp import SelectiveBackprop, cli, entry
from lightning_sbp.entry import main
from lightning_sbp.recipes import DigitsDataModule, ImageClassifier

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "examples" / "configs"
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
    assert accuracy and accuracy[-1] > 0.5  # one epoch of 10 classes (chance 0.1); the config's five reach 0.99
    assert any(row.get("sbp/k") for row in rows)
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["trainer"]["callbacks"][0]["init_args"]["selector"] == "omp"


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        (["--trainer.callbacks.init_args.selector=nope"], ["unknown selector 'nope'", "random", "topk"]),
        (["--trainer.callbacks.init_args.keep=0"], ["keep", "(0, 1]"]),
        (["--trainer.callbacks.init_args.keep=1.5"], ["keep", "(0, 1]"]),
        (
            ["--trainer.callbacks.init_args.keep=abc"],
            ["(lightning_sbp.SelectiveBackprop): keep expects a float, got 'abc'"],
        ),
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
    err = capsys.readouterr().err
    error = err.strip().splitlines()[-1]
    assert error.startswith("error: trainer.callbacks")
    assert "usage:" not in err and err.count("error:") == 1  # the error, not the usage of every option
    for text in expected:
        assert text in error


@pytest.mark.parametrize(
    ("override", "line"),
    [
        (
            "--model.init_args.backbone=vgg",
            "error: model (lightning_sbp.recipes.ImageClassifier): unknown backbone 'vgg'; available backbones: ",
        ),
        (
            "--data.init_args.label_noise=1.5",
            "error: data (lightning_sbp.recipes.DigitsDataModule): label_noise must be a fraction in [0, 1], got 1.5",
        ),
        (
            '--model={"class_path": "lightning_sbp.recipes.ImageClassifier", "init_arg": {"num_classes": 10}}',
            "error: model (lightning_sbp.recipes.ImageClassifier): Option 'init_arg.num_classes' is not accepted "
            "(a class's arguments go under init_args)",
        ),
    ],
    ids=["constructor", "data module", "init_arg"],
)
def test_a_bad_model_or_data_argument_is_one_line_with_the_class_s_reason(
    override: str, line: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(["fit", "--config", str(CONFIGS / "digits_full.yaml"), override]) == 2
    lines = [text for text in capsys.readouterr().err.splitlines() if text.startswith("error:") or text.startswith(" ")]
    assert len(lines) == 1 and lines[0].startswith(line), lines


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


class UnlabelledBatches(BoringModel):
    """Lightning's BoringModel (batches without targets) on batches of 8, which selection can split."""

    def train_dataloader(self) -> DataLoader:
        return DataLoader(RandomDataset(32, 32), batch_size=8)


def test_a_module_the_scoring_pass_cannot_read_is_one_error_naming_the_fix(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    args = [
        "fit",
        f"--model={__name__}.UnlabelledBatches",
        "--trainer.max_steps=2",
        "--trainer.logger=false",
        "--trainer.enable_checkpointing=false",
        "--trainer.enable_progress_bar=false",
        "--trainer.callbacks=lightning_sbp.SelectiveBackprop",
        "--trainer.callbacks.selector=topk",
    ]
    assert run(args) == 1
    err = capsys.readouterr().err
    error = err.strip().splitlines()[-1]
    assert error.startswith("error: ") and "UnlabelledBatches" in error and "score_fn" in error
    assert "Traceback" not in err


UNANNOTATED_SCORING = """
import torch.nn.functional as F

calls = []


def losses(module, batch):
    calls.append(len(batch[1]))
    return F.cross_entropy(module(batch[0]), batch[1], reduction="none")


def squared(outputs, targets):
    return (outputs - targets).square()
"""


def scoring_package(root: Path, monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    """A package ``userscoring`` whose functions carry no annotations, importable from ``root``."""
    package = root / "userscoring"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "scoring.py").write_text(UNANNOTATED_SCORING)
    monkeypatch.syspath_prepend(str(root))
    for name in ("userscoring", "userscoring.scoring"):  # another test's copy, from another directory
        monkeypatch.delitem(sys.modules, name, raising=False)
    return importlib.import_module("userscoring.scoring")


def sbp_config(root: Path, **init_args: str) -> Path:
    config = root / "sbp.yaml"
    entries = "".join(f"        {key}: {value}\n" for key, value in init_args.items())
    config.write_text(
        "trainer:\n  callbacks:\n    - class_path: lightning_sbp.SelectiveBackprop\n      init_args:\n"
        f"        selector: topk\n        keep: 0.5\n{entries}"
    )
    return config


def test_a_plain_function_given_as_score_fn_in_yaml_runs_through_fit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    scoring = scoring_package(tmp_path, monkeypatch)
    assert inspect.signature(scoring.losses).return_annotation is inspect.Signature.empty
    config = sbp_config(tmp_path, score_fn="userscoring.scoring.losses", track_grad_error="false")
    args = ["fit", "--config", str(CONFIGS / "digits_full.yaml"), "--config", str(config)]
    quick = ["--trainer.max_steps=2", "--trainer.limit_val_batches=0", "--trainer.logger=false"]
    assert run([*args, *quick, "--trainer.enable_checkpointing=false", "--trainer.enable_progress_bar=false"]) == 0
    assert scoring.calls == [64, 64], "the function scored both steps of the fit, on whole batches"


@pytest.mark.parametrize("option", ["score_fn", "loss_fn"])
def test_an_unannotated_function_is_accepted_for_either_option(
    option: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    scoring_package(tmp_path, monkeypatch)
    function = "losses" if option == "score_fn" else "squared"
    config = sbp_config(tmp_path, **{option: f"userscoring.scoring.{function}"})
    printed = printed_config(capsys, CONFIGS / "digits_full.yaml", config)
    assert printed["trainer"]["callbacks"][0]["init_args"][option] == f"userscoring.scoring.{function}"


@pytest.mark.parametrize(
    ("path", "reason"),
    [
        ("userscoring.scoring.nothere", "module 'userscoring.scoring' has no attribute 'nothere'"),
        ("nowhere.losses", "No module named 'nowhere'"),
    ],
)
def test_a_wrong_function_path_is_one_error_line(
    path: str, reason: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    scoring_package(tmp_path, monkeypatch)
    monkeypatch.setattr(DigitsDataModule, "setup", lambda *args: pytest.fail("read data despite the wrong path"))
    config = sbp_config(tmp_path, score_fn=path)
    assert run(["fit", "--config", str(CONFIGS / "digits_full.yaml"), "--config", str(config)]) == 2
    (error,) = capsys.readouterr().err.strip().splitlines()
    assert error.startswith(f"error: trainer.callbacks (lightning_sbp.SelectiveBackprop): score_fn '{path}' is not")
    assert reason in error and "dotted import path" in error


def test_help_lists_every_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["--help"]) == 0
    out = capsys.readouterr().out
    assert "{fit,validate,test,compare,profile,demo}" in out.splitlines()[0]
    listed = [match[1] for match in re.finditer(r"^ {4}(\w+) ", out, re.MULTILINE)]
    assert listed == ["fit", "validate", "test", "compare", "profile", "demo"]
    assert set(entry.SUBCOMMANDS) == {*cli.COMMANDS, "compare", "profile", "demo"}


@pytest.mark.parametrize("args", [[], ["predict"], ["predict", "--help"]])
def test_a_missing_or_unknown_subcommand_is_a_clean_error(args: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert run(args) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("lightning-sbp: error:") and "fit" in error and "profile" in error


def test_the_console_script_and_python_m_run_the_dispatcher(capsys: pytest.CaptureFixture[str]) -> None:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"lightning-sbp": "lightning_sbp.entry:main"}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sys, "argv", ["python -m lightning_sbp", "--help"])
        with pytest.raises(SystemExit) as stop:
            runpy.run_module("lightning_sbp", run_name="__main__", alter_sys=True)
    assert stop.value.code == 0
    assert "compare" in capsys.readouterr().out


MODULES = {"compare": "lightning_sbp.compare.command", "profile": "lightning_sbp.profile", "demo": "lightning_sbp.demo"}


@pytest.mark.parametrize(("name", "module_name"), MODULES.items())
def test_compare_profile_and_demo_are_dispatched_to_their_modules(
    name: str, module_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    received: list[list[str]] = []

    def module_main(argv: list[str]) -> int:
        received.append(argv)
        return 3

    module: Any = types.ModuleType(f"lightning_sbp.{name}")
    module.main = module_main
    monkeypatch.setitem(sys.modules, module_name, module)
    monkeypatch.setattr(sys, "argv", ["lightning-sbp", name, "--config", "base.yaml"])
    assert main() == 3
    assert received == [["--config", "base.yaml"]]


@pytest.mark.parametrize("module", MODULES.values())
def test_a_subcommand_without_its_module_is_a_one_line_error(
    module: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, module, None)
    name = module.split(".")[1]
    assert run([name]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: `lightning-sbp {name}` is not available in this installation (no {module})"
    ]


@pytest.mark.skipif(importlib.util.find_spec("lightning_sbp.profile") is None, reason="no lightning_sbp.profile")
def test_profile_help_comes_from_its_module(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["profile", "--help"]) == 0
    assert "--keep" in capsys.readouterr().out


def test_test_subcommand_runs_on_the_digits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    args = [
        "test",
        "--config",
        str(CONFIGS / "digits_omp.yaml"),
        "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
        f"--trainer.logger.save_dir={tmp_path}",
        "--trainer.logger.name=digits",
        "--trainer.limit_test_batches=2",
        "--trainer.enable_progress_bar=false",
    ]
    assert run(args) == 0
    (row,) = csv.DictReader((tmp_path / "digits" / "version_0" / "metrics.csv").open())
    assert 0.0 <= float(row["test/acc"]) <= 1.0 and math.isfinite(float(row["test/loss"]))
    assert not any(key.startswith(("train", "val", "sbp")) and value for key, value in row.items())


def test_fit_without_a_logger_writes_no_config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    args = ["fit", "--config", str(CONFIGS / "digits_full.yaml"), "--trainer.logger=false", "--trainer.max_epochs=1"]
    quick = ["--trainer.limit_train_batches=1", "--trainer.limit_val_batches=1", "--trainer.enable_checkpointing=false"]
    assert run([*args, *quick, "--trainer.enable_progress_bar=false"]) == 0
    assert not list(tmp_path.rglob("config.yaml"))


def test_a_misspelled_callback_argument_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    typo = tmp_path / "typo.yaml"
    typo.write_text(
        "trainer:\n  callbacks:\n    - class_path: lightning_sbp.SelectiveBackprop\n"
        "      init_args:\n        selector: random\n        kepp: 0.3\n"
    )
    monkeypatch.setattr(DigitsDataModule, "setup", lambda *args: pytest.fail("read data despite the typo"))
    assert run(["fit", "--config", str(CONFIGS / "digits_full.yaml"), "--config", str(typo)]) == 2
    (error,) = capsys.readouterr().err.strip().splitlines()
    assert error.startswith("error: trainer.callbacks (lightning_sbp.SelectiveBackprop): unknown argument 'kepp'")
    assert "did you mean 'keep'?" in error
    accepted = error.split("accepted arguments: ")[1].split(", ")
    assert accepted == list(inspect.signature(SelectiveBackprop).parameters)


def test_a_misspelled_selector_argument_names_the_selector(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    typo = tmp_path / "typo.yaml"
    typo.write_text(
        "trainer:\n  callbacks:\n    - class_path: lightning_sbp.SelectiveBackprop\n      init_args:\n"
        "        selector:\n          class_path: lightning_sbp.selectors.LossSelector\n"
        "          init_args: {betta: 2.0}\n"
    )
    assert run(["fit", "--config", str(CONFIGS / "digits_full.yaml"), "--config", str(typo), "--print_config"]) == 2
    (error,) = capsys.readouterr().err.strip().splitlines()
    assert "(lightning_sbp.selectors.LossSelector): unknown argument 'betta'; did you mean 'beta'?" in error


@pytest.mark.parametrize(
    "args",
    [
        ["fit", "--help"],
        ["fit", "--trainer.callbacks.help", "lightning_sbp.SelectiveBackprop"],
        ["fit", "--model.help", "lightning_sbp.recipes.ImageClassifier"],
    ],
    ids=["fit", "callback", "model"],
)
def test_help_texts_carry_no_sphinx_markup(args: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert run(args) == 0
    out = capsys.readouterr().out
    assert out.count("--") > 10
    for markup in ("``", ":class:", ":func:", ":meth:", ":mod:", "`"):
        assert markup not in out, f"{markup!r} in the help of {' '.join(args)}"


def test_the_callback_help_keeps_what_the_markup_named(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["fit", "--trainer.callbacks.help", "lightning_sbp.SelectiveBackprop"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "or a Selector" in out  # from :class:`~lightning_sbp.selectors.Selector`
    assert "0 < keep <= 1" in out  # from ``0 < keep <= 1``


@pytest.mark.parametrize(
    ("text", "plain"),
    [
        (":class:`~lightning_sbp.selectors.Selector`", "Selector"),
        (":func:`lightning_sbp.selectors.available_selectors`", "lightning_sbp.selectors.available_selectors"),
        (":py:meth:`the hook <lightning_sbp.SelectiveBackprop.example_indices>`", "the hook"),
        ('``0 < keep <=\n1`` or ``"auto"``', '0 < keep <=\n1 or "auto"'),
        ("see `the guide <https://example.org/guide>`_ and `N`", "see the guide (https://example.org/guide) and N"),
        ("no markup: a < b, c:d", "no markup: a < b, c:d"),
    ],
)
def test_plain_text(text: str, plain: str) -> None:
    assert cli.plain_text(text) == plain


def test_is_selective_backprop() -> None:
    assert cli.is_selective_backprop("lightning_sbp.SelectiveBackprop")
    assert cli.is_selective_backprop("lightning_sbp.callback.SelectiveBackprop")
    assert cli.is_selective_backprop("somewhere.not.installed.SelectiveBackprop")
    assert not cli.is_selective_backprop("lightning.pytorch.callbacks.ModelCheckpoint")
    assert not cli.is_selective_backprop("somewhere.not.installed.Callback")


@pytest.mark.parametrize(
    "unknown",
    [
        "Option 'kepp' is not accepted",  # jsonargparse 4.3x and later
        "'Configuration check failed :: No action for key \"kepp\" to check its value.'",  # 4.27
    ],
)
def test_unknown_argument_summary_reads_either_jsonargparse_wording(unknown: str) -> None:
    where = "Parser key \"trainer.callbacks\":\n  - Problem with given class_path 'lightning_sbp.SelectiveBackprop':"
    message = f"{where}\n    {unknown}"
    summary = cli.unknown_argument_summary(message)
    assert summary is not None
    assert summary.startswith("trainer.callbacks (lightning_sbp.SelectiveBackprop): unknown argument 'kepp'; ")
    assert "did you mean 'keep'?" in summary
    assert str(cli.unknown_argument_summary(message.replace("kepp", "zzzzzz"))).endswith(
        "unknown argument 'zzzzzz'; accepted arguments: " + ", ".join(inspect.signature(SelectiveBackprop).parameters)
    )
    assert cli.unknown_argument_summary(message.replace("lightning_sbp.SelectiveBackprop", "not.a.Class")) is None
    assert cli.unknown_argument_summary('Parser key "trainer.max_epochs": Expected an int') is None
    # A known argument with a value of the wrong type is not an unknown argument of the base class.
    wrong_type = message.replace("kepp", "keep").replace("lightning_sbp.SelectiveBackprop", "lightning.Callback")
    assert cli.unknown_argument_summary(wrong_type) is None
