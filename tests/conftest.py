"""Test setup: the Triton kernel runs on CPU tensors through the interpreter.

TRITON_INTERPRET must be set before any module that defines a kernel is imported, so it is set here, before
pytest imports the test modules (and with them vstar_kernels).
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.pop("VSTAR_KERNELS_BACKEND", None)  # tests choose backends explicitly
