"""The checker's one comparator and its one table of tolerances (spec/tolerances.md).

Comparator (llm.c's "max diff, OK / NOT OK", made scale-aware): for a candidate tensor a and the
float64 reference b, [T, N] (one row per token),

    |a - b| <= atol_t + rtol·|b|,   atol_t = τ · rms(b[t, :]),   rtol = τ,

and the report gives the worst element as the ratio |a - b| / (atol_t + rtol·|b|) (≤ 1 passes), its
place (token, index), both values, the max |a - b|, and, for the reader, the cosine and NMSE.  The
absolute part is relative to the RMS of the token's row because rounding errors of a matrix product
scale with the size of the whole row, not of the one element; the relative part covers the final
rounding of large elements.

τ = C[stage kind] · u_eff[precision] · g(depth): u_eff the unit roundoff of what the candidate
computed in (plus its accumulator's over the longest dot product), C how many roundings one stage
makes and how much it amplifies the error it inherits, g the growth of the accumulated error with
the number of layers behind the stage (local checks: none).  The reasoning for every
entry is in spec/tolerances.md; the entries live only here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

# What the candidate computed in -> (u, u_acc, why): u the unit roundoff of what it stores and
# multiplies (the largest relative error of one rounding), u_acc that of its accumulator (float32
# in every half-precision backend; a backend that accumulates in half precision is not honest here).
# For weight-only quantisation u is the RMS error of a dequantised weight relative to the RMS of its
# row, since a matrix product averages element errors and passes on their RMS; activations are
# bf16/f16 or better.
PRECISIONS: dict[str, tuple[float, float, str]] = {
    "float64": (2.0 ** -53, 2.0 ** -53, "binary64: another float64 implementation (summation order only)"),
    "float32": (2.0 ** -24, 2.0 ** -24, "binary32, 24-bit significand, float32 accumulation"),
    "float16": (2.0 ** -11, 2.0 ** -24, "binary16, 11-bit significand, float32 accumulation"),
    "bfloat16": (2.0 ** -8, 2.0 ** -24, "bfloat16, 8-bit significand, float32 accumulation"),
    "int8w": (2.0 ** -7, 2.0 ** -24, "int8 weights, symmetric per row: RMS weight error ≈ absmax/(127·√12) "
                                     "≈ 0.7 % of the row RMS for Gaussian rows; bf16/f16 activations"),
    "int4w": (2.0 ** -3, 2.0 ** -24, "int4 weights, symmetric per group of 32: RMS weight error ≈ "
                                     "absmax/(7·√12) ≈ 10 % of the row RMS; bf16/f16 activations"),
}

# Stage kind -> (C_local, C_drift, why), in units of u_eff.  C_local bounds the error one stage makes
# from exact inputs; C_drift the error of the stage against the reference pass, per √depth (the
# inherited error of the residual stream, amplified by the stage, plus its own).  Honest candidates
# (transformers and tests/peer/buggy.py in f16, bf16, f32, int8w, int4w; 7 families, Dense2MoE
# layouts, 3-12 layers, many seeds) stay below 1/2.3 of every entry (spec/tolerances.md, "Calibration").
STAGE_FACTORS: dict[str, tuple[float, float, str]] = {
    "embeddings": (2.0, 2.0, "one rounding of the stored table (observed ≤ 0.7)"),
    "attn_out": (24.0, 36.0, "norm, q/k/v projections, RoPE, q·k, softmax, weighted sum, o_proj: ~8 roundings, "
                             "and scores of size ~√D amplify q/k errors (observed ≤ 9.3 local, 13.6 drift)"),
    "router_logits": (10.0, 28.0, "norm and one projection (observed ≤ 4.3 local, 10.1 drift)"),
    "router_scores": (10.0, 28.0, "softmax/sigmoid of the logits: derivative ≤ 1"),
    "topk_weights": (8.0, 20.0, "the chosen scores, maybe renormalised (observed ≤ 2.9 local, 7.3 drift)"),
    "ffn_out": (32.0, 100.0, "norm, gate/up projections, silu, product (relative errors add), down "
                             "projection, weighted sum of experts (observed ≤ 13.7 local, 40 drift)"),
    "hidden": (4.0, 40.0, "local: two additions; drift: the whole residual stream (observed ≤ 1.4, 14.6)"),
    "final_norm": (5.0, 40.0, "one RMSNorm of the residual stream (observed ≤ 2.1, 15.8)"),
    "logits": (10.0, 64.0, "one projection from a normalised input, as router_logits (observed ≤ 3.3 with "
                           "int4 weights, 24 drift)"),
}


def unit_roundoff(precision: str, reduction: int = 1) -> float:
    """u_eff = u + u_acc·√N: one rounding of each result, plus the accumulated rounding of a length-N
    dot product (probabilistic bound, Higham & Mary 2019); N = the model's longest reduction."""
    u, u_acc, _ = PRECISIONS[precision]
    return u + u_acc * math.sqrt(max(reduction, 1))


def drift_growth(depth: int) -> float:
    """g(n): the accumulated error of n layers is the sum of n fresh ones that propagate with gain ≈ 1
    through the residual stream and are independent: it grows as √n.  (n = 0, the embeddings, has only
    its own rounding.)"""
    return math.sqrt(max(depth, 1))


def tolerance(kind: str, precision: str, depth: int = 1, local: bool = False, reduction: int = 1) -> float:
    """τ for a stage of `kind` at `depth` layers (drift) or recomputed from the candidate's own inputs
    (local: only this stage's rounding, no growth), for a candidate computing in `precision`."""
    c_local, c_drift, _ = STAGE_FACTORS[kind]
    u = unit_roundoff(precision, reduction)
    return c_local * u if local else c_drift * u * drift_growth(depth)


@dataclass(frozen=True)
class Comparison:
    """Result of comparing one candidate tensor with the reference."""

    tau: float
    ratio: float  # max |a-b| / (atol_t + rtol|b|): <= 1 passes
    max_abs: float  # max |a-b|
    where: tuple[int, ...]  # index of the worst element (by ratio)
    candidate: float
    reference: float
    rms: float  # RMS of the reference row holding the worst element
    cos_min: float  # the smallest per-token cosine similarity
    nmse: float  # Σ(a-b)² / Σb², as llama.cpp's test-backend-ops reports it
    bad: int  # elements over the tolerance
    size: int

    @property
    def ok(self) -> bool:
        return self.ratio <= 1.0

    def as_dict(self) -> dict:
        return {"tau": self.tau, "ratio": self.ratio, "max_abs": self.max_abs, "where": list(self.where),
                "candidate": self.candidate, "reference": self.reference, "row_rms": self.rms,
                "cos_min": self.cos_min, "nmse": self.nmse, "elements_over": self.bad, "elements": self.size}


def row_rms(b: np.ndarray) -> np.ndarray:
    """[T, N] -> [T, 1]: RMS of each row; a row of zeros takes the whole tensor's RMS (or 1e-300)."""
    r = np.sqrt(np.mean(np.square(b), axis=-1, keepdims=True))
    whole = float(np.sqrt(np.mean(np.square(b)))) if b.size else 0.0
    return np.where(r > 0, r, whole if whole > 0 else 1e-300)


# Stage kinds whose rows are scaled by the whole tensor's RMS: the router reads a normalised input, so
# every token's logits share one scale, and a row of E (or K) values is too short for its own RMS to
# be a stable scale (three logits can all be near 0 by chance while their errors are not).
TENSOR_SCALED = frozenset({"router_logits", "router_scores", "topk_weights"})


def compare(candidate: np.ndarray, reference: np.ndarray, tau: float, scale: str = "row") -> Comparison:
    """The comparator: |a - b| <= τ·s + τ·|b| for every element of [T, N] (or [N]) arrays, s the RMS
    of the element's row of b (scale="row") or of all of b (scale="tensor").

    Both are taken as float64; shapes must already agree and `candidate` be finite (the checker
    reports NaN/Inf and shape mismatches before calling this).
    """
    a = np.asarray(candidate, dtype=np.float64)
    b = np.asarray(reference, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"compare: shapes {a.shape} and {b.shape} differ")
    a2, b2 = (a.reshape(1, -1), b.reshape(1, -1)) if b.ndim < 2 else (a.reshape(-1, b.shape[-1]), b.reshape(-1, b.shape[-1]))
    rms = row_rms(b2)
    if scale == "tensor":
        rms = np.full_like(rms, float(np.sqrt(np.mean(np.square(b2)))) or 1e-300)
    diff = np.abs(a2 - b2)
    allowed = tau * (rms + np.abs(b2))
    ratios = diff / allowed
    flat = int(np.argmax(ratios))
    t, j = divmod(flat, b2.shape[1])
    where = tuple(int(i) for i in np.unravel_index(flat, b.shape)) if b.ndim else ()
    num = np.sum(a2 * b2, axis=-1)
    den = np.linalg.norm(a2, axis=-1) * np.linalg.norm(b2, axis=-1)
    cos = np.where(den > 0, num / np.where(den > 0, den, 1.0), np.where(np.linalg.norm(a2 - b2, axis=-1) == 0, 1.0, 0.0))
    ref_energy = float(np.sum(np.square(b2)))
    return Comparison(
        tau=tau, ratio=float(ratios[t, j]), max_abs=float(diff.max()) if diff.size else 0.0, where=where,
        candidate=float(a2[t, j]), reference=float(b2[t, j]), rms=float(rms[t, 0]),
        cos_min=float(cos.min()) if cos.size else 1.0,
        nmse=float(np.sum(np.square(a2 - b2)) / ref_energy) if ref_energy > 0 else float(np.sum(np.square(a2))),
        bad=int(np.sum(ratios > 1.0)), size=int(b.size))


def logit_stats(candidate: np.ndarray, reference: np.ndarray) -> dict:
    """Token-distribution agreement as quantisation people read it (llama.cpp perplexity --kl-divergence):
    KL(reference ‖ candidate) per token (mean, max), and how often both pick the same top token."""
    a = np.asarray(candidate, np.float64)
    b = np.asarray(reference, np.float64)
    lp = b - b.max(-1, keepdims=True)
    lp = lp - np.log(np.exp(lp).sum(-1, keepdims=True))
    lq = a - a.max(-1, keepdims=True)
    lq = lq - np.log(np.exp(lq).sum(-1, keepdims=True))
    kl = np.sum(np.exp(lp) * (lp - lq), axis=-1)
    same = np.argmax(a, -1) == np.argmax(b, -1)
    return {"kl_mean": float(kl.mean()), "kl_max": float(kl.max()), "same_top1": float(same.mean()),
            "top1_differs_at": [int(t) for t in np.nonzero(~same)[0]]}
