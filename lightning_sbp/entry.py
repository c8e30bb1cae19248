"""The ``lightning-sbp`` command: one dispatcher over its subcommands.

``fit``, ``validate`` and ``test`` (and any leading option, such as ``--config``) go to the
LightningCLI in :mod:`lightning_sbp.cli`; ``compare`` goes to ``lightning_sbp.compare.command.main``,
``profile`` to ``lightning_sbp.profile.main`` and ``demo`` to ``lightning_sbp.demo.main``. Each of
those takes the arguments after its name and returns an exit status. They are imported only when
named, so ``lightning-sbp fit`` loads none of them, and the modules below this one never import it:
the dependencies point one way (dispatcher, then ``demo``, ``compare`` and ``profile``, then the CLI
class).

Run it as ``lightning-sbp ...`` or ``python -m lightning_sbp ...``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

__all__ = ["SUBCOMMANDS", "main"]

SUBCOMMANDS: dict[str, str] = {
    "fit": "train a model from a LightningCLI configuration (--config CONFIG.yaml)",
    "validate": "run one validation epoch from a LightningCLI configuration",
    "test": "run one test epoch from a LightningCLI configuration",
    "compare": "run a grid of selectors against full training on one base configuration",
    "profile": "time a configuration's model and data: will Selective Backprop pay off on it?",
    "demo": "run the packaged comparison grid (digits, every selector, label noise) in a few minutes",
}
"""Every subcommand of ``lightning-sbp`` with its one-line summary."""

_MODULES = {
    "compare": "lightning_sbp.compare.command",
    "profile": "lightning_sbp.profile",
    "demo": "lightning_sbp.demo",
}
"""The subcommands that live in a module of their own, whose ``main(argv) -> int`` runs them."""

_EPILOG = "Each subcommand has its own help: lightning-sbp SUBCOMMAND --help."


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``lightning-sbp``.

    Args:
        argv: the arguments after the program name; ``None`` reads ``sys.argv[1:]``.

    Returns:
        The exit status: 0 on success; ``compare`` returns 1 when some of its runs failed.

    Raises:
        SystemExit: for ``--help``, and with status 2 for bad input (an unknown subcommand, a wrong
            configuration) or 1 for a dataset missing from disk.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    first = args[0] if args else ""
    if first in _MODULES:
        return _run_module(first, args[1:])
    if first in SUBCOMMANDS or (first.startswith("-") and first not in ("-h", "--help")):
        from lightning_sbp.cli import main as run_lightning_cli

        return run_lightning_cli(None if argv is None else args)
    _parser().parse_args(args[:1])  # prints the help, or exits with the error for a missing or unknown subcommand
    raise SystemExit(2)


def _run_module(name: str, argv: list[str]) -> int:
    try:
        run = _load(name)
    except ModuleNotFoundError as err:
        if err.name != _MODULES[name]:
            raise
        sys.stderr.write(f"error: `lightning-sbp {name}` is not available in this installation (no {err.name})\n")
        raise SystemExit(2) from None
    return int(run(argv) or 0)


def _load(name: str) -> Callable[[list[str]], int | None]:
    """The ``main`` of the module behind the subcommand ``name``, imported only now."""
    if name == "compare":
        from lightning_sbp.compare.command import main as compare

        return compare
    if name == "demo":
        from lightning_sbp.demo import main as demo

        return demo
    from lightning_sbp.profile import main as profile

    return profile


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lightning-sbp",
        description="Selective Backprop for PyTorch Lightning: forward every example, backpropagate a subset.",
        epilog=_EPILOG,
    )
    commands = parser.add_subparsers(title="subcommands", metavar="{" + ",".join(SUBCOMMANDS) + "}", required=True)
    for name, summary in SUBCOMMANDS.items():
        commands.add_parser(name, help=summary, add_help=False)
    return parser
