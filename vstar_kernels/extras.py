"""Which optional modules (the ``demo`` and ``bench`` extras) are installed, asked without importing them: shared by
the CLI, the demo and the benchmark sweep, so none of them imports another for it."""

from __future__ import annotations

from collections.abc import Sequence


def missing_modules(names: Sequence[str]) -> list[str]:
    """Those of ``names`` that cannot be imported (no import is run: ``importlib.util.find_spec``), so a command
    can refuse before it does any work rather than fail on an import after it."""
    import importlib.util

    missing = []
    for name in names:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):  # a parent package missing, or sys.modules[name] = None
            found = False
        if not found:
            missing.append(name)
    return missing
