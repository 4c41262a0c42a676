"""torch.compile markers that cost nothing at import time.

``torch.compiler.assume_constant_result`` imports ``torch._dynamo`` (1-2 s on a 2-core CPU, more than ``import torch``
itself) before it marks the function. Modules that ``import vstar_kernels`` loads mark their functions with
:func:`assume_constant_result` below instead, so the import stays cheap and a compiled caller still sees the same
marker. ``tests/test_import_time.py`` checks that the marker equals what torch's decorator sets, so a torch release
that changes it fails a test instead of silently graph-breaking.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TypeVar

import torch

F = TypeVar("F", bound=Callable)

# The attribute torch._dynamo.decorators.assume_constant_result sets (torch 2.4 to 2.13); dynamo reads it when it
# meets a call to the function and evaluates the call once, while tracing, as a constant.
_DYNAMO_CONSTANT_MARKER = "_dynamo_marked_constant"


def assume_constant_result(fn: F) -> F:
    """Mark ``fn`` as :func:`torch.compiler.assume_constant_result` does, importing ``torch._dynamo`` only if loaded.

    Contract: ``fn``'s result must be final for the process for the arguments it is called with (torch.compile does
    not check that); the function object is returned, marked.
    """
    if "torch._dynamo" in sys.modules:
        return torch.compiler.assume_constant_result(fn)
    setattr(fn, _DYNAMO_CONSTANT_MARKER, True)
    return fn
