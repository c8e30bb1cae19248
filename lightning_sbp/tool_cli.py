"""A user's configuration, built for a command that trains it under trainer settings of its own.

``compare`` and ``profile`` build the model, data and callbacks of any LightningCLI configuration,
then train them with settings the configuration does not have: no progress bar, no checkpoints,
another logger, a few steps. Lightning refuses some configured callbacks next to such settings (a
progress bar when the bar is off, a ``ModelCheckpoint`` when checkpointing is off), and the
``Trainer`` appends the callbacks it adds itself (its progress bar, its model summary) to the very
list it is given, which LightningCLI shares between the trainers it builds. :class:`ToolCLI` gives
every trainer a list of its own and leaves out the configured callbacks its settings turn off;
every other callback (learning-rate monitors, early stopping, a user's own) is kept.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, ModelSummary, ProgressBar
from lightning.pytorch.loggers import Logger

from lightning_sbp.cli import SelectiveBackpropCLI

__all__ = ["DiscardingLogger", "ToolCLI", "turned_off"]


def turned_off(callback: Callback, settings: Mapping[str, Any]) -> bool:
    """Whether the trainer settings turn ``callback`` off: a progress bar, checkpoint or summary they disable."""
    switches: tuple[tuple[type, str], ...] = (
        (ProgressBar, "enable_progress_bar"),
        (ModelCheckpoint, "enable_checkpointing"),
        (ModelSummary, "enable_model_summary"),
    )
    return any(isinstance(callback, kind) and settings.get(switch) is False for kind, switch in switches)


class ToolCLI(SelectiveBackpropCLI):
    """The command's LightningCLI, whose trainers take the configured callbacks their settings allow.

    Build it with ``run=False``; :meth:`instantiate_trainer` can then be called once per fit, with
    the fit's own trainer settings and extra callbacks.

    Args:
        args: the LightningCLI arguments.
        leave_out: callbacks of these types are never handed to a trainer (``profile`` leaves out
            early stopping and tuners, which would change what it times).
        **kwargs: further ``SelectiveBackpropCLI`` arguments.
    """

    def __init__(self, args: Any = None, leave_out: tuple[type, ...] = (), **kwargs: Any) -> None:
        self.leave_out = leave_out
        super().__init__(args=args, **kwargs)

    def configured_callbacks(self) -> list[Callback]:
        """The callbacks built from ``trainer.callbacks``, as configured (a new list)."""
        config = self.config_init.get(str(self.subcommand), self.config_init)
        trainer = config.get("trainer") or {}
        return _as_list(trainer.get("callbacks"))

    def instantiate_trainer(self, **kwargs: Any) -> pl.Trainer:
        """A trainer with the configuration's settings updated by ``kwargs``.

        Its callbacks are the configured ones its settings allow, then ``kwargs["callbacks"]``, in a
        list of its own.
        """
        config = self.config_init.get(str(self.subcommand), self.config_init)
        settings = {**(config.get("trainer") or {}), **kwargs}
        extra = _as_list(kwargs.get("callbacks"))
        kept = [
            callback
            for callback in self.configured_callbacks()
            if not isinstance(callback, self.leave_out) and not turned_off(callback, settings)
        ]
        kwargs["callbacks"] = [*kept, *extra]
        return super().instantiate_trainer(**kwargs)


class DiscardingLogger(Logger):
    """A logger that writes nothing: callbacks that need a logger (``LearningRateMonitor``) still run."""

    @property
    def name(self) -> str:
        """``discarded``."""
        return "discarded"

    @property
    def version(self) -> int:
        """0."""
        return 0

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Discard ``metrics``."""

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        """Discard ``params``."""


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    return list(value) if isinstance(value, list | tuple) else [value]
