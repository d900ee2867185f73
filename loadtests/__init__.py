"""Benchmark suite: canary-proxy measured side by side with nginx (entry point: ``bench.py``)."""
