"""setuptools entry: the package, its C++ sources (csrc/ ships as ``vstar_kernels/csrc`` for just-in-time builds), and
on request the ahead-of-time extension.

``VSTAR_KERNELS_BUILD_EXT=1 pip install --no-build-isolation .`` builds ``vstar_kernels._C``: a CppExtension, or a
CUDAExtension (adding csrc/tar_attention_cuda.cu) where torch is a CUDA build and a CUDA toolkit is found. Without the
variable nothing is compiled at install time and the extension is built on first use. Metadata: pyproject.toml.
"""

import os
import sys
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent
CSRC_FILES = ["*.h", "*.cpp", "*.cu"]


def extension_build() -> dict:
    if os.environ.get("VSTAR_KERNELS_BUILD_EXT", "").strip() in ("", "0"):
        return {}
    from torch.utils import cpp_extension

    sys.path.insert(0, str(ROOT))
    from vstar_kernels.backends.extension_build import compile_flags, cuda_flags, sources, with_cuda

    files = [f"csrc/{name}" for name in sources()]
    cxx = compile_flags()
    if with_cuda():
        ext = cpp_extension.CUDAExtension(
            "vstar_kernels._C", files, include_dirs=[str(ROOT / "csrc")], extra_link_args=["-fopenmp"],
            extra_compile_args={"cxx": cxx, "nvcc": cuda_flags()},
        )
    else:
        ext = cpp_extension.CppExtension("vstar_kernels._C", files, include_dirs=[str(ROOT / "csrc")],
                                         extra_compile_args=cxx, extra_link_args=["-fopenmp"])
    return {"ext_modules": [ext], "cmdclass": {"build_ext": cpp_extension.BuildExtension}}


setup(
    packages=[*find_packages(include=["vstar_kernels", "vstar_kernels.*"]), "vstar_kernels.csrc"],
    package_dir={"vstar_kernels.csrc": "csrc"},
    package_data={"vstar_kernels.csrc": CSRC_FILES},
    **extension_build(),
)
