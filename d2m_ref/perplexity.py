"""Perplexity on held-out text (spec/convert.md §5): windows of W tokens, stride W, each a fresh
sequence from position 0; every token but a window's first is predicted from the ones before it.

    ppl = exp( Σ_windows Σ_{t=1}^{W−1} −log p(x_t | x_<t) / Σ_windows (W − 1) )
"""

from __future__ import annotations

import numpy as np

from .model import forward
from .weights import Model

HEAD_ROWS = 256  # tokens whose log-softmax is taken at once ([rows, V] float64)


def token_nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """logits [T, V], targets [T] -> −log softmax(logits)[t, targets[t]] [T], in float64."""
    z = np.asarray(logits, np.float64)
    top = z.max(axis=-1, keepdims=True)
    log_norm = top[:, 0] + np.log(np.exp(z - top).sum(axis=-1))
    return log_norm - z[np.arange(z.shape[0]), targets]


def window_nll(model: Model, ids: np.ndarray, dtype=np.float64) -> tuple[float, int]:
    """One window [W] -> (Σ −log p of ids[1:], W − 1)."""
    logits, _ = forward(model, ids, dtype=dtype)
    total = 0.0
    for lo in range(0, ids.size - 1, HEAD_ROWS):
        hi = min(lo + HEAD_ROWS, ids.size - 1)
        total += float(token_nll(logits[lo:hi], ids[lo + 1:hi + 1]).sum())
    return total, ids.size - 1


def perplexity(model: Model, windows: list[np.ndarray], dtype=np.float64, log=None) -> dict:
    """{"perplexity", "nll_per_token", "predicted_tokens", "windows"} over the windows."""
    total, count = 0.0, 0
    for k, w in enumerate(windows):
        nll, n = window_nll(model, w, dtype)
        total, count = total + nll, count + n
        if log is not None:
            log(f"perplexity: window {k + 1}/{len(windows)}, running ppl {np.exp(total / count):.3f}")
    return {"perplexity": float(np.exp(total / count)), "nll_per_token": total / count,
            "predicted_tokens": count, "windows": len(windows)}
