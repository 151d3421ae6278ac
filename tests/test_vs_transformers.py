"""d2m_ref against transformers, the independent peer: every family in FAMILIES, every Dense2MoE plan.

Metric everywhere: relative error = max |candidate - reference| / max |reference| over the whole
[T, V] logits (or [T, H] block output).  Dividing by the largest reference value, not entry by
entry, keeps the figure meaningful where single logits are near zero.

Tolerances:
- float64 d2m_ref vs float64 transformers: 1e-9.  Stock transformers is not float64 throughout
  (it differs from itself made float64 by ~1e-7, see test_stock_float64_is_not_float64), so the
  reference runs inside `hf.float64_transformers()`; both sides are then float64 end to end and
  differ only by summation order (~1e-15).
- float32 d2m_ref vs stock float32 transformers: 1e-4 (float32 rounding through a few layers,
  measured 3e-7 to 6e-7; routes are decisive with these weights, so no near-tie flips).
- bf16 / f16 checkpoints: d2m_ref in float64 on the half-precision file vs float64 transformers on
  the same half-precision weights upcast: 1e-9, i.e. loading a half checkpoint is exact.
"""

from __future__ import annotations

import zlib

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

try:  # tests/ is a package (tests/__init__.py) ...
    from tests.peer import dense2moe as d2m
    from tests.peer import hf
except ImportError:  # ... or a plain directory that pytest put on sys.path
    from peer import dense2moe as d2m
    from peer import hf

FLOAT64_TOL = 1e-9
FLOAT32_TOL = 1e-4

HF_IDS = [c.name for c in hf.FAMILIES]
D2M_IDS = [c.name for c in d2m.DENSE2MOE_CASES]
HALF = {"bf16": torch.bfloat16, "f16": torch.float16}


def token_ids(name: str, vocab_size: int) -> np.ndarray:
    """7-11 random token ids, seeded by the case name (stable across runs and machines)."""
    seed = zlib.crc32(name.encode())
    rng = np.random.default_rng(seed)
    return rng.integers(0, vocab_size, size=7 + seed % 5).astype(np.int64)


def patched_logits(model, ids: np.ndarray) -> np.ndarray:
    with hf.float64_transformers():
        return hf.logits(model, ids)


def d2m_ref_logits(directory, ids: np.ndarray, dtype) -> np.ndarray:
    """d2m_ref's [T, V] logits for the checkpoint in `directory`, as float64."""
    import d2m_ref

    model = d2m_ref.load_model(directory)
    out, _cache = d2m_ref.forward(model, ids, dtype=dtype)
    assert out.dtype == dtype, f"forward(dtype={np.dtype(dtype)}) returned {out.dtype} logits"
    return np.asarray(out, dtype=np.float64)


def assert_close(candidate: np.ndarray, reference: np.ndarray, tol: float, what: str) -> float:
    """Relative error <= tol, else a message with the worst entry and both values."""
    assert candidate.shape == reference.shape, f"{what}: shape {candidate.shape} vs {reference.shape}"
    err = hf.relative_error(candidate, reference)
    t, v = np.unravel_index(np.argmax(np.abs(candidate - reference)), reference.shape)
    assert err <= tol, (f"{what}: relative error {err:.3e} > {tol:.0e}; worst at token {t}, logit {v}: "
                        f"candidate {candidate[t, v]!r} vs reference {reference[t, v]!r}")
    return err


# ---------------------------------------------------------------------------------------------
# The peer itself: is patched transformers really float64, and does the patch matter?


@pytest.mark.parametrize("name", HF_IDS + D2M_IDS)
def test_patched_transformers_never_leaves_float64(name):
    """Inside float64_transformers() a float64 model reads and writes no float32 tensor at all;
    stock transformers does (RMSNorm, RoPE, softmax, router), so the spy can see them."""
    if name in HF_IDS:
        model, vocab = hf.build(hf.case(name)), hf.case(name).config["vocab_size"]
    else:
        config = d2m.dense2moe_case(name).config
        model, vocab = d2m.build_dense2moe(config), config["vocab_size"]
    ids = token_ids(name, vocab)
    stock_ops = hf.non_float64_ops(model, ids)
    assert {"aten._softmax.default", "aten.rsqrt.default", "aten.cos.default"} <= set(stock_ops)
    with hf.float64_transformers():
        assert hf.non_float64_ops(model, ids) == {}


def test_patch_is_undone_on_exit():
    """Leaving the context restores every patched callable and the stock result bit for bit."""
    targets = hf.patch_targets()
    before = [getattr(owner, attribute) for owner, attribute, _ in targets]
    model = hf.build(hf.FAMILIES[4])
    ids = token_ids("restore", model.config.vocab_size)
    stock = hf.logits(model, ids)
    with hf.float64_transformers():
        assert all(getattr(owner, attribute) is new for owner, attribute, new in targets)
        patched = hf.logits(model, ids)
    assert [getattr(owner, attribute) for owner, attribute, _ in targets] == before
    assert np.array_equal(hf.logits(model, ids), stock)
    assert not np.array_equal(patched, stock)


@pytest.mark.parametrize("name", HF_IDS)
def test_float64_rope_is_transformers_formula(name):
    """rope_inv_freq_float64 (default, linear, llama3) equals transformers' float32 inv_freq to
    float32 rounding: same formula, more bits."""
    model = hf.build(hf.case(name))
    ours = hf.rope_inv_freq_float64(model.config).numpy()
    theirs = model.model.rotary_emb.inv_freq.to(torch.float64).numpy()
    assert np.max(np.abs(ours - theirs) / theirs) < 1e-6


def test_stock_float64_is_not_float64(record_property, capsys):
    """Stock float64 transformers vs the same model made float64: ~1e-7 for every family (> 1e-9,
    so the patch matters; < 1e-5, so it changes rounding only).  Stock float32 for scale."""
    rows = []
    for c in hf.FAMILIES:
        model = hf.build(c)
        ids = token_ids(c.name, c.config["vocab_size"])
        patched = patched_logits(model, ids)
        stock = hf.relative_error(hf.logits(model, ids), patched)
        f32 = hf.relative_error(hf.logits(hf.build(c, torch.float32), ids), patched)
        record_property(f"stock_float64_vs_float64_{c.name}", stock)
        record_property(f"stock_float32_vs_float64_{c.name}", f32)
        rows.append((c.name, stock, f32))
    with capsys.disabled():
        print("\nstock transformers vs transformers made float64 (max|a-b|/max|b| of the logits)")
        for name, stock, f32 in rows:
            print(f"  {name:34s} stock float64 {stock:.2e}   stock float32 {f32:.2e}")
    for name, stock, f32 in rows:
        assert 1e-9 < stock < 1e-5, (name, stock)
        assert f32 < 1e-4, (name, f32)


@pytest.mark.parametrize("name", HF_IDS[:2])
def test_hidden_states_are_layer_outputs(name):
    """hf.hidden_states gives one [T, H] residual per layer; the last one, normed and projected,
    is the logits."""
    model = hf.build(hf.case(name))
    ids = token_ids(name, model.config.vocab_size)
    with hf.float64_transformers():
        states = hf.hidden_states(model, ids)
        expected = hf.logits(model, ids)
        with torch.no_grad():
            last = model.model.norm(torch.from_numpy(states[-1]))
            recomputed = (last @ model.lm_head.weight.T).numpy()
    assert len(states) == model.config.num_hidden_layers
    assert all(s.shape == (len(ids), model.config.hidden_size) for s in states)
    assert hf.relative_error(recomputed, expected) < 1e-14


def _spec_moe(weights: dict, prefix: str, s: dict, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The spec's MoE in NumPy, from checkpoint tensors: [T, H] -> ([T, H] output, [T, K] topk_ids)."""
    w = {k[len(prefix):]: v.to(torch.float64).numpy() for k, v in weights.items() if k.startswith(prefix)}
    router_logits = x @ w["gate.weight"].T
    if s["scoring_func"] == "softmax":
        e = np.exp(router_logits - router_logits.max(-1, keepdims=True))
        scores = e / e.sum(-1, keepdims=True)
    else:
        scores = 1.0 / (1.0 + np.exp(-router_logits))
    choice = scores + w["gate.e_score_correction_bias"] if s["selection_bias"] else scores
    topk_ids = np.argsort(-choice, axis=-1, kind="stable")[:, : s["num_experts_per_tok"]]
    topk_weights = np.take_along_axis(scores, topk_ids, axis=-1)
    if s["norm_topk_prob"]:
        topk_weights = topk_weights / topk_weights.sum(-1, keepdims=True)
    topk_weights = topk_weights * s["routed_scaling_factor"]

    def mlp(p, v):
        gate, up = v @ w[p + "gate_proj.weight"].T, v @ w[p + "up_proj.weight"].T
        return (gate / (1.0 + np.exp(-gate)) * up) @ w[p + "down_proj.weight"].T

    y = np.zeros_like(x)
    for t in range(x.shape[0]):
        for k, e in enumerate(topk_ids[t]):
            y[t] += topk_weights[t, k] * mlp(f"experts.{e}.", x[t : t + 1])[0]
    if s["shared_expert_intermediate_size"]:
        shared = mlp("shared_expert.", x)
        if s["shared_expert_gate"]:
            shared = shared / (1.0 + np.exp(-(x @ w["shared_expert_gate.weight"].T)))
        y += shared
    return y, topk_ids


@pytest.mark.parametrize("name", D2M_IDS)
def test_dense2moe_blocks_follow_spec(name):
    """Each MoE layer of the Dense2MoE reference equals the spec's formula (NumPy, read from the
    saved tensor names) to 1e-12; and a selection bias changes some routes, so it is tested."""
    config = d2m.dense2moe_case(name).config
    model = d2m.build_dense2moe(config)
    weights = d2m.dense2moe_state_dict(model, config)
    x = np.random.default_rng(5).standard_normal((64, config["hidden_size"]))
    for i, entry in enumerate(config["layer_plan"]):
        if entry["ffn"] != "moe":
            continue
        s = d2m.moe_settings(config, entry)
        with hf.float64_transformers(), torch.no_grad():
            ours = model.model.layers[i].mlp(torch.from_numpy(x)[None])[0].numpy()
        spec, topk_ids = _spec_moe(weights, f"model.layers.{i}.mlp.", s, x)
        assert hf.relative_error(ours, spec) < 1e-12, f"layer {i}"
        if s["selection_bias"]:
            unbiased = dict(weights, **{f"model.layers.{i}.mlp.gate.e_score_correction_bias":
                                        torch.zeros(s["num_experts"], dtype=torch.float64)})
            _, ids_unbiased = _spec_moe(unbiased, f"model.layers.{i}.mlp.", s, x)
            assert (np.sort(ids_unbiased, -1) != np.sort(topk_ids, -1)).any(axis=-1).sum() >= 3, f"layer {i}"


# ---------------------------------------------------------------------------------------------
# d2m_ref against the peer


@pytest.mark.parametrize("name", HF_IDS)
def test_hf_float64(name, tmp_path):
    """float64 d2m_ref on a save_pretrained checkpoint == float64 transformers, to 1e-9."""
    c = hf.case(name)
    model = hf.build(c)
    hf.save(model, tmp_path)
    ids = token_ids(name, c.config["vocab_size"])
    assert_close(d2m_ref_logits(tmp_path, ids, np.float64), patched_logits(model, ids), FLOAT64_TOL, name)


@pytest.mark.parametrize("name", HF_IDS)
def test_hf_float32(name, tmp_path):
    """float32 d2m_ref on a float32 checkpoint == stock float32 transformers, to 1e-4."""
    c = hf.case(name)
    model = hf.build(c, torch.float32)
    hf.save(model, tmp_path)
    ids = token_ids(name, c.config["vocab_size"])
    assert_close(d2m_ref_logits(tmp_path, ids, np.float32), hf.logits(model, ids), FLOAT32_TOL, name)


@pytest.mark.parametrize("half", list(HALF))
@pytest.mark.parametrize("name", HF_IDS)
def test_hf_half_checkpoint_loads_exactly(name, half, tmp_path):
    """float64 d2m_ref on a bf16/f16 checkpoint == float64 transformers on those weights upcast."""
    c = hf.case(name)
    model = hf.build(c).to(HALF[half])
    hf.save(model, tmp_path)
    ids = token_ids(name, c.config["vocab_size"])
    reference = patched_logits(model.to(torch.float64), ids)
    assert_close(d2m_ref_logits(tmp_path, ids, np.float64), reference, FLOAT64_TOL, f"{name} {half}")


@pytest.mark.parametrize("fused", [False, True], ids=["per_expert", "fused_experts"])
@pytest.mark.parametrize("name", D2M_IDS)
def test_dense2moe_float64(name, fused, tmp_path):
    """float64 d2m_ref on a Dense2MoE checkpoint (experts per expert or fused 3-D) == the
    transformers-composed reference in float64, to 1e-9."""
    config = d2m.dense2moe_case(name).config
    model = d2m.build_dense2moe(config)
    d2m.save_dense2moe(model, config, tmp_path, fused_experts=fused)
    ids = token_ids(name, config["vocab_size"])
    assert_close(d2m_ref_logits(tmp_path, ids, np.float64), patched_logits(model, ids), FLOAT64_TOL, name)


@pytest.mark.parametrize("name", D2M_IDS)
def test_dense2moe_float32(name, tmp_path):
    """float32 d2m_ref on a float32 Dense2MoE checkpoint == the stock float32 reference, to 1e-4."""
    config = d2m.dense2moe_case(name).config
    model = d2m.build_dense2moe(config, torch.float32)
    d2m.save_dense2moe(model, config, tmp_path)
    ids = token_ids(name, config["vocab_size"])
    assert_close(d2m_ref_logits(tmp_path, ids, np.float32), hf.logits(model, ids), FLOAT32_TOL, name)


@pytest.mark.parametrize("half", list(HALF))
@pytest.mark.parametrize("name", D2M_IDS)
def test_dense2moe_half_checkpoint_loads_exactly(name, half, tmp_path):
    """float64 d2m_ref on a bf16/f16 Dense2MoE checkpoint == float64 reference on the upcast weights."""
    config = d2m.dense2moe_case(name).config
    model = d2m.build_dense2moe(config).to(HALF[half])
    d2m.save_dense2moe(model, config, tmp_path)
    ids = token_ids(name, config["vocab_size"])
    reference = patched_logits(model.to(torch.float64), ids)
    assert_close(d2m_ref_logits(tmp_path, ids, np.float64), reference, FLOAT64_TOL, f"{name} {half}")
