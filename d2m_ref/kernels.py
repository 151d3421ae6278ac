"""The kernel interface: the two products the forward pass delegates, `linear` and `expert`.

This is the seam for the C kernels (the expert GEMV of decode): a kernel set takes activations in
the compute dtype and a weight in its storage format, and returns activations in the compute
dtype.  `NumpyKernels` is the reference: it converts the weight (a block of rows at a time for
big matrices, spec §6) to the compute dtype, multiplies with NumPy, and drops the converted copy.
"""

from __future__ import annotations

import numpy as np

from .ops import swiglu
from .weights import MLPWeights, Param

# Largest converted weight block held at once; bigger matrices (the LM head of a 150k vocabulary
# is 2.5 GB in float64) are done in row blocks.  The split depends only on the matrix shape and
# dtype, so results do not depend on how the weights are stored.
BLOCK_BYTES = 128 * 2**20


class NumpyKernels:
    """Reference kernels.  Result dtype = x.dtype."""

    name = "numpy"

    def __init__(self, block_bytes: int = BLOCK_BYTES):
        self.block_bytes = block_bytes

    def linear(self, x: np.ndarray, w: Param) -> np.ndarray:
        """[T, C], weight [R, C] -> [T, R]: x·Wᵀ."""
        rows, cols = w.shape
        per_block = max(1, self.block_bytes // (cols * x.dtype.itemsize))
        if rows <= per_block:
            return x @ w.load(x.dtype).T
        out = np.empty((x.shape[0], rows), dtype=x.dtype)
        for lo in range(0, rows, per_block):
            hi = min(rows, lo + per_block)
            out[:, lo:hi] = x @ w.rows(lo, hi, x.dtype).T
        return out

    def expert(self, x: np.ndarray, w: MLPWeights) -> np.ndarray:
        """[T, H] -> [T, H]: down(silu(gate·x) ⊙ up·x), spec §4.1."""
        return self.linear(swiglu(self.linear(x, w.gate), self.linear(x, w.up)), w.down)


def default_kernels() -> NumpyKernels:
    """The kernel set used when none is given."""
    return NumpyKernels()
