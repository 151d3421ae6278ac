"""The checker's one comparator (spec/tolerances.md §1, §3).

For a candidate tensor a, the float64 reference b and σ, the standard deviation of the rounding error
the candidate's precision puts there (d2m_ref.rounding, computed beside the reference), both [T, N]:

    element    |a − b| ≤ κ·σ                      for every element,
    aggregate  √(mean((a − b)² / σ²)) ≤ κ_rms       over the tensor,

and the report gives each as a ratio to its bound (≤ 1 passes).  The element test catches an error
at a few places; the aggregate one an error spread thinly over all of them (a projection scaled by
2 % moves every element by less than κσ in bfloat16, but all of them at once, which rounding does
not).  The constants are here and nowhere else; spec/tolerances.md §3 derives them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

# κ: if the model's σ were exact and errors Gaussian, P(|z| > κ) per element = erfc(κ/√2); a check
# of a 1,024-token prompt of a 3B model compares ~1e9 elements, and 1e-3 false alarms per check
# asks 1e-12 per element: κ = 7.1, taken as 8.
KAPPA = 8.0
# κ_rms: under the model mean(z²) = 1 (≤ 1: the model bounds covariances it drops); 2 leaves the
# model room to underestimate σ by 2× on average over a whole tensor before it cries wolf.
KAPPA_RMS = 2.0
# The logits' mean KL divergence against its expectation under the model (rounding.expected_kl):
# KL is quadratic in the error, so the same room: κ_rms².
KAPPA_KL = KAPPA_RMS ** 2
SIGMA_FLOOR = 2.0 ** -20  # relative to the tensor's RMS times u: where the model says "exact" (0·0)


@dataclass(frozen=True)
class Comparison:
    """Result of comparing one candidate tensor with the reference."""

    ratio: float  # max |a-b| / (κσ): <= 1 passes
    rms_ratio: float  # √mean(((a-b)/σ)²) / κ_rms: <= 1 passes
    max_abs: float  # max |a-b|
    where: tuple[int, ...]  # index of the worst element (by ratio)
    candidate: float
    reference: float
    sigma: float  # σ at the worst element
    cos_min: float  # the smallest per-token cosine similarity
    nmse: float  # Σ(a-b)² / Σb², as llama.cpp's test-backend-ops reports it
    bad: int  # elements over κσ
    size: int

    @property
    def ok(self) -> bool:
        return self.ratio <= 1.0 and self.rms_ratio <= 1.0

    @property
    def score(self) -> float:
        """How far past its bound the worse of the two tests is (<= 1 passes)."""
        return max(self.ratio, self.rms_ratio)

    def as_dict(self) -> dict:
        return {"ratio": self.ratio, "rms_ratio": self.rms_ratio, "max_abs": self.max_abs, "where": list(self.where),
                "candidate": self.candidate, "reference": self.reference, "sigma": self.sigma,
                "allowed": KAPPA * self.sigma, "cos_min": self.cos_min, "nmse": self.nmse,
                "elements_over": self.bad, "elements": self.size}


def _rows(x: np.ndarray, like: np.ndarray) -> np.ndarray:
    return x.reshape(1, -1) if like.ndim < 2 else x.reshape(-1, like.shape[-1])


def compare(candidate: np.ndarray, reference: np.ndarray, sigma: np.ndarray, u: float,
            rows: np.ndarray | None = None) -> Comparison:
    """The comparator over [T, N] (or [N]) arrays: |a − b| ≤ κσ per element and √mean(((a−b)/σ)²) ≤ κ_rms.

    σ is floored at SIGMA_FLOOR·u·rms(b) (elements the model calls exact, such as 0·0).  `rows`, a
    boolean [T], restricts both tests to those token rows.  Both arrays are taken as float64; shapes
    must already agree and `candidate` be finite (the checker reports NaN/Inf and shape mismatches
    before calling this).
    """
    a = np.asarray(candidate, dtype=np.float64)
    b = np.asarray(reference, dtype=np.float64)
    if a.shape != b.shape or np.shape(sigma) != b.shape:
        raise ValueError(f"compare: shapes {a.shape}, {b.shape} and σ {np.shape(sigma)} differ")
    a2, b2 = _rows(a, b), _rows(b, b)
    whole = float(np.sqrt(np.mean(np.square(b2)))) if b2.size else 0.0
    s2 = np.maximum(_rows(np.asarray(sigma, np.float64), b), SIGMA_FLOOR * u * whole + 1e-300)
    keep = np.ones(a2.shape[0], bool) if rows is None else np.asarray(rows, bool)
    diff = np.abs(a2 - b2)
    z = np.where(keep[:, None], diff / s2, 0.0)
    flat = int(np.argmax(z))
    t, j = divmod(flat, b2.shape[1])
    where = tuple(int(i) for i in np.unravel_index(flat, b.shape)) if b.ndim else ()
    n = int(keep.sum()) * b2.shape[1]
    num = np.sum(a2 * b2, axis=-1)
    den = np.linalg.norm(a2, axis=-1) * np.linalg.norm(b2, axis=-1)
    cos = np.where(den > 0, num / np.where(den > 0, den, 1.0), np.where(np.linalg.norm(a2 - b2, axis=-1) == 0, 1.0, 0.0))
    ref_energy = float(np.sum(np.square(b2)))
    return Comparison(
        ratio=float(z[t, j]) / KAPPA, rms_ratio=math.sqrt(float(np.sum(np.square(z))) / max(n, 1)) / KAPPA_RMS,
        max_abs=float(diff.max()) if diff.size else 0.0, where=where,
        candidate=float(a2[t, j]), reference=float(b2[t, j]), sigma=float(s2[t, j]),
        cos_min=float(cos.min()) if cos.size else 1.0,
        nmse=float(np.sum(np.square(a2 - b2)) / ref_energy) if ref_energy > 0 else float(np.sum(np.square(a2))),
        bad=int(np.sum(z > KAPPA)), size=n)


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
