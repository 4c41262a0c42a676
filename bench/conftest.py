"""``pytest bench``: the microbenchmarks need pytest-benchmark (the ``bench`` extra). Say so before pytest fails on
its options (``--benchmark-only``) or on the missing ``benchmark`` fixture."""

import importlib.util

import pytest

if importlib.util.find_spec("pytest_benchmark") is None:
    raise pytest.UsageError("pytest bench (the microbenchmarks) needs pytest-benchmark, not installed: "
                            "pip install 'vstar-kernels[bench]'")
