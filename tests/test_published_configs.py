"""Configs as the world writes them: d2m_ref's per-family defaults against transformers' config
classes, and published config.json files of every supported family (spec/config.md)."""

from __future__ import annotations

import re
from pathlib import Path

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
    if isinstance(value, list):
        return str(value)
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
    ours = parse_config({"model_type": family, **given, "max_position_embeddings": 1 << 20})
    if key == "num_key_value_heads":
        assert ours.num_key_value_heads == expected
    elif key == "head_dim":
        assert ours.head_dim == expected
    elif key == "rms_norm_eps":
        assert ours.rms_norm_eps == expected
    elif key == "rope_theta":
        assert ours.rope.theta == expected
    elif key == "num_experts_per_tok":
        assert ours.layers[0].moe.top_k == expected
    elif key in ("num_experts", "num_local_experts"):
        assert ours.layers[0].moe.num_experts == expected
    elif key == "shared_expert_intermediate_size":
        assert ours.layers[0].moe.shared_expert_intermediate_size == expected
    elif key == "moe_intermediate_size":
        assert ours.layers[0].moe.intermediate_size == expected
