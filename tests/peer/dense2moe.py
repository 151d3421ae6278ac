"""A Dense2MoE reference composed from transformers' own modules (transformers has no such model).

A Dense2MoE checkpoint is a base family (llama, qwen2 or qwen3: that decides qkv bias and q/k norm)
whose layers follow `layer_plan` in config.json.  The reference is the base family's CausalLM from
transformers with, per plan entry:

- attention=false: `self_attn` replaced by `NoAttention` (adds exactly 0 to the residual) and
  `input_layernorm` by `nn.Identity` (so it reads nothing), which leaves the decoder layer's own
  forward computing  h = h + FFN(post_attention_layernorm(h)).
- ffn="moe": `mlp` replaced by a transformers MoE block built from a per-layer config:
    softmax, shared expert with gate      -> `Qwen2MoeSparseMoeBlock`, verbatim
    softmax, no shared expert             -> `Qwen3MoeSparseMoeBlock`, verbatim
    anything else (sigmoid scoring, selection bias, routed_scaling_factor, shared expert without
    gate)                                 -> `ComposedMoeBlock`: transformers' router (Qwen2-MoE's
                                             softmax router, or DeepSeek-V3's sigmoid router with one
                                             group), Qwen2-MoE's experts and shared expert; only the
                                             final sum is written here.
  DeepSeek-V3's router with n_group = topk_group = 1 is exactly the spec's sigmoid rule: it takes
  top-k of sigmoid(logits) + e_score_correction_bias, gathers the weights from the unbiased scores,
  divides by their sum (+1e-20) when norm_topk_prob, then multiplies by routed_scaling_factor.
  (Its own DeepseekV3MoE block is not used: its shared experts have no gate and their width must
  be a multiple of moe_intermediate_size.)

Nothing in the spec that no transformers router implements (softmax with a selection bias, or with
routed_scaling_factor != 1) is built: `build_dense2moe` refuses it rather than inventing a reference.
Run under `hf.float64_transformers()` for float64 (it also patches DeepseekV3TopkRouter).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, DeepseekV3Config, Qwen2MoeConfig, Qwen3MoeConfig
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter
from transformers.models.qwen2_moe.modeling_qwen2_moe import (
    Qwen2MoeExperts,
    Qwen2MoeMLP,
    Qwen2MoeSparseMoeBlock,
    Qwen2MoeTopKRouter,
)
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

from . import hf

BASES = ("llama", "qwen2", "qwen3")
_TOP_LEVEL_KEYS = {
    "model_type", "base_model_type", "vocab_size", "hidden_size", "intermediate_size", "num_attention_heads",
    "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta", "max_position_embeddings",
    "tie_word_embeddings", "moe_intermediate_size", "num_experts_per_tok", "scoring_func", "norm_topk_prob",
    "layer_plan", "num_hidden_layers",
}
_PLAN_KEYS = {
    "attention", "ffn", "num_experts", "num_experts_per_tok", "moe_intermediate_size", "scoring_func",
    "norm_topk_prob", "shared_expert_intermediate_size", "shared_expert_gate", "selection_bias",
    "routed_scaling_factor", "source_layers", "attention_source",
}
# Per-layer keys that fall back to the top level (spec), and the per-layer-only defaults.
_INHERITED = ("moe_intermediate_size", "num_experts_per_tok", "scoring_func", "norm_topk_prob", "routed_scaling_factor")
_LAYER_DEFAULTS = dict(shared_expert_intermediate_size=0, shared_expert_gate=False, selection_bias=False,
                       routed_scaling_factor=1.0)


class Dense2MoeCase(NamedTuple):
    name: str
    config: dict[str, Any]


DENSE2MOE_CASES: list[Dense2MoeCase] = [
    # The spec's example: attention-free layers at the end; top-2 softmax without renormalisation and
    # a gated shared expert; top-1 sigmoid with a selection bias; a dense attention-free last layer.
    Dense2MoeCase("qwen2_spec_example_attnfree_end", {
        "model_type": "dense2moe", "base_model_type": "qwen2", "vocab_size": 131, "hidden_size": 48,
        "intermediate_size": 96, "num_attention_heads": 6, "num_key_value_heads": 2, "head_dim": 8,
        "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "max_position_embeddings": 64, "tie_word_embeddings": False,
        "moe_intermediate_size": 96, "num_experts_per_tok": 1, "scoring_func": "softmax", "norm_topk_prob": True,
        "layer_plan": [
            {"attention": True, "ffn": "dense", "source_layers": [0]},
            {"attention": True, "ffn": "moe", "num_experts": 3, "num_experts_per_tok": 2, "scoring_func": "softmax",
             "norm_topk_prob": False, "shared_expert_intermediate_size": 64, "shared_expert_gate": True,
             "attention_source": 1, "source_layers": [1, 2, 3]},
            {"attention": False, "ffn": "moe", "num_experts": 2, "scoring_func": "sigmoid", "selection_bias": True,
             "routed_scaling_factor": 1.0, "source_layers": [4, 5]},
            {"attention": False, "ffn": "dense"},
        ]}),
    # llama base, tied embeddings, GQA 1, head_dim != hidden/heads; attention-free MoE layer first;
    # top-1 softmax without renormalisation (weight = raw probability, Switch style).
    Dense2MoeCase("llama_attnfree_start_tied_gqa1", {
        "model_type": "dense2moe", "base_model_type": "llama", "vocab_size": 97, "hidden_size": 32,
        "intermediate_size": 64, "num_attention_heads": 4, "num_key_value_heads": 4, "head_dim": 12,
        "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "max_position_embeddings": 64, "tie_word_embeddings": True,
        "moe_intermediate_size": 40, "num_experts_per_tok": 2, "scoring_func": "softmax", "norm_topk_prob": True,
        "layer_plan": [
            {"attention": False, "ffn": "moe", "num_experts": 4, "source_layers": [0, 1, 2, 3]},
            {"attention": True, "ffn": "dense", "source_layers": [4]},
            {"attention": True, "ffn": "moe", "num_experts": 2, "num_experts_per_tok": 1, "norm_topk_prob": False},
        ]}),
    # qwen3 base (q/k norm), GQA 2; attention-free layers in the middle; sigmoid + bias + scaling with
    # a gated shared expert; softmax with an ungated shared expert and its own expert width; k == E.
    Dense2MoeCase("qwen3_attnfree_middle_gqa2", {
        "model_type": "dense2moe", "base_model_type": "qwen3", "vocab_size": 203, "hidden_size": 48,
        "intermediate_size": 80, "num_attention_heads": 6, "num_key_value_heads": 3, "head_dim": 12,
        "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "max_position_embeddings": 64, "tie_word_embeddings": False,
        "moe_intermediate_size": 32, "num_experts_per_tok": 2, "scoring_func": "sigmoid", "norm_topk_prob": True,
        "layer_plan": [
            {"attention": True, "ffn": "moe", "num_experts": 3, "selection_bias": True, "routed_scaling_factor": 2.5,
             "shared_expert_intermediate_size": 24, "shared_expert_gate": True, "attention_source": 0},
            {"attention": False, "ffn": "moe", "num_experts": 4, "num_experts_per_tok": 3, "scoring_func": "softmax",
             "moe_intermediate_size": 40, "shared_expert_intermediate_size": 16},
            {"attention": False, "ffn": "dense"},
            {"attention": True, "ffn": "moe", "num_experts": 2, "norm_topk_prob": False},
        ]}),
]


def dense2moe_case(name: str) -> Dense2MoeCase:
    """The DENSE2MOE_CASES entry called `name`."""
    for c in DENSE2MOE_CASES:
        if c.name == name:
            return c
    raise KeyError(f"no DENSE2MOE_CASES entry named {name!r}")


# ---------------------------------------------------------------------------------------------
# Reading the config


def check_config(config: dict[str, Any]) -> None:
    """Refuse keys this reference does not implement, so it never silently ignores one."""
    if config.get("model_type") != "dense2moe":
        raise ValueError(f"model_type={config.get('model_type')!r}, expected 'dense2moe'")
    if config.get("base_model_type") not in BASES:
        raise ValueError(f"base_model_type={config.get('base_model_type')!r} is not one of {BASES}")
    unknown = sorted(set(config) - _TOP_LEVEL_KEYS)
    if unknown:
        raise ValueError(f"top-level keys {unknown} are not implemented by this reference")
    if config.get("num_hidden_layers", len(config["layer_plan"])) != len(config["layer_plan"]):
        raise ValueError("num_hidden_layers differs from len(layer_plan)")
    for i, entry in enumerate(config["layer_plan"]):
        unknown = sorted(set(entry) - _PLAN_KEYS)
        if unknown:
            raise ValueError(f"layer_plan[{i}]: keys {unknown} are not implemented by this reference")


def moe_settings(config: dict[str, Any], entry: dict[str, Any]) -> dict[str, Any]:
    """One MoE plan entry with the spec's defaults filled in (top-level ones, then per-layer ones)."""
    settings = dict(_LAYER_DEFAULTS)
    settings.update({key: config[key] for key in _INHERITED if key in config})
    settings.update({key: value for key, value in entry.items()
                     if key not in ("attention", "ffn", "source_layers", "attention_source")})
    return settings


def base_config(config: dict[str, Any]):
    """The base family's transformers config for a Dense2MoE config (all layers dense, for now)."""
    kwargs = dict(
        vocab_size=config["vocab_size"], hidden_size=config["hidden_size"],
        intermediate_size=config["intermediate_size"], num_hidden_layers=len(config["layer_plan"]),
        num_attention_heads=config["num_attention_heads"],
        num_key_value_heads=config.get("num_key_value_heads", config["num_attention_heads"]),
        head_dim=config.get("head_dim", config["hidden_size"] // config["num_attention_heads"]),
        rms_norm_eps=config.get("rms_norm_eps", 1e-6),
        rope_parameters={"rope_type": "default", "rope_theta": config.get("rope_theta", 10000.0)},
        max_position_embeddings=config["max_position_embeddings"],
        tie_word_embeddings=config.get("tie_word_embeddings", False),
    )
    return AutoConfig.for_model(config["base_model_type"], **kwargs)


# ---------------------------------------------------------------------------------------------
# Modules


class NoAttention(nn.Module):
    """Stands in for `self_attn` in an attention-free layer: contributes exactly zero."""

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        return torch.zeros_like(hidden_states), None


class ComposedMoeBlock(nn.Module):
    """An MoE layer no single transformers block covers, from transformers parts.

    gate: Qwen2MoeTopKRouter (softmax) or DeepseekV3TopkRouter (sigmoid, one group);
    experts: Qwen2MoeExperts; shared_expert: Qwen2MoeMLP; shared_expert_gate: Linear(H, 1).
    y = experts(x; topk_ids, topk_weights) + [sigmoid(x·w_gate) if gated] · shared_expert(x)
    """

    def __init__(self, gate: nn.Module, experts: nn.Module, shared_expert: nn.Module | None,
                 shared_expert_gate: nn.Module | None):
        super().__init__()
        self.gate = gate
        self.experts = experts
        if shared_expert is not None:
            self.shared_expert = shared_expert
        if shared_expert_gate is not None:
            self.shared_expert_gate = shared_expert_gate

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        batch_size, sequence_length, hidden_dim = hidden_states.shape
        x = hidden_states.reshape(-1, hidden_dim)
        _, topk_weights, topk_ids = self.gate(x)
        y = self.experts(x, topk_ids, topk_weights)
        if hasattr(self, "shared_expert"):
            shared = self.shared_expert(x)
            if hasattr(self, "shared_expert_gate"):
                shared = torch.sigmoid(self.shared_expert_gate(x)) * shared
            y = y + shared
        return y.reshape(batch_size, sequence_length, hidden_dim)


def build_moe_block(hidden_size: int, settings: dict[str, Any]) -> nn.Module:
    """A transformers MoE block for one plan entry (see the module docstring for which)."""
    experts, top_k = settings["num_experts"], settings["num_experts_per_tok"]
    width, shared_width = settings["moe_intermediate_size"], settings["shared_expert_intermediate_size"]
    gated = settings["shared_expert_gate"]
    if gated and not shared_width:
        raise ValueError("shared_expert_gate without a shared expert")
    common = dict(hidden_size=hidden_size, num_attention_heads=1, num_key_value_heads=1, num_hidden_layers=1,
                  experts_implementation="eager")
    qwen2 = Qwen2MoeConfig(num_experts=experts, num_experts_per_tok=top_k, moe_intermediate_size=width,
                           norm_topk_prob=settings["norm_topk_prob"],
                           shared_expert_intermediate_size=shared_width or width, **common)
    if settings["scoring_func"] == "softmax":
        if settings["selection_bias"] or settings["routed_scaling_factor"] != 1.0:
            raise NotImplementedError("no transformers router does softmax with selection_bias or "
                                      "routed_scaling_factor != 1; this reference does not invent one")
        if shared_width and gated:
            return Qwen2MoeSparseMoeBlock(qwen2)
        if not shared_width:
            return Qwen3MoeSparseMoeBlock(Qwen3MoeConfig(
                num_experts=experts, num_experts_per_tok=top_k, moe_intermediate_size=width,
                norm_topk_prob=settings["norm_topk_prob"], **common))
        gate = Qwen2MoeTopKRouter(qwen2)
    elif settings["scoring_func"] == "sigmoid":
        gate = DeepseekV3TopkRouter(DeepseekV3Config(
            n_routed_experts=experts, num_experts_per_tok=top_k, n_group=1, topk_group=1,
            norm_topk_prob=settings["norm_topk_prob"], routed_scaling_factor=settings["routed_scaling_factor"],
            moe_intermediate_size=width, **common))
    else:
        raise ValueError(f"scoring_func={settings['scoring_func']!r}")
    return ComposedMoeBlock(
        gate=gate,
        experts=Qwen2MoeExperts(qwen2),
        shared_expert=Qwen2MoeMLP(qwen2, intermediate_size=shared_width) if shared_width else None,
        shared_expert_gate=nn.Linear(hidden_size, 1, bias=False) if gated else None,
    )


def build_dense2moe(config: dict[str, Any], dtype: torch.dtype = torch.float64, seed: int = 0) -> nn.Module:
    """A random Dense2MoE reference model for `config` (a config.json dict), eager everywhere.

    Weights are drawn in float64 with the rules of `hf.random_tensor`, then cast to `dtype`.
    e_score_correction_bias (a buffer) is drawn with std 0.3 where selection_bias is set, so the bias
    changes some choices; elsewhere it stays 0 and is not saved.
    """
    check_config(config)
    model = AutoModelForCausalLM.from_config(base_config(config), dtype=torch.float64,
                                             attn_implementation="eager")
    hidden = config["hidden_size"]
    for layer, entry in zip(model.model.layers, config["layer_plan"]):
        if not entry["attention"]:
            layer.self_attn = NoAttention()
            layer.input_layernorm = nn.Identity()
        if entry["ffn"] == "moe":
            layer.mlp = build_moe_block(hidden, moe_settings(config, entry)).to(torch.float64)
        elif entry["ffn"] != "dense":
            raise ValueError(f"ffn={entry['ffn']!r}")
    hf.randomize_(model, seed)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for i, entry in enumerate(config["layer_plan"]):
            if entry["ffn"] == "moe" and moe_settings(config, entry)["selection_bias"]:
                bias = model.model.layers[i].mlp.gate.e_score_correction_bias
                bias.copy_(torch.randn(bias.shape, generator=generator, dtype=torch.float64) * 0.3)
    model.dense2moe_config = copy.deepcopy(config)
    return model.to(dtype).eval()


# ---------------------------------------------------------------------------------------------
# Saving in our names


def expected_tensor_names(config: dict[str, Any], fused_experts: bool = False) -> set[str]:
    """The tensor names a Dense2MoE checkpoint holds, from the spec alone (not from the model)."""
    base = config["base_model_type"]
    names = {"model.embed_tokens.weight", "model.norm.weight"}
    if not config.get("tie_word_embeddings", False):
        names.add("lm_head.weight")
    for i, entry in enumerate(config["layer_plan"]):
        p = f"model.layers.{i}."
        names.add(p + "post_attention_layernorm.weight")
        if entry["attention"]:
            names.add(p + "input_layernorm.weight")
            names.update(f"{p}self_attn.{n}_proj.weight" for n in "qkvo")
            if base == "qwen2":
                names.update(f"{p}self_attn.{n}_proj.bias" for n in "qkv")
            if base == "qwen3":
                names.update({p + "self_attn.q_norm.weight", p + "self_attn.k_norm.weight"})
        if entry["ffn"] == "dense":
            names.update(f"{p}mlp.{n}_proj.weight" for n in ("gate", "up", "down"))
            continue
        s = moe_settings(config, entry)
        names.add(p + "mlp.gate.weight")
        if s["selection_bias"]:
            names.add(p + "mlp.gate.e_score_correction_bias")
        if fused_experts:
            names.update({p + "mlp.experts.gate_up_proj", p + "mlp.experts.down_proj"})
        else:
            names.update(f"{p}mlp.experts.{e}.{n}_proj.weight"
                         for e in range(s["num_experts"]) for n in ("gate", "up", "down"))
        if s["shared_expert_intermediate_size"]:
            names.update(f"{p}mlp.shared_expert.{n}_proj.weight" for n in ("gate", "up", "down"))
        if s["shared_expert_gate"]:
            names.add(p + "mlp.shared_expert_gate.weight")
    return names


def dense2moe_state_dict(model: nn.Module, config: dict[str, Any],
                         fused_experts: bool = False) -> dict[str, torch.Tensor]:
    """Our tensor names -> tensors.  Experts per expert (`experts.{e}.{gate,up,down}_proj.weight`) or,
    with fused_experts, as transformers 5 holds them: `experts.gate_up_proj` [E, 2F, H] (gate rows
    first) and `experts.down_proj` [E, H, F]."""
    expected = expected_tensor_names(config, fused_experts)
    out: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and name not in expected:
            continue  # tied: lm_head is embed_tokens
        if name.endswith("e_score_correction_bias") and name not in expected:
            continue  # a sigmoid router without selection_bias: its zero buffer is not in the checkpoint
        if name.endswith("experts.gate_up_proj") and not fused_experts:
            prefix, width = name[: -len("gate_up_proj")], tensor.shape[1] // 2
            for e in range(tensor.shape[0]):
                out[f"{prefix}{e}.gate_proj.weight"] = tensor[e, :width].clone()
                out[f"{prefix}{e}.up_proj.weight"] = tensor[e, width:].clone()
            continue
        if name.endswith("experts.down_proj") and not fused_experts:
            prefix = name[: -len("down_proj")]
            for e in range(tensor.shape[0]):
                out[f"{prefix}{e}.down_proj.weight"] = tensor[e].clone()
            continue
        out[name] = tensor.detach().clone().contiguous()
    if set(out) != expected:
        raise AssertionError(f"saved names differ from the spec: extra {sorted(set(out) - expected)}, "
                             f"missing {sorted(expected - set(out))}")
    return out


def save_dense2moe(model: nn.Module, config: dict[str, Any], directory: str | Path,
                   fused_experts: bool = False) -> Path:
    """Write config.json (the config dict as given) and model.safetensors (our names, model's dtype)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    save_file(dense2moe_state_dict(model, config, fused_experts), str(directory / "model.safetensors"),
              metadata={"format": "pt"})
    return directory


def dense2moe_logits(model: nn.Module, input_ids: np.ndarray) -> np.ndarray:
    """[T] int64 -> [T, V] float64 logits (batch 1, no cache)."""
    return hf.logits(model, input_ids)
