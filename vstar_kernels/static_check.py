"""``python -m vstar_kernels.static_check``, the command's original name.

The check lives in :mod:`vstar_kernels.checks.static_check`.
"""

from .checks.static_check import main

if __name__ == "__main__":
    raise SystemExit(main())
