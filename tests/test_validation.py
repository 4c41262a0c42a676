"""Bad input fails before any launch with a message that names the argument; dispatch rules."""

from __future__ import annotations

import pytest
import torch

from vstar_kernels import tar_attention
from vstar_kernels.backends import BACKENDS, extension, torch_tar, triton_tar
from vstar_kernels.ops import BACKEND_ENV


@pytest.fixture
def no_launch(monkeypatch):
    """Make every backend's forward fail loudly: validation must reject before reaching it."""

    def launched(*args, **kwargs):
        raise AssertionError("a backend was launched")

    for impl in BACKENDS.values():
        monkeypatch.setattr(impl, "forward", launched)


def qkv(shape=(2, 8, 3, 16), **kw):
    return torch.randn(shape, **kw), torch.randn(shape, **kw), torch.randn(shape, **kw)


@pytest.mark.parametrize(
    ("mutate", "exc", "match"),
    [
        (lambda q, k, v: (q[0], k, v), ValueError, "q must be 4-D"),
        (lambda q, k, v: (q, k.unsqueeze(0), v), ValueError, "k must be 4-D"),
        (lambda q, k, v: (q, k, v[..., 0]), ValueError, "v must be 4-D"),
        (lambda q, k, v: (q, k[:1], v[:1]), ValueError, "mismatched batch"),
        (lambda q, k, v: (q, k[:, :, :2], v[:, :, :2]), ValueError, "mismatched heads"),
        (lambda q, k, v: (q, k[..., :8], v), ValueError, "mismatched head_dim"),
        (lambda q, k, v: (q, k, v[..., :8]), ValueError, "mismatched head_dim"),
        (lambda q, k, v: (q, k, v[:, :5]), ValueError, "mismatched frames"),
        (lambda q, k, v: (q, k.half(), v), TypeError, "mismatched dtype"),
        (lambda q, k, v: (q.int(), k.int(), v.int()), TypeError, "dtype"),
        (lambda q, k, v: (q, k.to("meta"), v), ValueError, "mismatched device"),
        (lambda q, k, v: (q.numpy(), k, v), TypeError, "q must be a torch.Tensor"),
        (lambda q, k, v: (q, k[:, :0], v[:, :0]), ValueError, "at least one frame"),
        (lambda q, k, v: (q[..., :0], k[..., :0], v[..., :0]), ValueError, "head_dim must be >= 1"),
    ],
)
def test_bad_tensors(no_launch, mutate, exc, match):
    q, k, v = mutate(*qkv())
    with pytest.raises(exc, match=match):
        tar_attention(q, k, v, sigma=1.0)


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"sigma": 0.0}, ValueError, "sigma must be > 0"),
        ({"sigma": -2.0}, ValueError, "sigma must be > 0"),
        ({"sigma": float("nan")}, ValueError, "sigma must be finite"),
        ({"sigma": float("inf")}, ValueError, "sigma must be finite"),
        ({"sigma": "1"}, TypeError, "sigma must be a real number"),
        ({"sigma": None}, TypeError, "sigma must be a real number"),
        ({"sigma": 1.0, "strength": float("nan")}, ValueError, "strength must be finite"),
        ({"sigma": 1.0, "strength": float("-inf")}, ValueError, "strength must be finite"),
        ({"sigma": 1.0, "mode": "relatve"}, ValueError, "mode must be one of"),
        ({"sigma": 1.0, "backend": "cuda"}, ValueError, "backend must be one of"),
        ({"sigma": 1.0, "scale": 0.0}, ValueError, "scale must be > 0"),
        ({"sigma": 1.0, "scale": float("nan")}, ValueError, "scale must be finite"),
        ({"sigma": 1.0, "q_offset": 1.5}, TypeError, "q_offset must be an integer"),
        ({"sigma": 1.0, "k_offset": True}, TypeError, "k_offset must be an integer"),
    ],
)
def test_bad_scalars(no_launch, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        tar_attention(*qkv(), **kwargs)


def test_head_dim_above_triton_limit_names_backend_and_limit(no_launch):
    with pytest.raises(RuntimeError, match=r"'triton' cannot run.*head_dim 300 exceeds.*256"):
        tar_attention(*qkv((1, 4, 1, 300)), sigma=1.0, backend="triton")


def test_float64_is_torch_only(no_launch):
    with pytest.raises(RuntimeError, match=r"dtype torch\.float64 is not supported"):
        tar_attention(*qkv(dtype=torch.float64), sigma=1.0, backend="triton")


def test_triton_on_cpu_without_interpreter_says_why(no_launch, monkeypatch):
    monkeypatch.setattr(triton_tar, "INTERPRETER", False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        tar_attention(*qkv(), sigma=1.0, backend="triton")


def test_auto_on_cpu_runs_the_extension_and_float64_on_torch(monkeypatch):
    calls = []
    for impl in (extension, torch_tar):
        real = impl.forward
        monkeypatch.setattr(impl, "forward", lambda *a, _r=real, _n=impl.NAME, **k: calls.append(_n) or _r(*a, **k))
    tar_attention(*qkv(), sigma=1.0)
    tar_attention(*qkv(dtype=torch.float64), sigma=1.0)
    assert calls == ["extension", "torch"]


def test_environment_variable_overrides_backend(monkeypatch):
    calls = []
    real = triton_tar.forward
    monkeypatch.setattr(triton_tar, "forward", lambda *a, **k: calls.append("triton") or real(*a, **k))
    monkeypatch.setenv(BACKEND_ENV, "triton")
    tar_attention(*qkv(), sigma=1.0, backend="torch")
    assert calls == ["triton"]


def test_bad_environment_variable_is_named(no_launch, monkeypatch):
    monkeypatch.setenv(BACKEND_ENV, "fast")
    with pytest.raises(ValueError, match=f"environment variable {BACKEND_ENV}"):
        tar_attention(*qkv(), sigma=1.0)


def test_empty_batch_needs_no_backend(no_launch):
    out = tar_attention(*qkv((0, 8, 3, 16)), sigma=1.0)
    assert out.shape == (0, 8, 3, 16)
