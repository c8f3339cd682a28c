"""Benchmarks, make reproduce and the prepared GPU check; run each from the repository root as ``python -m bench.NAME``."""
