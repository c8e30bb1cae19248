"""The documentation site builds with ``mkdocs build --strict``, its Python snippets run, and its API page is complete.

Runnable pages: ``quickstart.md``, ``guides/*.md`` and every page that carries the marker
``<!-- docs-test: run -->``. Their ```` ```python ```` blocks run in order, one fresh namespace per
page, so a page may build on its earlier blocks. Illustrative code goes in ```` ```text ````,
```` ```yaml ```` or ```` ```bash ```` fences.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest

from lightning_sbp.selectors import registry as selector_registry

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
RUN_MARKER = "<!-- docs-test: run -->"
PYTHON_BLOCK = re.compile(
    r"^(?P<indent>[ \t]*)```python[^\n]*\n(?P<body>.*?)^(?P=indent)```[ \t]*$", re.DOTALL | re.MULTILINE
)
# Pages written with other parts of the project (distributed training, the comparison results); their
# code blocks are not held to the rule that every ```python block runs here.
WRITTEN_ELSEWHERE = ("distributed.md", "results.md")
API_MODULES = ("lightning_sbp", "lightning_sbp.selectors", "lightning_sbp.functional", "lightning_sbp.metrics")


def _pages() -> list[Path]:
    return sorted(path for path in DOCS.rglob("*.md") if "_ext" not in path.parts)


def _runnable(page: Path) -> bool:
    relative = page.relative_to(DOCS)
    return relative.as_posix() == "quickstart.md" or relative.parts[0] == "guides" or RUN_MARKER in page.read_text()


def _blocks(page: Path) -> list[str]:
    return [textwrap.dedent(match["body"]) for match in PYTHON_BLOCK.finditer(page.read_text())]


RUNNABLE = [page for page in _pages() if _runnable(page) and _blocks(page)]


def test_site_builds_strictly(tmp_path: Path) -> None:
    if importlib.util.find_spec("mkdocs") is None:
        pytest.skip("mkdocs is not installed in this environment (pip install -e '.[docs]')")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stdout}\n{result.stderr}"
    assert (tmp_path / "site" / "api" / "index.html").is_file()
    # Math renders with the site's own MathJax; no page loads a script from elsewhere.
    assert (tmp_path / "site" / "assets" / "mathjax" / "tex-svg.js").stat().st_size > 100_000
    metrics = (tmp_path / "site" / "metrics" / "index.html").read_text()
    assert '<script src="../assets/mathjax/tex-svg.js"' in metrics and 'class="arithmatex"' in metrics
    for page in (tmp_path / "site").rglob("*.html"):
        assert not re.search(r"<script[^>]+src=\"(https?:)?//", page.read_text()), f"{page} loads a remote script"


@pytest.mark.parametrize("page", RUNNABLE, ids=[page.relative_to(DOCS).as_posix() for page in RUNNABLE])
def test_python_snippets_run(page: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # anything a snippet writes lands in a temporary folder
    # Selectors a snippet registers stay out of the registry the rest of the test session sees.
    monkeypatch.setattr(selector_registry, "_REGISTRY", dict(selector_registry._REGISTRY))
    namespace: dict[str, object] = {"__name__": f"docs_{page.stem.replace('-', '_')}"}
    for number, code in enumerate(_blocks(page), start=1):
        where = f"{page.relative_to(DOCS).as_posix()}, python block {number}"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                exec(compile(code, where, "exec"), namespace)
            except Exception as error:
                raise AssertionError(f"{where} failed:\n{code}") from error


def test_every_python_block_is_run() -> None:
    pages = [page for page in _pages() if page.relative_to(DOCS).as_posix() not in WRITTEN_ELSEWHERE]
    not_run = [page.relative_to(DOCS).as_posix() for page in pages if _blocks(page) and not _runnable(page)]
    assert not not_run, (
        f"pages with ```python blocks that no test runs: {not_run}; mark them with {RUN_MARKER!r} "
        "or put illustrative code in ```text fences"
    )


@pytest.mark.parametrize("module_name", API_MODULES)
def test_api_page_lists_every_public_name(module_name: str) -> None:
    api = (DOCS / "api.md").read_text()
    module = importlib.import_module(module_name)
    missing = [name for name in module.__all__ if not re.search(rf"{re.escape(module_name)}\.{re.escape(name)}\b", api)]
    assert not missing, f"docs/api.md does not mention {', '.join(f'{module_name}.{n}' for n in missing)}"
