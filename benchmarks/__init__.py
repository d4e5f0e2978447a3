"""Benchmarks: `python -m benchmarks.run --help`; figures and how they were taken in RESULTS.md."""
