"""Benchmarks: ratios against a bare baseline, measured in one run."""
