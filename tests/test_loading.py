"""Loading checkpoints: every accepted layout works, every defect is an error that names its culprit."""

from __future__ import annotations

import json

import numpy as np
import pytest

import d2m_ref
from d2m_ref.errors import ConfigError, InputError, WeightsError
from d2m_ref.safetensors_io import save
from d2m_ref.synth import random_arrays, random_model

from .models import dense2moe_config, dense_config

PLAN = [{"attention": True, "ffn": "moe", "num_experts": 3, "num_experts_per_tok": 2,
         "shared_expert_intermediate_size": 16, "shared_expert_gate": True},
        {"attention": False, "ffn": "moe", "num_experts": 2, "scoring_func": "sigmoid", "selection_bias": True},
        {"attention": True, "ffn": "dense"}]
CFG = dense2moe_config(PLAN, base="qwen2")


def write(folder, cfg_dict, arrays, metadata=None, config_json=True):
    folder.mkdir(parents=True, exist_ok=True)
    if config_json:
        (folder / "config.json").write_text(json.dumps(cfg_dict))
    save(folder / "model.safetensors", arrays, metadata=metadata)
    return folder


def logits_of(model, T=5):
    ids = np.arange(T) * 7 % model.config.vocab_size
    return d2m_ref.forward(model, ids)[0]


@pytest.fixture
def arrays():
    return random_arrays(d2m_ref.parse_config(CFG), seed=3)


def test_directory_file_and_memory_agree(tmp_path, arrays):
    """Loading by directory and by file gives the in-memory model's logits exactly."""
    write(tmp_path, CFG, arrays)
    ref = logits_of(random_model(d2m_ref.parse_config(CFG), seed=3))
    for target in (tmp_path, tmp_path / "model.safetensors"):
        m = d2m_ref.load_model(target)
        np.testing.assert_array_equal(logits_of(m), ref)
        m.close()


def test_vectors_are_converted_once_matrices_never(tmp_path, arrays):
    """A norm weight is converted once and kept as a read-only copy (not a view of the mapped file:
    the checkpoint still closes); a matrix is converted afresh on every load."""
    write(tmp_path, CFG, arrays)
    m = d2m_ref.load_model(tmp_path)
    first = logits_of(m)
    norm = m.weights.norm
    v = norm.load(np.float32)
    assert v is norm.load(np.float32) and not v.flags.writeable
    assert not np.shares_memory(v, norm.raw())
    np.testing.assert_array_equal(v, norm.raw())
    assert norm.load(np.float64).dtype == np.float64
    matrix = m.weights.lm_head
    assert matrix.load(np.float64) is not matrix.load(np.float64)
    np.testing.assert_array_equal(logits_of(m), first)
    m.close()
    np.testing.assert_array_equal(norm.load(np.float32), v)  # the kept copy outlives the mapping


def test_config_from_metadata_alone(tmp_path, arrays):
    """A single safetensors file with the config in __metadata__['config'] is enough."""
    write(tmp_path, CFG, arrays, metadata={"config": json.dumps(CFG)}, config_json=False)
    m = d2m_ref.load_model(tmp_path / "model.safetensors")
    assert m.config.family == "dense2moe" and m.config.num_hidden_layers == 3


def test_metadata_and_config_json_disagree(tmp_path, arrays):
    other = dict(CFG, rms_norm_eps=1e-5)
    write(tmp_path, CFG, arrays, metadata={"config": json.dumps(other)})
    with pytest.raises(ConfigError, match="different models"):
        d2m_ref.load_model(tmp_path)
    m = d2m_ref.load_model(tmp_path, config=tmp_path / "config.json")  # --config settles it
    assert m.config.rms_norm_eps == 1e-6


def test_sharded_checkpoint(tmp_path, arrays):
    """model.safetensors.index.json with two shards loads like one file."""
    names = sorted(arrays)
    half = len(names) // 2
    save(tmp_path / "model-00001-of-00002.safetensors", {n: arrays[n] for n in names[:half]})
    save(tmp_path / "model-00002-of-00002.safetensors", {n: arrays[n] for n in names[half:]})
    index = {"metadata": {}, "weight_map": {n: f"model-0000{1 + (i >= half)}-of-00002.safetensors"
                                            for i, n in enumerate(names)}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    (tmp_path / "config.json").write_text(json.dumps(CFG))
    ref = logits_of(random_model(d2m_ref.parse_config(CFG), seed=3))
    np.testing.assert_array_equal(logits_of(d2m_ref.load_model(tmp_path)), ref)


def test_fused_expert_tensors(tmp_path, arrays):
    """transformers 5's fused experts.gate_up_proj [E, 2F, H] / experts.down_proj [E, H, F] load like per-expert tensors."""
    fused = dict(arrays)
    for i, E in ((0, 3), (1, 2)):
        p = f"model.layers.{i}.mlp.experts."
        gate = [fused.pop(f"{p}{e}.gate_proj.weight") for e in range(E)]
        up = [fused.pop(f"{p}{e}.up_proj.weight") for e in range(E)]
        down = [fused.pop(f"{p}{e}.down_proj.weight") for e in range(E)]
        fused[f"{p}gate_up_proj"] = np.stack([np.concatenate([g, u]) for g, u in zip(gate, up)])
        fused[f"{p}down_proj"] = np.stack(down)
    write(tmp_path, CFG, fused)
    ref = logits_of(random_model(d2m_ref.parse_config(CFG), seed=3))
    np.testing.assert_array_equal(logits_of(d2m_ref.load_model(tmp_path)), ref)


def test_mixtral_names(tmp_path):
    """Mixtral's block_sparse_moe / w1 w3 w2 names load as gate / up / down."""
    cfg = dense_config("mixtral", num_local_experts=3, num_experts_per_tok=2)
    arrays = random_arrays(d2m_ref.parse_config(cfg), seed=1)
    renamed = {}
    for n, a in arrays.items():
        n = n.replace(".mlp.", ".block_sparse_moe.")
        n = n.replace("gate_proj", "w1").replace("up_proj", "w3").replace("down_proj", "w2") if "experts" in n else n
        renamed[n] = a
    write(tmp_path, cfg, renamed)
    ref = logits_of(random_model(d2m_ref.parse_config(cfg), seed=1))
    np.testing.assert_array_equal(logits_of(d2m_ref.load_model(tmp_path)), ref)


@pytest.mark.parametrize("edit, match", [
    (lambda a: a.pop("model.layers.0.mlp.experts.2.down_proj.weight"), "missing tensor 'model.layers.0.mlp.experts.2.down_proj.weight'"),
    (lambda a: a.__setitem__("model.layers.3.mlp.up_proj.weight", np.zeros((2, 2), np.float32)), "unexpected tensor.*model.layers.3.mlp.up_proj.weight"),
    (lambda a: a.__setitem__("model.layers.1.self_attn.q_proj.weight", np.zeros((32, 32), np.float32)), "layer 1 has no attention.*self_attn.q_proj.weight"),
    (lambda a: a.__setitem__("model.layers.2.mlp.gate_proj.weight", np.zeros((47, 32), np.float32)), r"'model.layers.2.mlp.gate_proj.weight' has shape \[47, 32\]; the config implies \[48, 32\]"),
    (lambda a: a.__setitem__("model.norm.weight", np.zeros(32, np.int32)), "'model.norm.weight' has dtype I32"),
    (lambda a: a.pop("model.layers.1.mlp.gate.e_score_correction_bias"), "missing tensor 'model.layers.1.mlp.gate.e_score_correction_bias'"),
    (lambda a: a.__setitem__("model.layers.2.self_attn.o_proj.bias", np.zeros(32, np.float32)), "unexpected tensor 'model.layers.2.self_attn.o_proj.bias'"),
    (lambda a: a.pop("lm_head.weight"), "missing tensor 'lm_head.weight'"),
])
def test_tensor_defects_are_named(tmp_path, arrays, edit, match):
    edit(arrays)
    write(tmp_path, CFG, arrays)
    with pytest.raises(WeightsError, match=match):
        d2m_ref.load_model(tmp_path)


def test_tied_lm_head_must_equal_embedding(tmp_path):
    cfg = dense_config("llama", tie=True)
    arrays = random_arrays(d2m_ref.parse_config(cfg), seed=0)
    arrays["lm_head.weight"] = arrays["model.embed_tokens.weight"].copy()
    write(tmp_path / "same", cfg, arrays)
    d2m_ref.load_model(tmp_path / "same")  # a duplicate of the tied matrix is accepted
    arrays["lm_head.weight"][0, 0] += 1
    write(tmp_path / "differs", cfg, arrays)
    with pytest.raises(WeightsError, match="lm_head.weight' differs"):
        d2m_ref.load_model(tmp_path / "differs")


def test_truncated_file(tmp_path, arrays):
    write(tmp_path, CFG, arrays)
    f = tmp_path / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(WeightsError, match="model.safetensors.*truncated"):
        d2m_ref.load_model(tmp_path)


def test_missing_config(tmp_path, arrays):
    write(tmp_path, CFG, arrays, config_json=False)
    with pytest.raises(ConfigError, match="no config"):
        d2m_ref.load_model(tmp_path / "model.safetensors")


def test_token_id_out_of_range_and_too_long():
    model = random_model(d2m_ref.parse_config(CFG), seed=0)
    with pytest.raises(InputError, match="token id 97 at position 2 is out of range: vocab_size=97"):
        d2m_ref.forward(model, [1, 2, 97])
    with pytest.raises(InputError, match="token id -1"):
        d2m_ref.forward(model, [-1])
    with pytest.raises(InputError, match="65 tokens.*max_position_embeddings=64"):
        d2m_ref.forward(model, np.zeros(65, np.int64))
    _, cache = d2m_ref.forward(model, np.zeros(60, np.int64))
    with pytest.raises(InputError, match=r"65 tokens \(60 cached \+ 5 new\)"):
        d2m_ref.forward(model, np.zeros(5, np.int64), cache=cache)
    with pytest.raises(InputError, match="empty"):
        d2m_ref.forward(model, [])
    with pytest.raises(InputError, match="integer token ids"):
        d2m_ref.forward(model, [1.5])


@pytest.mark.parametrize("change, match", [
    ({"model_type": "gpt2"}, "model_type='gpt2' is not supported"),
    ({"hidden_size": 30, "head_dim": None, "num_attention_heads": 4}, "num_attention_heads=4 does not divide hidden_size=30"),
    ({"num_key_value_heads": 3}, "num_attention_heads=4 is not a multiple of num_key_value_heads=3"),
    ({"vocab_size": 0}, "'vocab_size'=0 must be >= 1"),
    ({"hidden_size": -8}, "'hidden_size'=-8 must be >= 1"),
    ({"rms_norm_eps": "small"}, "'rms_norm_eps' must be a finite number"),
    ({"num_hidden_layers": 5}, "num_hidden_layers=5 but layer_plan has 3 entries"),
    ({"final_logit_softcapping": 30.0}, "final_logit_softcapping=30.0 soft-caps the logits"),
    ({"quantization_config": {"quant_method": "gptq", "bits": 4}}, "quantization_config=.*'gptq'.*another tool"),
    ({"rope_interleaved": True}, "rope_interleaved=True rotates interleaved pairs"),
    ({"mlp_bias": True}, "mlp_bias=True adds biases to the MLP"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 2.0}}, "rope_type='yarn' is not supported"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ({"base_model_type": "gpt2"}, "'base_model_type'='gpt2' is not one of"),
    ({"layer_plan": []}, "'layer_plan' must be a non-empty list"),
])
def test_config_defects_are_named(change, match):
    cfg = {k: v for k, v in {**CFG, **change}.items() if v is not None}
    with pytest.raises(ConfigError, match=match):
        d2m_ref.parse_config(cfg)


@pytest.mark.parametrize("entry, match", [
    ({"attention": True, "ffn": "moe", "num_experts": 2, "num_experts_per_tok": 3}, r"layer_plan\[0\]: num_experts_per_tok=3 exceeds num_experts=2"),
    ({"attention": True, "ffn": "moe"}, r"layer_plan\[0\]: missing required key 'num_experts'"),
    ({"attention": True, "ffn": "sparse"}, r"layer_plan\[0\]: 'ffn'='sparse' is not one of dense, moe"),
    ({"attention": True, "ffn": "dense", "num_experts": 2}, r"layer_plan\[0\]: unknown config key.*'num_experts'"),
    ({"attention": False, "ffn": "dense", "attention_source": 3}, "attention_source=3 given but attention=false"),
    ({"attention": True, "ffn": "moe", "num_experts": 2, "shared_expert_gate": True}, "shared_expert_gate=true but shared_expert_intermediate_size=0"),
    ({"attention": True, "ffn": "moe", "num_experts": 2, "source_layers": [1, 2, 3]}, "source_layers names 3 layers for num_experts=2"),
    ({"attention": "yes", "ffn": "dense"}, "'attention' must be true or false"),
])
def test_layer_plan_defects_are_named(entry, match):
    with pytest.raises(ConfigError, match=match):
        d2m_ref.parse_config(dense2moe_config([entry]))


def test_moe_family_defects():
    with pytest.raises(ConfigError, match="num_experts=4 contradicts num_local_experts=8"):
        d2m_ref.parse_config(dense_config("qwen3_moe", num_experts=4, num_local_experts=8, num_experts_per_tok=2,
                                          moe_intermediate_size=16))
    with pytest.raises(ConfigError, match="num_experts_per_tok=9 exceeds num_experts=8"):
        d2m_ref.parse_config(dense_config("olmoe", num_experts=8, num_experts_per_tok=9))
    with pytest.raises(ConfigError, match=r"mlp_only_layers \[7\] are outside 0..2"):
        d2m_ref.parse_config(dense_config("qwen2_moe", num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                                          mlp_only_layers=[7]))


def test_unknown_keys_are_recorded_and_strict_refuses_them():
    """A key d2m_ref neither reads nor knows is accepted and listed; strict=True refuses it by name.
    Bookkeeping keys and a neighbour family's key at a neutral value are neither."""
    cfg = d2m_ref.parse_config({**CFG, "frobnicate": 1, "zeta": [2], "_model_name_or_path": "x",
                                "unk_token_id": 0, "attention_bias": False, "num_local_experts": 1})  # qwen2 reads neither
    assert cfg.unverified_keys == ("frobnicate", "zeta")
    assert d2m_ref.parse_config(CFG).unverified_keys == ()
    with pytest.raises(ConfigError, match="unverified config key.*'frobnicate', 'zeta'.*--strict-config"):
        d2m_ref.parse_config({**CFG, "frobnicate": 1, "zeta": [2]}, strict=True)
    d2m_ref.parse_config({**CFG, "_model_name_or_path": "x"}, strict=True)


def test_config_schema_accepts_what_the_parser_accepts():
    """spec/config.schema.json agrees with the parser on valid and invalid layer plans."""
    jsonschema = pytest.importorskip("jsonschema")
    from pathlib import Path
    schema = json.loads((Path(__file__).parents[1] / "spec" / "config.schema.json").read_text())
    jsonschema.validate(CFG, schema)
    d2m_ref.parse_config(CFG)
    bad = dense2moe_config([{"attention": True, "ffn": "dense", "num_experts": 2}])
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)
    with pytest.raises(ConfigError):
        d2m_ref.parse_config(bad)


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "qwen2_moe", "qwen3_moe", "mixtral", "olmoe"])
def test_configs_as_transformers_writes_them_by_default(family, tmp_path):
    """Every family's config as transformers' save_pretrained writes it with its own defaults
    (nulls such as head_dim, sliding_window, rope_parameters) parses."""
    transformers = pytest.importorskip("transformers")
    moe = {"num_experts_per_tok": 2} if family in ("qwen2_moe", "qwen3_moe", "mixtral", "olmoe") else {}
    cfg = transformers.AutoConfig.for_model(family, vocab_size=101, hidden_size=64, intermediate_size=96,
                                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                            **moe)
    cfg.save_pretrained(tmp_path)
    parsed = d2m_ref.load_config(tmp_path / "config.json")
    assert parsed.family == family and parsed.num_hidden_layers == 2
    assert parsed.head_dim == (getattr(cfg, "head_dim", None) or 64 // 4)  # qwen3's default is 128


@pytest.mark.parametrize("change, match", [
    ({"model_type": "mixtral", "num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": 16},
     "sliding_window=16 limits attention to a sliding window"),
    ({"model_type": "qwen2", "layer_types": ["full_attention", "sliding_attention", "full_attention"]},
     "layer_types contains \\['sliding_attention'\\]"),
    ({"model_type": "qwen2", "use_sliding_window": True}, "use_sliding_window=true limits attention"),
    ({"model_type": "mistral", "max_position_embeddings": 8192}, r"sliding_window=4096 \(absent: mistral's default\) limits attention"),
    ({"model_type": "llama", "num_hidden_layers": 10**9}, "num_hidden_layers=1000000000 is more than 10000"),
    ({"model_type": "llama", "rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "factor": 8.0}},
     "rope factor=8.0 with rope_type 'default'"),
    ({"model_type": "llama", "rope_scaling": {"type": "linear", "rope_type": "llama3", "factor": 2.0}},
     "rope parameter 'rope_type' is given twice with different values"),
    ({"model_type": "llama", "rope_theta": 5e5, "rope_parameters": {"rope_theta": 1e4}},
     "rope parameter 'rope_theta' is given twice"),
])
def test_unsupported_or_contradictory_configs_are_refused(change, match):
    with pytest.raises(ConfigError, match=match):
        d2m_ref.parse_config({**dense_config(), **change})


@pytest.mark.parametrize("change, key", [
    ({"model_type": "llama", "qkv_bias": True}, "qkv_bias"),  # transformers' Llama ignores it
    ({"model_type": "qwen3", "clip_qkv": 1}, "clip_qkv"),  # an OLMoE key, not at its neutral value
    ({"model_type": "mixtral", "attention_bias": True}, "attention_bias"),  # Mixtral has no biases
    # Qwen2MoeConfig has no num_local_experts alias: transformers reads num_experts alone
    ({"model_type": "qwen2_moe", "num_experts": 4, "num_local_experts": 6, "num_experts_per_tok": 2,
      "moe_intermediate_size": 16}, "num_local_experts"),
])
def test_neighbour_keys_off_their_neutral_value_are_unverified(change, key):
    assert d2m_ref.parse_config({**dense_config(), **change}).unverified_keys == (key,)


def test_configs_that_change_nothing_are_accepted():
    """Keys at values that change nothing give the same model as the config without them, and are
    not reported as unverified."""
    cases = [(dense_config("mixtral", num_local_experts=4, num_experts_per_tok=2),
              {"sliding_window": 64, "head_dim": None}),  # a window as long as the model: no change
             (dense_config("qwen2"), {"sliding_window": 4, "use_sliding_window": False,
                                      "layer_types": ["full_attention"] * 3, "some_future_key": None}),
             (dense_config("llama"), {"qkv_bias": False, "num_experts": 0})]
    for base, neutral in cases:
        plain, same = d2m_ref.parse_config(base), d2m_ref.parse_config({**base, **neutral})
        assert same == plain and same.unverified_keys == (), neutral


def test_dense2moe_top_level_defaults_are_checked_where_they_stand():
    with pytest.raises(ConfigError, match="'routed_scaling_factor'=-1 must be > 0"):
        d2m_ref.parse_config(dense2moe_config([{"attention": True, "ffn": "dense"}], routed_scaling_factor=-1))
    with pytest.raises(ConfigError, match="'num_experts_per_tok'=0 must be >= 1"):
        d2m_ref.parse_config(dense2moe_config([{"attention": True, "ffn": "dense"}], top_k=0))


@pytest.mark.parametrize("content, match", [
    (b'{"model_type": "llama", "x": "\xff"}', "not valid JSON"),
    (b"[" * 100000 + b"]" * 100000, "not valid JSON"),
    (b'{"model_type": "llama", "vocab_size": ' + b"9" * 5000 + b"}", "not valid JSON"),
    (b'[1, 2]', "expected a JSON object"),
])
def test_unreadable_config_files(tmp_path, content, match):
    (tmp_path / "config.json").write_bytes(content)
    with pytest.raises(ConfigError, match=match):
        d2m_ref.load_config(tmp_path / "config.json")


def test_forced_routes_must_name_moe_layers():
    model = random_model(d2m_ref.parse_config(CFG), seed=0)
    ids = np.arange(4)
    for layer in (2, 7, "1", True):  # layer 2 is dense; 7 does not exist; "1" and True are not layer numbers
        with pytest.raises(InputError, match=f"forced routes name layer {layer!r}, which is not an MoE layer"):
            d2m_ref.forward(model, ids, forced_routes={layer: np.zeros((4, 1), np.int64)})
    with pytest.raises(InputError, match=r"forced routes for layer 1: expected integer \[T=4, K=1\]"):
        d2m_ref.forward(model, ids, forced_routes={1: np.zeros((4, 2), np.int64)})
    with pytest.raises(InputError, match="names the same expert twice"):
        d2m_ref.forward(model, ids, forced_routes={0: np.zeros((4, 2), np.int64)})
    trace = {}
    d2m_ref.forward(model, ids, forced_routes={0: np.array([[2, 1]] * 4)}, capture=trace)
    assert (trace["topk_ids.0"] == [[2, 1]] * 4).all()


@pytest.mark.parametrize("key", ["vocab_size", "hidden_size", "max_position_embeddings", "rms_norm_eps", "rope_theta"])
def test_a_400_digit_number_is_a_named_error(key):
    """A JSON integer of 400 digits: a ConfigError naming the key, shown cut short (it was an
    OverflowError traceback: issue 22)."""
    with pytest.raises(ConfigError, match=rf"'{key}'.*\(401 characters\)"):
        d2m_ref.parse_config({**dense_config("llama"), key: 10 ** 400})
