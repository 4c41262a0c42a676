"""``python -m bench.sweep``: the benchmark sweep (vstar_kernels.bench.sweep), writing into bench/results/.

Same options as ``vstar-kernels bench``; see ``python -m bench.sweep --help``.
"""

from pathlib import Path

from vstar_kernels.bench.sweep import main

if __name__ == "__main__":
    raise SystemExit(main(default_out=Path(__file__).resolve().parent / "results"))
