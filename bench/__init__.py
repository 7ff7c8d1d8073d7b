"""The benchmarks: one script a measurement, each run from the repo root as ``python -m bench.<name>`` (not tests).

Shared helpers live in :mod:`bench.common`; ``python -m bench.report`` runs the scripts and renders
docs/benchmarks.md from their JSON results; ``bash bench/gpu.sh`` is the one prepared GPU run.
"""
