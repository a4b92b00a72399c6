"""Benchmarks for tinylm: `python -m benchmarks.run --help`."""
