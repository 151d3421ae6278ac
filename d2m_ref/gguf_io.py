"""GGUF checkpoints (llama.cpp's format) read as d2m_ref models (spec/format.md §3).

A GGUF file holds the config as metadata, the tokenizer's vocabulary and merges, and the tensors
under llama.cpp's names, many of them in llama.cpp's block-quantised types.  This module turns it
into what the rest of d2m_ref reads: a Hugging Face config dict (so the config policy and the
family defaults of spec/config.md apply unchanged), tensors under Hugging Face names, and a
tokenizer.  Nothing is dequantised up front: each Param decodes its own rows with the `gguf`
package's dequantisers (never re-implemented here) when an op asks for them, so the streaming rule
of spec/architecture.md §6 holds as it does for safetensors.

The `gguf` package is optional (`pip install "d2m_ref[gguf]"`); without it, a GGUF path is a named
error that says so.
"""

from __future__ import annotations

import importlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .errors import ConfigError, D2MError, WeightsError

GGUF_MAGIC = b"GGUF"
# GGUF architecture name -> d2m_ref family (model_type).  Others are refused by name.
ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "qwen2moe": "qwen2_moe",
                 "qwen3moe": "qwen3_moe"}
# llama.cpp's converter permutes the q and k rows of these architectures for its RoPE kernel
# (pairs (i, i + D/2) made adjacent); the Qwen architectures use its NEOX RoPE and are stored as-is.
PERMUTED_QK = ("llama",)
FLOAT_TYPES = {"F32": "F32", "F16": "F16", "BF16": "BF16"}  # GGUF type -> d2m_ref float storage
QUANT_TYPES = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K")  # dequantised by the gguf package;
# Q5_0 / Q5_1 are where llama-quantize puts K-quant rows that 256 does not divide
# llama.cpp routes Qwen3-MoE with renormalised top-k weights and Qwen2-MoE without (its qwen3moe /
# qwen2moe graphs); GGUF metadata has no key for it.
NORM_TOPK = {"qwen2moe": False, "qwen3moe": True}


def gguf_module():
    """The `gguf` package, or a named error saying which extra installs it."""
    try:
        return importlib.import_module("gguf")
    except ImportError:
        raise D2MError("reading GGUF files needs the 'gguf' package: pip install \"d2m_ref[gguf]\" "
                       "(or pip install gguf)") from None


def is_gguf(path: str | os.PathLike) -> bool:
    """A regular file that starts with the GGUF magic (or, when unreadable, is named *.gguf)."""
    path = Path(path)
    if not path.is_file():
        return path.suffix.lower() == ".gguf"
    try:
        with open(path, "rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError:
        return path.suffix.lower() == ".gguf"


# ---------------------------------------------------------------------------------------------
# The file


class GGUFFile:
    """An open GGUF file: metadata as Python values, tensors by name (memory-mapped).

    Quacks like safetensors_io.Checkpoint where the tools need it (path, names, file_of, close)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        gguf = gguf_module()
        try:
            size = self.path.stat().st_size
        except OSError as exc:
            raise WeightsError(f"{self.path}: cannot open: {exc.strerror or exc}") from None
        if size < 24:
            raise WeightsError(f"{self.path}: truncated: {size} bytes, shorter than a GGUF header")
        try:
            reader = gguf.GGUFReader(self.path, "r")
            self.fields = {name: field.contents() for name, field in reader.fields.items()}
        except (ValueError, IndexError, KeyError, TypeError, OverflowError, MemoryError, UnicodeDecodeError,
                OSError) as exc:
            raise WeightsError(f"{self.path}: not a readable GGUF file (truncated or corrupt?): "
                               f"{type(exc).__name__}: {exc}") from None
        # A truncated file fails inside the reader (a tensor's short slice does not reshape): caught above.
        self.tensors = {t.name: t for t in reader.tensors}
        self._reader = reader

    def names(self) -> list[str]:
        return list(self.tensors)

    def file_of(self, name: str) -> Path:
        return self.path

    def field(self, key: str, default: Any = ...) -> Any:
        if key in self.fields:
            return self.fields[key]
        if default is ...:
            raise WeightsError(f"{self.path}: GGUF metadata has no '{key}'")
        return default

    def close(self) -> None:
        self.tensors, self._reader = {}, None  # the memory map goes with the last reference

    def __repr__(self) -> str:
        return f"GGUFFile({str(self.path)!r}, {len(self.tensors)} tensors)"


# ---------------------------------------------------------------------------------------------
# Config from the metadata


def gguf_architecture(f: GGUFFile) -> str:
    arch = f.field("general.architecture")
    if arch not in ARCHITECTURES:
        raise ConfigError(f"{f.path}: GGUF architecture {arch!r} is not supported; d2m_ref reads "
                          f"{', '.join(ARCHITECTURES)}")
    return arch


def _number(f: GGUFFile, key: str, default: Any = ...) -> float:
    """A float metadata value as the shortest decimal its float32 rounds from: GGUF stores 1e-5 as
    the float32 9.99999974738e-06, and the writer meant 1e-5 (spec/format.md §3.1).  Anything but a
    finite number is a named error."""
    x = f.field(key, default)
    if isinstance(x, bool) or not isinstance(x, (int, float, np.floating, np.integer)) or not np.isfinite(x):
        raise ConfigError(f"{f.path}: GGUF metadata '{key}' must be a finite number, found {x!r}")
    return float(str(np.float32(x)))


def _count(f: GGUFFile, key: str, default: Any = ...) -> int:
    """An integer metadata value, or a named error."""
    x = f.field(key, default)
    if isinstance(x, bool) or not isinstance(x, (int, np.integer)):
        raise ConfigError(f"{f.path}: GGUF metadata '{key}' must be an integer, found {x!r}")
    return int(x)


def gguf_config(f: GGUFFile) -> dict[str, Any]:
    """The Hugging Face config dict the metadata describes (what import_gguf writes as config.json)."""
    arch = gguf_architecture(f)
    a = f"{arch}."
    heads, hidden = _count(f, a + "attention.head_count"), _count(f, a + "embedding_length")
    if arch == "llama" and _count(f, a + "expert_count", 0) > 0:
        raise ConfigError(f"{f.path}: a llama GGUF with {a}expert_count={f.field(a + 'expert_count')} is "
                          "llama.cpp's Mixtral layout, which d2m_ref does not read from GGUF; convert from the "
                          "Hugging Face checkpoint instead")
    vocab = f.field(a + "vocab_size", None)
    cfg: dict[str, Any] = {
        "model_type": ARCHITECTURES[arch],
        "architectures": [_HF_CLASS[arch]],
        "vocab_size": len(f.field("tokenizer.ggml.tokens", ())) if vocab is None else _count(f, a + "vocab_size"),
        "hidden_size": hidden,
        "intermediate_size": _count(f, a + "feed_forward_length"),
        "num_hidden_layers": _count(f, a + "block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": _count(f, a + "attention.head_count_kv", heads),
        "max_position_embeddings": _count(f, a + "context_length"),
        "rms_norm_eps": _number(f, a + "attention.layer_norm_rms_epsilon"),
        "rope_theta": _number(f, a + "rope.freq_base", 10000.0),
        "tie_word_embeddings": "output.weight" not in f.tensors,
    }
    if arch == "llama":  # no metadata key: llama.cpp loads the biases when the tensors are there
        cfg["attention_bias"] = "blk.0.attn_q.bias" in f.tensors
    # llama.cpp: head size = key_length, else hidden / heads, for every architecture (so a
    # family's config default, such as Qwen3's 128, never applies to a GGUF); rope.dimension_count
    # is the number of rotated dimensions, which d2m_ref supports only when it is all of them.
    head_dim = _count(f, a + "attention.key_length", hidden // heads if heads > 0 else 0)
    value_length = _count(f, a + "attention.value_length", head_dim)
    if value_length != head_dim:
        raise ConfigError(f"{f.path}: {a}attention.key_length={head_dim} differs from "
                          f"value_length={value_length}; d2m_ref needs one head_dim")
    cfg["head_dim"] = head_dim
    rotated = _count(f, a + "rope.dimension_count", head_dim)
    if rotated != head_dim:
        raise ConfigError(f"{f.path}: {a}rope.dimension_count={rotated} rotates part of each head of "
                          f"{head_dim} (partial RoPE); d2m_ref rotates whole heads only")
    cfg.update(_rope_scaling(f, a))
    if "rope_freqs.weight" in f.tensors:
        raise ConfigError(f"{f.path}: the file stores per-frequency RoPE factors (rope_freqs.weight, as llama.cpp "
                          "writes Llama 3.1 scaling); d2m_ref reads rope scaling from a config: convert from "
                          "the Hugging Face checkpoint instead")
    if arch in NORM_TOPK:
        cfg.update(num_experts=_count(f, a + "expert_count"), num_experts_per_tok=_count(f, a + "expert_used_count"),
                   moe_intermediate_size=_count(f, a + "expert_feed_forward_length"),
                   norm_topk_prob=NORM_TOPK[arch], decoder_sparse_step=1, mlp_only_layers=[])
        if arch == "qwen2moe":
            cfg["shared_expert_intermediate_size"] = _count(f, a + "expert_shared_feed_forward_length", 0)
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = f.field(f"tokenizer.ggml.{key}", None)
        if value is not None:
            cfg[key] = value
    return cfg


def _rope_scaling(f: GGUFFile, a: str) -> dict[str, Any]:
    """llama.cpp's reading: the type defaults to linear, the factor comes from rope.scaling.factor
    or the older rope.scale_linear; a factor of 1 (or none) means no scaling."""
    factor = None
    for key in (a + "rope.scaling.factor", a + "rope.scale_linear"):
        if key in f.fields:
            factor = _number(f, key)
            break
    kind = f.field(a + "rope.scaling.type", "linear" if factor not in (None, 0.0, 1.0) else "none")
    if kind == "none" or (kind == "linear" and factor in (None, 0.0, 1.0)):
        return {}
    if kind != "linear":
        raise ConfigError(f"{f.path}: {a}rope.scaling.type={kind!r} is not supported (none or linear)")
    return {"rope_scaling": {"rope_type": "linear", "factor": factor}}


_HF_CLASS = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
             "qwen2moe": "Qwen2MoeForCausalLM", "qwen3moe": "Qwen3MoeForCausalLM"}


# ---------------------------------------------------------------------------------------------
# Tensors under Hugging Face names

_TOP = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
        "output.weight": "lm_head.weight"}
_BLOCK = {  # blk.{i}.<key> -> model.layers.{i}.<value>
    "attn_norm.weight": "input_layernorm.weight", "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight", "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight", "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias", "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias", "attn_output.bias": "self_attn.o_proj.bias",
    "attn_q_norm.weight": "self_attn.q_norm.weight", "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight", "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight", "ffn_gate_inp.weight": "mlp.gate.weight",
    "ffn_gate_shexp.weight": "mlp.shared_expert.gate_proj.weight",
    "ffn_up_shexp.weight": "mlp.shared_expert.up_proj.weight",
    "ffn_down_shexp.weight": "mlp.shared_expert.down_proj.weight",
    "ffn_gate_inp_shexp.weight": "mlp.shared_expert_gate.weight",
}
_EXPERTS = {"ffn_gate_exps.weight": "gate_proj", "ffn_up_exps.weight": "up_proj", "ffn_down_exps.weight": "down_proj"}
_BLOCK_NAME = re.compile(r"blk\.(\d+)\.(.+)")


@dataclass(frozen=True)
class HFTensor:
    """One tensor under its Hugging Face name: storage, shape, the raw storage array (rows in HF
    order), and for GGUF block types the decoder of raw rows to float32 rows."""

    gguf_name: str
    storage: str
    shape: tuple[int, ...]
    raw: Callable[[], np.ndarray]
    decode: Callable[[np.ndarray], np.ndarray] | None


def hf_tensors(f: GGUFFile, cfg: dict[str, Any]) -> dict[str, HFTensor]:
    """Every tensor of the file under its Hugging Face name.  An unknown GGUF name or type is a
    named error; experts stacked [E, ...] in GGUF come out one per expert."""
    arch = gguf_architecture(f)
    out: dict[str, HFTensor] = {}
    for name, t in f.tensors.items():
        storage, decode = _storage(f, t)
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))  # GGUF lists dimensions fastest first
        raw = _raw_reader(t, storage)
        if name in _TOP:
            out[_TOP[name]] = HFTensor(name, storage, shape, raw, decode)
            continue
        m = _BLOCK_NAME.fullmatch(name)
        key = m.group(2) if m else None
        prefix = f"model.layers.{m.group(1)}." if m else ""
        if key in _EXPERTS:
            for e in range(shape[0]):
                out[f"{prefix}mlp.experts.{e}.{_EXPERTS[key]}.weight"] = HFTensor(
                    name, storage, shape[1:], (lambda raw=raw, e=e: raw()[e]), decode)
        elif key == "ffn_gate_inp_shexp.weight" and len(shape) == 1:  # llama.cpp keeps the [1, H] gate as [H]
            out[prefix + _BLOCK[key]] = HFTensor(name, storage, (1, shape[0]),
                                                 (lambda raw=raw: raw().reshape(1, -1)), decode)
        elif key in _BLOCK:
            hf = prefix + _BLOCK[key]
            if arch in PERMUTED_QK and key in ("attn_q.weight", "attn_k.weight", "attn_q.bias", "attn_k.bias"):
                heads = cfg["num_attention_heads"] if key.startswith("attn_q") else cfg["num_key_value_heads"]
                raw = _unpermuted(raw, _rope_unpermutation(shape[0], heads, f.path, name))
            out[hf] = HFTensor(name, storage, shape, raw, decode)
        else:
            raise WeightsError(f"{f.path}: GGUF tensor '{name}' is not one d2m_ref knows for architecture {arch!r}")
    return out


def _storage(f: GGUFFile, t) -> tuple[str, Callable[[np.ndarray], np.ndarray] | None]:
    type_name = t.tensor_type.name
    if type_name in FLOAT_TYPES:
        return FLOAT_TYPES[type_name], None
    if type_name in QUANT_TYPES:
        gguf = gguf_module()
        qtype = t.tensor_type
        return f"GGUF_{type_name}", lambda rows: gguf.quants.dequantize(rows, qtype)
    raise WeightsError(f"{f.path}: tensor '{t.name}' has GGUF type {type_name}; d2m_ref reads "
                       f"{', '.join([*FLOAT_TYPES, *QUANT_TYPES])}")


def _raw_reader(t, storage: str) -> Callable[[], np.ndarray]:
    """The storage array of a tensor, [rows..., cols] (bytes per row for block types; BF16 as
    uint16 bits, as d2m_ref stores bf16), without copying."""
    data = t.data
    if storage == "BF16":
        data = data.view(np.uint16).reshape(tuple(reversed(t.shape.tolist())))
    return lambda: data


def _rope_unpermutation(rows: int, heads: int, path: Path, name: str) -> np.ndarray:
    """Row order that undoes llama.cpp's q/k permutation: it stores row (h, i, j) of
    [heads, D/2, 2] at (h, j, i) of [heads, 2, D/2] (interleaved pairs for its RoPE kernel)."""
    if heads <= 0 or rows % (2 * heads):
        raise WeightsError(f"{path}: tensor '{name}' has {rows} rows, not a multiple of 2 x {heads} heads")
    half = rows // heads // 2
    stored = np.arange(rows).reshape(heads, half, 2)  # stored row index for each position in GGUF order
    return stored.swapaxes(1, 2).reshape(rows)


def _unpermuted(raw: Callable[[], np.ndarray], order: np.ndarray) -> Callable[[], np.ndarray]:
    """The rows in Hugging Face order, gathered once on first use and kept: a gather is a copy,
    and an op reads a matrix block by block (Param.rows), which would otherwise gather it whole
    for every block.  Kept in storage format: q and k only, not a full-precision copy."""
    kept: list[np.ndarray] = []

    def rows() -> np.ndarray:
        if not kept:
            gathered = raw()[order]
            gathered.setflags(write=False)
            kept.append(gathered)
        return kept[0]

    return rows


# ---------------------------------------------------------------------------------------------
# The tokenizer


def gguf_tokenizer(f: GGUFFile):
    """The file's own tokenizer (vocabulary, merges, special tokens) as a d2m_ref Tokenizer."""
    from .gguf_tokenizer import tokenizer_from_gguf
    from .tokenizer import Tokenizer
    return Tokenizer(f.path, tokenizer_from_gguf(f.fields, str(f.path)))
