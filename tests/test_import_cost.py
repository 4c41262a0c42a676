"""``import vstar_kernels`` and the CLI's cheap commands load nothing heavy beyond torch.

Import time is not asserted (no timing in tests); what makes it slow is. ``torch._dynamo`` alone costs more than
``import torch`` on a 2-core CPU, and diffusers, transformers and matplotlib load only when their features are used.
Each check runs in a fresh interpreter, since the test process has most of them loaded already.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

HEAVY = ("torch._dynamo", "torch._inductor", "diffusers", "transformers", "matplotlib", "sympy")


def _loaded_after(code: str) -> list[str]:
    probe = f"{code}\nimport json, sys\nprint(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("code", [
    "import vstar_kernels",
    "import vstar_kernels.ops",
    "import vstar_kernels.cli",
    "import vstar_kernels.backends.extension",
    "from vstar_kernels.cli import main\ntry:\n    main(['--version'])\nexcept SystemExit:\n    pass",
])
def test_import_loads_nothing_heavy(code):
    assert _loaded_after(code) == []


def test_the_lazy_constant_marker_is_the_one_torch_sets():
    """Without torch._dynamo loaded, the marker is set directly; it must be exactly what torch's decorator sets."""
    code = """
import json, sys
import torch
from vstar_kernels.compile_markers import assume_constant_result
def ours(): return 0
def theirs(): return 0
assume_constant_result(ours)
assert "torch._dynamo" not in sys.modules
marked = dict(vars(ours))
torch.compiler.assume_constant_result(theirs)
print(json.dumps([marked, dict(vars(theirs))]))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    ours, theirs = json.loads(proc.stdout.strip().splitlines()[-1])
    assert theirs, "torch's decorator no longer marks the function: compile_markers must follow it"
    assert ours == theirs


def test_the_availability_probe_is_a_compile_time_constant():
    """The extension's availability is evaluated once while tracing (no graph break in a compiled caller)."""
    import torch

    from vstar_kernels.backends import extension

    def probe(x):
        return x + 1 if extension.unavailable_reason(x.device) is None else x - 1

    x = torch.zeros(3)
    torch._dynamo.reset()
    compiled = torch.compile(probe, fullgraph=True, backend="eager")
    assert torch.equal(compiled(x), probe(x))
