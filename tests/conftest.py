"""Test setup: the Triton kernel runs on CPU tensors through the interpreter.

TRITON_INTERPRET must be set before any module that defines a kernel is imported, so it is set here, before
pytest imports the test modules (and with them vstar_kernels).
"""

import os

import pytest

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.pop("VSTAR_KERNELS_BACKEND", None)  # tests choose backends explicitly


@pytest.fixture
def world_of_one(tmp_path):
    """A gloo process group of one process (rank 0), destroyed after the test (unless the test closed it)."""
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    if dist.is_initialized():
        dist.destroy_process_group()
