"""``python -m lightning_sbp.compare.ranks JOB``: the command of a cell whose fit starts processes of its own.

Every process of the cell runs it: the first one, started by
:func:`~lightning_sbp.compare.processes.run_in_processes`, and, for ``ddp``, each rank that
Lightning starts by running the same command line again. It runs the pickled
:class:`~lightning_sbp.compare.processes.ProcessJob` and, when that fails, writes which rank
failed and why next to the job file. It is run, never imported (the processes of ``ddp_spawn``
load it as ``__mp_main__``, which runs nothing).
"""

from __future__ import annotations

import pickle
import sys
from collections.abc import Sequence
from pathlib import Path

from lightning_sbp.compare.processes import ProcessJob, die_with_parent, record_failure

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the job in the file named by the only argument.

    Returns:
        0 when the job returned, 1 when it raised (the failure is written next to the job file).
    """
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        sys.stderr.write(f"usage: python -m {__spec__.name if __spec__ else 'ranks'} JOB\n")
        return 2
    die_with_parent()
    job_file = Path(args[0])
    job: ProcessJob = pickle.loads(job_file.read_bytes())
    try:
        job.target(*job.args)
    except BaseException as err:  # whatever ends this rank is the cell's error
        if isinstance(err, SystemExit) and not err.code:
            return 0
        failure = record_failure(job_file.parent, err)
        sys.stderr.write(f"{failure.error}\n{failure.details}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
