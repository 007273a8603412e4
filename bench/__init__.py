"""Benchmarks, each run as ``python -m bench.<name>``: prints a table and writes JSON under bench/results/."""
