"""Triton kernels of :mod:`visar.ops`, one module per op, imported on first use (they import triton).

Each module defines ``@triton.jit`` kernels and a ``launch(...)`` function taking contiguous tensors. Loads are
converted to float32 at once (bfloat16 arithmetic is float32 arithmetic rounded once at the store), and a launch
uses at most one program per row (rows ops) or per block of 1024 elements (elementwise ops).
"""
