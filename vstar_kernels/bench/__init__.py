"""The benchmark harness behind ``python -m bench.sweep`` and ``vstar-kernels bench`` (matplotlib and rich: the
``bench`` extra): providers (every peer behind one interface), interleaved timing, memory measurement, the sweep
and its plots. The repository's ``bench/`` folder holds the entry points and the committed results.
"""
