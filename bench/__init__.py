"""Benchmarks: run each from the repository root as ``python -m bench.NAME`` (see BENCHMARKS.md).

A package so that the scripts import each other as ``from bench.X import ...`` with no ``sys.path`` edits.
"""
