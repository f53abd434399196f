"""Benchmarks run from notebooks/benchmark_*.ipynb and the command line."""
