"""The demo from a built wheel, installed in a fresh virtual environment, run from outside the repository.

It builds a wheel, creates a virtual environment and installs the wheel with its ``demo`` extra,
then runs a two-run demo: about half a minute, so it is marked ``packaging`` and left out of the
default run; ``make test-packaging`` (part of CI) runs it. The new environment sees this one's
installed packages (torch, Lightning...) as its own site directory, without this project's editable
install, so pip resolves every dependency offline (``--no-index``) and installs the wheel alone.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _build_wheel(tmp_path: Path) -> Path:
    """A wheel of the sources, built from a copy (the build leaves its folders beside the sources)."""
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "lightning_sbp", source / "lightning_sbp", ignore=shutil.ignore_patterns("__pycache__"))
    dist = tmp_path / "dist"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", dist, source], check=True)
    (wheel,) = dist.glob("lightning_sbp-*.whl")
    return wheel


def _fresh_environment(tmp_path: Path) -> Path:
    """A new virtual environment whose site directory lists this environment's packages, but not this project."""
    env = tmp_path / "env"
    venv.create(env, with_pip=False)
    packages = tmp_path / "packages"
    packages.mkdir()
    for entry in Path(sysconfig.get_paths()["purelib"]).iterdir():
        if "lightning_sbp" not in entry.name and not entry.name.startswith("__editable__"):
            (packages / entry.name).symlink_to(entry)
    python = env / "bin" / "python"
    purelib = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    # A line that starts with "import" runs: the folder becomes a site directory, its own .pth files included.
    (Path(purelib) / "shared_packages.pth").write_text(f"import site; site.addsitedir({str(packages)!r})\n")
    return env


@pytest.mark.packaging
def test_the_demo_runs_from_an_installed_wheel(tmp_path: Path) -> None:
    wheel = _build_wheel(tmp_path)
    env = _fresh_environment(tmp_path)
    python = env / "bin" / "python"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--disable-pip-version-check",
            "--python",
            str(python),
            "install",
            "--no-index",
            "-q",
            f"{wheel}[demo]",
        ],
        check=True,
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    clean = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "VIRTUAL_ENV")}
    where = subprocess.run(
        [python, "-c", "import lightning_sbp.demo as demo; print(demo.GRID)"],
        cwd=elsewhere,
        env=clean,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    assert Path(where).is_relative_to(env) and Path(where).is_file()  # the wheel's copy, not the sources

    demo = [
        env / "bin" / "lightning-sbp",
        "demo",
        "--methods",
        "full",
        "random",
        "--seeds",
        "0",
        "--label-noise",
        "0.3",
        "--set",
        "trainer.max_epochs=1",
        "--set",
        "trainer.limit_train_batches=2",
        "--set",
        "trainer.limit_val_batches=1",
        "--no-progress",
    ]
    finished = subprocess.run(demo, cwd=elsewhere, env=clean, capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stderr
    output = elsewhere / "sbp-demo"
    assert (output / "summary.md").is_file()
    records = [json.loads(path.read_text()) for path in (output / "runs").glob("*/record.json")]
    assert sorted(record["method"] for record in records) == ["full", "random"]
    assert json.loads((output / "compare.json").read_text())["base"] == str(Path(where).parent / "base.yaml")
