"""Benchmarks run by scripts/bench.py; each module exposes main(argv)."""
