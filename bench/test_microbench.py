"""pytest-benchmark microbenchmarks of TAR temporal attention (``pytest bench --benchmark-only``).

Not part of the default test run (pyproject's testpaths is tests/). Shapes are the temporal attention of real
models: ModelScope/VideoCrafter-style head_dim 64 with 5/10/20 heads, AnimateDiff 8 heads x 40/80/160, at 16-512
frames, with ``VSTAR_BENCH_TOKENS`` (default 4096) = batch*frames tokens per call. Each benchmark group is one point
(shape, frames, mode), so ``--benchmark-group-by=group`` lines the providers up side by side; providers that cannot
run a point (FlexAttention in relative mode, CUDA-only kernels on a CPU) are skipped with the reason.
For the side-by-side CSV and plots use ``python -m bench.sweep``.
"""

from __future__ import annotations

import os

import pytest
import torch

from vstar_kernels.bench.providers import PROVIDERS, make_case
from vstar_kernels.bench.sweep import SHAPES

TOKENS = int(os.environ.get("VSTAR_BENCH_TOKENS", "4096"))
FRAMES = (16, 64, 128, 256, 512)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.float16 if DEVICE == "cuda" else torch.float32


@pytest.mark.parametrize("provider", list(PROVIDERS))
@pytest.mark.parametrize("mode", ["relative", "absolute"])
@pytest.mark.parametrize("frames", FRAMES)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_tar_attention(benchmark, shape, frames, mode, provider):
    spec = SHAPES[shape]
    case = make_case(TOKENS, frames, spec.heads, spec.head_dim, mode, dtype=DTYPE, device=DEVICE)
    reason = PROVIDERS[provider].unavailable(case)
    if reason is not None:
        pytest.skip(reason)
    thunk = PROVIDERS[provider].build(case)
    benchmark.group = f"{shape} F={frames} {mode}"
    benchmark.extra_info.update(batch=case.q.shape[0], dtype=str(DTYPE), device=DEVICE)
    sync = torch.cuda.synchronize if DEVICE == "cuda" else (lambda: None)

    def run() -> None:
        thunk()
        sync()

    with torch.inference_mode():
        benchmark(run)
