"""The kernel interface: the products the forward pass delegates, `linear`, `expert` and
`experts_topk`.

This is the seam for the C kernels (the expert GEMV of decode): a kernel set takes activations in
the compute dtype and a weight in its storage format, and returns activations in the compute
dtype.  `NumpyKernels` is the reference: it converts the weight (a block of rows at a time for
big matrices, spec §6) to the compute dtype, multiplies with NumPy, and drops the converted copy.
`CKernels` (d2m_ref/ckernels.py, spec/kernels.md) runs float32 compute on the C extension;
`d2m_ref.kernel_choice.kernels_for("c" | "numpy")` picks one.
"""

from __future__ import annotations

import numpy as np

from .errors import InputError
from .ops import swiglu
from .weights import MLPWeights, Param

# Largest converted weight block held at once; bigger matrices (the LM head of a 150k vocabulary
# is 2.5 GB in float64) are done in row blocks.  The split depends only on the matrix shape and
# dtype, so results do not depend on how the weights are stored.
BLOCK_BYTES = 128 * 2**20
# With few tokens (decode) the product is cheap and converting the weight is the work: converting a
# cache-sized block of rows and using it at once is about 4x faster than converting the whole
# matrix to memory and reading it back.  Which split is used depends only on the shapes and dtype.
DECODE_TOKENS = 16
DECODE_BLOCK_BYTES = 2**20


class NumpyKernels:
    """Reference kernels.  Result dtype = x.dtype."""

    name = "numpy"

    def __init__(self, block_bytes: int = BLOCK_BYTES):
        self.block_bytes = block_bytes

    def linear(self, x: np.ndarray, w: Param) -> np.ndarray:
        """[T, C], weight [R, C] -> [T, R]: x·Wᵀ."""
        rows, cols = w.shape
        budget = self.block_bytes
        if x.shape[0] <= DECODE_TOKENS:
            budget = min(budget, DECODE_BLOCK_BYTES)
        per_block = max(1, budget // (cols * x.dtype.itemsize))
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

    def experts_topk(self, x: np.ndarray, experts, topk_ids: np.ndarray, topk_weights: np.ndarray) -> np.ndarray:
        """[T, H], E experts, [T, K], [T, K] -> [T, H]: Σ_k topk_weights[t, k] · expert_{topk_ids[t, k]}(x[t]),
        the routed part of spec §4.2 step 5."""
        return experts_topk_loop(self, x, experts, topk_ids, topk_weights)


def experts_topk_loop(kernels, x: np.ndarray, experts, topk_ids: np.ndarray, topk_weights: np.ndarray) -> np.ndarray:
    """The reference order of the routed sum: experts in increasing id, each on the tokens that chose
    it, y[tokens] += weight · expert(x[tokens]) starting from zeros.  model.moe reaches it through
    the kernel set's experts_topk."""
    topk_ids = np.asarray(topk_ids)
    if topk_ids.size and (topk_ids.min() < 0 or topk_ids.max() >= len(experts)):
        raise InputError(f"expert ids must be in 0..{len(experts) - 1}, found {int(topk_ids.min())}.."
                         f"{int(topk_ids.max())}")  # a negative id would wrap like a Python index
    y = np.zeros_like(x)
    for e in np.unique(topk_ids):
        tokens, slots = np.nonzero(topk_ids == e)  # a token picks an expert at most once
        y[tokens] += topk_weights[tokens, slots][:, None] * kernels.expert(x[tokens], experts[e])
    return y


def default_kernels() -> NumpyKernels:
    """The kernel set used when none is given."""
    return NumpyKernels()
