"""``python -m vstar_kernels.nvcc_check``, the command's original name.

The check lives in :mod:`vstar_kernels.checks.nvcc_check`.
"""

from .checks.nvcc_check import main

if __name__ == "__main__":
    raise SystemExit(main())
