"""How much a candidate's rounding moves each element: the error model of spec/tolerances.md §2.

The candidate computes the spec's forward pass in finite precision.  Each number it stores carries a
relative rounding error ε with |ε| ≤ u, which we model as independent and uniform, variance u²/3
(Higham, "Accuracy and Stability of Numerical Algorithms", §2.8; the probabilistic analysis of
Higham & Mary 2019 rests on the same independence).  To first order, an error δ in an operand moves
the result by the operation's derivative times δ, and independent errors add in variance.  Each
function below is one equation of spec/tolerances.md §2.3: given the reference's operands and the
error variance of each, the error variance of the result.

Variances are held in units of u² (u: the candidate's storage unit roundoff), float32: magnitudes
need two digits, not sixteen.  The model is evaluated twice, at the point each check compares at:

    drift  along the reference forward pass (its routes, forced ones included), every rounding since
           the embeddings: the candidate against the reference;
    local  along the candidate's own inputs of a layer (its hidden.{i-1}, its attn_out when dumped,
           its routes), only that layer's roundings: the layer recomputed from the candidate's own
           residual stream.  Evaluated where the candidate is, not where the reference is: where a
           value cancels, the two can differ by more than the local error itself.

Dimension letters as in d2m_ref/model.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np

from .config import ModelConfig
from .ops import rms_norm, rope_inv_freq, rotate_half, sigmoid, silu, softmax, top_k
from .weights import MLPWeights, Model, MoEWeights, Param

F32 = np.float32
STORE = 1.0 / 3.0  # one rounding of v: variance v²/3, in units of u²
BLOCK_BYTES = 64 * 2**20  # the largest weight block squared at once


@dataclass(frozen=True)
class Arithmetic:
    """What a candidate computes in (spec/tolerances.md §2.1).

    u        unit roundoff of every number it stores (activations, intermediates, weights);
    u_acc    unit roundoff of its dot-product accumulator;
    u_w      the error of a stored weight: relative to the weight itself ("element": a float rounding)
             or RMS relative to its row's RMS ("row": a quantised weight, which a matrix product
             averages over the row);
    u_angle  unit roundoff of the RoPE angles p·ω (every backend we know computes them in float32).
    """

    u: float
    u_acc: float
    u_w: float
    weight_form: str
    u_angle: float
    why: str
    tiny: float = 0.0  # the spacing of the storage format's subnormal numbers (float16: 2⁻²⁴)

    def rounding_var(self, v: np.ndarray) -> np.ndarray:
        """Variance of one rounding of v to storage, in units of u²: v²/3, or η²/12 where v is so small
        that the format's fixed subnormal spacing η sets the error."""
        return np.maximum(STORE * np.square(v, dtype=F32), F32((self.tiny / self.u) ** 2 / 12))

    @property
    def weight_var(self) -> float:
        """Variance of one weight's error, in units of u² (of the weight, or of its row's RMS)."""
        r = (self.u_w / self.u) ** 2
        return r * STORE if self.weight_form == "element" else r

    def accumulation_var(self, n: int) -> float:
        """Variance of an n-term sum's accumulated rounding, per unit of Σ tⱼ², in units of u²: each of
        the n additions rounds a partial sum, whose square is on average (n/2)/n of Σ tⱼ² for terms of
        random sign; we take twice that, for sums whose terms share a sign (softmax-weighted values)."""
        return (self.u_acc / self.u) ** 2 * STORE * n

    def angle_var(self) -> float:
        """Variance of an angle's relative error per unit of c², in units of u² (see rope_var)."""
        return (self.u_angle / self.u) ** 2 * STORE


_U64, _U32, _U16, _UBF = 2.0 ** -53, 2.0 ** -24, 2.0 ** -11, 2.0 ** -8
ARITHMETIC: dict[str, Arithmetic] = {
    "float64": Arithmetic(_U64, _U64, _U64, "element", _U64, "binary64 throughout: another float64 implementation"),
    "float32": Arithmetic(_U32, _U32, _U32, "element", _U32, "binary32 storage and accumulation"),
    "float16": Arithmetic(_U16, _U32, _U16, "element", _U32,
                          "binary16 storage, float32 accumulation and RoPE angles (as every GPU/CPU GEMM does)",
                          tiny=2.0 ** -24),
    "bfloat16": Arithmetic(_UBF, _U32, _UBF, "element", _U32,
                           "bfloat16 storage, float32 accumulation and RoPE angles"),
    "int8w": Arithmetic(_UBF, _U32, 2.0 ** -7, "row", _U32,
                        "int8 weights, symmetric per row: RMS weight error ≈ absmax/(127·√12) ≈ 0.7 % of the row "
                        "RMS (Gaussian rows, absmax ≈ 3σ); bfloat16 activations"),
    "int4w": Arithmetic(_UBF, _U32, 2.0 ** -3, "row", _U32,
                        "int4 weights, symmetric per group of 32: RMS weight error ≈ absmax/(7·√12) ≈ 10 % of the "
                        "row RMS (group absmax ≈ 2.5σ); bfloat16 activations"),
}


# ---------------------------------------------------------------------------------------------
# One equation each (spec/tolerances.md §2.3).  x: the operand; var: the variance of its error
# (units of u²), the same shape.  Results exclude the final storage rounding of the result,
# which the caller adds with `stored` (some results are not stored: a backend fuses them).


def stored(var: np.ndarray, y: np.ndarray, a: Arithmetic, roundings: float = 1.0) -> np.ndarray:
    """(2.1) y rounded `roundings` times on its way to storage: + roundings·y²/3 (or the subnormal
    spacing's η²/12 for tiny y)."""
    return var + roundings * a.rounding_var(y)


def add_var(var_a: np.ndarray, var_b: np.ndarray, y: np.ndarray, a: Arithmetic) -> np.ndarray:
    """(2.2) y = a + b, stored: var_a + var_b + y²/3."""
    return stored(var_a + var_b, y, a)


def row_blocks(w: Param) -> Iterator[tuple[int, int, np.ndarray]]:
    """(lo, hi, W[lo:hi] as float32) over W's rows, in blocks of at most BLOCK_BYTES."""
    per_block = max(1, BLOCK_BYTES // (4 * w.shape[1]))
    for lo in range(0, w.shape[0], per_block):
        hi = min(w.shape[0], lo + per_block)
        yield lo, hi, w.rows(lo, hi, F32)


def linear_var(x: np.ndarray, var: np.ndarray, w2: np.ndarray, a: Arithmetic) -> np.ndarray:
    """(2.3) y = x·Wᵀ for x [T, C], W² [R, C] (the weights squared): the propagated W²·var, plus the
    weight's rounding (elementwise: u_w²/3·W²·x²; quantised: u_w²·rms(Wᵣ)²·‖x‖²) and the accumulation
    of C products (accumulation_var(C)·W²·x²).  -> [T, R]."""
    T, C = var.shape
    x2 = np.square(x, dtype=F32)
    prod = np.concatenate([var, x2]) @ w2.T  # one product for the propagated and the fresh terms
    fresh = (a.weight_var if a.weight_form == "element" else 0.0) + a.accumulation_var(C)
    out = prod[:T] + fresh * prod[T:]
    if a.weight_form == "row":
        out += a.weight_var * w2.mean(axis=1)[None, :] * x2.sum(axis=1, keepdims=True)
    return out


def rms_norm_var(x: np.ndarray, var: np.ndarray, g: np.ndarray, eps: float) -> np.ndarray:
    """(2.4) y = g ⊙ x / r, r = √(mean(x²) + ε), over the last axis N: δy = g(δx/r − x·δr/r²) with
    δr/r = Σⱼ xⱼδxⱼ/(N r²); the two terms' variances added (their correlation ignored: it only
    lowers the error, at a massive channel the norm divides out).  -> var of y before storage."""
    N = x.shape[-1]
    r2 = np.mean(np.square(x, dtype=F32), axis=-1, keepdims=True) + F32(eps)
    rel_r = np.sum(np.square(x, dtype=F32) * var, axis=-1, keepdims=True) / (N * N * r2 * r2)
    return np.square(g, dtype=F32) * (var / r2 + np.square(x, dtype=F32) / r2 * rel_r)


def norm_stored(var: np.ndarray, y: np.ndarray, a: Arithmetic) -> np.ndarray:
    """(2.4') a norm's result rounded three times: the normalised x cast to storage, the product with
    the weight, and the weight's own rounding."""
    return stored(var, y, a, 3.0)


def swap_halves(v: np.ndarray) -> np.ndarray:
    """[..., D] -> [..., D]: (v₁, v₂) -> (v₂, v₁); rotate_half without its sign, for variances."""
    half = v.shape[-1] // 2
    return np.concatenate([v[..., half:], v[..., :half]], axis=-1)


def rope_var(x: np.ndarray, var: np.ndarray, cos: np.ndarray, sin: np.ndarray, y: np.ndarray,
             angle_rel: np.ndarray, a: Arithmetic) -> np.ndarray:
    """(2.5) y = x cos φ + rotate_half(x) sin φ for x [T, N, D], cos/sin [T, D]: the propagated
    var·cos² + swap(var)·sin²; the roundings of cos, sin, both products and the sum; and the angle's
    own error, δy = rotate_half(y)·δφ, with δφ = c·φ·ε_angle (angle_rel [T, D] = c·φ, see
    angle_error).  -> var of y, stored."""
    c2, s2 = np.square(cos, dtype=F32)[:, None, :], np.square(sin, dtype=F32)[:, None, :]
    xc2, xs2 = np.square(x, dtype=F32) * c2, np.square(rotate_half(x), dtype=F32) * s2
    prop = var * c2 + swap_halves(var) * s2
    fresh = STORE * (2 * xc2 + 2 * xs2) + a.rounding_var(y)
    fresh += a.angle_var() * np.square(rotate_half(y), dtype=F32) * np.square(angle_rel, dtype=F32)[:, None, :]
    return prop + fresh


def angle_error(positions: np.ndarray, inv_freq: np.ndarray, theta: float) -> np.ndarray:
    """(2.5') [T], [D/2] -> [T, D]: c·φ, the relative error of the angle φ = p·ω in units of the angle
    precision.  ω = θ^(-2i/D) computed in that precision errs by (ln θ·2i/D + 2) roundings (the
    exponent's rounding scaled by ln θ, the power, the reciprocal); the product p·ω by one more."""
    D2 = inv_freq.shape[0]
    c = math.log(max(theta, 1.0)) * np.arange(D2) / D2 + 3.0
    phi = positions.astype(np.float64)[:, None] * inv_freq.astype(np.float64)[None, :] * c[None, :]
    return np.concatenate([phi, phi], axis=-1).astype(F32)


def scores_var(q: np.ndarray, var_q: np.ndarray, k: np.ndarray, var_k: np.ndarray, s: np.ndarray,
               a: Arithmetic) -> np.ndarray:
    """(2.6) s = q·kᵀ/√D for q [M, D], k [S, D]: (var_q·(k²)ᵀ + q²·var_kᵀ)/D, the D-term accumulation,
    and two roundings (the scaling, the stored score).  -> [M, S]."""
    D = q.shape[-1]
    q2, k2 = np.square(q, dtype=F32), np.square(k, dtype=F32)
    prop = (var_q @ k2.T + q2 @ var_k.T + (a.accumulation_var(D)) * (q2 @ k2.T)) / F32(D)
    return stored(prop, s, a, 2.0)


def lognormal_growth(v: np.ndarray) -> np.ndarray:
    """E[(e^X − 1)²]/v for X ~ N(0, v): how much a relative error e^X − 1 exceeds its first-order
    variance v once v is not small (→ 1 as v → 0).  v in absolute units, capped at 20."""
    v = np.minimum(np.asarray(v, np.float64), 20.0)
    small = v < 1e-4
    safe = np.where(small, 1.0, v)
    return np.where(small, 1.0 + 1.25 * v, (np.exp(2 * safe) - 2 * np.exp(safe / 2) + 1) / safe).astype(F32)


def softmax_var(p: np.ndarray, var_s: np.ndarray, a: Arithmetic) -> np.ndarray:
    """(2.7) p = softmax(s) over the last axis: δpⱼ = pⱼ(δsⱼ − Σₗ pₗδsₗ), so log pⱼ errs with variance
    vⱼ = V(sⱼ) + Σₗ pₗ²V(sₗ) (the −2pⱼV(sⱼ) covariance dropped) and V(pⱼ) = pⱼ²·vⱼ to first order;
    beyond it (a drift of a logit or more: an expert's weight can move 100×) pⱼ·e^X with X ~ N(0, vⱼ),
    lognormal_growth, up to σ = 1 (any probability).  Then p stored.  Masked entries (p = 0) carry no error."""
    p2 = np.square(p, dtype=F32)
    v = var_s + np.sum(p2 * var_s, axis=-1, keepdims=True)
    var = p2.astype(np.float64) * v * lognormal_growth(v * a.u * a.u)
    return stored(np.minimum(var, 1 / (a.u * a.u)).astype(F32), p, a)  # at most σ = 1: a probability's range


def weighted_sum_var(p: np.ndarray, var_p: np.ndarray, v: np.ndarray, var_v: np.ndarray, o: np.ndarray,
                     a: Arithmetic, coherent_values: bool = True) -> np.ndarray:
    """(2.8) o = P·V for P [M, S], V [S, D].  The probabilities' errors over the S keys are summed
    coherently, (σ_P·|V|)²: they share the query's error (δsⱼ = δq·kⱼ + …), so on a repeated phrase,
    whose keys and values are alike, they move together (|Σⱼ aⱼδⱼ| ≤ Σⱼ |aⱼ|σⱼ holds for any
    correlation).  The values' errors likewise when they are inherited (the drift every key carries
    from the same weights and the same earlier keys: coherent_values), in quadrature, P²·V(V), when
    they are each key's own fresh rounding (a local check).  Plus the accumulation over S keys, o
    stored.  -> [M, D]."""
    p2, v2 = np.square(p, dtype=F32), np.square(v, dtype=F32)
    var = np.square(np.sqrt(var_p) @ np.abs(v).astype(F32))
    var += np.square(p.astype(F32) @ np.sqrt(var_v)) if coherent_values else p2 @ var_v
    return stored(var + a.accumulation_var(p.shape[-1]) * (p2 @ v2), o, a)


def swiglu_var(g: np.ndarray, var_g: np.ndarray, up: np.ndarray, var_up: np.ndarray, h: np.ndarray,
               a: Arithmetic) -> np.ndarray:
    """(2.9) h = silu(g) ⊙ up: silu'(g)²·up²·var_g + silu(g)²·var_up; silu(g) stored (a relative
    rounding of h) and h stored."""
    s = sigmoid(g)
    d_silu = s * (1 + g * (1 - s))
    var = np.square(d_silu * up, dtype=F32) * var_g + np.square(silu(g), dtype=F32) * var_up
    return stored(var, h, a, 2.0)


def sigmoid_var(s: np.ndarray, var_l: np.ndarray, a: Arithmetic) -> np.ndarray:
    """(2.10) s = σ(ℓ): (σ(1 − σ))²·V(ℓ) to first order; beyond it the slope at ℓ + δ is up to e^|δ|
    times the slope at ℓ (and never above 1/4): (σ(1 − σ))²·e^(2√V)·V, at most V/16.  s stored."""
    sd = np.sqrt(np.minimum(var_l * F32(a.u * a.u), 400.0))
    slope2 = np.minimum(np.square(s * (1 - s), dtype=F32) * np.exp(2 * sd, dtype=F32), F32(1 / 16))
    return stored(slope2 * var_l, s, a)


def renormalised_var(w: np.ndarray, var_w: np.ndarray, a: Arithmetic) -> np.ndarray:
    """(2.11) wₖ / Σⱼ wⱼ over the last axis (K chosen scores): δ = (δwₖ − wₖ'·Σδwⱼ)/Σw with wₖ' the
    renormalised weight; the terms' variances added.  -> var of the renormalised weights, stored."""
    total = np.sum(w, axis=-1, keepdims=True)
    total = np.where(total > 0, total, 1.0)
    wn = w / total
    var = (var_w + np.square(wn, dtype=F32) * np.sum(var_w, axis=-1, keepdims=True)) / np.square(total, dtype=F32)
    return stored(var, wn, a)


def mixture_var(w: np.ndarray, var_w: np.ndarray, f: np.ndarray, var_f: np.ndarray, a: Arithmetic) -> np.ndarray:
    """(2.12) y = Σₖ wₖ fₖ for weights [T, K] and outputs [T, K, H]: Σₖ (wₖ²·var_fₖ + fₖ²·var_wₖ), each
    product and each partial sum stored (K roundings of the sum, bounded by |y|+Σ|wf| each)."""
    wf = w[:, :, None] * f
    var = np.sum(np.square(w, dtype=F32)[:, :, None] * var_f + np.square(f, dtype=F32) * var_w[:, :, None], axis=1)
    return var + np.sum(a.rounding_var(wf), axis=1) + w.shape[1] * a.rounding_var(wf.sum(1))


# ---------------------------------------------------------------------------------------------
# The pass: the equations composed as spec/architecture.md composes the operations




class ErrorModel:
    """spec/tolerances.md §2.4: the forward pass in float32 carrying the variance of a `precision`
    candidate's error beside every value.  `drift` runs it from the embeddings along the reference;
    `layer` runs one layer from given inputs (the local checks)."""

    def __init__(self, model: Model, precision: str):
        self.model, self.cfg, self.a = model, model.config, ARITHMETIC[precision]
        self._rope: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None

    def sigma(self, var: np.ndarray) -> np.ndarray:
        """Variance in units of u² -> standard deviation in the tensor's units."""
        return np.sqrt(np.maximum(var, 0)) * F32(self.a.u)

    # -- the operations, each with its equation ---------------------------------------------------
    def linear(self, x: np.ndarray, var: np.ndarray, w: Param, bias: Param | None = None):
        """x [T, C] and its variance -> x·Wᵀ (+ b) [T, R] and its variance, stored."""
        y = np.empty((x.shape[0], w.shape[0]), F32)
        var_y = np.empty_like(y)
        x = np.asarray(x, F32)
        for lo, hi, block in row_blocks(w):
            y[:, lo:hi] = x @ block.T
            var_y[:, lo:hi] = linear_var(x, var, np.square(block), self.a)
        if bias is not None:
            b = bias.load(F32)
            var_y = var_y + (self.a.weight_var if self.a.weight_form == "element" else STORE) * np.square(b)
            y = y + b
        return y, stored(var_y, y, self.a)

    def norm(self, x: np.ndarray, var: np.ndarray, weight: Param):
        g = weight.load(F32)
        y = rms_norm(x, g, self.cfg.rms_norm_eps)
        return y, norm_stored(rms_norm_var(x, var, g, self.cfg.rms_norm_eps), y, self.a)

    def rope(self, T: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """cos, sin [T, D] and the angles' relative error c·φ [T, D] (angle_error) for positions 0..T-1."""
        if self._rope is None or self._rope[0].shape[0] < T:
            positions = np.arange(T)
            inv_freq = rope_inv_freq(self.cfg.rope, self.cfg.head_dim, np.float64)
            angles = positions[:, None] * inv_freq[None, :]
            angles = np.concatenate([angles, angles], axis=-1)
            self._rope = (np.cos(angles).astype(F32), np.sin(angles).astype(F32),
                          angle_error(positions, inv_freq, self.cfg.rope.theta))
        return tuple(t[:T] for t in self._rope)

    def attention(self, x: np.ndarray, var: np.ndarray, w, inherited: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """[T, H] normed input -> attention output [T, H] and its variance.  spec §3.  inherited: the
        input's errors are drift, shared across tokens (2.8), not each token's own rounding."""
        cfg, T = self.cfg, x.shape[0]
        Nh, Nkv, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        q, vq = self.linear(x, var, w.q, w.q_bias)
        k, vk = self.linear(x, var, w.k, w.k_bias)
        v, vv = self.linear(x, var, w.v, w.v_bias)
        if cfg.qk_norm == "proj":
            q, vq = self.norm(q, vq, w.q_norm)
            k, vk = self.norm(k, vk, w.k_norm)
        if cfg.clip_qkv is not None:  # a clamped element keeps no error from before the clamp
            c = cfg.clip_qkv
            vq, vk, vv = (np.where(np.abs(t) < c, vt, 0).astype(F32) for t, vt in ((q, vq), (k, vk), (v, vv)))
            q, k, v = (np.clip(t, -c, c) for t in (q, k, v))
        q, vq = q.reshape(T, Nh, D), vq.reshape(T, Nh, D)
        k, vk = k.reshape(T, Nkv, D), vk.reshape(T, Nkv, D)
        v, vv = v.reshape(T, Nkv, D), vv.reshape(T, Nkv, D)
        if cfg.qk_norm == "head":
            q, vq = self.norm(q, vq, w.q_norm)
            k, vk = self.norm(k, vk, w.k_norm)
        cos, sin, rel = self.rope(T)
        qr = q * cos[:, None] + rotate_half(q) * sin[:, None]
        kr = k * cos[:, None] + rotate_half(k) * sin[:, None]
        vq = rope_var(q, vq, cos, sin, qr, rel, self.a)
        vk = rope_var(k, vk, cos, sin, kr, rel, self.a)
        G = Nh // Nkv
        out = np.empty((T, Nh, D), F32)
        vout = np.empty((T, Nh, D), F32)
        block = max(1, (16 * 2**20) // (4 * T))
        positions = np.arange(T)
        for h in range(Nh):
            g = h // G
            for lo in range(0, T, block):
                hi = min(T, lo + block)
                mask = positions[None, :] <= positions[lo:hi, None]
                s = (qr[lo:hi, h] @ kr[:, g].T) / F32(math.sqrt(D))
                vs = scores_var(qr[lo:hi, h], vq[lo:hi, h], kr[:, g], vk[:, g], s, self.a)
                p = softmax(np.where(mask, s, -np.inf), axis=-1)
                vp = softmax_var(p, np.where(mask, vs, 0), self.a)
                out[lo:hi, h] = o = p @ v[:, g]
                vout[lo:hi, h] = weighted_sum_var(p, vp, v[:, g], vv[:, g], o, self.a, inherited)
        return self.linear(out.reshape(T, Nh * D), vout.reshape(T, Nh * D), w.o, w.o_bias)

    def mlp(self, x: np.ndarray, var: np.ndarray, w: MLPWeights):
        """spec §4.1: down(silu(gate·x) ⊙ up·x) and its variance."""
        g, vg = self.linear(x, var, w.gate)
        up, vu = self.linear(x, var, w.up)
        h = silu(g) * up
        return self.linear(h, swiglu_var(g, vg, up, vu, h, self.a), w.down)

    def router(self, i: int, x: np.ndarray, var: np.ndarray, w: MoEWeights):
        """spec §4.2 (1)-(2): router logits and scores, with their variances."""
        spec = self.cfg.layers[i].moe
        logits, vl = self.linear(x, var, w.router)
        if spec.scoring == "softmax":
            scores = softmax(logits, axis=-1)
            return logits, vl, scores, softmax_var(scores, vl, self.a)
        scores = sigmoid(logits)
        return logits, vl, scores, sigmoid_var(scores, vl, self.a)

    def moe(self, i: int, x: np.ndarray, var: np.ndarray, w: MoEWeights, scores, vs, ids: np.ndarray):
        """spec §4.2 (4)-(5): top-k weights and the mixture (plus gated shared expert), with variances."""
        spec = self.cfg.layers[i].moe
        wk = np.take_along_axis(scores, ids, axis=-1)
        vw = np.take_along_axis(vs, ids, axis=-1)
        if spec.norm_topk_prob:
            vw = renormalised_var(wk, vw, self.a)
            total = wk.sum(-1, keepdims=True)
            wk = wk / np.where(total > 0, total, 1)
        if spec.routed_scaling_factor != 1.0:
            r = F32(spec.routed_scaling_factor)
            wk, vw = wk * r, stored(vw * r * r, wk * r, self.a)
        T, H = x.shape
        f = np.zeros((T, ids.shape[1], H), F32)
        vf = np.zeros((T, ids.shape[1], H), F32)
        for e in np.unique(ids):
            tokens, slots = np.nonzero(ids == e)
            f[tokens, slots], vf[tokens, slots] = self.mlp(x[tokens], var[tokens], w.experts[e])
        y = np.sum(wk[:, :, None] * f, axis=1)
        vy = mixture_var(wk, vw, f, vf, self.a)
        if w.shared is not None:
            sh, vsh = self.mlp(x, var, w.shared)
            if w.shared_gate is not None:
                gl, vgl = self.linear(x, var, w.shared_gate)
                gate = sigmoid(gl)
                vgate = sigmoid_var(gate, vgl, self.a)
                vsh = stored(np.square(gate, dtype=F32) * vsh + np.square(sh, dtype=F32) * vgate, gate * sh, self.a)
                sh = gate * sh
            y = y + sh
            vy = add_var(vy, vsh, y, self.a)
        return wk, vw, y, vy

    # -- compositions -----------------------------------------------------------------------------
    def layer(self, i: int, h: np.ndarray, var: np.ndarray, routes: Callable[[], np.ndarray | None],
              attn_out: np.ndarray | None = None, ffn: bool = True,
              inherited: bool = True) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
        """Layer i from the residual h [T, H] with error variance var: yields (trace name, value,
        variance) per stage.  spec §5.1.  `attn_out`, if given, is the candidate's: the FFN reads
        h + attn_out and its error starts at that addition's rounding.  `routes()` gives topk_ids
        [T, K] when the MoE needs them, or None for the spec's rule on this pass's own scores.
        ffn=False stops after the attention.  inherited=False: `var` is each token's own (a local
        check from the candidate's dumped inputs), not drift shared across tokens (2.8)."""
        spec, lw = self.cfg.layers[i], self.model.weights.layers[i]
        h = np.asarray(h, F32)
        if spec.attention:
            if attn_out is None:
                x, vx = self.norm(h, var, lw.attention.norm)
                a, va = self.attention(x, vx, lw.attention, inherited)
                yield f"attn_out.{i}", a, va
                h = h + a
                var = add_var(var, va, h, self.a)
            else:  # the candidate's own attention output, one rounding away from what it used
                a = np.asarray(attn_out, F32)
                h = h + a
                var = var + self.a.rounding_var(a) + self.a.rounding_var(h)
        if not ffn:
            return
        x, vx = self.norm(h, var, lw.ffn_norm)
        if spec.moe is None:
            f, vf = self.mlp(x, vx, lw.ffn)
        else:
            logits, vl, scores, vs = self.router(i, x, vx, lw.ffn)
            yield f"router_logits.{i}", logits, vl
            yield f"router_scores.{i}", scores, vs
            ids = routes()
            if ids is None:
                bias = lw.ffn.selection_bias
                ids = top_k(scores if bias is None else scores + bias.load(F32), spec.moe.top_k)
            wk, vw, f, vf = self.moe(i, x, vx, lw.ffn, scores, vs, np.asarray(ids, np.int64))
            yield f"topk_weights.{i}", wk, vw
        yield f"ffn_out.{i}", f, vf
        h = h + f
        yield f"hidden.{i}", h, add_var(var, vf, h, self.a)

    def final_norm(self, h: np.ndarray, var: np.ndarray):
        return self.norm(np.asarray(h, F32), var, self.model.weights.norm)

    def logits(self, x: np.ndarray, var: np.ndarray):
        return self.linear(np.asarray(x, F32), var, self.model.weights.lm_head)

    def drift(self, input_ids: np.ndarray, routes: Callable[[int], np.ndarray]) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
        """The whole pass from the embeddings, along the reference: yields (trace name, value, σ) for
        every trace tensor but input_ids and topk_ids, in forward order.  `routes(i)` is read when MoE
        layer i needs it, so a caller that forces routes as it goes is followed."""
        h = self.model.weights.embed.take(np.asarray(input_ids, np.int64), F32)
        var = self.a.rounding_var(h)
        yield "embeddings", h, self.sigma(var)
        for i in range(self.cfg.num_hidden_layers):
            for name, h_, var_ in self.layer(i, h, var, lambda i=i: routes(i)):
                yield name, h_, self.sigma(var_)
            h, var = h_, var_
        x, vx = self.final_norm(h, var)
        yield "final_norm", x, self.sigma(vx)
        logits, vl = self.logits(x, vx)
        yield "logits", logits, self.sigma(vl)


def expected_kl(logits: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    """(2.13) [T, V] reference logits, σ [T, V] -> [T]: the KL divergence of the token distribution
    that errors of standard deviation σ cause on average, to second order:
    KL ≈ ½ Var_p(δℓ), E = ½ Σᵥ pᵥ(1 − pᵥ) σᵥ²."""
    p = softmax(np.asarray(logits, np.float64), axis=-1)
    return 0.5 * np.sum(p * (1 - p) * np.square(sigma, dtype=np.float64), axis=-1)


def config_reduction(cfg: ModelConfig) -> int:
    """The longest dot product of the forward pass (hidden size, attention width or an MLP width):
    used by hints that compare precisions."""
    widths = [cfg.hidden_size, cfg.num_attention_heads * cfg.head_dim]
    for s in cfg.layers:
        widths.append(s.intermediate_size)
        if s.moe is not None:
            widths += [s.moe.intermediate_size, s.moe.shared_expert_intermediate_size]
    return max(widths)
