"""The import graph of ``lightning_sbp``, read from the source: no cycles; the lower layers import nothing above."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import lightning_sbp

PACKAGE = Path(__file__).resolve().parents[1] / "lightning_sbp"
# The layers that know nothing above them, and what each may import from the package besides itself.
LOWER_LAYERS = {
    "lightning_sbp.functional": set(),
    "lightning_sbp.selectors": {"lightning_sbp.functional"},
    "lightning_sbp.metrics": {"lightning_sbp.functional"},
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_names(path: Path) -> set[str]:
    """Every ``lightning_sbp`` module that ``path`` imports, anywhere in it (functions too, and ``importlib`` calls)."""
    tree = ast.parse(path.read_text())
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    [*package.split(".")[: len(package.split(".")) - node.level + 1], *filter(None, [base])]
                )
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            names.add(node.args[0].value)
    return {name for name in names if name == "lightning_sbp" or name.startswith("lightning_sbp.")}


def import_graph() -> dict[str, set[str]]:
    """Module -> the package's modules it imports (``from a import b`` counts as ``a.b`` when that is a module)."""
    modules = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets = set()
        for imported in imported_names(path):
            while imported not in modules:  # an object imported from a module: the module is the target
                imported = imported.rpartition(".")[0]
            if imported != name:
                targets.add(imported)
        graph[name] = targets
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def within(name: str, layer: str) -> bool:
    return name == layer or name.startswith(layer + ".")


def test_the_graph_is_read_from_every_module() -> None:
    graph = import_graph()
    assert {"lightning_sbp.cli", "lightning_sbp.entry", "lightning_sbp.functional.gram"} <= set(graph)
    assert "lightning_sbp.cli" in graph["lightning_sbp.compare.runner"]
    assert "lightning_sbp.compare.command" in graph["lightning_sbp.entry"]  # imported inside a function
    assert "lightning_sbp.compare.grid" in graph["lightning_sbp.compare.command"]
    assert "lightning_sbp.selectors.base" in graph["lightning_sbp.selectors"]  # a package's own modules count


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles() -> None:
    graph = import_graph()
    # A package's __init__ re-exports its modules, and those modules import their siblings through
    # the package: edges into a package's own __init__ from inside it are not a cycle of ideas.
    pruned = {
        name: {target for target in targets if not (name.startswith(target + ".") and target != "lightning_sbp")}
        for name, targets in graph.items()
    }
    assert cycles(pruned) == []


@pytest.mark.parametrize("layer", sorted(LOWER_LAYERS))
def test_lower_layers_import_nothing_above_them(layer: str) -> None:
    graph = import_graph()
    allowed = [layer, *LOWER_LAYERS[layer]]
    above = {
        f"{name} -> {target}"
        for name, targets in graph.items()
        if within(name, layer)
        for target in targets
        if not any(within(target, ok) for ok in allowed)
    }
    assert not above, f"{layer} imports from above it: {sorted(above)}"


def test_importing_the_package_loads_neither_torch_nor_lightning() -> None:
    # What `lightning-sbp --help` pays before it knows its subcommand.
    program = (
        "import sys, lightning_sbp, lightning_sbp.entry\n"
        "heavy = sorted(name for name in ('torch', 'lightning', 'lightning_sbp.callback') if name in sys.modules)\n"
        "print(lightning_sbp.__version__, heavy)"
    )
    result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, check=True)
    assert result.stdout.split() == [lightning_sbp.__version__, "[]"]


def test_every_public_name_resolves_from_its_home() -> None:
    import lightning_sbp.callback
    import lightning_sbp.selectors

    assert lightning_sbp.SelectiveBackprop is lightning_sbp.callback.SelectiveBackprop
    assert lightning_sbp.get_selector is lightning_sbp.selectors.get_selector
    assert sorted(lightning_sbp._HOMES) == sorted(set(lightning_sbp.__all__) - {"__version__"})
    for name in lightning_sbp.__all__:
        assert getattr(lightning_sbp, name) is not None
        assert name in dir(lightning_sbp)
    with pytest.raises(AttributeError, match="no attribute 'SelectiveBackProp'"):
        _ = lightning_sbp.SelectiveBackProp  # type: ignore[attr-defined]
    assert not {"Any", "TYPE_CHECKING", "annotations", "importlib"} & set(dir(lightning_sbp))


def test_subpackages_load_on_first_access() -> None:
    program = "import lightning_sbp; print(lightning_sbp.recipes.__name__, 'recipes' in dir(lightning_sbp))"
    result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["lightning_sbp.recipes", "True"]
