"""Benchmarks run by ``labkit bench <name>``: each module exposes ``run(quick=False) -> dict``."""
