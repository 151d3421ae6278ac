"""Build configuration that pyproject.toml cannot hold: the cffi extension of the C kernels.

The project's metadata lives in pyproject.toml.  `cffi_modules` builds d2m_ref._d2m_kernels from
c_src/ (see d2m_ref/_build_kernels.py); if that fails (no compiler), the install still succeeds
and d2m_ref runs on its NumPy kernels.
"""

import sys
from pathlib import Path

from setuptools import setup

sys.path.insert(0, str(Path(__file__).resolve().parent / "d2m_ref"))
from _build_kernels import build_ext_class  # noqa: E402  (d2m_ref itself is not importable yet)

setup(
    cffi_modules=["d2m_ref/_build_kernels.py:ffibuilder"],
    cmdclass={"build_ext": build_ext_class()},
)
