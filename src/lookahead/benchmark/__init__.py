"""Benchmark harness: datasets, methods compared side by side, reports."""
