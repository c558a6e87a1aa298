"""Benchmarks: offline accuracy (offline.py) and stream reliability (chaos.py)."""
