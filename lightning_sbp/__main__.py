"""``python -m lightning_sbp``: the ``lightning-sbp`` command."""

import sys

from lightning_sbp.entry import main

if __name__ == "__main__":
    sys.exit(main())
