"""The ``lightning-sbp`` command: LightningCLI with ``fit``, ``validate`` and ``test``, plus ``compare``.

Models and data are named by ``class_path`` in YAML (``model: {class_path: ..., init_args: ...}``),
and Selective Backprop is a callback under ``trainer.callbacks``::

    trainer:
      callbacks:
        - class_path: lightning_sbp.SelectiveBackprop
          init_args: {selector: omp, keep: 0.5}

Configuration errors (an unknown selector, ``keep`` outside ``(0, 1]``, ``start >= end``, an unknown
backbone, ...) stop the command before any data is read, with ``error: ...`` and exit status 2.
A dataset missing from disk stops it with ``error: ...`` and exit status 1.

``lightning-sbp compare ...`` hands its arguments to ``lightning_sbp.compare.main``.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

from jsonargparse import ArgumentParser, Namespace
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.cli import LightningCLI

import lightning_sbp
import lightning_sbp.recipes  # makes the recipe classes known to jsonargparse by their short names
from lightning_sbp.callback import SelectiveBackprop
from lightning_sbp.recipes.data import DatasetNotFoundError

__all__ = ["COMMANDS", "SelectiveBackpropCLI", "main"]

COMMANDS = ("fit", "validate", "test")
"""The LightningCLI subcommands of ``lightning-sbp``; ``compare`` is dispatched separately."""

_DESCRIPTION = (
    "Selective Backprop for PyTorch Lightning. Subcommands: fit, validate and test take a LightningCLI "
    "configuration (see examples/configs); compare runs a grid of selectors on one base configuration "
    "(lightning-sbp compare --help)."
)


class SelectiveBackpropCLI(LightningCLI):
    """LightningCLI whose model and data are any ``LightningModule`` and ``LightningDataModule`` named in the config.

    Differences from ``LightningCLI``: only the ``fit``, ``validate`` and ``test`` subcommands; an
    existing ``config.yaml`` in the log directory is overwritten; errors raised while building the
    configured objects (``ValueError`` and Lightning's ``MisconfigurationException``) become a parser
    error (``error: ...``, exit status 2) instead of a traceback. Every ``SelectiveBackprop`` callback
    is built and checked before the model and the data, so a wrong argument fails before anything
    heavy happens, with the callback's own message.

    Another command can reuse it with ``run=False`` and a dict or list of ``args``.

    Args:
        args: command-line arguments; ``None`` reads ``sys.argv``.
        run: run the subcommand after building the objects.
        **kwargs: further ``LightningCLI`` arguments.
    """

    def __init__(self, args: Any = None, run: bool = True, **kwargs: Any) -> None:
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("parser_kwargs", {"description": _DESCRIPTION})
        super().__init__(
            model_class=None,
            datamodule_class=None,
            subclass_mode_model=True,
            subclass_mode_data=True,
            args=args,
            run=run,
            **kwargs,
        )

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """``fit``, ``validate`` and ``test`` with the trainer-method arguments they skip."""
        available = LightningCLI.subcommands()
        return {name: available[name] for name in COMMANDS}

    def before_instantiate_classes(self) -> None:
        """Build each configured ``SelectiveBackprop`` once on its own, so that a wrong argument fails first.

        Building it alone also keeps its own error message, which jsonargparse would otherwise bury in
        the list of every type the ``callbacks`` argument accepts.
        """
        config = self.config.get(str(self.subcommand), self.config)
        callbacks = config.get("trainer.callbacks") or []
        if not isinstance(callbacks, list):
            callbacks = [callbacks]
        for position, entry in enumerate(callbacks):
            class_path = entry.get("class_path") if isinstance(entry, Namespace) else None
            if not isinstance(class_path, str) or not _is_selective_backprop(class_path):
                continue
            try:
                _instantiate_callback(entry)
            except (ValueError, TypeError) as err:
                self._parser(self.subcommand).error(f"trainer.callbacks[{position}] ({class_path}): {err}")

    def instantiate_classes(self) -> None:
        """Build callbacks, model, data and trainer; report configuration errors as parser errors."""
        try:
            super().instantiate_classes()
        except (ValueError, MisconfigurationException) as err:
            self._parser(self.subcommand).error(str(err))


def _is_selective_backprop(class_path: str) -> bool:
    module_name, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError, ValueError):
        return False
    return isinstance(cls, type) and issubclass(cls, SelectiveBackprop)


def _instantiate_callback(entry: Namespace) -> Callback:
    """Instantiate one ``{class_path, init_args}`` callback entry, raising its own errors unwrapped."""
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--callback", type=Callback)
    config = parser.parse_object({"callback": entry.clone().as_dict()})
    instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes
    return instantiate(config).callback


def _run_compare(args: list[str]) -> Any:
    try:
        compare = importlib.import_module("lightning_sbp.compare")
    except ModuleNotFoundError as err:
        if err.name != "lightning_sbp.compare":
            raise
        sys.stderr.write(
            "error: `lightning-sbp compare` is not available: this installation of lightning-sbp "
            f"{lightning_sbp.__version__} has no lightning_sbp.compare module\n"
        )
        raise SystemExit(2) from None
    return compare.main(args)


def main(args: list[str] | None = None) -> Any:
    """Entry point of the ``lightning-sbp`` console script.

    Args:
        args: the arguments after the program name; ``None`` reads ``sys.argv[1:]``.

    Returns:
        What ``lightning_sbp.compare.main`` returns for ``compare`` (an exit status or ``None``);
        ``None`` for the LightningCLI subcommands.

    Raises:
        SystemExit: with status 2 for configuration errors and 1 for missing datasets.
    """
    argv = sys.argv[1:] if args is None else list(args)
    if argv and argv[0] == "compare":
        return _run_compare(argv[1:])
    try:
        SelectiveBackpropCLI(args=args)
    except DatasetNotFoundError as err:
        sys.stderr.write(f"error: {err}\n")
        raise SystemExit(1) from None
    return None


if __name__ == "__main__":
    sys.exit(main())
