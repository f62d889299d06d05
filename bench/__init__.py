"""Benchmarks of the realtime relay: `make bench` (or `python -m bench`) prints the table."""
