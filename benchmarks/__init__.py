"""Benchmarks of acon_cuda (run with ``python -m benchmarks`` or ``make bench``)."""
