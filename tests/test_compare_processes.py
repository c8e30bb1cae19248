"""Comparison cells on two CPU devices (gloo): in this process's launcher, with ``--cell`` and on a local Ray.

Every grid trains on the whole digits training set for one epoch with ``devices=2``. The
configuration names ``ddp_models.FailOnRank``, which makes rank 1 of every selective run raise at
its second batch and leaves ``full`` and ``small-batch`` alone; a failing rank is tested with
``ddp`` and ``ddp_spawn``, whose ranks report their errors differently, and not again on Ray, where
the same code records it. A ``sitecustomize`` on the path of the cells' processes notes every
write of a ``record.json``, with the writer's process and rank.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import compare, trainer
from lightning.pytorch.plugins.environments import LightningEnvironment

from lightning_sbp.compare import runner
from lightning_sbp.compare.processes import ProcessJob, RankFailure, starts_processes
from lightning_sbp.recipes import DigitsDataModule

ROOT = Path(__file__).resolve().parents[1]
BASE = ROOT / "examples" / "configs" / "digits_full.yaml"
FAILURE = "rank 1: RuntimeError: this rank fails on purpose"


SETTINGS = (
    "trainer.max_epochs=1",
    "trainer.limit_val_batches=1",
    "trainer.num_sanity_val_steps=0",
    "trainer.accelerator=cpu",
    "trainer.devices=2",
    "trainer.callbacks=[{class_path: ddp_models.FailOnRank}]",
)


def grid(strategy: str, *methods: str) -> list[str]:
    settings = [arg for setting in (*SETTINGS, f"trainer.strategy={strategy}") for arg in ("--set", setting)]
    return ["--base", str(BASE), "--methods", *methods, "--keep", "0.5", "--threads", "1", "--no-progress", *settings]


def records(output: Path) -> dict[str, dict[str, Any]]:
    """The records of ``output`` by method."""
    found = [json.loads(path.read_text()) for path in (output / "runs").glob("*/record.json")]
    return {record["method"]: record for record in found}


_RECORD_WRITES = """
import os
import sys


def _note_record_writes(event, args):
    log = os.environ.get("SBP_TEST_RECORD_WRITES")
    if log and event == "os.rename" and str(args[1]).endswith("record.json"):
        run_id = os.path.basename(os.path.dirname(args[1]))
        with open(log, "a") as file:
            file.write(f"{os.getpid()} {os.environ.get('LOCAL_RANK', '-')} {run_id}\\n")


sys.addaudithook(_note_record_writes)
"""


class RecordWrites:
    """Who wrote which ``record.json``: a line ``pid local-rank run-id`` per write, here and in the cells' processes."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.log = folder / "writes.txt"

    def lines(self) -> list[str]:
        return self.log.read_text().splitlines() if self.log.exists() else []

    def of(self, run_id: str, until: int | None = None) -> list[tuple[int, str]]:
        """The writes of ``run_id``, among the first ``until`` writes (all by default)."""
        lines = self.lines()[:until]
        return [(int(pid), rank) for pid, rank, run in (line.split() for line in lines) if run == run_id]


@pytest.fixture(scope="module")
def writes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RecordWrites]:
    folder = tmp_path_factory.mktemp("sitecustomize")
    (folder / "sitecustomize.py").write_text(_RECORD_WRITES)
    namespace: dict[str, Any] = {}
    exec(_RECORD_WRITES, namespace)  # the same hook in this process; it stays, inert once the variable is gone
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SBP_TEST_RECORD_WRITES", str(folder / "writes.txt"))
        patch.syspath_prepend(str(folder))  # the cells' processes get this process's path
        yield RecordWrites(folder)


def training_examples() -> int:
    """Examples the two ranks see in one epoch: the training split, padded by the sampler to a multiple of 2."""
    data = DigitsDataModule(image_size=8, val_fraction=0.2, split_seed=0)
    data.setup("fit")
    return 2 * math.ceil(len(data.train_dataloader().dataset) / 2)


@pytest.fixture(scope="module")
def in_process(tmp_path_factory: pytest.TempPathFactory, writes: RecordWrites) -> tuple[Path, int, str, int]:
    """The output, status and error output of a grid run in this process, and the count of writes then."""
    output = tmp_path_factory.mktemp("ddp") / "out"
    capture = tmp_path_factory.mktemp("ddp") / "stderr.txt"
    with capture.open("w") as err, pytest.MonkeyPatch.context() as patch:
        patch.setattr(sys, "stderr", err)
        status = compare([*grid("ddp", "full", "random"), "--output", str(output)])
    return output, status, capture.read_text(), len(writes.lines())


def test_ddp_cells_train_in_their_own_processes_and_rank_zero_writes_their_records(
    in_process: tuple[Path, int, str, int], writes: RecordWrites
) -> None:
    # Only the in-process run's writes: the Ray test, whichever order the tests run in, adds its own.
    output, status, err, written = in_process
    found = records(output)
    assert status == 1 and set(found) == {"full", "random"}
    full = found["full"]
    assert full["status"] == "finished" and full["world_size"] == 2 and full["threads"] == 1
    assert len(full["rank_train_seconds"]) == 2 and full["train_seconds"] == max(full["rank_train_seconds"])
    examples = training_examples()
    assert full["examples_seen"] == full["examples_backpropagated"] == examples  # both ranks', not rank zero's
    assert full["optimizer_steps"] == math.ceil(examples / 2 / 64)
    [(pid, rank)] = writes.of(full["run_id"], written)
    assert pid != os.getpid() and rank == "0"

    failed = found["random"]
    assert failed["status"] == "failed" and failed["error"] == FAILURE and failed["world_size"] == 2
    assert f"{failed['run_id']}: failed: {FAILURE}\n" in err
    run_dir = output / "runs" / failed["run_id"]
    assert "in on_train_batch_start" in (run_dir / "error.txt").read_text()
    assert FAILURE in (run_dir / "output.log").read_text()
    # Rank zero was stopped: the launcher records it.
    assert writes.of(failed["run_id"], written) == [(os.getpid(), "-")]
    with (output / "summary.csv").open() as table:
        assert [row["method"] for row in csv.DictReader(table)] == ["full"]


def test_resuming_trains_only_the_cells_without_a_finished_record(
    in_process: tuple[Path, int, str, int],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # A copy: resuming rewrites the failed cell's record, which the other tests read.
    output = tmp_path / "out"
    shutil.copytree(in_process[0], output)
    trained: list[str] = []

    def refuse_to_start(job: ProcessJob, log: Path, threads: int | None, world_size: int) -> RankFailure:
        trained.append(job.args[0].method)
        return RankFailure(rank=1, error="rank 1: not trained again in this test", details="", time=0.0)

    monkeypatch.setattr(runner, "run_in_processes", refuse_to_start)
    assert compare([*grid("ddp", "full", "random"), "--output", str(output)]) == 1
    assert trained == ["random"]
    assert "reused 1 finished runs of 2; 1 to train" in capsys.readouterr().err


def test_ddp_spawn_cells_with_cell(tmp_path: Path, writes: RecordWrites, capsys: pytest.CaptureFixture[str]) -> None:
    output = tmp_path / "out"
    args = [*grid("ddp_spawn", "small-batch", "random"), "--output", str(output)]
    assert compare([*args, "--cell", "1"]) == 1
    failed = records(output)["random"]
    assert failed["error"] == FAILURE
    assert capsys.readouterr().out == f"{failed['run_id']}: failed: {FAILURE}\n"

    assert compare([*args, "--cell", "0"]) == 0
    small = records(output)["small-batch"]
    assert small["status"] == "finished" and small["world_size"] == 2
    # As many steps per rank as the runs on batches of 64 take (not as they take on both ranks), on batches of 32.
    steps = math.ceil(training_examples() / 2 / 64)
    assert small["optimizer_steps"] == steps and small["examples_seen"] == 2 * steps * 32
    assert f"limit_train_batches: {steps}\n" in (output / "runs" / small["run_id"] / "config.yaml").read_text()
    [(pid, rank)] = writes.of(small["run_id"])  # written in the spawned rank zero
    assert pid != os.getpid() and rank == "0"

    capsys.readouterr()
    assert compare([*args, "--cell", "0"]) == 0
    assert "has finished already" in capsys.readouterr().out
    assert writes.of(small["run_id"]) == [(pid, rank)]


@pytest.fixture(scope="module")
def ray_session(writes: RecordWrites) -> Iterator[Any]:
    ray = pytest.importorskip("ray")
    # Ray's workers do not get this process's path: they import the test helpers through PYTHONPATH.
    path = os.pathsep.join([str(writes.folder), str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PYTHONPATH", path)
        ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield ray
    ray.shutdown()


def test_ddp_cells_on_ray_train_what_they_train_in_process(
    ray_session: Any, in_process: tuple[Path, int, str, int], tmp_path: Path, writes: RecordWrites
) -> None:
    output = tmp_path / "out"
    assert compare([*grid("ddp", "full"), "--output", str(output), "--launcher", "ray"]) == 0
    here, there = records(in_process[0])["full"], records(output)["full"]
    assert there["status"] == "finished" and there["world_size"] == 2 and there["run_id"] == here["run_id"]
    for key in ("final", "optimizer_steps", "examples_seen", "examples_backpropagated", "threads"):
        assert there[key] == here[key], key
    assert [rank for _, rank in writes.of(there["run_id"])] == ["0", "0"]  # once in process, once on Ray


SLURM_TASK = {
    "SLURM_NTASKS": "2",
    "SLURM_NTASKS_PER_NODE": "2",
    "SLURM_NNODES": "1",
    "SLURM_JOB_NAME": "cells",
    "SLURM_JOB_ID": "1234",
    "SLURM_NODELIST": "localhost",
    "SLURM_PROCID": "0",
    "SLURM_LOCALID": "0",
    "SLURM_NODEID": "0",
    "MASTER_ADDR": "127.0.0.1",  # Lightning's SLURM environment sets it when asked for it
}


def test_a_run_starts_processes_when_lightning_starts_its_ranks(monkeypatch: pytest.MonkeyPatch) -> None:
    assert not starts_processes(trainer(devices=1))
    assert starts_processes(trainer(devices=2, strategy="ddp"))
    assert starts_processes(trainer(devices=2, strategy="ddp_spawn"))
    for name, value in SLURM_TASK.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=r"started outside Lightning \(SLURMEnvironment\).*LightningEnvironment"):
        starts_processes(trainer(devices=2, strategy="ddp"))
    assert starts_processes(trainer(devices=2, strategy="ddp", plugins=[LightningEnvironment()]))
