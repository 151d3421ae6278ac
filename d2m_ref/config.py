"""Model configuration: one frozen dataclass, read from a Hugging Face `config.json` and validated once.

Implements spec/architecture.md §1 (families and the layer plan) and spec/config.md (keys).
Every family is described as data: which attention flavour (qkv bias, q/k norm), which layers
have attention, and which FFN each layer has (a dense SwiGLU MLP or an MoE).  The forward pass
never looks at the family name; it reads the per-layer `LayerSpec`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Mapping

from .errors import ConfigError
from .files import require_regular

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "qwen2_moe", "qwen3_moe", "mixtral", "olmoe", "dense2moe")
DENSE2MOE_BASES = ("llama", "qwen2", "qwen3")
SCORING = ("softmax", "sigmoid")
ROPE_TYPES = ("default", "linear", "llama3")
SILU_NAMES = ("silu", "swish")  # transformers' ACT2FN maps both to SiLU


class Derived:
    """A default computed from other keys, as transformers' config class computes it."""

    def __init__(self, text: str):
        self.text = text

    def __repr__(self) -> str:
        return self.text


SAME_AS_HEADS = Derived("num_attention_heads")
HIDDEN_PER_HEAD = Derived("hidden_size / num_attention_heads")

# The value of an absent key, per family: what transformers' config class for that family (5.24)
# uses, so a published config that leaves a key out means the same model here as there (spec/config.md,
# "Defaults per family"; tests/test_published_configs.py compares this table with those classes).
# Structural sizes (vocab_size, hidden_size, intermediate_size, num_hidden_layers,
# num_attention_heads) have no default here: a config without them is not a checkpoint's config,
# and transformers' 7B-sized fallbacks would only fail later, at the weights.
_ALL_FAMILIES = dict(rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False, hidden_act="silu",
                     mlp_bias=False, head_dim=HIDDEN_PER_HEAD)
FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": {**_ALL_FAMILIES, "num_key_value_heads": SAME_AS_HEADS, "max_position_embeddings": 2048,
              "attention_bias": False},
    "mistral": {**_ALL_FAMILIES, "num_key_value_heads": 8, "max_position_embeddings": 131072,
                "sliding_window": 4096},
    "qwen2": {**_ALL_FAMILIES, "num_key_value_heads": 32, "max_position_embeddings": 32768},
    "qwen3": {**_ALL_FAMILIES, "num_key_value_heads": 32, "head_dim": 128, "max_position_embeddings": 32768,
              "attention_bias": False},
    "qwen2_moe": {**_ALL_FAMILIES, "num_key_value_heads": 16, "max_position_embeddings": 32768, "qkv_bias": True,
                  "num_experts": 60, "num_experts_per_tok": 4, "moe_intermediate_size": 1408,
                  "shared_expert_intermediate_size": 5632, "norm_topk_prob": False, "decoder_sparse_step": 1,
                  "mlp_only_layers": []},
    "qwen3_moe": {**_ALL_FAMILIES, "num_key_value_heads": 4, "max_position_embeddings": 32768,
                  "attention_bias": False, "num_experts": 128, "num_experts_per_tok": 8,
                  "moe_intermediate_size": 768, "norm_topk_prob": False, "decoder_sparse_step": 1,
                  "mlp_only_layers": []},
    "mixtral": {**_ALL_FAMILIES, "rms_norm_eps": 1e-5, "rope_theta": 1e6, "num_key_value_heads": 8,
                "max_position_embeddings": 131072, "num_local_experts": 8, "num_experts_per_tok": 2},
    "olmoe": {**_ALL_FAMILIES, "rms_norm_eps": 1e-5, "num_key_value_heads": SAME_AS_HEADS,
              "max_position_embeddings": 4096, "attention_bias": False, "clip_qkv": None, "num_experts": 64,
              "num_experts_per_tok": 8, "norm_topk_prob": False},
}

# Keys known never to change the forward pass (bookkeeping, training-only, generation defaults):
# accepted silently.  See spec/config.md, "Key policy".
_INERT_KEYS = frozenset({
    "conversion",  # provenance written by d2m_ref.convert (spec/convert.md §2.6)
    "_name_or_path", "_model_name_or_path", "architectures", "attention_dropout", "bos_token_id",
    "chunk_size_feed_forward", "dtype", "torch_dtype", "eos_token_id", "pad_token_id", "unk_token_id",
    "id2label", "label2id", "initializer_range", "is_encoder_decoder", "output_attentions",
    "output_hidden_states", "output_router_logits", "problem_type", "return_dict", "transformers_version",
    "use_cache", "router_aux_loss_coef", "router_jitter_noise", "pretraining_tp", "max_window_layers",
    "tokenizer_class", "auto_map", "model_name", "router_z_loss_coef",
    "use_return_dict", "tie_encoder_decoder", "torchscript", "prefix", "task_specific_params",
    "finetuning_task", "add_cross_attention", "cross_attention_hidden_size", "decoder_start_token_id",
    "sep_token_id", "tf_legacy_loss", "use_bfloat16", "pruned_heads", "bad_words_ids",
    "num_return_sequences", "output_scores", "return_dict_in_generate", "forced_bos_token_id",
    "forced_eos_token_id", "remove_invalid_values", "exponential_decay_length_penalty",
    "suppress_tokens", "begin_suppress_tokens", "max_length", "min_length", "do_sample",
    "early_stopping", "num_beams", "num_beam_groups", "diversity_penalty", "temperature", "top_k",
    "top_p", "typical_p", "repetition_penalty", "length_penalty", "no_repeat_ngram_size",
    "encoder_no_repeat_ngram_size", "is_decoder",
    # written by other tools beside transformers: SmolLM2's nanotron export, transformers.js
    "is_llama_config", "transformers.js_config", "_attn_implementation_autoset", "attn_implementation",
})


@dataclass(frozen=True)
class Refused:
    """A key that changes the forward pass in a way d2m_ref does not implement, unless `neutral`."""

    changes: str  # what the key does, for the error message
    neutral: Callable[[Any], bool]


def _is(*values: Any) -> Callable[[Any], bool]:
    """Neutral when equal (same type: true is not 1) to one of `values`."""
    return lambda v: any(type(v) is type(n) and v == n for n in values)


# Keys whose non-neutral values d2m_ref refuses by name (sliding windows, hidden_act and rope types
# are refused where they are read: their neutral values depend on other keys).
_REFUSED: dict[str, Refused] = {
    "mlp_bias": Refused("adds biases to the MLP projections", _is(False)),
    "quantization_config": Refused("says the weights were quantised by another tool (GPTQ, AWQ, bitsandbytes, "
                                   "FP8, ...): d2m_ref reads float weights or its own Q8/Q4G formats "
                                   "(spec/quant.md); dequantise the checkpoint first", lambda v: False),
    "final_logit_softcapping": Refused("soft-caps the logits (c·tanh(z/c))", _is(None)),
    "attn_logit_softcapping": Refused("soft-caps the attention scores (c·tanh(s/c))", _is(None)),
    "rope_interleaved": Refused("rotates interleaved pairs (GPT-J layout) instead of halves", _is(False)),
    "use_mrope": Refused("uses multimodal RoPE (position sections per axis)", _is(False)),
    "partial_rotary_factor": Refused("rotates only part of each head", _is(1.0, 1)),
    "use_qk_norm": Refused("RMS-normalises queries and keys", _is(False)),
    "qk_layernorm": Refused("normalises queries and keys", _is(False)),
    "logits_scaling": Refused("divides the logits by a constant", _is(1.0, 1)),
    "embedding_multiplier": Refused("scales the embeddings", _is(1.0, 1)),
    "residual_multiplier": Refused("scales each residual branch", _is(1.0, 1)),
    "attention_multiplier": Refused("replaces the 1/sqrt(head_dim) attention scale", lambda v: False),
    "no_rope_layers": Refused("skips RoPE in some layers", lambda v: isinstance(v, list) and all(x == 1 for x in v)),
    "no_rope_layer_interval": Refused("skips RoPE in some layers", _is(None, 0)),
}


# Sanity limit: the largest released decoders have a few hundred layers; a config claiming more
# is corrupt, and building its layer plan would take unbounded time and memory.
MAX_LAYERS = 10_000


@dataclass(frozen=True)
class RopeSpec:
    """Rotary position embedding (spec §2.3). `rope_type` 'default', 'linear' or 'llama3'."""

    theta: float
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 0


@dataclass(frozen=True)
class MoESpec:
    """One MoE block (spec §4): E experts of width F, top-k routing."""

    num_experts: int
    top_k: int
    intermediate_size: int
    scoring: str = "softmax"  # 'softmax' | 'sigmoid' over router_logits
    norm_topk_prob: bool = False  # renormalise the k chosen scores to sum 1
    routed_scaling_factor: float = 1.0
    selection_bias: bool = False  # e_score_correction_bias: added to scores for choosing only
    shared_expert_intermediate_size: int = 0  # 0: no shared expert
    shared_expert_gate: bool = False  # sigmoid(x·w_g) scales the shared expert (Qwen2-MoE)


MAX_INT = 2 ** 53  # larger integers are not sizes, counts or positions of any model (and lose exactness as floats)
MAX_FLOAT = 1.7976931348623157e308  # a JSON integer past float64's range would overflow math on it


def _shown(v: Any) -> str:
    """A config value for an error message: long ones (a 400-digit integer) cut to their ends."""
    text = repr(v)
    return text if len(text) <= 60 else f"{text[:24]}...{text[-12:]} ({len(text)} characters)"


@dataclass(frozen=True)
class LayerSpec:
    """One decoder layer of the layer plan (spec §1.2)."""

    attention: bool
    moe: MoESpec | None  # None: dense SwiGLU MLP of width `intermediate_size`
    intermediate_size: int = 0
    # Provenance (Dense2MoE): which dense layer each expert (or the dense MLP) came from, and
    # whose attention was kept.  Informational: the forward pass never reads it.
    source_layers: tuple[int, ...] = ()
    attention_source: int | None = None


@dataclass(frozen=True)
class ModelConfig:
    """Everything the forward pass needs, validated.  Dimension letters: see d2m_ref/model.py."""

    family: str
    vocab_size: int
    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope: RopeSpec
    max_position_embeddings: int
    tie_word_embeddings: bool
    layers: tuple[LayerSpec, ...]
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: str = "none"  # 'none' | 'head' (Qwen3: per head, weight [D]) | 'proj' (OLMoE: weight [Nh·D])
    clip_qkv: float | None = None  # OLMoE: clamp q, k, v projections to [-c, c]
    moe_naming: str = "qwen"  # 'qwen': mlp.gate / mlp.experts.{e}.gate_proj; 'mixtral': block_sparse_moe w1/w3/w2
    source: dict = field(default_factory=dict, compare=False, repr=False)  # the config dict as given
    # Keys of `source` that d2m_ref neither reads nor knows (spec/config.md, "Key policy"): accepted,
    # but a reader of a trace or a check report must see that they were not verified.
    unverified_keys: tuple[str, ...] = field(default=(), compare=False)

    @property
    def num_hidden_layers(self) -> int:
        return len(self.layers)


# ---------------------------------------------------------------------------------------------
# Reading a config dict


class _Keys:
    """Reads keys from a config dict, remembering which were used, with errors that quote values."""

    def __init__(self, d: Mapping[str, Any], where: str, defaults: Mapping[str, Any] | None = None):
        if not isinstance(d, Mapping):
            raise ConfigError(f"{where}: expected a JSON object, found {type(d).__name__}")
        self.d, self.where, self.used = d, where, set()
        self.defaults = defaults or {}  # the family's defaults (FAMILY_DEFAULTS), used when no default is passed

    def has(self, key: str) -> bool:
        """Present and not null (a null value is read as 'absent', so the key counts as read)."""
        self.used.add(key)
        return key in self.d and self.d[key] is not None

    def raw(self, key: str, default: Any = ...) -> Any:
        self.used.add(key)
        if default is ...:
            default = self.defaults.get(key, ...)
        if key not in self.d or self.d[key] is None:
            if default is ...:
                raise ConfigError(f"{self.where}: missing required key '{key}'")
            return default
        return self.d[key]

    def int(self, key: str, default: Any = ..., minimum: int = 1) -> int:
        v = self.raw(key, default)
        if isinstance(v, bool) or not isinstance(v, int):
            raise ConfigError(f"{self.where}: '{key}' must be an integer, found {_shown(v)}")
        if v < minimum:
            raise ConfigError(f"{self.where}: '{key}'={_shown(v)} must be >= {minimum}")
        if v > MAX_INT:
            raise ConfigError(f"{self.where}: '{key}'={_shown(v)} is beyond any real model (> 2**53)")
        return v

    def float(self, key: str, default: Any = ..., positive: bool = True) -> float:
        v = self.raw(key, default)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or abs(v) > MAX_FLOAT or not math.isfinite(v):
            raise ConfigError(f"{self.where}: '{key}' must be a finite number, found {_shown(v)}")
        if positive and v <= 0:
            raise ConfigError(f"{self.where}: '{key}'={v} must be > 0")
        return float(v)

    def bool(self, key: str, default: Any = ...) -> bool:
        v = self.raw(key, default)
        if not isinstance(v, bool):
            raise ConfigError(f"{self.where}: '{key}' must be true or false, found {v!r}")
        return v

    def choice(self, key: str, choices: tuple[str, ...], default: Any = ...) -> str:
        v = self.raw(key, default)
        if v not in choices:
            raise ConfigError(f"{self.where}: '{key}'={v!r} is not one of {', '.join(choices)}")
        return v

    def int_list(self, key: str, default: Any = ...) -> tuple[int, ...]:
        v = self.raw(key, default)
        if not isinstance(v, (list, tuple)) or any(isinstance(i, bool) or not isinstance(i, int) for i in v):
            raise ConfigError(f"{self.where}: '{key}' must be a list of integers, found {v!r}")
        return tuple(v)

    def unread(self) -> list[str]:
        """Keys present (not null) that nothing has read, sorted."""
        return sorted(k for k in self.d if k not in self.used and self.d[k] is not None)

    def reject_unknown(self) -> None:
        """For d2m_ref's own formats (a layer_plan entry, rope parameters): an unread key is an error."""
        unknown = self.unread()
        if unknown:
            raise ConfigError(f"{self.where}: unknown config key(s) {', '.join(map(repr, unknown))}: "
                              "d2m_ref does not know what they change, so it refuses to guess "
                              "(see spec/config.md for the keys it reads)")


def _rope(k: _Keys) -> RopeSpec:
    """Both spellings: transformers 5 `rope_parameters`, older `rope_theta` + `rope_scaling`.
    Sub-keys are d2m_ref's to know: one it does not read is an error (they all change the angles)."""
    params = k.raw("rope_parameters", None)
    scaling = k.raw("rope_scaling", None)
    if params is not None and not isinstance(params, Mapping):
        raise ConfigError(f"{k.where}: 'rope_parameters' must be an object, found {params!r}")
    if scaling is not None and not isinstance(scaling, Mapping):
        raise ConfigError(f"{k.where}: 'rope_scaling' must be an object, found {scaling!r}")
    merged: dict[str, Any] = {}
    if k.has("rope_theta"):
        merged["rope_theta"] = k.raw("rope_theta")
    for part in (scaling or {}, params or {}):
        for key, value in part.items():
            key = "rope_type" if key == "type" else key
            if key in merged and merged[key] != value:
                raise ConfigError(f"{k.where}: rope parameter '{key}' is given twice with different values "
                                  f"({merged[key]!r} and {value!r})")
            merged[key] = value
    r = _Keys(merged, f"{k.where}: rope parameters")
    theta = r.float("rope_theta", k.defaults["rope_theta"])
    rope_type = r.raw("rope_type", "default")
    if rope_type not in ROPE_TYPES:
        raise ConfigError(f"{k.where}: rope_type={rope_type!r} is not supported "
                          f"(d2m_ref implements {', '.join(ROPE_TYPES)})")
    partial = r.float("partial_rotary_factor", 1.0)
    if partial != 1.0:
        raise ConfigError(f"{k.where}: partial_rotary_factor={partial} is not supported (only 1.0)")
    if rope_type == "default":
        if r.float("factor", 1.0) != 1.0:  # some writers leave factor=1.0 on default rope; more means a mistake
            raise ConfigError(f"{k.where}: rope factor={r.raw('factor')} with rope_type 'default' "
                              "(set rope_type 'linear' or 'llama3' to scale)")
        spec = RopeSpec(theta=theta)
    elif rope_type == "linear":
        spec = RopeSpec(theta=theta, rope_type="linear", factor=r.float("factor"))
    else:
        spec = RopeSpec(theta=theta, rope_type="llama3", factor=r.float("factor"),
                        low_freq_factor=r.float("low_freq_factor"),
                        high_freq_factor=r.float("high_freq_factor"),
                        original_max_position_embeddings=r.int("original_max_position_embeddings"))
        if spec.high_freq_factor <= spec.low_freq_factor:
            raise ConfigError(f"{k.where}: llama3 rope needs high_freq_factor > low_freq_factor, found "
                              f"{spec.high_freq_factor} <= {spec.low_freq_factor}")
    r.reject_unknown()
    return spec


def _check_unsupported(k: _Keys, family: str, max_positions: int) -> None:
    """Refuse what d2m_ref does not implement rather than compute something else (spec/config.md,
    "Key policy": refused keys)."""
    act = k.raw("hidden_act")
    if act not in SILU_NAMES:
        raise ConfigError(f"{k.where}: hidden_act={act!r} changes the MLP's activation; d2m_ref implements "
                          f"SwiGLU with {' / '.join(SILU_NAMES)} only")
    for key, rule in _REFUSED.items():
        k.used.add(key)
        if key in k.d and not rule.neutral(k.d[key]):
            value = k.d[key]
            shown = f"{{quant_method: {value.get('quant_method')!r}, ...}}" if isinstance(value, Mapping) else repr(value)
            raise ConfigError(f"{k.where}: {key}={shown} {rule.changes}; d2m_ref does not implement that")
    if family in ("qwen2", "qwen3", "qwen2_moe", "qwen3_moe"):
        # transformers' Qwen classes apply sliding_window only when use_sliding_window is true
        k.used.add("sliding_window")
        if k.bool("use_sliding_window", False):
            raise ConfigError(f"{k.where}: use_sliding_window=true limits attention to a sliding window; "
                              "d2m_ref implements full causal attention only")
    elif family in ("mistral", "mixtral"):
        # applied whenever set; an explicit null means no window (transformers keeps it), absent means
        # the family's default.  A window as long as the model allows changes nothing.
        k.used.add("sliding_window")
        window = k.d["sliding_window"] if "sliding_window" in k.d else k.defaults.get("sliding_window")
        if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < max_positions):
            absent = "" if "sliding_window" in k.d else f" (absent: {family}'s default)"
            raise ConfigError(f"{k.where}: sliding_window={window!r}{absent} limits attention to a sliding window; "
                              "d2m_ref implements full causal attention only (null, or a window >= "
                              f"max_position_embeddings={max_positions}, would be accepted)")
    types = k.raw("layer_types", None)
    if types is not None:
        if not isinstance(types, list) or any(t != "full_attention" for t in types):
            bad = types if not isinstance(types, list) else sorted({t for t in types if t != "full_attention"}, key=str)
            raise ConfigError(f"{k.where}: layer_types contains {bad!r}: d2m_ref implements 'full_attention' only")


def _attention_flavour(family: str, k: _Keys) -> dict[str, Any]:
    """qkv/o bias and q/k norm of the attention block, by family (spec §3)."""
    if family == "llama":
        bias = k.bool("attention_bias")
        return dict(qkv_bias=bias, o_bias=bias, qk_norm="none")
    if family in ("mistral", "mixtral"):  # transformers builds these without biases, whatever the config says
        return dict(qkv_bias=False, o_bias=False, qk_norm="none")
    if family == "qwen2":  # q, k, v biases always (Qwen2Attention), no config key
        return dict(qkv_bias=True, o_bias=False, qk_norm="none")
    if family == "qwen2_moe":
        return dict(qkv_bias=k.bool("qkv_bias"), o_bias=False, qk_norm="none")
    if family in ("qwen3", "qwen3_moe"):
        bias = k.bool("attention_bias")
        return dict(qkv_bias=bias, o_bias=bias, qk_norm="head")
    if family == "olmoe":
        bias = k.bool("attention_bias")
        clip = k.raw("clip_qkv")
        return dict(qkv_bias=bias, o_bias=bias, qk_norm="proj",
                    clip_qkv=None if clip is None else k.float("clip_qkv"))
    raise AssertionError(family)  # unreachable: family was validated


def _moe_defaults(family: str, k: _Keys) -> MoESpec | None:
    """The family's MoE block, or None for dense families."""
    if family in ("llama", "mistral", "qwen2", "qwen3", "dense2moe"):
        return None
    top_k = k.int("num_experts_per_tok")
    experts = _expert_count(family, k)
    if family == "mixtral":
        return MoESpec(num_experts=experts, top_k=top_k, intermediate_size=k.int("intermediate_size"),
                       norm_topk_prob=True)
    if family == "olmoe":
        return MoESpec(num_experts=experts, top_k=top_k, intermediate_size=k.int("intermediate_size"),
                       norm_topk_prob=k.bool("norm_topk_prob"))
    shared = k.int("shared_expert_intermediate_size", minimum=0) if family == "qwen2_moe" else 0
    return MoESpec(num_experts=experts, top_k=top_k, intermediate_size=k.int("moe_intermediate_size"),
                   norm_topk_prob=k.bool("norm_topk_prob"),
                   shared_expert_intermediate_size=shared, shared_expert_gate=shared > 0)


# The expert count's key and the alias transformers' config class maps to it (its attribute_map):
# released Qwen3-MoE configs say num_experts where transformers writes num_local_experts.
# Qwen2-MoE has no alias: there num_local_experts is another family's key.
_EXPERT_KEYS = {"qwen2_moe": ("num_experts",), "qwen3_moe": ("num_local_experts", "num_experts"),
                "mixtral": ("num_local_experts", "num_experts"), "olmoe": ("num_experts", "num_local_experts")}


def _expert_count(family: str, k: _Keys) -> int:
    """E, from the family's key or its alias (both given and different: refused)."""
    given = [key for key in _EXPERT_KEYS[family] if k.has(key)]
    if len(given) == 2 and k.raw(given[0]) != k.raw(given[1]):
        raise ConfigError(f"{k.where}: {given[1]}={k.raw(given[1])} contradicts {given[0]}={k.raw(given[0])} "
                          "(the same setting)")
    return k.int(given[0] if given else "num_experts" if "num_experts" in k.defaults else "num_local_experts")


def _hf_layers(family: str, k: _Keys, moe: MoESpec | None, n_layers: int) -> tuple[LayerSpec, ...]:
    """Layer plan of a standard HF family: every layer has attention; FFN by the family's rule."""
    width = k.int("intermediate_size")
    if family in ("qwen2_moe", "qwen3_moe"):
        step = k.int("decoder_sparse_step")
        mlp_only = set(k.int_list("mlp_only_layers"))
        bad = sorted(i for i in mlp_only if not 0 <= i < n_layers)
        if bad:
            raise ConfigError(f"{k.where}: mlp_only_layers {bad} are outside 0..{n_layers - 1}")
        # transformers: layer i is MoE when i not in mlp_only_layers and (i+1) % decoder_sparse_step == 0
        is_moe = [i not in mlp_only and (i + 1) % step == 0 for i in range(n_layers)]
    else:
        is_moe = [moe is not None] * n_layers
    return tuple(LayerSpec(attention=True, moe=moe if m else None, intermediate_size=width,
                           source_layers=(i,), attention_source=i)
                 for i, m in enumerate(is_moe))


def _plan_layer(i: int, entry: Any, top: _Keys, width: int) -> LayerSpec:
    """One `layer_plan` entry; MoE keys default to the top-level ones (spec/config.md)."""
    e = _Keys(entry, f"{top.where}: layer_plan[{i}]")
    attention = e.bool("attention")
    ffn = e.choice("ffn", ("dense", "moe"))
    sources = e.int_list("source_layers", ())
    attn_src = e.int("attention_source", None, minimum=0) if e.has("attention_source") else None
    if any(s < 0 for s in sources):
        raise ConfigError(f"{e.where}: source_layers {list(sources)} must be >= 0")
    if not attention and attn_src is not None:
        raise ConfigError(f"{e.where}: attention_source={attn_src} given but attention=false")
    if ffn == "dense":
        w = e.int("intermediate_size", width)
        e.reject_unknown()
        if len(sources) > 1:
            raise ConfigError(f"{e.where}: a dense FFN comes from one layer, source_layers={list(sources)}")
        return LayerSpec(attention=attention, moe=None, intermediate_size=w,
                         source_layers=sources, attention_source=attn_src)

    def _top(key, default):
        """Top-level default for a per-layer MoE key (spec/config.md)."""
        return top.d[key] if top.d.get(key) is not None else default

    experts = e.int("num_experts")
    top_k = e.int("num_experts_per_tok", _top("num_experts_per_tok", ...))
    spec = MoESpec(
        num_experts=experts,
        top_k=top_k,
        intermediate_size=e.int("moe_intermediate_size", _top("moe_intermediate_size", width)),
        scoring=e.choice("scoring_func", SCORING, _top("scoring_func", "softmax")),
        norm_topk_prob=e.bool("norm_topk_prob", _top("norm_topk_prob", False)),
        routed_scaling_factor=e.float("routed_scaling_factor", _top("routed_scaling_factor", 1.0)),
        selection_bias=e.bool("selection_bias", False),
        shared_expert_intermediate_size=e.int("shared_expert_intermediate_size", 0, minimum=0),
        shared_expert_gate=e.bool("shared_expert_gate", False),
    )
    if top_k > experts:
        raise ConfigError(f"{e.where}: num_experts_per_tok={top_k} exceeds num_experts={experts}")
    if spec.shared_expert_gate and spec.shared_expert_intermediate_size == 0:
        raise ConfigError(f"{e.where}: shared_expert_gate=true but shared_expert_intermediate_size=0")
    if sources and len(sources) != experts:
        raise ConfigError(f"{e.where}: source_layers names {len(sources)} layers for num_experts={experts}")
    e.reject_unknown()
    return LayerSpec(attention=attention, moe=spec, intermediate_size=width,
                     source_layers=sources, attention_source=attn_src)


# Families d2m_ref does not implement, with what sets them apart, so the refusal says why.
_OTHER_FAMILIES = {
    "gemma": "GeGLU MLP, (1 + w) RMSNorm weights, embeddings scaled by sqrt(hidden_size)",
    "gemma2": "logit soft-capping, sliding-window layers, extra norms around each block",
    "gemma3": "sliding-window layers, q/k norms with (1 + w) weights, extra norms around each block",
    "gemma3_text": "sliding-window layers, q/k norms with (1 + w) weights, extra norms around each block",
    "phi": "LayerNorm, a parallel attention/MLP block, partial rotary embeddings",
    "phi3": "fused qkv and gate_up projections, su/longrope scaling",
    "deepseek_v2": "multi-head latent attention and grouped routing",
    "deepseek_v3": "multi-head latent attention and grouped routing",
    "gpt2": "LayerNorm, learned positions, GELU MLP",
    "falcon": "parallel attention/MLP blocks, LayerNorm",
    "qwen2_vl": "multimodal RoPE and a vision tower",
    "qwen2_5_vl": "multimodal RoPE and a vision tower",
}


def parse_config(d: Mapping[str, Any], where: str = "config", *, strict: bool = False) -> ModelConfig:
    """config dict (HF config.json) -> ModelConfig, or ConfigError naming the key at fault.

    Keys nobody reads and that d2m_ref does not know (spec/config.md, "Key policy") are accepted and
    listed in `ModelConfig.unverified_keys`; `strict=True` refuses them instead."""
    k = _Keys(d, where)
    family = k.raw("model_type")
    if family not in FAMILIES:
        why = f" ({_OTHER_FAMILIES[family]})" if isinstance(family, str) and family in _OTHER_FAMILIES else ""
        raise ConfigError(f"{where}: model_type={family!r} is not supported{why}; d2m_ref implements "
                          f"{', '.join(FAMILIES)}")
    attn_family = family
    if family == "dense2moe":
        attn_family = k.choice("base_model_type", DENSE2MOE_BASES)
    k.defaults = FAMILY_DEFAULTS[attn_family]  # a Dense2MoE model keeps its base family's defaults
    _check_unsupported(k, attn_family, k.int("max_position_embeddings"))
    hidden = k.int("hidden_size")
    heads = k.int("num_attention_heads")
    kv_heads = k.int("num_key_value_heads", heads if k.defaults["num_key_value_heads"] is SAME_AS_HEADS else ...)
    if heads % kv_heads:
        absent = "" if k.has("num_key_value_heads") else f" ({attn_family}'s default)"
        raise ConfigError(f"{where}: num_attention_heads={heads} is not a multiple of "
                          f"num_key_value_heads={kv_heads}{absent}")
    if k.has("head_dim") or k.defaults["head_dim"] is not HIDDEN_PER_HEAD:
        head_dim = k.int("head_dim")
    else:
        if hidden % heads:
            raise ConfigError(f"{where}: num_attention_heads={heads} does not divide hidden_size={hidden} "
                              "and no head_dim is given")
        head_dim = hidden // heads
    if head_dim % 2:
        raise ConfigError(f"{where}: head_dim={head_dim} must be even for rotary embeddings")
    moe = _moe_defaults(family, k)
    if moe is not None and moe.top_k > moe.num_experts:
        raise ConfigError(f"{where}: num_experts_per_tok={moe.top_k} exceeds num_experts={moe.num_experts}")
    if family == "dense2moe":
        plan = k.raw("layer_plan")
        if not isinstance(plan, list) or not plan:
            raise ConfigError(f"{where}: 'layer_plan' must be a non-empty list of layer entries")
        if len(plan) > MAX_LAYERS:
            raise ConfigError(f"{where}: layer_plan has {len(plan)} entries, more than {MAX_LAYERS}")
        width = k.int("intermediate_size")
        _check_moe_defaults(k)
        layers = tuple(_plan_layer(i, entry, k, width) for i, entry in enumerate(plan))
        n = k.int("num_hidden_layers", len(layers))
        if n != len(layers):
            raise ConfigError(f"{where}: num_hidden_layers={n} but layer_plan has {len(layers)} entries")
    else:
        n = k.int("num_hidden_layers")
        if n > MAX_LAYERS:
            raise ConfigError(f"{where}: num_hidden_layers={n} is more than {MAX_LAYERS}: not a real model")
        layers = _hf_layers(family, k, moe, n)
    cfg = ModelConfig(
        family=family,
        vocab_size=k.int("vocab_size"),
        hidden_size=hidden,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=k.float("rms_norm_eps"),
        rope=_rope(k),
        max_position_embeddings=k.int("max_position_embeddings"),
        tie_word_embeddings=k.bool("tie_word_embeddings"),
        layers=layers,
        moe_naming="mixtral" if family == "mixtral" else "qwen",
        source=dict(d),
        **_attention_flavour(attn_family, k),
    )
    unverified = tuple(key for key in k.unread() if key not in _INERT_KEYS and not _neighbour_at_neutral(key, d[key]))
    if unverified and strict:
        raise ConfigError(f"{where}: unverified config key(s) {', '.join(map(repr, unverified))}: d2m_ref does not "
                          "know whether they change the forward pass, and --strict-config refuses them "
                          "(spec/config.md, 'Key policy')")
    return replace(cfg, unverified_keys=unverified)


# Keys of a neighbouring family that a generic writer may leave behind, with the values at which
# they change nothing anywhere (types compared too: true is not 1, 1.0 is not 1).
_COUNT = _is(None, 0, 1)
_NEIGHBOUR_NEUTRAL: dict[str, Callable[[Any], bool]] = {
    "qkv_bias": _is(None, False), "attention_bias": _is(None, False), "use_sliding_window": _is(None, False),
    "norm_topk_prob": _is(None, False), "clip_qkv": _is(None), "mlp_only_layers": lambda v: v is None or v == [],
    "num_experts": _COUNT, "num_local_experts": _COUNT, "num_experts_per_tok": _COUNT, "decoder_sparse_step": _COUNT,
    "shared_expert_intermediate_size": _is(None, 0), "moe_intermediate_size": _is(None, 0),
}


def _neighbour_at_neutral(key: str, value: Any) -> bool:
    return key in _NEIGHBOUR_NEUTRAL and _NEIGHBOUR_NEUTRAL[key](value)


def _check_moe_defaults(k: _Keys) -> None:
    """Dense2MoE top-level MoE defaults are checked where they stand, not only where inherited."""
    checks = {"moe_intermediate_size": lambda key: k.int(key), "num_experts_per_tok": lambda key: k.int(key),
              "scoring_func": lambda key: k.choice(key, SCORING), "norm_topk_prob": lambda key: k.bool(key),
              "routed_scaling_factor": lambda key: k.float(key)}
    for key, check in checks.items():
        if k.has(key):
            check(key)


def load_config(path: str | Path, *, strict: bool = False) -> ModelConfig:
    """Read and validate a config.json (`strict`: see parse_config)."""
    path = Path(path)
    require_regular(path, "config", ConfigError)
    try:
        text = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config: {exc.strerror or exc}") from None
    return parse_config(parse_json(text, str(path)), where=str(path), strict=strict)


def parse_json(text: str | bytes, where: str) -> Any:
    """JSON text -> value, or ConfigError (also for undecodable bytes, absurd nesting, huge numbers)."""
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ConfigError(f"{where}: not valid JSON: {exc}") from None

