"""`python -m worker resummarize ...`: the command line; the worker itself runs as `arq worker.WorkerSettings`."""

from __future__ import annotations

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
