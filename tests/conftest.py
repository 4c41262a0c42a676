"""Test setup: the Triton kernel runs on CPU tensors through the interpreter.

TRITON_INTERPRET must be set before any module that defines a kernel is imported, so it is set here, before
pytest imports the test modules (and with them vstar_kernels).
"""

import os

import pytest

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.pop("VSTAR_KERNELS_BACKEND", None)  # tests choose backends explicitly

# pytest-xdist workers share the cores: each gets cores // workers intra-op threads. torch's default is one per core
# in every worker, so `-n auto` ran workers x cores OpenMP threads; whenever a core was busy elsewhere their spinning
# barriers made every op up to 10x slower (2 cores, load ~3: test_real_use, test_diffusers_integration and
# test_dit_integration took 130 s and 248 s of CPU, with one thread per worker 67 s and 60 s). An OMP_NUM_THREADS
# already set wins; subprocesses inherit it. test_extension.py checks the kernels on two threads against one.
_XDIST_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
if _XDIST_WORKERS > 1 and "OMP_NUM_THREADS" not in os.environ:
    import torch

    os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // _XDIST_WORKERS))
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


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
