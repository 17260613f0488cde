"""Benchmark suite: ``python -m benchmarks NAME|all|report [--quick] [--device cpu|cuda] ...``.

harness.py times and memory-probes the cases of one bench; limits.py measures the machine's copy
bandwidth and matmul rate; suite.py runs every bench into one results file; report.py writes
RESULTS.md, the charts and the headline ratios. See __main__.py for the command line.
"""
