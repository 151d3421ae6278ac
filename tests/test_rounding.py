"""The error model of spec/tolerances.md §2 against the rounding it models.

Each equation of d2m_ref.rounding is checked by simulation: its operands are perturbed by random
errors of the variance it is given (propagation), or actually rounded to float16 and computed as a
half-precision backend does (fresh roundings), and the measured error variance over many elements
is set against the model's.  The model may overestimate (it drops covariances that lower the
error, it bounds accumulation) but must not underestimate: that would be a false alarm waiting.
"""

from __future__ import annotations

import numpy as np
import pytest

import d2m_ref
from d2m_ref.ops import rms_norm, softmax
from d2m_ref.rounding import (ARITHMETIC, ErrorModel, angle_error, linear_var, rms_norm_var, softmax_var,
                              weighted_sum_var)
from d2m_ref.synth import model_from_arrays, random_arrays

F16 = ARITHMETIC["float16"]
U16 = F16.u


def _ratio(measured_sq: np.ndarray, model_var: np.ndarray, u: float) -> float:
    """Measured mean squared error over the model's mean variance (both per element, averaged)."""
    return float(np.mean(measured_sq) / np.mean(model_var * u * u))


def test_linear_propagation_is_exact_for_independent_errors():
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((8, 64)), rng.standard_normal((32, 64)) / 8
    var = (rng.uniform(0.5, 2.0, x.shape) * 1e6).astype(np.float32)  # large: the fresh terms vanish beside it
    model = linear_var(x, var, np.square(w).astype(np.float32), F16)
    errs = [((x + rng.standard_normal(x.shape) * np.sqrt(var) * U16) - x) @ w.T for _ in range(400)]
    ratio = float(np.mean(np.var(errs, axis=0)) / np.mean(model * U16 * U16))
    assert 0.9 < ratio < 1.1


def test_linear_fresh_rounding_matches_a_float16_matmul():
    """float16 operands, float32 accumulation, float16 result: the measured error is within the model
    (weights rounded, inputs rounded as their producer stored them, accumulation, result rounding)."""
    rng = np.random.default_rng(1)
    x, w = rng.standard_normal((64, 256)), rng.standard_normal((128, 256)) / 16
    y = x @ w.T
    y16 = (x.astype(np.float16).astype(np.float32) @ w.astype(np.float16).astype(np.float32).T).astype(np.float16)
    model = linear_var(x, F16.rounding_var(x), np.square(w).astype(np.float32), F16) + F16.rounding_var(y)
    ratio = _ratio(np.square(y16.astype(np.float64) - y), model, U16)
    assert 0.4 < ratio <= 1.0
    # the weights' own rounding alone: exact float16 inputs, the product kept in float32
    x16 = x.astype(np.float16).astype(np.float64)
    y_w = x16.astype(np.float32) @ w.astype(np.float16).astype(np.float32).T
    model_w = linear_var(x16, np.zeros(x16.shape, np.float32), np.square(w).astype(np.float32), F16)
    assert 0.4 < _ratio(np.square(y_w - x16 @ w.T), model_w, U16) <= 1.0


def test_rms_norm_matches_a_float16_norm():
    """x in float16 (with a massive channel, as real residual streams have), the norm in float32, cast
    back, times the float16 weight: within the model, and not far below it."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((256, 96))
    x[:, 7] *= 300.0
    g = 1 + 0.3 * rng.standard_normal(96)
    y = rms_norm(x, g, 1e-5)
    x16 = x.astype(np.float16).astype(np.float32)
    normed = (x16 / np.sqrt(np.mean(x16 * x16, -1, keepdims=True) + 1e-5)).astype(np.float16)
    y16 = (normed * g.astype(np.float16)).astype(np.float16)
    model = rms_norm_var(x, F16.rounding_var(x), g.astype(np.float32), 1e-5) + 3 * F16.rounding_var(y)
    ratio = _ratio(np.square(y16.astype(np.float64) - y), model, U16)
    assert 0.3 < ratio <= 1.0


def test_softmax_of_sharp_scores_matches_float16():
    """Attention scores far from zero (a sharp softmax amplifies their rounding): float16 scores,
    softmax in float32, probabilities cast to float16."""
    rng = np.random.default_rng(3)
    s = rng.standard_normal((512, 64)) * 8
    p = softmax(s)
    s16 = s.astype(np.float16).astype(np.float32)
    p16 = softmax(s16).astype(np.float16)
    model = softmax_var(p, F16.rounding_var(s), F16)
    err = np.square(p16.astype(np.float64) - p)
    assert _ratio(err, model, U16) <= 1.0
    # and element by element the errors stay inside 8σ
    assert np.max(np.sqrt(err) / np.maximum(np.sqrt(model) * U16, 1e-30)) < 8


def test_weighted_sum_holds_for_repeated_keys():
    """o = P·V: keys that repeat (a repeated phrase) make the same rounding error, so errors over the
    keys add coherently; the model's bound is exact then, and above the independent case."""
    rng = np.random.default_rng(4)
    p = softmax(rng.standard_normal((16, 40)))
    v = rng.standard_normal((40, 8))
    vp, vv = np.zeros(p.shape, np.float32), np.full(v.shape, 4.0, np.float32)
    model = weighted_sum_var(p, vp, v, vv, p @ v, F16) - weighted_sum_var(p, vp, v, 0 * vv, p @ v, F16)
    same = [p @ np.broadcast_to(rng.standard_normal(8) * 2 * U16, v.shape) for _ in range(400)]  # every key alike
    independent = [p @ (rng.standard_normal(v.shape) * 2 * U16) for _ in range(400)]
    ratio_same = float(np.mean(np.var(same, axis=0)) / np.mean(model * U16 * U16))
    ratio_independent = float(np.mean(np.var(independent, axis=0)) / np.mean(model * U16 * U16))
    assert 0.85 < ratio_same <= 1.1 and ratio_independent < 0.5 * ratio_same


def test_rope_angles_in_float32_err_within_the_model():
    """transformers computes ω = 1/θ^(2i/D) and p·ω in float32: the angle error grows with position,
    and stays below c·φ·u32 (angle_error), the relative error the model gives the angle."""
    import math
    theta, D = 1e5, 64
    positions = np.arange(4096)
    i = np.arange(0, D, 2)
    exact = positions[:, None] * (1.0 / theta ** (i / D))[None, :]
    inv32 = (np.float32(1.0) / (np.float32(theta) ** (i.astype(np.float32) / np.float32(D)))).astype(np.float32)
    got = positions.astype(np.float32)[:, None] * inv32[None, :]
    bound = angle_error(positions, 1.0 / theta ** (i / D), theta)[:, : D // 2] * 2.0 ** -24
    err = np.abs(got.astype(np.float64) - exact)
    assert np.all(err <= bound + 1e-12)
    assert err[-1].max() > 100 * 2.0 ** -24 and math.log(theta) > 10  # it is real: ~1e-4 rad at 4k tokens


def test_float16_subnormals_have_a_fixed_spacing():
    tiny = np.array([1e-7, 3e-6, 1.0])
    var = F16.rounding_var(tiny)
    assert var[0] == var[1] == pytest.approx((2.0 ** -24 / U16) ** 2 / 12) and var[2] == pytest.approx(1 / 3)


def test_the_pass_follows_the_reference_forward():
    """ErrorModel.drift computes the same values as the reference (in float32), stage for stage."""
    cfg = d2m_ref.parse_config({
        "model_type": "qwen2_moe", "vocab_size": 61, "hidden_size": 32, "intermediate_size": 48,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "moe_intermediate_size": 24, "shared_expert_intermediate_size": 40, "num_experts": 4,
        "num_experts_per_tok": 2, "norm_topk_prob": False, "max_position_embeddings": 64})
    model = model_from_arrays(cfg, random_arrays(cfg, 0, "F32"), "F32")
    ids = np.arange(0, 60, 5)
    ref: dict = {}
    d2m_ref.forward(model, ids, capture=ref)
    seen = set()
    for name, value, sigma in ErrorModel(model, "bfloat16").drift(ids, lambda i: ref[f"topk_ids.{i}"]):
        b = ref[name]
        assert np.max(np.abs(value.reshape(b.shape) - b)) <= 1e-4 * np.max(np.abs(b)), name
        assert sigma.shape == b.shape and np.all(sigma > 0), name
        seen.add(name)
    assert seen == {k for k in ref if k != "input_ids" and not k.startswith("topk_ids")}
