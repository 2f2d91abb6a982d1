"""Triton kernels, each with its math (a ``Semantics:`` block) and a torch reference.

The references are the engine's CPU execution path. Nothing here imports the rest of
loraserve.
"""
