"""Benchmarks: run with ``python -m bench.<name>``. They print ratios against a baseline measured in
the same run; nothing here is a test."""
