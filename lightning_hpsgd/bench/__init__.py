"""Benchmarks: ``python -m lightning_hpsgd.bench --help``. Timings live here, never in the tests."""
