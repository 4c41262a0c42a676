"""setuptools entry kept for the C++/CUDA extension (csrc/), which a later build step adds here.

All metadata lives in pyproject.toml; today this builds the pure-Python package.
"""

from setuptools import setup

setup()
