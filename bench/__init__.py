"""Benchmarks: speed targets as ratios measured side by side in one run, never timed asserts."""
