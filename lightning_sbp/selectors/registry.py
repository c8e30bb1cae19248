"""Selectors by name."""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable
from typing import Any, TypeVar

from lightning_sbp.selectors.base import Selector

__all__ = ["available_selectors", "get_selector", "register_selector"]

_REGISTRY: dict[str, type[Selector]] = {}

S = TypeVar("S", bound=type[Selector])


def register_selector(name: str) -> Callable[[S], S]:
    """Register a :class:`Selector` subclass under ``name`` (a class decorator).

    Args:
        name: the name users give to ``SelectiveBackprop(selector=name)`` and in YAML.

    Raises:
        ValueError: if ``name`` is taken by another class.
    """

    def decorate(cls: S) -> S:
        if not (isinstance(cls, type) and issubclass(cls, Selector)):
            raise TypeError(f"register_selector({name!r}) expects a Selector subclass, got {cls!r}")
        taken = _REGISTRY.get(name)
        if taken is not None and taken.__qualname__ != cls.__qualname__:
            raise ValueError(f"selector name {name!r} is already registered to {taken.__qualname__}")
        _REGISTRY[name] = cls
        return cls

    return decorate


def available_selectors() -> list[str]:
    """The registered selector names, sorted."""
    return sorted(_REGISTRY)


def get_selector(name: str, **kwargs: Any) -> Selector:
    """A new selector of the class registered under ``name``.

    Args:
        name: a registered name (see :func:`available_selectors`).
        **kwargs: passed to the selector's constructor.

    Raises:
        ValueError: for an unknown name, listing the registered ones, or for an argument the selector's
            constructor does not take, with the closest one it takes.
    """
    try:
        cls = _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"unknown selector {name!r}; registered selectors: {', '.join(available_selectors())}"
        ) from None
    parameters = inspect.signature(cls).parameters
    if not any(parameter.kind is inspect.Parameter.VAR_KEYWORD for parameter in parameters.values()):
        for key in kwargs:
            if key not in parameters:
                closest = difflib.get_close_matches(key, parameters, n=1)
                hint = f"; did you mean {closest[0]!r}?" if closest else ";"
                raise ValueError(
                    f"{cls.__name__} has no argument {key!r}{hint} its arguments: {', '.join(parameters) or 'none'}"
                )
    return cls(**kwargs)
