"""Configs as the world writes them: d2m_ref's per-family defaults against transformers' config
classes, and published config.json files of every supported family (spec/config.md)."""

from __future__ import annotations

import copy
import json
import zlib
from pathlib import Path

import numpy as np
import pytest

from d2m_ref.errors import ConfigError
from d2m_ref.config import FAMILY_DEFAULTS, HIDDEN_PER_HEAD, SAME_AS_HEADS, parse_config

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

REPO = Path(__file__).resolve().parents[1]
SIZES = dict(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4)


def _show(value) -> str:
    """A default as spec/config.md's table writes it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    return str(value)


def test_spec_table_is_the_code_table():
    """spec/config.md's 'Defaults per family' table says what FAMILY_DEFAULTS holds, cell for cell."""
    text = (REPO / "spec" / "config.md").read_text()
    section = text.split("## Defaults per family", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ")]
    families = [c.strip() for c in rows[0].strip("|").split("|")][1:]
    assert families == list(FAMILY_DEFAULTS)
    table = {}
    for row in rows[1:]:
        cells = [c.strip() for c in row.strip("|").split("|")]
        table[cells[0].strip("`")] = dict(zip(families, cells[1:]))
    keys = {k for d in FAMILY_DEFAULTS.values() for k in d}
    assert set(table) == keys
    for family, defaults in FAMILY_DEFAULTS.items():
        for key in keys:
            assert table[key][family] == (_show(defaults[key]) if key in defaults else "–"), (key, family)


def _transformers_value(family: str, key: str, given: dict):
    """What transformers makes of `key` when a config of `family` leaves it out: read from the
    config object, or from the built model where the modeling code decides (biases, head_dim, eps)."""
    hf_config = transformers.AutoConfig.for_model(family, **given)
    if key == "rope_theta":
        return hf_config.rope_parameters["rope_theta"]
    if key == "num_experts" and family == "qwen3_moe":
        return hf_config.num_local_experts
    if key in ("head_dim", "rms_norm_eps", "attention_bias", "qkv_bias", "mlp_bias"):
        model = transformers.AutoModelForCausalLM.from_config(hf_config)
        layer = model.model.layers[0]
        attention = layer.self_attn
        if key == "head_dim":
            return attention.head_dim
        if key == "rms_norm_eps":
            return model.model.norm.variance_epsilon
        if key in ("attention_bias", "qkv_bias"):
            return attention.q_proj.bias is not None
        mlp = layer.mlp.shared_expert if hasattr(layer.mlp, "shared_expert") else layer.mlp
        return getattr(getattr(mlp, "gate_proj", None), "bias", None) is not None
    value = getattr(hf_config, key)
    return list(value) if isinstance(value, (list, tuple)) else value


@pytest.mark.parametrize("family, key", [(f, k) for f, d in FAMILY_DEFAULTS.items() for k in d])
def test_family_defaults_are_transformers_defaults(family, key):
    """An absent key means for d2m_ref what it means for transformers' config class of the family."""
    given = dict(SIZES, num_key_value_heads=2)
    if family in ("qwen2_moe", "qwen3_moe", "mixtral", "olmoe") and key not in (
            "num_experts", "num_local_experts", "num_experts_per_tok", "moe_intermediate_size",
            "shared_expert_intermediate_size"):
        given.update(num_experts_per_tok=2, **({"num_local_experts": 4} if family == "mixtral" else {"num_experts": 4}))
    if family == "mistral":
        given["sliding_window"] = None
    if key == "num_key_value_heads":  # 32 heads: every family's fixed default divides them
        given.update(hidden_size=256, num_attention_heads=32)
    given.pop(key, None)
    expected = FAMILY_DEFAULTS[family][key]
    if expected is SAME_AS_HEADS:
        expected = given["num_attention_heads"]
    elif expected is HIDDEN_PER_HEAD:
        expected = given["hidden_size"] // given["num_attention_heads"]
    got = _transformers_value(family, key, given)
    assert got == expected and type(got) is type(expected), (family, key, got, expected)
    # and d2m_ref reads the absent key the same way
    if key == "sliding_window":
        with pytest.raises(ConfigError, match=f"sliding_window={expected}"):
            parse_config({"model_type": family, **given, "max_position_embeddings": 1 << 20})
        return
    ours = parse_config({"model_type": family, **given})
    assert _ours(ours, key) == expected, (family, key, _ours(ours, key), expected)


def _ours(cfg, key: str):
    """What d2m_ref made of `key`: the ModelConfig field it becomes (every defaulted key has one)."""
    moe = cfg.layers[0].moe
    fields = {
        "rms_norm_eps": lambda: cfg.rms_norm_eps, "rope_theta": lambda: cfg.rope.theta,
        "tie_word_embeddings": lambda: cfg.tie_word_embeddings, "head_dim": lambda: cfg.head_dim,
        "num_key_value_heads": lambda: cfg.num_key_value_heads,
        "max_position_embeddings": lambda: cfg.max_position_embeddings,
        "hidden_act": lambda: "silu",  # the only activation d2m_ref computes: parsing it is the check
        "mlp_bias": lambda: False,  # likewise: a true value is refused
        "attention_bias": lambda: cfg.qkv_bias if cfg.qkv_bias == cfg.o_bias else "q and o differ",
        "qkv_bias": lambda: cfg.qkv_bias, "clip_qkv": lambda: cfg.clip_qkv,
        "num_experts": lambda: moe.num_experts, "num_local_experts": lambda: moe.num_experts,
        "num_experts_per_tok": lambda: moe.top_k, "moe_intermediate_size": lambda: moe.intermediate_size,
        "shared_expert_intermediate_size": lambda: moe.shared_expert_intermediate_size,
        "norm_topk_prob": lambda: moe.norm_topk_prob,
        # every layer MoE <=> step 1 and no dense layers (the defaults)
        "decoder_sparse_step": lambda: 1 if all(layer.moe for layer in cfg.layers) else "some dense",
        "mlp_only_layers": lambda: [] if all(layer.moe for layer in cfg.layers) else "some dense",
    }
    return fields[key]()


# ---------------------------------------------------------------------------------------------
# Published config.json files (tests/data/published_configs/, sources in SOURCES.md)

PUBLISHED = REPO / "tests" / "data" / "published_configs"
FAMILIES_HERE = ("llama", "mistral", "qwen2", "qwen3", "qwen2_moe", "qwen3_moe", "mixtral", "olmoe")


def _published() -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text(encoding="utf-8")) for p in sorted(PUBLISHED.glob("*.json"))}


def _loadable(d: dict) -> bool:
    return d.get("model_type") in FAMILIES_HERE and "quantization_config" not in d and not (
        d.get("model_type") == "mistral" and d.get("sliding_window") is not None)


ACCEPTED = sorted(name for name, d in _published().items() if _loadable(d))
REFUSED = sorted(name for name, d in _published().items() if not _loadable(d))


def shrink(d: dict) -> dict:
    """The config at test size: layers, widths, heads and expert counts made small; every other key
    (rope scaling, eps, theta, biases, vocab and token ids, bookkeeping) kept verbatim.  A key the
    config leaves out stays out, so the family defaults are exercised as published."""
    d = copy.deepcopy(d)
    heads = d["num_attention_heads"]
    kv = d.get("num_key_value_heads") or heads
    ratio = max(1, heads // kv)
    new_kv = 1 if ratio >= 4 else 2
    d["num_attention_heads"] = new_kv * min(ratio, 4)
    if "num_key_value_heads" in d:
        d["num_key_value_heads"] = new_kv
    d.update(hidden_size=96, intermediate_size=128, num_hidden_layers=2)  # 96: every head count used divides it
    if d.get("head_dim") is not None:
        d["head_dim"] = 16
    for key, small in (("moe_intermediate_size", 32), ("shared_expert_intermediate_size", 48)):
        if d.get(key):
            d[key] = small
    for key in ("num_experts", "num_local_experts"):
        if d.get(key):
            d[key] = d.get("num_experts_per_tok", 2) + 2
    if isinstance(d.get("layer_types"), list):
        d["layer_types"] = d["layer_types"][:2]
    return d


def test_the_fixtures_cover_every_family():
    families = {_published()[name]["model_type"] for name in ACCEPTED}
    assert len(ACCEPTED) >= 15 and families >= {"llama", "qwen2", "qwen3", "qwen2_moe", "qwen3_moe", "mixtral"}


def _published_model(name: str, tmp_path: Path, seed: int):
    """The published config `name`, shrunk, as written to tmp_path; transformers' float64 model of it
    with random weights (saved beside it); d2m_ref's model of those files, read with --strict-config."""
    import d2m_ref
    from tests.peer import hf

    config = shrink(_published()[name])
    (tmp_path / "published").mkdir()
    (tmp_path / "published" / "config.json").write_text(json.dumps(config))
    hf_config = transformers.AutoConfig.from_pretrained(tmp_path / "published")
    kwargs = dict(dtype=torch.float64, attn_implementation="eager")
    if hf_config.model_type in hf.MOE_FAMILIES:
        kwargs["experts_implementation"] = "eager"
    model = hf.randomize_(transformers.AutoModelForCausalLM.from_config(hf_config, **kwargs), seed=seed).eval()
    model.save_pretrained(tmp_path / "weights")
    ours = d2m_ref.load_model(tmp_path / "weights" / "model.safetensors", tmp_path / "published" / "config.json",
                              strict_config=True)
    return config, model, ours


@pytest.mark.slow
@pytest.mark.parametrize("name", ACCEPTED)
def test_published_config_agrees_with_transformers(name, tmp_path, record_property):
    """A published config, shrunk, loads as published (no edits, no unverified keys) and its
    float64 logits agree with float64-patched transformers to <= 1e-9 (weights by transformers)."""
    import d2m_ref
    from tests.peer import hf

    config, model, ours = _published_model(name, tmp_path, seed=1)
    try:
        ids = np.random.default_rng(zlib.crc32(name.encode())).integers(0, config["vocab_size"], 11)
        logits, _ = d2m_ref.forward(ours, ids)
    finally:
        ours.close()
    with hf.float64_transformers():
        reference = hf.logits(model, ids)
    error = float(np.max(np.abs(logits - reference)) / np.max(np.abs(reference)))
    record_property("relative_error", error)
    assert error <= 1e-9, f"{name}: relative error {error:.3e}"


@pytest.mark.parametrize("name", REFUSED)
def test_published_config_of_what_d2m_ref_does_not_implement_is_refused(name):
    """Other families, weights quantised by another tool, windows in effect: a named error."""
    d = _published()[name]
    with pytest.raises(ConfigError) as info:
        parse_config(d, name)
    message = str(info.value)
    if d.get("model_type") not in FAMILIES_HERE:
        assert f"model_type={d['model_type']!r} is not supported" in message
    elif "quantization_config" in d:
        assert "quantization_config=" in message and "another tool" in message
    else:
        assert "sliding_window=" in message


@pytest.mark.slow
@pytest.mark.parametrize("name", ACCEPTED)
def test_published_config_honest_half_precision_runs_raise_no_alarm(name, tmp_path):
    """The published config, shrunk, with random weights: transformers run in float32, float16 and
    bfloat16 (cast from the float64 checkpoint the reference reads), recorded as a user would, checked
    with the whole trace and residual-only — no alarm (spec/tolerances.md §6)."""
    import copy

    from d2m_ref.adapters.torch import record_trace
    from d2m_ref.check import check
    from tests.peer.dumps import residual_only

    config, model, ours = _published_model(name, tmp_path, seed=2)
    alarms = []
    try:
        ids = np.random.default_rng(zlib.crc32(name.encode())).integers(0, config["vocab_size"], 24)
        for precision in ("float32", "float16", "bfloat16"):
            trace = record_trace(copy.deepcopy(model).to(getattr(torch, precision)), ids)
            for mode, cand in (("full", trace), ("residual-only", residual_only(trace))):
                report = check(ours, cand, precision)
                if report.exit_code:
                    alarms.append(f"{precision} {mode}: {report.verdict()}")
    finally:
        ours.close()
    assert not alarms, f"{name}: " + "; ".join(alarms)
