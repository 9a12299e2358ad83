"""Benchmarks: `make bench` (CPU, side-by-side ratios) and `bench/gpu.sh` (one lent GPU)."""
