"""Where the cells of a comparison train: in this process, or as tasks on a Ray cluster.

A launcher changes where a cell trains, not what it computes: every cell goes through
:func:`~lightning_sbp.compare.runner.run_cell` (same seeds, same thread setting, same warm-up),
which writes the cell's record into the output directory. On a cluster that directory must be on
a filesystem every node shares. The third way, one cell per command for an outside scheduler
(``compare --cell I``), calls :func:`~lightning_sbp.compare.runner.run_cell` directly.
"""

from __future__ import annotations

import logging
import traceback
import warnings
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

from lightning_sbp.compare.grid import GridError, Run
from lightning_sbp.compare.runner import BaseInfo, CellJob, Launcher

__all__ = ["LAUNCHERS", "InProcessLauncher", "RayLauncher", "cell_resources", "make_launcher"]

LAUNCHERS = ("in-process", "ray")
"""The names ``compare --launcher`` accepts."""

_RAY_MISSING = "--launcher ray needs Ray, which is not installed: pip install 'lightning-sbp[cluster]'"


class InProcessLauncher:
    """Train the cells in this process, one after another, in grid order."""

    in_process = True

    def run(
        self,
        runs: Sequence[Run],
        job: CellJob,
        finished: Callable[[Run, dict[str, Any]], None],
        status: Callable[[str], None],
    ) -> None:
        """Train every run with ``job``; a failed fit is recorded by the job and the next run goes on."""
        for run in runs:
            status(run.run_id)
            finished(run, job(run))


class RayLauncher:
    """Train every cell as a Ray task that asks for the resources of one run of the base configuration.

    The driver connects to the cluster at ``address``; without one, to the cluster that
    ``ray.init(address="auto")`` finds, or else to a new local one, which it shuts down at the end.
    A session already started in this process (``ray.init(...)`` before the comparison) is used as
    it is. A task that dies (its worker crashed or was killed) is recorded as failed by the driver.
    On ``KeyboardInterrupt`` the outstanding tasks are cancelled; their runs have no record, so the
    next command trains them again.

    Args:
        address: the Ray cluster to connect to (``ray.init(address=...)``), e.g. ``ray://head:10001``.

    Raises:
        GridError: if Ray is not installed.
    """

    in_process = False

    def __init__(self, address: str | None = None) -> None:
        self.address = address
        self._ray = _import_ray()

    def run(
        self,
        runs: Sequence[Run],
        job: CellJob,
        finished: Callable[[Run, dict[str, Any]], None],
        status: Callable[[str], None],
    ) -> None:
        """Submit every run, then report each one as its task ends, in the order they end."""
        ray = self._ray
        own_session = self._connect()
        pending: dict[Any, Run] = {}
        try:
            cluster = ray.cluster_resources()
            resources = cell_resources(job.base, job.grid.threads, cluster.get("GPU", 0) > 0)
            _check_fits(resources, cluster, autoscaled=not own_session)
            task = ray.remote(_train_cell).options(**resources)
            for run in runs:
                pending[task.remote(job, run)] = run
            status(f"{len(runs)} Ray tasks")
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                run = pending.pop(done[0])
                try:
                    record = ray.get(done[0])
                except ray.exceptions.RayError as err:
                    record = job.failed(run, _cause(err), "".join(traceback.format_exception(err)))
                finished(run, record)
        except BaseException:
            for ref in pending:
                ray.cancel(ref, force=True)
            raise
        finally:
            if own_session:
                ray.shutdown()

    def _connect(self) -> bool:
        """Connect to the cluster unless this process already is; return whether this call connected."""
        ray = self._ray
        if ray.is_initialized():
            return False
        quiet: dict[str, Any] = {"logging_level": logging.WARNING}
        where = f"the Ray cluster at {self.address}" if self.address is not None else "a local Ray instance"
        try:
            if self.address is not None:
                ray.init(address=self.address, **quiet)
                return True
            try:
                ray.init(address="auto", **quiet)
            except ConnectionError:
                ray.init(include_dashboard=False, **quiet)
        except Exception as err:  # Ray raises plain exceptions for a node that does not start
            raise GridError(f"--launcher ray could not reach {where}: {' '.join(str(err).split())}") from None
        return True


def make_launcher(name: str, ray_address: str | None = None) -> Launcher:
    """The launcher called ``name`` (one of :data:`LAUNCHERS`).

    Raises:
        GridError: for an unknown name, a Ray address without the Ray launcher, or Ray not installed.
    """
    if name not in LAUNCHERS:
        raise GridError(f"unknown launcher {name!r}; launchers: {', '.join(LAUNCHERS)}")
    if name == "ray":
        return RayLauncher(ray_address)
    if ray_address is not None:
        raise GridError("--ray-address needs --launcher ray")
    return InProcessLauncher()


def cell_resources(base: BaseInfo, threads: int | None, cluster_has_gpus: bool) -> dict[str, float]:
    """The Ray resources one cell asks for: the GPUs of ``trainer.devices`` and a CPU per thread and device.

    A run uses GPUs when ``trainer.accelerator`` is ``gpu`` or ``cuda``, or ``auto`` on a cluster
    with GPUs; it then needs ``trainer.devices`` as a count (or a list) of GPUs. Each of its
    devices is a process (a rank, when there are several) with ``threads`` CPUs (1 when the grid
    does not set them). The task holds them all, and the fit starts its ranks inside it.

    Raises:
        GridError: for a GPU run whose ``trainer.devices`` is not a count.
    """
    accelerator = (base.accelerator or "auto").lower()
    devices = _device_count(base.devices)
    cpus = float(threads or 1)
    if accelerator in ("gpu", "cuda") or (accelerator == "auto" and cluster_has_gpus):
        if devices is None:
            raise GridError(
                f"--launcher ray needs trainer.devices as a number of GPUs per run, got {base.devices!r}; "
                "set it in the base configuration or with --set trainer.devices=1"
            )
        return {"num_cpus": cpus * devices, "num_gpus": float(devices)}
    return {"num_cpus": cpus * (devices or 1), "num_gpus": 0.0}


def _check_fits(resources: dict[str, float], cluster: dict[str, float], autoscaled: bool) -> None:
    """Refuse runs larger than a local Ray instance (Ray would wait for them forever); warn on a cluster.

    Raises:
        GridError: if a run asks for more CPUs or GPUs than the local instance has.
    """
    for request, name in (("num_cpus", "CPU"), ("num_gpus", "GPU")):
        needed, total = resources[request], cluster.get(name, 0.0)
        if needed <= total:
            continue
        message = f"each run asks Ray for {needed:g} {name}s, and the Ray cluster has {total:g}"
        if not autoscaled:
            raise GridError(f"{message}; lower `threads` or trainer.devices")
        warnings.warn(f"{message}: the runs wait until nodes with enough join the cluster", stacklevel=2)


def _device_count(devices: Any) -> int | None:
    """How many devices ``trainer.devices`` names; ``None`` for ``auto`` and ``-1`` (every device)."""
    if isinstance(devices, list | tuple):
        return len(devices)
    if isinstance(devices, str):
        text = devices.strip()
        if "," in text:
            return len([part for part in text.split(",") if part.strip()])
        devices = int(text) if text.lstrip("-").isdigit() else None
    if isinstance(devices, int) and not isinstance(devices, bool) and devices > 0:
        return devices
    return None


def _train_cell(job: CellJob, run: Run) -> dict[str, Any]:
    """The Ray task: train one cell in the worker and write its record."""
    return job(run)


def _cause(err: BaseException) -> BaseException:
    """The error a task raised (``RayTaskError`` wraps it), or the Ray error itself."""
    cause = getattr(err, "cause", None)
    return cause if isinstance(cause, BaseException) else err


def _import_ray() -> ModuleType:
    try:
        import ray
    except ImportError:
        raise GridError(_RAY_MISSING) from None
    return ray
