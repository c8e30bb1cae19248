"""Griffe extension for the documentation build: Sphinx roles in docstrings become cross-references.

The package's docstrings use roles such as ``:class:`~lightning_sbp.SelectiveBackpropMixin``` and
``:meth:`sbp_reduce```. mkdocstrings does not read roles, so this extension rewrites each one into a
Markdown cross-reference (``[`SelectiveBackpropMixin`][lightning_sbp.SelectiveBackpropMixin]``) before
rendering. Relative names are resolved in the scope of the object that owns the docstring, the way
Python would find them (members, then the enclosing class and module). A role that names nothing
stays a reference to what it says, so that ``mkdocs build --strict`` reports it instead of hiding it.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

ROLE = re.compile(r":(?:class|func|meth|mod|attr|data|exc|obj):`(?P<tilde>~?)(?P<name>[\w.]+)(?:\(\))?`")


def _resolve(obj: griffe.Object, name: str) -> str:
    head, _, rest = name.partition(".")
    if head == obj.package.name:
        return name
    try:
        base = obj.resolve(head)
    except griffe.NameResolutionError:
        return name
    return f"{base}.{rest}" if rest else base


class SphinxRoles(griffe.Extension):
    """Rewrites ``:role:`name``` in every docstring into a Markdown cross-reference."""

    def on_object(self, *, obj: griffe.Object, loader: griffe.GriffeLoader, **kwargs: Any) -> None:
        """Rewrite the roles of one object's docstring."""
        if obj.docstring is None or ":`" not in obj.docstring.value:
            return

        def replace(match: re.Match[str]) -> str:
            name = match["name"]
            shown = name.rsplit(".", 1)[-1] if match["tilde"] else name
            return f"[`{shown}`][{_resolve(obj, name)}]"

        obj.docstring.value = ROLE.sub(replace, obj.docstring.value)
