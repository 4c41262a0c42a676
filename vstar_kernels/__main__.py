"""``python -m vstar_kernels``: what ``vstar-kernels info`` prints (versions, devices, which backend runs where and
why the others do not), like ``python -m xformers.info``; any arguments are those of the ``vstar-kernels`` command."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:] or ["info"]))
