"""Benchmarks of precision modes against plain `transformers`: see `runner.run_bench`."""

from .runner import BenchConfig, BenchError, run_bench

__all__ = ["BenchConfig", "BenchError", "run_bench"]
