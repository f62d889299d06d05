"""`python -m bench`: see bench/run.py."""

from .run import run

run()
