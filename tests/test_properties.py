"""Invariants of the forward pass, over random configs and weights (hypothesis)."""

from __future__ import annotations

import dataclasses

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import d2m_ref
from d2m_ref.config import MoESpec
from d2m_ref.kernels import NumpyKernels
from d2m_ref.model import KV_MIN_SLACK, Runtime, mlp, moe
from d2m_ref.synth import model_from_arrays, random_arrays, random_model, write_checkpoint
from d2m_ref.weights import MLPWeights, MoEWeights, Param

from .models import dense2moe_config, dense2moe_configs, dense_config
from .test_safetensors_io import float_format_value

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    """max |a - b| / max |b|."""
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def ids_for(cfg, T: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, cfg.vocab_size, T)


@SETTINGS
@given(cfg_dict=dense2moe_configs(), seed=st.integers(0, 2**16), T=st.integers(2, 9), data=st.data())
def test_decode_with_cache_equals_full_forward(cfg_dict, seed, T, data):
    """Decode with a KV cache (a prefix, then chunks of one or more tokens) equals the full forward."""
    cfg = d2m_ref.parse_config(cfg_dict)
    model = random_model(cfg, seed)
    ids = ids_for(cfg, T, seed)
    full, _ = d2m_ref.forward(model, ids)
    # random chunk lengths: a prefill, then single tokens or several at once on top of the cache
    cuts = sorted(data.draw(st.sets(st.integers(1, T - 1), min_size=1)))
    parts, cache = [], None
    for chunk in np.split(ids, cuts):
        logits, cache = d2m_ref.forward(model, chunk, cache=cache)
        parts.append(logits)
    assert cache.length == T
    assert rel_err(np.concatenate(parts), full) < 1e-12


@SETTINGS
@given(cfg_dict=dense2moe_configs(), seed=st.integers(0, 2**16), T=st.integers(2, 6), data=st.data())
def test_branches_of_one_cache_stay_apart(cfg_dict, seed, T, data):
    """Two continuations of one cache, stepped in turn (the KV buffers are appended in place where
    nobody appended first): each equals the full forward of its own sequence, and the shared prefix
    cache still reads as it did."""
    cfg = d2m_ref.parse_config(cfg_dict)
    model = random_model(cfg, seed)
    prefix = ids_for(cfg, T, seed)
    _, base = d2m_ref.forward(model, prefix[:-1])
    _, base = d2m_ref.forward(model, prefix[-1:], cache=base)  # a grown buffer, with room to share
    snapshot = [None if k is None else k.copy() for k in base.keys]
    steps = data.draw(st.integers(1, 4))
    branches = [(prefix, base, []), (prefix, base, [])]
    for step in range(steps):
        for b, token in enumerate(data.draw(st.lists(st.integers(0, cfg.vocab_size - 1), min_size=2, max_size=2))):
            ids, cache, logits = branches[b]
            out, cache = d2m_ref.forward(model, [token], cache=cache)
            branches[b] = (np.append(ids, token), cache, logits + [out])
    for ids, cache, logits in branches:
        full, _ = d2m_ref.forward(model, ids)
        assert rel_err(np.concatenate(logits), full[T:]) < 1e-12
    for k, before in zip(base.keys, snapshot):
        assert (k is None) == (before is None) and (k is None or np.array_equal(k, before))


def test_decode_appends_kv_in_place():
    """A decode loop writes each step's keys and values into the layer's buffers: over 317 steps
    they are replaced only when full, each time with a quarter more room (64 positions at least)
    and never past max_position_embeddings; the cache reads read-only views of them."""
    cfg = d2m_ref.parse_config(dense_config(layers=2, max_position_embeddings=320))
    model = random_model(cfg, 0)
    _, cache = d2m_ref.forward(model, [1, 2, 3])
    assert cache.stores[0].keys.shape[0] == 3  # a prompt's buffer is its size
    buffers = 1
    for step in range(317):
        before = cache.stores[0].keys
        _, cache = d2m_ref.forward(model, [step % cfg.vocab_size], cache=cache)
        store, S = cache.stores[0], cache.length
        buffers += store.keys is not before
        assert S <= store.keys.shape[0] <= min(320, S + max(KV_MIN_SLACK, S // 4))
        assert np.shares_memory(cache.keys[0], store.keys) and np.shares_memory(cache.values[0], store.values)
        assert not cache.keys[0].flags.writeable and not cache.values[0].flags.writeable
    assert cache.length == 320 and cache.keys[0].shape[0] == 320
    assert buffers <= 6, f"{buffers} buffers for 317 steps"


def test_a_cache_is_read_as_given():
    """A cache whose arrays were replaced (dataclasses.replace keeps the stores) or built by hand
    without stores is read as given: the store is appended to only through its own views."""
    cfg = d2m_ref.parse_config(dense_config(layers=2))
    model = random_model(cfg, 1)
    _, cache = d2m_ref.forward(model, [1, 2, 3])
    _, cache = d2m_ref.forward(model, [4], cache=cache)  # a grown buffer, with room
    zeros = tuple(np.zeros_like(k) for k in cache.keys)
    edited = dataclasses.replace(cache, keys=zeros, values=zeros)
    by_hand = d2m_ref.KVCache(cache.length, zeros, zeros)
    a, _ = d2m_ref.forward(model, [5], cache=edited)
    b, _ = d2m_ref.forward(model, [5], cache=by_hand)
    c, _ = d2m_ref.forward(model, [5], cache=cache)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)


@SETTINGS
@given(cfg_dict=dense2moe_configs(), seed=st.integers(0, 2**16), T=st.integers(2, 9), data=st.data())
def test_causality(cfg_dict, seed, T, data):
    """Logits at position t do not depend on tokens after t."""
    cfg = d2m_ref.parse_config(cfg_dict)
    model = random_model(cfg, seed)
    ids = ids_for(cfg, T, seed)
    t = data.draw(st.integers(0, T - 2))
    changed = ids.copy()
    changed[t + 1:] = (ids[t + 1:] + 1 + np.arange(T - t - 1)) % cfg.vocab_size
    a, _ = d2m_ref.forward(model, ids)
    b, _ = d2m_ref.forward(model, changed)
    assert rel_err(b[:t + 1], a[:t + 1]) < 1e-12
    if cfg.num_hidden_layers and any(s.attention for s in cfg.layers):
        assert not np.allclose(a[t + 1:], b[t + 1:])  # the change is visible where it should be


def _as_one_expert_moe(dense_arrays: dict, layer: int) -> dict:
    """Rename layer `layer`'s dense MLP to expert 0 of an MoE and give it a random router."""
    out = dict(dense_arrays)
    p = f"model.layers.{layer}.mlp."
    for part in ("gate_proj", "up_proj", "down_proj"):
        out[f"{p}experts.0.{part}.weight"] = out.pop(f"{p}{part}.weight")
    out[f"{p}gate.weight"] = np.random.default_rng(layer).standard_normal((1, dense_arrays[f"{p}up_proj.weight"].shape[1])).astype(np.float32)
    return out


@SETTINGS
@given(base=st.sampled_from(["llama", "qwen2", "qwen3"]), layer=st.integers(0, 2), seed=st.integers(0, 2**16),
       scoring=st.sampled_from([("softmax", False), ("softmax", True), ("sigmoid", True)]))
def test_fusion_group_of_one_layer_is_the_dense_layer(base, layer, seed, scoring):
    """A fusion group of one layer (attention kept, its MLP the only expert of a top-1 MoE) equals the dense layer."""
    dense = {"attention": True, "ffn": "dense"}
    fused = {"attention": True, "ffn": "moe", "num_experts": 1, "num_experts_per_tok": 1,
             "scoring_func": scoring[0], "norm_topk_prob": scoring[1], "source_layers": [layer]}
    plan = [dict(dense) for _ in range(3)]
    cfg_dense = d2m_ref.parse_config(dense2moe_config(plan, base=base, width=48))
    plan[layer] = fused
    cfg_fused = d2m_ref.parse_config(dense2moe_config(plan, base=base, width=48, moe_intermediate_size=48))
    arrays = random_arrays(cfg_dense, seed)
    ids = ids_for(cfg_dense, 7, seed)
    a, _ = d2m_ref.forward(model_from_arrays(cfg_dense, arrays), ids)
    b, _ = d2m_ref.forward(model_from_arrays(cfg_fused, _as_one_expert_moe(arrays, layer)), ids)
    assert rel_err(b, a) < 1e-13


@SETTINGS
@given(seed=st.integers(0, 2**16), T=st.integers(1, 6), scoring=st.sampled_from(["softmax", "sigmoid"]))
def test_one_expert_top1_moe_is_that_mlp(seed, T, scoring):
    """An MoE with one expert and top-1 (softmax, or sigmoid renormalised) equals that dense MLP, shared expert aside."""
    rng = np.random.default_rng(seed)
    H, F = 16, 24
    w = MLPWeights(*(Param.of(n, rng.standard_normal(s)) for n, s in
                     (("gate", (F, H)), ("up", (F, H)), ("down", (H, F)))))
    spec = MoESpec(num_experts=1, top_k=1, intermediate_size=F, scoring=scoring, norm_topk_prob=scoring == "sigmoid")
    moe_w = MoEWeights(router=Param.of("router", rng.standard_normal((1, H))), experts=(w,))
    cfg = d2m_ref.parse_config(dense_config())
    rt = Runtime(cfg, np.dtype(np.float64), NumpyKernels())
    x = rng.standard_normal((T, H))
    np.testing.assert_array_equal(moe(x, moe_w, spec, rt, 0), mlp(x, w, rt))


@SETTINGS
@given(cfg_dict=dense2moe_configs(), seed=st.integers(0, 2**16), data=st.data())
def test_permuting_experts_with_router_rows_changes_nothing(cfg_dict, seed, data):
    """Permuting the experts together with the router rows (and selection bias) changes no logit."""
    cfg = d2m_ref.parse_config(cfg_dict)
    arrays = random_arrays(cfg, seed)
    permuted = dict(arrays)
    for i, spec in enumerate(cfg.layers):
        if spec.moe is None:
            continue
        E = spec.moe.num_experts
        perm = np.array(data.draw(st.permutations(range(E))))  # new expert j is old expert perm[j]
        p = f"model.layers.{i}.mlp."
        permuted[f"{p}gate.weight"] = arrays[f"{p}gate.weight"][perm]
        if spec.moe.selection_bias:
            permuted[f"{p}gate.e_score_correction_bias"] = arrays[f"{p}gate.e_score_correction_bias"][perm]
        for j in range(E):
            for part in ("gate_proj", "up_proj", "down_proj"):
                permuted[f"{p}experts.{j}.{part}.weight"] = arrays[f"{p}experts.{perm[j]}.{part}.weight"]
    ids = ids_for(cfg, 6, seed)
    a, _ = d2m_ref.forward(model_from_arrays(cfg, arrays), ids)
    b, _ = d2m_ref.forward(model_from_arrays(cfg, permuted), ids)
    assert rel_err(b, a) < 1e-12


@settings(max_examples=5, deadline=None)
@given(storage=st.sampled_from(["BF16", "F16"]), seed=st.integers(0, 2**16))
def test_bf16_f16_loading_is_exact(tmp_path_factory, storage, seed):
    """Every bf16/f16 weight read from a file equals its exact value (decoded from the bits by formula)."""
    cfg = d2m_ref.parse_config(dense2moe_config([{"attention": True, "ffn": "moe", "num_experts": 2},
                                                 {"attention": False, "ffn": "dense"}]))
    path = tmp_path_factory.mktemp("ckpt") / "model.safetensors"
    write_checkpoint(cfg, path, seed=seed, storage=storage)
    model = d2m_ref.load_model(path, config=_write_config(cfg, path.parent))
    exp_bits, man_bits = (8, 7) if storage == "BF16" else (5, 10)
    for p in d2m_ref.weights.iter_params(model.weights):
        assert p.storage == storage
        bits = p.raw().view(np.uint16)
        np.testing.assert_array_equal(p.load(np.float64), float_format_value(bits, exp_bits, man_bits))
        np.testing.assert_array_equal(p.load(np.float32), float_format_value(bits, exp_bits, man_bits).astype(np.float32))
    model.close()


def _write_config(cfg, folder):
    import json
    (folder / "config.json").write_text(json.dumps(cfg.source))
    return folder / "config.json"


@SETTINGS
@given(cfg_dict=dense2moe_configs(), seed=st.integers(0, 2**16), T=st.integers(1, 9))
def test_attention_in_query_blocks_equals_one_block(cfg_dict, seed, T):
    """Computing attention in blocks of queries (bounded memory on long prompts) changes no logit."""
    import d2m_ref.model as model_module
    cfg = d2m_ref.parse_config(cfg_dict)
    model = random_model(cfg, seed)
    ids = ids_for(cfg, T, seed)
    whole, _ = d2m_ref.forward(model, ids)
    saved = model_module.ATTENTION_BLOCK_BYTES
    model_module.ATTENTION_BLOCK_BYTES = 1  # one query per block
    try:
        blocked, _ = d2m_ref.forward(model, ids)
    finally:
        model_module.ATTENTION_BLOCK_BYTES = saved
    assert rel_err(blocked, whole) < 1e-13
