"""Run under compute-sanitizer by tests/test_cuda.py: forward and backward of one backend over head_dim
{40, 80, 160, 256} x frames {1, 17, 300}, both modes, fp16 (and fp32 for the extension). Exit status 0 when every
call ran; the sanitizer reports the errors."""

from __future__ import annotations

import itertools
import sys

import torch

from vstar_kernels import tar_attention


def main(backend: str) -> int:
    dtypes = [torch.float16, torch.float32] if backend == "extension" else [torch.float16]
    for dim, frames, mode, dtype in itertools.product((40, 80, 160, 256), (1, 17, 300), ("relative", "absolute"),
                                                      dtypes):
        qkv = torch.randn(2, frames, 3 * 3 * dim, device="cuda", dtype=dtype, requires_grad=True)  # fused QKV
        q, k, v = (t.unflatten(-1, (3, dim)) for t in qkv.chunk(3, dim=-1))
        out = tar_attention(q, k, v, sigma=2.0, mode=mode, q_offset=5, backend=backend)
        torch.autograd.grad(out, qkv, torch.randn_like(out))
    torch.cuda.synchronize()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
