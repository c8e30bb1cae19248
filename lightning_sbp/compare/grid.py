"""The comparison grid: what it holds, how it is checked, and how it expands into runs.

A grid is a base LightningCLI configuration plus the axes the comparison varies: methods, keep
fractions, label-noise levels, seeds and, optionally, learning rates per method. Every cell of
the grid becomes a :class:`Run` whose id is a pure function of what the run's configuration is
made of (the base configuration's contents, the overrides, and the cell's own settings), so the
same cell always lands in the same directory and a repeated comparison finds its finished runs.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lightning_sbp.compare.multiplicity import CORRECTIONS
from lightning_sbp.functional.batch import subset_size
from lightning_sbp.selectors import available_selectors, get_selector

__all__ = [
    "FULL",
    "GRID_KEYS",
    "SMALL_BATCH",
    "ConfigKeys",
    "Grid",
    "GridError",
    "Run",
    "adopt_base_callback",
    "available_methods",
    "base_fingerprint",
    "expand",
    "is_aa",
    "load_grid_file",
    "merge",
    "nest",
    "override_args",
    "parse_assignment",
    "parse_method",
]

FULL = "full"
"""Plain training on every example: no callback."""

SMALL_BATCH = "small-batch"
"""Plain training with batch size ``k = floor(keep * N)`` for as many optimiser steps as the selective runs."""

GRID_KEYS = (
    "base",
    "output",
    "methods",
    "keep",
    "label_noise",
    "seeds",
    "lr",
    "overrides",
    "keys",
    "metric",
    "mode",
    "threads",
    "target_tolerance",
    "grad_error_every",
    "correction",
)
"""The keys a grid file may hold."""

SEED_OFFSET = "seed_offset"
"""A method option the grid takes for itself: ``random:seed_offset=1`` draws other random subsets.

The run keeps its seed (``seed_everything``: the same initial weights and data order) and gives
the callback the seed ``seed + seed_offset * SEED_STRIDE``, so its selections differ. Against
``random`` it is an A/A comparison: a difference by chance alone.
"""

SEED_STRIDE = 1_000_003
"""How far apart the callback seeds of two seed offsets lie (so that no offset reuses another run's seed)."""

DEFAULT_GRAD_ERROR_EVERY = 4
"""Selective runs measure their gradient errors on every this-many-th selective step, unless the grid says."""


class GridError(ValueError):
    """A grid that cannot run: reported as ``error: ...`` with exit status 2 before any training."""


def available_methods() -> list[str]:
    """``full``, ``small-batch`` and every registered selector name.

    A selector method may carry options for the selector's constructor: ``omp:weights=raw``,
    ``omp:nonnegative=true,ridge=0.1`` (see :func:`parse_method`).
    """
    return [FULL, SMALL_BATCH, *available_selectors()]


def parse_method(method: str) -> tuple[str, dict[str, Any]]:
    """A method's name and options: ``"omp:weights=raw,ridge=0.1"`` as ``("omp", {...})``.

    The options follow the name after a colon, as comma-separated ``KEY=VALUE`` pairs with YAML
    values (``true``, ``0.1``, ``raw``); they are passed to the selector's constructor, except
    ``seed_offset`` (a non-negative integer, see :data:`SEED_OFFSET`), which the grid keeps.

    Raises:
        GridError: for an unknown name, options on ``full`` or ``small-batch``, a malformed or
            repeated option, or options the selector refuses.
    """
    name, sep, rest = method.partition(":")
    name = name.strip()
    if name not in available_methods():
        raise GridError(f"unknown method {method!r}; methods: {', '.join(available_methods())}")
    if not sep:
        return name, {}
    if name in (FULL, SMALL_BATCH):
        raise GridError(f"method {name!r} takes no options, got {method!r}")
    options: dict[str, Any] = {}
    for item in rest.split(","):
        key, eq, text = (part.strip() for part in item.partition("="))
        if not eq or not key.isidentifier() or not text:
            raise GridError(f"method {method!r}: options are KEY=VALUE pairs after the colon, e.g. omp:weights=raw")
        if key in options:
            raise GridError(f"method {method!r} sets {key!r} twice")
        options[key] = _option_value(text)
    offset = options.get(SEED_OFFSET, 0)
    if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
        raise GridError(f"method {method!r}: {SEED_OFFSET} must be a non-negative integer, got {offset!r}")
    try:
        get_selector(name, **{key: value for key, value in options.items() if key != SEED_OFFSET})
    except (TypeError, ValueError) as err:
        raise GridError(f"method {method!r}: {err}") from None
    return name, options


def is_aa(method: str) -> bool:
    """Whether ``method`` is an A/A row: ``random`` with a seed offset and no other option."""
    name, sep, rest = method.partition(":")
    return name == "random" and bool(sep) and [part.split("=")[0].strip() for part in rest.split(",")] == [SEED_OFFSET]


def _option_value(text: str) -> Any:
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, str):  # YAML 1.1 reads 1e-3 as a string
        try:
            return float(value) if any(char.isdigit() for char in value) else value
        except ValueError:
            return value
    return value


def _canonical_method(method: str) -> str:
    """The spelling of a method that names it in rows, plots and run ids: options sorted, values normalised."""
    name, options = parse_method(method)
    if not options:
        return name
    return f"{name}:" + ",".join(f"{key}={_arg_value(options[key])}" for key in sorted(options))


@dataclass(frozen=True)
class ConfigKeys:
    """Where, in the LightningCLI configuration, the grid's axes are set.

    Attributes:
        lr: the model's learning rate.
        label_noise: the DataModule's fraction of flipped training labels.
        batch_size: the DataModule's batch size (read for ``k``, set by ``small-batch``).
    """

    lr: str = "model.init_args.lr"
    label_noise: str = "data.init_args.label_noise"
    batch_size: str = "data.init_args.batch_size"


@dataclass
class Grid:
    """A checked comparison grid.

    Attributes:
        base: the base LightningCLI configuration (model, data, trainer).
        output: the directory that receives the runs, the summary and the plots.
        methods: methods in the order they were given; a selector's options in one spelling, sorted by key
            (``omp:nonnegative=true,weights=raw``).
        keep: keep fractions of the methods that select (every method but ``full``).
        label_noise: label-noise levels; ``[None]`` keeps the base configuration's.
        seeds: one run per seed: ``seed_everything`` and the callback's ``seed``.
        lr: learning rates per method; a method missing here keeps the base configuration's.
        overrides: a partial LightningCLI configuration applied to every run after the base.
        keys: where the axes live in the configuration.
        metric: the validation metric to report (logged once per validation).
        mode: ``max`` when a higher metric is better, ``min`` otherwise.
        threads: ``torch.set_num_threads`` for the runs; ``None`` leaves torch's default.
        target_tolerance: the time-to-accuracy target of a noise level is ``full``'s mean final
            value less this (plus this when ``mode`` is ``min``).
        grad_error_every: selective runs measure their gradient errors on every this-many-th
            selective step (the callback's ``grad_error_every``).
        correction: how the p-values of a table are adjusted together: ``holm``, ``bh`` or ``none``
            (see :mod:`~lightning_sbp.compare.multiplicity`).
        callback_options: options of a ``SelectiveBackprop`` callback in the base configuration,
            given to every selective run's callback (see :func:`adopt_base_callback`).
    """

    base: Path
    output: Path
    methods: list[str]
    keep: list[float]
    label_noise: list[float | None]
    seeds: list[int]
    lr: dict[str, list[float]] = field(default_factory=dict)
    overrides: dict[str, Any] = field(default_factory=dict)
    keys: ConfigKeys = field(default_factory=ConfigKeys)
    metric: str = "val/acc"
    mode: str = "max"
    threads: int | None = None
    target_tolerance: float = 0.01
    grad_error_every: int = DEFAULT_GRAD_ERROR_EVERY
    correction: str = "holm"
    callback_options: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_values(cls, values: Mapping[str, Any]) -> Grid:
        """Check raw values (from a grid file and flags) and build the grid.

        Args:
            values: a mapping with the keys of :data:`GRID_KEYS`; missing keys take their defaults
                (no methods, keep fractions or output means an error).

        Raises:
            GridError: naming the first key whose value cannot run.
        """
        unknown = sorted(set(values) - set(GRID_KEYS))
        if unknown:
            raise GridError(f"unknown grid key(s) {', '.join(unknown)}; allowed keys: {', '.join(GRID_KEYS)}")
        if values.get("base") in (None, ""):
            raise GridError("no base configuration: give --base BASE.yaml or `base:` in the grid file")
        base = Path(values["base"])
        if not base.is_file():
            raise GridError(f"base configuration {str(base)!r} does not exist")
        if values.get("output") in (None, ""):
            raise GridError("no output directory: give --output DIR or `output:` in the grid file")
        methods = _methods(values.get("methods"))
        selecting = [method for method in methods if method != FULL]
        keep = _fractions("keep", values.get("keep"), low_open=True) if selecting else []
        if selecting and not keep:
            raise GridError(f"empty grid: no keep fractions for {', '.join(selecting)}; give --keep or `keep:`")
        noise_values = values.get("label_noise")
        label_noise: list[float | None] = (
            [None] if noise_values is None else list(_fractions("label_noise", noise_values, low_open=False))
        )
        if not label_noise:
            raise GridError("empty grid: label_noise is an empty list; omit it to keep the base configuration's")
        seeds = _seeds(values.get("seeds"))
        threads = values.get("threads")
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
            raise GridError(f"threads must be a positive integer, got {threads!r}")
        mode = values.get("mode", "max")
        if mode not in ("max", "min"):
            raise GridError(f"mode must be 'max' or 'min', got {mode!r}")
        metric = values.get("metric", "val/acc")
        if not isinstance(metric, str) or not metric:
            raise GridError(f"metric must be the name of a logged validation metric, got {metric!r}")
        tolerance = values.get("target_tolerance", 0.01)
        if isinstance(tolerance, bool) or not isinstance(tolerance, int | float) or tolerance < 0:
            raise GridError(f"target_tolerance must be a number >= 0, got {tolerance!r}")
        every = values.get("grad_error_every", DEFAULT_GRAD_ERROR_EVERY)
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise GridError(f"grad_error_every must be a positive integer (1: every selective step), got {every!r}")
        correction = values.get("correction", "holm")
        if correction not in CORRECTIONS:
            raise GridError(f"correction must be one of {', '.join(CORRECTIONS)}, got {correction!r}")
        overrides = values.get("overrides") or {}
        if not isinstance(overrides, Mapping):
            raise GridError(f"overrides must be a mapping (a partial LightningCLI config), got {overrides!r}")
        return cls(
            base=base,
            output=Path(values["output"]),
            methods=methods,
            keep=keep,
            label_noise=label_noise,
            seeds=seeds,
            lr=_learning_rates(values.get("lr"), methods),
            overrides=dict(overrides),
            keys=_keys(values.get("keys")),
            metric=metric,
            mode=mode,
            threads=threads,
            target_tolerance=float(tolerance),
            grad_error_every=every,
            correction=correction,
        )


@dataclass(frozen=True)
class Run:
    """One cell of the grid: one Lightning fit.

    Attributes:
        method: ``full``, ``small-batch`` or a selector name, possibly with options (``omp:weights=raw``).
        keep: the keep fraction; ``None`` for ``full``.
        label_noise: the label-noise level; ``None`` keeps the base configuration's.
        seed: ``seed_everything`` and the callback's ``seed``.
        lr: the learning rate; ``None`` keeps the base configuration's.
        batch_size: the batch size the run trains with (``k`` for ``small-batch``, else the base's).
        run_id: a readable name followed by a hash of everything the run's configuration is made of.
        args: the LightningCLI arguments that turn the base configuration into this cell's.
    """

    method: str
    keep: float | None
    label_noise: float | None
    seed: int
    lr: float | None
    batch_size: int
    run_id: str
    args: tuple[str, ...]

    def spec(self) -> dict[str, Any]:
        """The cell's settings as a JSON-ready mapping."""
        return {
            "method": self.method,
            "keep": self.keep,
            "label_noise": self.label_noise,
            "seed": self.seed,
            "lr": self.lr,
            "batch_size": self.batch_size,
        }


def load_grid_file(path: Path) -> dict[str, Any]:
    """Read a grid file; ``base`` and ``output`` in it are taken relative to the file's folder.

    Raises:
        GridError: if the file is missing, is not YAML, or is not a mapping.
    """
    if not path.is_file():
        raise GridError(f"grid file {str(path)!r} does not exist")
    try:
        values = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise GridError(f"grid file {str(path)!r} is not valid YAML: {err}") from None
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise GridError(f"grid file {str(path)!r} must hold a mapping of grid keys, got {type(values).__name__}")
    for key in ("base", "output"):
        if isinstance(values.get(key), str) and values[key]:
            values[key] = os.path.normpath(path.parent / values[key])
    return values


def parse_assignment(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` with a dotted key and a YAML value, e.g. ``trainer.max_epochs=3``.

    Raises:
        GridError: without ``=`` or with an empty key.
    """
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise GridError(f"--set expects KEY=VALUE with a dotted configuration key, got {text!r}")
    try:
        parsed = yaml.safe_load(value)
    except yaml.YAMLError:
        parsed = value
    return key.strip(), parsed


def nest(dotted: Mapping[str, Any]) -> dict[str, Any]:
    """``{"a.b": 1}`` as ``{"a": {"b": 1}}``."""
    nested: dict[str, Any] = {}
    for key, value in dotted.items():
        node = nested
        *parents, leaf = key.split(".")
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                child = node[part] = {}
            node = child
        node[leaf] = value
    return nested


def merge(into: dict[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """Merge ``update`` into ``into``, recursively for mappings; returns ``into``."""
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(into.get(key), dict):
            merge(into[key], value)
        else:
            into[key] = value
    return into


def override_args(overrides: Mapping[str, Any], prefix: str = "") -> list[str]:
    """LightningCLI arguments ``--a.b=value`` that apply a partial configuration.

    Mappings are followed down to their leaves, except a mapping with a ``class_path``, which is
    passed whole (as JSON) because it names an object to build.
    """
    args: list[str] = []
    for key, value in overrides.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping) and "class_path" not in value and value:
            args += override_args(value, f"{dotted}.")
        else:
            args.append(f"--{dotted}={_arg_value(value)}")
    return args


def base_fingerprint(grid: Grid) -> str:
    """A hash of what every run shares: the base configuration's contents, the overrides and the keys.

    Comments, key order and the base file's location do not change it.
    """
    try:
        base = yaml.safe_load(grid.base.read_text())
    except yaml.YAMLError as err:
        raise GridError(f"base configuration {str(grid.base)!r} is not valid YAML: {err}") from None
    return _digest({"base": base, "overrides": grid.overrides, "keys": vars(grid.keys)})


def expand(grid: Grid, fingerprint: str, base_batch_size: int) -> list[Run]:
    """Every run of the grid, methods interleaved within each seed and noise level.

    Interleaving spreads slow periods of a shared machine over all methods instead of one.

    Args:
        grid: the checked grid.
        fingerprint: :func:`base_fingerprint` of the grid.
        base_batch_size: the batch size ``N`` of the base configuration; ``small-batch`` trains with
            ``floor(keep * N)``, at least 1.
    """
    runs: list[Run] = []
    for seed in grid.seeds:
        for noise in grid.label_noise:
            for method in grid.methods:
                for keep in [None] if method == FULL else grid.keep:
                    for lr in grid.lr.get(method, [None]):
                        runs.append(_make_run(grid, fingerprint, base_batch_size, method, keep, noise, seed, lr))
    return runs


def _make_run(
    grid: Grid,
    fingerprint: str,
    base_batch_size: int,
    method: str,
    keep: float | None,
    noise: float | None,
    seed: int,
    lr: float | None,
) -> Run:
    keys = grid.keys
    args = [f"--seed_everything={seed}"]
    if noise is not None:
        args.append(f"--{keys.label_noise}={noise!r}")
    if lr is not None:
        args.append(f"--{keys.lr}={lr!r}")
    batch = base_batch_size
    if method == SMALL_BATCH:
        assert keep is not None
        batch = subset_size(keep, base_batch_size)
        args.append(f"--{keys.batch_size}={batch}")
    elif method != FULL:
        name, options = parse_method(method)
        offset = options.pop(SEED_OFFSET, 0)
        selector: str | dict[str, Any] = name
        if options:
            cls = type(get_selector(name, **options))
            selector = {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": options}
        # The comparison reads the gradient errors, measured on a sample of the selective steps and timed apart.
        init_args = {
            **grid.callback_options,
            "selector": selector,
            "keep": keep,
            "seed": seed + offset * SEED_STRIDE,
            "track_grad_error": True,
            "grad_error_every": grid.grad_error_every,
        }
        callback = {"class_path": "lightning_sbp.SelectiveBackprop", "init_args": init_args}
        args.append(f"--trainer.callbacks+={json.dumps(callback)}")
    parts = [method.replace(":", "-").replace("=", "-").replace(",", "-")]
    if keep is not None:
        parts.append(f"keep{keep:g}")
    if noise is not None:
        parts.append(f"noise{noise:g}")
    parts.append(f"seed{seed}")
    if lr is not None:
        parts.append(f"lr{lr:g}")
    digest = _digest({"base": fingerprint, "args": args})[:8]
    return Run(method, keep, noise, seed, lr, batch, "-".join([*parts, digest]), tuple(args))


_GRID_OWNED = ("selector", "keep", "seed", "track_grad_error", "grad_error_every")
"""Options of the comparison's callbacks that the grid sets for each run, whatever the base configuration says."""


def adopt_base_callback(grid: Grid, callbacks: Sequence[Mapping[str, Any]]) -> Grid:
    """The grid for a base configuration whose ``trainer.callbacks`` hold a ``SelectiveBackprop`` callback.

    The comparison gives every method its own callback, so the base's leaves the configuration:
    the grid's overrides set ``trainer.callbacks`` to the other callbacks, and the options the
    base's callback sets away from their defaults (a cheaper scoring pass, a schedule) go to every
    selective run's callback, except those the grid sets itself (selector, keep, seed, gradient-error
    tracking). A base without such a callback gives the grid back unchanged.

    Args:
        grid: the checked grid.
        callbacks: the base configuration's ``trainer.callbacks``, as ``{class_path, init_args}`` mappings.

    Raises:
        GridError: when the base configuration has more than one ``SelectiveBackprop`` callback.
    """
    import inspect

    from lightning_sbp.callback import SelectiveBackprop
    from lightning_sbp.cli import is_selective_backprop

    found = [i for i, entry in enumerate(callbacks) if is_selective_backprop(str(entry.get("class_path", "")))]
    if not found:
        return grid
    if len(found) > 1:
        raise GridError(
            f"base configuration {str(grid.base)!r} has {len(found)} SelectiveBackprop callbacks "
            f"(trainer.callbacks{found}); the comparison replaces one by each method's: keep at most one"
        )
    defaults = {name: p.default for name, p in inspect.signature(SelectiveBackprop).parameters.items()}
    given = callbacks[found[0]].get("init_args") or {}
    options = {
        key: value
        for key, value in given.items()
        if key not in _GRID_OWNED and (key not in defaults or value != defaults[key])
    }
    others = [dict(entry) for i, entry in enumerate(callbacks) if i != found[0]]
    overrides = merge(copy.deepcopy(grid.overrides), {"trainer": {"callbacks": others}})
    return dataclasses.replace(grid, overrides=overrides, callback_options=options)


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def _arg_value(value: Any) -> str:
    if isinstance(value, str):
        return value
    return json.dumps(value)


def _as_list(name: str, value: Any) -> list[Any]:
    if value is None:
        return []
    if isinstance(value, str | bytes) or not isinstance(value, Iterable):
        return [value]
    if isinstance(value, Mapping):
        raise GridError(f"{name} must be a list, got a mapping {dict(value)!r}")
    return list(value)


def _unique(values: Sequence[Any]) -> list[Any]:
    return list(dict.fromkeys(values))


def _methods(value: Any) -> list[str]:
    methods = _unique([str(method) for method in _as_list("methods", value)])
    if not methods:
        raise GridError(f"empty grid: no methods; give --methods or `methods:` from {', '.join(available_methods())}")
    allowed = available_methods()
    unknown = [method for method in methods if method.partition(":")[0].strip() not in allowed]
    if unknown:
        raise GridError(f"unknown method(s) {', '.join(map(repr, unknown))}; methods: {', '.join(allowed)}")
    return _unique([_canonical_method(method) for method in methods])


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool):
        raise GridError(f"{name} must be a number, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise GridError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(number):
        raise GridError(f"{name} must be finite, got {value!r}")
    return number


def _fractions(name: str, value: Any, low_open: bool) -> list[float]:
    fractions = _unique([_number(name, item) for item in _as_list(name, value)])
    for fraction in fractions:
        if (fraction <= 0.0 if low_open else fraction < 0.0) or fraction > 1.0:
            interval = "(0, 1]" if low_open else "[0, 1]"
            raise GridError(f"{name} values must lie in {interval}, got {fraction:g}")
    return fractions


def _seeds(value: Any) -> list[int]:
    if value is None:
        return [0]
    seeds = _as_list("seeds", value)
    if not seeds:
        raise GridError("empty grid: seeds is an empty list")
    for seed in seeds:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise GridError(f"seeds must be integers, got {seed!r}")
    return _unique(seeds)


def _learning_rates(value: Any, methods: list[str]) -> dict[str, list[float]]:
    if value is None:
        return {}
    if isinstance(value, Mapping):
        table = {_method_key(str(method)): rates for method, rates in value.items()}
    else:
        table = {method: value for method in methods}
    unknown = [method for method in table if method not in methods]
    if unknown:
        raise GridError(f"lr given for method(s) {', '.join(map(repr, unknown))} that are not in the grid's methods")
    rates: dict[str, list[float]] = {}
    for method, values in table.items():
        numbers = _unique([_number(f"lr of {method}", item) for item in _as_list(f"lr of {method}", values)])
        if not numbers:
            raise GridError(f"empty grid: no learning rates for {method}")
        if any(rate <= 0 for rate in numbers):
            raise GridError(f"learning rates must be positive, got {numbers} for {method}")
        rates[method] = numbers
    return rates


def _method_key(method: str) -> str:
    try:
        return _canonical_method(method)
    except GridError:
        return method  # reported as a method that is not in the grid


def _keys(value: Any) -> ConfigKeys:
    if value is None:
        return ConfigKeys()
    if not isinstance(value, Mapping):
        raise GridError(f"keys must be a mapping of lr, label_noise and batch_size to config keys, got {value!r}")
    allowed = set(vars(ConfigKeys()))
    unknown = sorted(set(value) - allowed)
    if unknown:
        raise GridError(f"unknown entries in keys: {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}")
    return ConfigKeys(**{name: str(key) for name, key in value.items()})
