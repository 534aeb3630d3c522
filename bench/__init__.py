"""Benchmarks, each run with ``python -m bench.<name>`` (``make bench`` runs them all).

They print ratios against a baseline measured in the same run; nothing here is a test.
"""
