"""``lightning-sbp compare``: Selective Backprop selectors against full training and a smaller batch, at equal cost.

The comparison of arXiv 2312.05021 on any LightningCLI configuration: a grid of methods, keep
fractions, label-noise levels, seeds and learning rates, one real Lightning fit per cell, a
summary table (Markdown and CSV) and plots. Modules: :mod:`~lightning_sbp.compare.grid` (the grid
and its runs), :mod:`~lightning_sbp.compare.runner` (the fits and their records),
:mod:`~lightning_sbp.compare.launchers` (where the fits run: in process or on Ray),
:mod:`~lightning_sbp.compare.processes` (fits on several devices, in a command of their own),
:mod:`~lightning_sbp.compare.report` (the table), :mod:`~lightning_sbp.compare.plots` (the PNGs)
and :mod:`~lightning_sbp.compare.command` (the command line).
"""

from lightning_sbp.compare.command import main
from lightning_sbp.compare.grid import FULL, SMALL_BATCH, Grid, GridError, Run, available_methods, expand

__all__ = ["FULL", "SMALL_BATCH", "Grid", "GridError", "Run", "available_methods", "expand", "main"]
