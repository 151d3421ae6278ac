"""The operations of spec/architecture.md, one equation per function, over plain arrays.

Pure functions: no weights loading, no state.  Every function computes in the dtype of its
inputs (float64 in oracle mode, float32 otherwise): there are no hidden casts — transformers'
float32 islands (norms, RoPE, softmaxes) are deliberately not copied (spec §0).
Dimension letters as in d2m_ref/model.py.
"""

from __future__ import annotations

import numpy as np

from .config import RopeSpec


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """[..., N], [N] -> [..., N].  spec §2.1: x / sqrt(mean(x²) + eps) ⊙ weight."""
    # the mean as np.mean computes it (sum, then / N), without its Python-level wrapper: decode
    # calls this twice per layer on one row, where the wrapper was a third of the time
    variance = np.add.reduce(np.square(x), axis=-1, keepdims=True) / x.dtype.type(x.shape[-1])
    return x / np.sqrt(variance + eps) * weight


def rope_inv_freq(rope: RopeSpec, head_dim: int, dtype: np.dtype) -> np.ndarray:
    """-> [D/2].  spec §2.3: θ^(-2i/D), with 'linear' or 'llama3' frequency scaling."""
    i = np.arange(0, head_dim, 2, dtype=np.float64)
    inv_freq = 1.0 / (rope.theta ** (i / head_dim))
    if rope.rope_type == "linear":
        inv_freq = inv_freq / rope.factor
    elif rope.rope_type == "llama3":
        inv_freq = _llama3_scale(inv_freq, rope)
    return inv_freq.astype(dtype)


def _llama3_scale(inv_freq: np.ndarray, rope: RopeSpec) -> np.ndarray:
    """spec §2.3.1: long wavelengths divided by `factor`, short ones kept, a linear blend between."""
    low_wavelen = rope.original_max_position_embeddings / rope.low_freq_factor
    high_wavelen = rope.original_max_position_embeddings / rope.high_freq_factor
    wavelen = 2 * np.pi / inv_freq
    smooth = (rope.original_max_position_embeddings / wavelen - rope.low_freq_factor) / (
        rope.high_freq_factor - rope.low_freq_factor)
    blended = (1 - smooth) * inv_freq / rope.factor + smooth * inv_freq
    return np.where(wavelen > low_wavelen, inv_freq / rope.factor,
                    np.where(wavelen < high_wavelen, inv_freq, blended))


def rope_cos_sin(positions: np.ndarray, inv_freq: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[T] int, [D/2] -> cos [T, D], sin [T, D].  Angles p·inv_freq, each half repeated."""
    angles = positions.astype(inv_freq.dtype)[:, None] * inv_freq[None, :]
    angles = np.concatenate([angles, angles], axis=-1)
    return np.cos(angles), np.sin(angles)


def rotate_half(x: np.ndarray) -> np.ndarray:
    """[..., D] -> [..., D]: (x1, x2) -> (-x2, x1), halves of the last axis."""
    half = x.shape[-1] // 2
    return np.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """[T, N, D], [T, D], [T, D] -> [T, N, D].  spec §2.3: x·cos + rotate_half(x)·sin."""
    return x * cos[:, None, :] + rotate_half(x) * sin[:, None, :]


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """Softmax along `axis`, max-subtracted.  Fully masked rows are not produced by our callers."""
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def sigmoid(x: np.ndarray) -> np.ndarray:
    """Elementwise 1 / (1 + exp(-x)), without overflow warnings for large |x|."""
    out = np.empty_like(x)
    pos = x >= 0
    out[pos] = 1.0 / (1.0 + np.exp(-x[pos]))
    ex = np.exp(x[~pos])
    out[~pos] = ex / (1.0 + ex)
    return out


def silu(x: np.ndarray) -> np.ndarray:
    """x · sigmoid(x)."""
    return x * sigmoid(x)


def swiglu(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    """[T, F], [T, F] -> [T, F].  spec §4.1: silu(gate) ⊙ up."""
    return silu(gate) * up


def causal_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, q_positions: np.ndarray,
                     k_positions: np.ndarray) -> np.ndarray:
    """q [T, Nh, D], k/v [S, Nkv, D], positions [T], [S] -> [T, Nh, D].  spec §3.4.

    Grouped-query: query head h reads key/value head h // G, G = Nh / Nkv.  A query at position
    p attends to keys at positions <= p.  Scores are scaled by 1/sqrt(D).  The G query heads of
    a key/value head are one [G·T, D] matrix against that head's keys: no copy of the keys per
    query head, and one matrix product per key/value head (decode reads the whole cache here
    every step).
    """
    T, Nh, D = q.shape
    S, Nkv, _ = k.shape
    G = Nh // Nkv
    q = q.reshape(T, Nkv, G, D).transpose(1, 2, 0, 3).reshape(Nkv, G * T, D)  # head h = kv·G + g
    scores = np.matmul(q, k.transpose(1, 2, 0)) / np.sqrt(D).astype(q.dtype)  # [Nkv, G·T, S]
    scores = scores.reshape(Nkv, G, T, S)
    allowed = k_positions[None, :] <= q_positions[:, None]  # [T, S]
    scores = np.where(allowed, scores, -np.inf)  # rebound: one [Nkv, G, T, S] block alive at a time
    probs = softmax(scores, axis=-1)
    out = np.matmul(probs.reshape(Nkv, G * T, S), v.transpose(1, 0, 2))  # [Nkv, G·T, D]
    return out.reshape(Nkv, G, T, D).transpose(2, 0, 1, 3).reshape(T, Nh, D)


def router_scores(router_logits: np.ndarray, scoring: str) -> np.ndarray:
    """[T, E] -> [T, E].  spec §4.2 (2): softmax over experts, or elementwise sigmoid."""
    return softmax(router_logits, axis=-1) if scoring == "softmax" else sigmoid(router_logits)


def top_k(choice_scores: np.ndarray, k: int) -> np.ndarray:
    """[T, E] -> topk_ids [T, K] int64.  spec §4.2 (3): the k largest, in descending order;
    on equal scores the lower expert index wins (a stable sort of -score)."""
    return np.argsort(-choice_scores, axis=-1, kind="stable")[:, :k].astype(np.int64)


def topk_weights(scores: np.ndarray, topk_ids: np.ndarray, norm_topk_prob: bool,
                 routed_scaling_factor: float) -> np.ndarray:
    """[T, E], [T, K] -> [T, K].  spec §4.2 (4): the chosen scores (never the selection bias),
    renormalised to sum 1 if asked, times the routed scaling factor."""
    w = np.take_along_axis(scores, topk_ids, axis=-1)
    if norm_topk_prob:
        total = np.sum(w, axis=-1, keepdims=True)
        # sigmoid scores can all underflow to 0: such a token then gets weights 0, not 0/0 = NaN
        w = np.divide(w, total, out=np.zeros_like(w), where=total > 0)
    return w * scores.dtype.type(routed_scaling_factor)
