"""Which kernel set runs a forward pass: the NumPy reference (d2m_ref.kernels) or the C kernels
(d2m_ref.ckernels), by name — what `--kernels c|numpy` and `kernels_for` choose between."""

from __future__ import annotations

from . import ckernels
from .errors import InputError
from .kernels import NumpyKernels

KERNEL_NAMES = ("c", "numpy")


def c_kernels_available() -> bool:
    """Whether the C extension was built (d2m_ref.ckernels)."""
    return ckernels.available()


def kernels_for(name: str, **options):
    """'numpy' -> NumpyKernels(); 'c' -> CKernels(**options) (path=, threads=, max_tokens=), or,
    when the C extension is not built, NumpyKernels with one warning saying so.  CKernels computes
    float32 only: in float64 (the oracle mode) it hands every call to the NumPy reference."""
    if name == "numpy":
        return NumpyKernels()
    if name == "c":
        if not ckernels.available():
            ckernels.warn_once("unavailable", ckernels.unavailable_reason())
            return NumpyKernels()
        return ckernels.CKernels(**options)
    raise InputError(f"kernels {name!r}: choose one of {', '.join(KERNEL_NAMES)}")
