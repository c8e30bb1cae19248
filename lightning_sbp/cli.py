"""The LightningCLI behind ``lightning-sbp fit``, ``validate`` and ``test``.

Models and data are named by ``class_path`` in YAML (``model: {class_path: ..., init_args: ...}``),
and Selective Backprop is a callback under ``trainer.callbacks``::

    trainer:
      callbacks:
        - class_path: lightning_sbp.SelectiveBackprop
          init_args: {selector: omp, keep: 0.5}

Configuration errors (an unknown selector, ``keep`` outside ``(0, 1]``, ``start >= end``, an unknown
backbone, ...) stop the command before any data is read, with ``error: ...`` and exit status 2.
A misspelled argument of a configured class is one line too, naming the accepted arguments and the
closest one. A dataset missing from disk stops it with ``error: ...`` and exit status 1. Help texts
come from docstrings, shown without their Sphinx markup.

The ``lightning-sbp`` command itself, with ``compare`` and ``profile`` beside these three, is the
dispatcher in :mod:`lightning_sbp.entry`; this module knows nothing of the other subcommands.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import re
import sys
from typing import Any, NoReturn

import lightning.pytorch as pl
from jsonargparse import ActionConfigFile, ArgumentParser, DefaultHelpFormatter, Namespace
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback

import lightning_sbp.recipes  # noqa: F401  (makes the recipe classes known to jsonargparse by their short names)
from lightning_sbp.callback import SelectiveBackprop
from lightning_sbp.recipes.data import DatasetNotFoundError
from lightning_sbp.scoring import ScoringError

__all__ = [
    "COMMANDS",
    "PlainHelpFormatter",
    "SelectiveBackpropCLI",
    "SelectiveBackpropParser",
    "is_selective_backprop",
    "main",
    "plain_text",
    "rejected_class_summary",
    "unknown_argument_summary",
    "unusable_function_summary",
    "wrong_type_summary",
]

COMMANDS = ("fit", "validate", "test")
"""The LightningCLI subcommands of ``lightning-sbp``."""

_DESCRIPTION = (
    "Selective Backprop for PyTorch Lightning. fit, validate and test take a LightningCLI configuration "
    "(see examples/configs); lightning-sbp --help lists every subcommand."
)

_ROLE = re.compile(r":(?:\w+:)?\w+:`(?P<tilde>~?)(?P<body>[^`]+)`")
_LITERAL = re.compile(r"``(?P<code>.+?)``", re.DOTALL)
_LINK = re.compile(r"`(?P<text>[^`<]+?)\s*<(?P<target>[^>]+)>`_{1,2}")
_INTERPRETED = re.compile(r"`(?P<text>[^`]+)`")
_UNKNOWN_KEY = re.compile(r"Option '(?P<key>[^']+)' is not accepted|No action for key \"(?P<old_key>[^\"]+)\" to check")
_CLASS_PATH = re.compile(r"class_path '(?P<path>[\w.]+)'")
_PARSER_KEY = re.compile(r'Parser key "(?P<key>[^"]+)"')
_GIVEN_CLASS_PATH = re.compile(r"class_path(?:=|': )'(?P<path>[\w.]+)'")
_UNION = "Does not validate against any of the Union subtypes"
_TOP_LEVEL = (("LightningDataModule'>", "data"), ("LightningModule'>", "model"))
_WRONG_TYPE = re.compile(
    r"class_path '(?P<path>[\w.]+)':\s*Parser key \"(?P<key>[^\"]+)\":\s*"
    r"Expected a <class '(?P<type>[\w.]+)'>\. Got value: (?P<value>[^\n]*)"
)
_UNUSABLE_FUNCTION = re.compile(
    r"class_path '(?P<path>[\w.]+)':\s*Parser key \"(?P<key>[^\"]+)\":.*?"
    r"expects a function or a callable class: (?P<reason>[^\n]*).*?Given value: (?P<value>[^\n]*)",
    re.DOTALL,
)


def plain_text(text: str) -> str:
    """``text`` without Sphinx markup: roles become their target's name, literals and links their text.

    ``:class:`~a.b.C``` becomes ``C``, ``:func:`a.b.f``` becomes ``a.b.f``, a double-backquoted literal
    or single-backquoted text its content, and ```text <url>`_`` becomes ``text (url)``.
    """

    def role(match: re.Match[str]) -> str:
        body = match["body"]
        titled = re.fullmatch(r"(?P<title>.+?)\s*<(?P<target>[^>]+)>", body)
        if titled:
            return titled["title"]
        return body.rsplit(".", 1)[-1] if match["tilde"] else body

    text = _ROLE.sub(role, text)
    text = _LITERAL.sub(lambda match: match["code"], text)
    text = _LINK.sub(lambda match: f"{match['text']} ({match['target']})", text)
    return _INTERPRETED.sub(lambda match: match["text"], text)


class PlainHelpFormatter(DefaultHelpFormatter):
    """jsonargparse's help formatter, with the Sphinx markup of docstrings removed (see :func:`plain_text`)."""

    def _split_lines(self, text: str, width: int) -> list[str]:
        return super()._split_lines(plain_text(text), width)

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        return super()._fill_text(plain_text(text), width, indent)

    def start_section(self, heading: str | None) -> None:
        """Open a section of the help; a class's section is headed by its docstring's first line."""
        super().start_section(None if heading is None else plain_text(heading))


class SelectiveBackpropParser(LightningArgumentParser):
    """The parser of ``lightning-sbp fit|validate|test``: plain help texts and one-line errors for unknown arguments.

    A misspelled argument of a class in the configuration (``kepp: 0.3`` under a callback's
    ``init_args``) makes jsonargparse list every type the enclosing argument accepts; this parser
    reports instead the unknown key, the arguments the class accepts and the closest of them, in one
    line. Every other error is jsonargparse's. A parser built with ``exit_on_error=False`` (and the
    parsers jsonargparse nests in it) raises jsonargparse's message unchanged; pass it to
    :func:`unknown_argument_summary` for the one line.
    """

    def __init__(self, *args: Any, formatter_class: type = PlainHelpFormatter, **kwargs: Any) -> None:
        super().__init__(*args, formatter_class=formatter_class, **kwargs)

    def error(self, message: str, *args: Any, **kwargs: Any) -> NoReturn:
        """Report ``message``, or a one-line summary of it when it is about an unknown argument of a class."""
        if not self.exit_on_error:  # nested parsers raise to the parser above them
            super().error(message, *args, **kwargs)
        # The usage block of every option would bury the one line that matters; --help prints it.
        summary = (
            unknown_argument_summary(message)
            or wrong_type_summary(message)
            or unusable_function_summary(message)
            or rejected_class_summary(message)
        )
        sys.stderr.write(f"error: {summary or message.strip()}\n")
        self.exit(2)


def unknown_argument_summary(message: str) -> str | None:
    """One line for a jsonargparse error about an unknown argument of a class given by ``class_path``.

    Args:
        message: the error message of jsonargparse.

    Returns:
        ``"<where> (<class path>): unknown argument '<key>'; did you mean '<closest>'? accepted arguments: ..."``,
        or ``None`` when the message is about something else or the class cannot be imported.
    """
    unknown = _UNKNOWN_KEY.search(message)
    if unknown is None:
        return None
    paths = list(_CLASS_PATH.finditer(message, 0, unknown.start()))
    if not paths:
        return None
    class_path = paths[-1]["path"]
    cls = _import(class_path)
    if not isinstance(cls, type):
        return None
    key = (unknown["key"] or unknown["old_key"]).rsplit(".", 1)[-1]
    accepted = [
        name
        for name, parameter in inspect.signature(cls).parameters.items()
        if parameter.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    ]
    # A known key with a value of the wrong type reaches the same message, through the base class of
    # the argument (``lightning.Callback``): jsonargparse's own message then says more than a guess.
    if key in accepted or not accepted:
        return None
    where = _PARSER_KEY.search(message)
    text = f"{where['key'] + ' ' if where else ''}({class_path}): unknown argument {key!r}"
    closest = difflib.get_close_matches(key, accepted, n=1)
    hint = f"; did you mean {closest[0]!r}?" if closest else ";"
    return f"{text}{hint} accepted arguments: {', '.join(accepted)}"


def wrong_type_summary(message: str) -> str | None:
    """One line for a jsonargparse error about a value of the wrong type for an argument of a class.

    Args:
        message: the error message of jsonargparse.

    Returns:
        ``"<where> (<class path>): <key> expects a <type>, got <value>"``, or ``None`` when the message
        is about something else.
    """
    wrong = _WRONG_TYPE.search(message)
    if wrong is None:
        return None
    return f"{_located(message, wrong['path'])}{wrong['key']} expects a {wrong['type']}, got {wrong['value'].strip()!r}"


def unusable_function_summary(message: str) -> str | None:
    """One line for a jsonargparse error about a function argument (``score_fn``, ``loss_fn``) it cannot import.

    Args:
        message: the error message of jsonargparse.

    Returns:
        ``"<where> (<class path>): <key> '<value>' is not a function it can import (<reason>); ..."``, or
        ``None`` when the message is about something else.
    """
    unusable = _UNUSABLE_FUNCTION.search(message)
    if unusable is None:
        return None
    return (
        f"{_located(message, unusable['path'])}{unusable['key']} {unusable['value'].strip()!r} is not a function it "
        f"can import ({unusable['reason'].strip()}); give the dotted import path of a function, "
        "package.module.function, importable where the command runs"
    )


def rejected_class_summary(message: str) -> str | None:
    """One line for a jsonargparse error about a class in the configuration that could not be used as given.

    jsonargparse tries every type the argument accepts (the class, and ``None``) and lists why each failed,
    with the whole value given: the reason that matters is the class's own (its constructor's ``ValueError``,
    an option it does not accept), which this line keeps.

    Args:
        message: the error message of jsonargparse.

    Returns:
        ``"<where> (<class path>): <the class's reason>"``, or ``None`` when the message is about something else
        or gives more than one reason.
    """
    if _UNION not in message or "Errors:" not in message:
        return None
    block = message.split("Errors:", 1)[1].split("Given value", 1)[0]
    reasons = [" ".join(item.split()) for item in re.split(r"\n\s*- ", "\n" + block.strip("\n")) if item.strip()]
    reasons = [reason for reason in reasons if not reason.startswith("Expected a <class 'NoneType'>")]
    given = _GIVEN_CLASS_PATH.search(message)
    if len(reasons) != 1 or given is None:
        return None
    reason = re.sub(r"^Problem with given class_path '[\w.]+':\s*", "", reasons[0])
    if "'init_arg." in reason:
        reason += " (a class's arguments go under init_args)"
    where = _located(message, given["path"])
    if _PARSER_KEY.search(message) is None:  # the top-level model or data, named by the types it accepts
        where = next((f"{key} {where}" for base, key in _TOP_LEVEL if base in message), where)
    return f"{where}{reason}"


def _located(message: str, class_path: str) -> str:
    """``"<parser key> (<class path>): "``, the start of a one-line summary of a jsonargparse error."""
    where = _PARSER_KEY.search(message)
    return f"{where['key'] + ' ' if where else ''}({class_path}): "


class SelectiveBackpropCLI(LightningCLI):
    """LightningCLI whose model and data are any ``LightningModule`` and ``LightningDataModule`` named in the config.

    Differences from ``LightningCLI``: only the ``fit``, ``validate`` and ``test`` subcommands; an
    existing ``config.yaml`` in the log directory is overwritten, and none is written when the
    trainer has no logger (``logger: false``); errors raised while building the configured objects
    (``ValueError`` and Lightning's ``MisconfigurationException``) become a parser error
    (``error: ...``, exit status 2) instead of a traceback. Every ``SelectiveBackprop`` callback is
    built and checked before the model and the data, so a wrong argument fails before anything heavy
    happens, with the callback's own message. The parser is a :class:`SelectiveBackpropParser`.

    Another command can reuse it with ``run=False`` and a dict or list of ``args``.

    Args:
        args: command-line arguments; ``None`` reads ``sys.argv``.
        run: run the subcommand after building the objects.
        **kwargs: further ``LightningCLI`` arguments.
    """

    def __init__(self, args: Any = None, run: bool = True, **kwargs: Any) -> None:
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("parser_kwargs", {"description": _DESCRIPTION, "prog": "lightning-sbp"})
        kwargs.setdefault("save_config_callback", _SaveConfigToLogDir)
        super().__init__(
            model_class=None,
            datamodule_class=None,
            subclass_mode_model=True,
            subclass_mode_data=True,
            args=args,
            run=run,
            **kwargs,
        )

    def init_parser(self, **kwargs: Any) -> LightningArgumentParser:
        """Lightning's parser, built as a :class:`SelectiveBackpropParser` (Lightning 2.3 has no ``parser_class``)."""
        kwargs.setdefault("dump_header", [f"lightning.pytorch=={pl.__version__}"])
        parser = SelectiveBackpropParser(**kwargs)
        parser.add_argument("-c", "--config", action=ActionConfigFile, help="Path to a configuration file.")
        return parser

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
            if not isinstance(class_path, str) or not is_selective_backprop(class_path):
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


class _SaveConfigToLogDir(SaveConfigCallback):
    """Lightning's ``SaveConfigCallback``, except that a trainer without a logger saves no ``config.yaml``.

    Without a logger there is no log directory, and Lightning would write the file into the working
    directory.
    """

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Save the configuration into the logger's directory, if there is a logger."""
        if trainer.logger is not None:
            super().setup(trainer, pl_module, stage)


def is_selective_backprop(class_path: str) -> bool:
    """Whether ``class_path`` names :class:`~lightning_sbp.SelectiveBackprop` or a subclass of it.

    A path that cannot be imported counts when its last part is ``SelectiveBackprop``: a configuration
    that names the callback by a path this environment cannot resolve still means it.
    """
    cls = _import(class_path)
    if cls is None:
        return class_path.rpartition(".")[2] == SelectiveBackprop.__name__
    return isinstance(cls, type) and issubclass(cls, SelectiveBackprop)


def _import(class_path: str) -> Any:
    """The object at the dotted path ``class_path``, or ``None`` when it cannot be imported."""
    module_name, _, name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError, ValueError):
        return None


def _instantiate_callback(entry: Namespace) -> Callback:
    """Instantiate one ``{class_path, init_args}`` callback entry, raising its own errors unwrapped."""
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--callback", type=Callback)
    config = parser.parse_object({"callback": entry.clone().as_dict()})
    instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes
    return instantiate(config).callback


def main(args: list[str] | None = None) -> int:
    """Run ``lightning-sbp fit|validate|test``: the LightningCLI alone, without ``compare`` and ``profile``.

    The whole command, with every subcommand, is :func:`lightning_sbp.entry.main`.

    Args:
        args: the arguments after the program name, starting with the subcommand; ``None`` reads
            ``sys.argv[1:]``.

    Returns:
        0 once the subcommand has run.

    Raises:
        SystemExit: with status 2 for configuration errors, and 1 for missing datasets and for a
            module whose batches the default scoring pass cannot read (the message names the fix).
    """
    try:
        SelectiveBackpropCLI(args=args)
    except (DatasetNotFoundError, ScoringError) as err:
        sys.stderr.write(f"error: {err}\n")
        raise SystemExit(1) from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
