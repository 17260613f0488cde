"""Benchmark suite: ``python -m benchmarks NAME [--quick] [--device cpu|cuda] [--json PATH]``."""
