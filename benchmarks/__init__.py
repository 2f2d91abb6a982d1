"""Benchmark scripts, not installed with loraserve.

Each is run from the repository root as ``python benchmarks/NAME.py`` (or
``python -m benchmarks.NAME``); a script that imports another module of this folder puts the
repository root on ``sys.path`` first, so ``benchmarks.NAME`` resolves either way, and the
tests import them the same way.
"""
