"""``lightning-sbp demo``: the comparison of arXiv 2312.05021 on a workload where Selective Backprop can pay off.

Shipped with the package, so that it runs from any directory after ``pip install 'lightning-sbp[demo]'``::

    lightning-sbp demo                      # a few minutes on two CPU cores; writes ./sbp-demo/
    lightning-sbp demo --output DIR --seeds 0 1 --set trainer.max_epochs=2

It is ``lightning-sbp compare`` on the grid of this folder (:data:`GRID`, whose base configuration is
:data:`BASE`): full training against random, loss-based (``loss``, ``topk``) and gradient-matching
(``omp``) selection at keep 0.25, with 30% label noise, five seeds, and the A/A row
``random:seed_offset=1``. Every option of ``lightning-sbp compare`` is accepted and overrides the
grid's setting; the output goes to ``./sbp-demo`` unless ``--output`` says otherwise.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ["BASE", "DEFAULT_OUTPUT", "GRID", "main"]

GRID = Path(__file__).resolve().parent / "grid.yaml"
"""The demo's grid file."""

BASE = Path(__file__).resolve().parent / "base.yaml"
"""The demo's base configuration: the digits and a wide CNN whose steps are dominated by convolutions."""

DEFAULT_OUTPUT = "sbp-demo"
"""Where the demo writes its runs, summary and plots, relative to the working directory."""

_HELP = f"""\
usage: lightning-sbp demo [--output DIR] [any option of lightning-sbp compare]

Run the comparison of arXiv 2312.05021 on a workload where Selective Backprop can pay off: the embedded
digits and a wide CNN whose steps are dominated by convolutions, full training against random, loss, topk
and omp selection at keep 0.25, with 30% of the training labels flipped, five seeds, and the A/A row
random:seed_offset=1 (random selection with other draws, which must not differ from random beyond seed
noise). 30 fits, a few minutes on two CPU cores, written to ./{DEFAULT_OUTPUT} (summary.md, summary.csv,
plots/).

Every option of lightning-sbp compare (see lightning-sbp compare --help) overrides the grid's setting,
e.g. --seeds 0 1, --set trainer.max_epochs=2, --launcher ray. A repeated command reuses finished runs.

grid: {GRID}
base: {BASE}
"""


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``lightning-sbp demo``.

    Args:
        argv: the arguments after ``demo``; ``None`` reads ``sys.argv[2:]``.

    Returns:
        ``lightning-sbp compare``'s exit status.
    """
    from lightning_sbp.compare.command import main as compare

    args = list(sys.argv[2:] if argv is None else argv)
    if "-h" in args or "--help" in args:
        print(_HELP, end="")
        return 0
    if not any(arg == "--output" or arg.startswith("--output=") for arg in args):
        args += ["--output", DEFAULT_OUTPUT]
    return compare(["--config", str(GRID), *args])
