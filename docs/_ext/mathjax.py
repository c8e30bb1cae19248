"""MkDocs hook: the site serves MathJax itself, so math renders offline and no page loads a CDN.

The MathJax 3 bundle comes from the ``django-static-mathjax`` package of the ``docs`` extra (it
holds MathJax's release files and depends on nothing; its import name is ``mathjax``). This hook
adds the single-file TeX-to-SVG component and MathJax's licence to the site; ``mkdocs.yml`` loads
``assets/mathjax/config.js`` and then the component on every page, and ``pymdownx.arithmatex``
marks the formulas (``$...$`` inline, ``$$...$$`` displayed).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

from mkdocs.config.defaults import MkDocsConfig
from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File, Files

SITE_FOLDER = "assets/mathjax"
BUNDLE = {"tex-svg.js": "es5/tex-svg.js", "LICENSE": "LICENSE"}


def _mathjax_folder() -> Path:
    try:
        folder = Path(str(resources.files("mathjax"))) / "static" / "mathjax"
    except ModuleNotFoundError:
        folder = None
    if folder is None or not (folder / BUNDLE["tex-svg.js"]).is_file():
        raise PluginError("MathJax is missing: install the docs extra (pip install -e '.[docs]')")
    return folder


def on_files(files: Files, *, config: MkDocsConfig, **kwargs: Any) -> Files:
    """Add the MathJax component and its licence to the site's files."""
    folder = _mathjax_folder()
    for name, source in BUNDLE.items():
        files.append(File.generated(config, f"{SITE_FOLDER}/{name}", abs_src_path=str(folder / source)))
    return files
