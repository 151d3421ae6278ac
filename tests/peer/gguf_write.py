"""A GGUF writer for test models, written the way llama.cpp's convert_hf_to_gguf.py writes one.

An independent peer of d2m_ref's GGUF reader: it imports nothing from d2m_ref, and what it writes
follows llama.cpp (convert_hf_to_gguf.py, its `conversion/` modules, `src/models/*.cpp`), gguf-py
0.19 and transformers' GGUF loader, read for their conventions (not copied).  It takes a small
transformers model of one of five families and writes a file with `gguf.GGUFWriter`:

  transformers model_type   GGUF general.architecture
  llama                     llama
  qwen2                     qwen2
  qwen3                     qwen3
  qwen2_moe                 qwen2moe
  qwen3_moe                 qwen3moe

Metadata ({a} = the architecture), as convert's TextModel.set_gguf_parameters and the family
classes write it:
  {a}.block_count, {a}.context_length (max_position_embeddings), {a}.embedding_length,
  {a}.feed_forward_length (intermediate_size), {a}.attention.head_count, {a}.attention.head_count_kv,
  {a}.rope.freq_base, {a}.attention.layer_norm_rms_epsilon (float32, both),
  {a}.attention.key_length and {a}.attention.value_length  -- only when the config states head_dim
      (convert writes them iff `head_dim` is in config.to_dict(): LlamaConfig and Qwen3Config always
      fill it in, Qwen2/Qwen2Moe/Qwen3Moe configs leave it None unless set; absent means
      hidden_size / num_attention_heads),
  {a}.expert_count, {a}.expert_used_count                                      -- MoE
  {a}.expert_feed_forward_length (moe_intermediate_size)                      -- qwen2moe, qwen3moe
  {a}.expert_shared_feed_forward_length (shared_expert_intermediate_size)     -- qwen2moe
  {a}.vocab_size, {a}.rope.dimension_count (head_dim)                         -- llama only
  {a}.rope.scaling.type = "linear", {a}.rope.scaling.factor                   -- linear RoPE
  {a}.rope.scaling.type = "yarn", .factor, .original_context_length, and .yarn_ext_factor,
      .yarn_attn_factor, .yarn_beta_fast, .yarn_beta_slow where the config has them   -- YaRN
  llama3 RoPE writes no key: a `rope_freqs.weight` tensor [D/2] (F32) of per-frequency divisors
      (llama arch only; convert's LlamaModel.generate_extra_tensors).
  general.architecture, general.type = "model", general.name, general.file_type,
  general.quantization_version = 2.
  Not written, because convert does not: norm_topk_prob (llama.cpp's qwen2moe graph never
  renormalises the top-k weights, its qwen3moe graph always does), mlp_only_layers and
  decoder_sparse_step (llama.cpp's MoE graphs make every layer sparse).  A model these keys would
  change is refused (ValueError naming the key) rather than written as a file that means another
  model.

Tensors (numpy shapes [out, in] as in PyTorch; GGUF stores the dims reversed, ne = {in, out}):
  token_embd.weight [V, H], output_norm.weight [H], output.weight [V, H] (absent when tied),
  blk.N.attn_norm / ffn_norm .weight [H], blk.N.attn_q / attn_k / attn_v / attn_output .weight,
  blk.N.attn_q / attn_k / attn_v .bias (qwen2, qwen2moe; llama with attention_bias, which also has
  attn_output.bias), blk.N.attn_q_norm / attn_k_norm .weight [D] (qwen3, qwen3moe),
  dense FFN: blk.N.ffn_gate / ffn_up .weight [F, H], blk.N.ffn_down.weight [H, F],
  MoE: blk.N.ffn_gate_inp.weight [E, H] (the router, always F32),
       blk.N.ffn_gate_exps / ffn_up_exps .weight [E, F, H], blk.N.ffn_down_exps.weight [E, H, F],
       (transformers 5 keeps experts fused as gate_up_proj [E, 2F, H], gate rows first: split),
  qwen2moe shared expert: blk.N.ffn_gate_shexp / ffn_up_shexp [Fs, H], ffn_down_shexp [H, Fs],
       blk.N.ffn_gate_inp_shexp.weight [H] (F32; HF's [1, H] written 1-D, as llama.cpp declares
       it and as released Qwen1.5-MoE files have it -- today's convert leaves it [1, H], ne {H, 1}:
       a reader should take either).

The llama architecture's q/k row permutation (convert's LlamaModel.permute; qwen2/qwen3 files are
not permuted, llama.cpp runs them with NEOX-style RoPE): within each head of D rows, the rotate-half
layout [x_0 .. x_{D/2-1}, y_0 .. y_{D/2-1}] becomes the interleaved one [x_0, y_0, x_1, y_1, ...]:
    gguf_row[h*D + 2*i + j] = hf_row[h*D + j*D/2 + i],   i < D/2, j in {0, 1},
applied to q_proj (weight and bias) with Nh heads and k_proj with Nkv heads.  `unpermute` is the
inverse.

Tensor storage, `tensor_type`, as convert (--outtype) and llama-quantize do it: 1-D tensors, every
`*_norm.weight`, biases, the routers (ffn_gate_inp, ffn_gate_inp_shexp) and rope_freqs stay F32;
every other 2-D or 3-D weight (embedding and output head included) gets `tensor_type`:
  F32, F16, BF16, Q8_0, Q4_0, Q4_1   -- gguf.quants.quantize (gguf-py 0.19), llama.cpp's reference
                                       rounding;
  Q4_K, Q5_K, Q6_K                   -- gguf-py 0.19 can only dequantise these, so `quantize_k` here
                                       writes ggml's exact block layout with a plain quantiser (not
                                       ggml's search for the best scales; the bytes differ from
                                       llama-quantize's, the format does not):
      Q4_K / Q5_K: per 32-value sub-block, scale (max - min') / (15 | 31) and offset -min'
        (min' = min(min, 0), as ggml's make_qkx2_quants clamps it); the eight scales and eight
        offsets are stored as 6-bit multiples of an f16 `d` and `dmin` (max / 63); then
        q = clip(round((x + offset') / scale'), 0, 15 | 31) with the stored scale' and offset'.
      Q6_K: per 16-value group, scale max|x| / 31 as an int8 multiple (<= 127) of an f16 `d`;
        q = clip(round(x / scale'), -32, 31).
A row length the type's block does not divide falls back as llama-quantize does (Q4_K -> Q5_0,
Q5_K -> Q5_1, Q6_K -> Q8_0, then F16 if 32 does not divide it either) or, for Q8_0, to F16 as
convert does; Q4_0 / Q4_1 refuse (llama-quantize throws) with a ValueError naming the tensor.
`tensor_types(path)` lists what each tensor became.

Tokenizer metadata: by default `minimal_vocab`, a valid byte-level BPE ("gpt2") vocabulary of
exactly vocab_size tokens: control tokens for bos/eos (and pad), then byte-alphabet characters,
then two- and three-character merges of them, with the merges list; tokenizer.ggml.pre is
"llama-bpe" (llama) or "qwen2" (the Qwen families).  Below vocab_size 256 + specials the alphabet
is incomplete, so only text within it can be encoded.  `tokenizer=` takes a `Vocab` or a
transformers fast BPE tokenizer instead (see `vocab_from_tokenizer`).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from gguf import GGMLQuantizationType as QType

# transformers model_type -> GGUF architecture name (gguf.MODEL_ARCH_NAMES spelling)
ARCH = {
    "llama": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "qwen2_moe": "qwen2moe",
    "qwen3_moe": "qwen3moe",
}
MOE_ARCHS = ("qwen2moe", "qwen3moe")

# HF name inside `model.layers.{i}.` -> GGUF name inside `blk.{i}.`, in the order they are written
# (the stacked experts follow ffn_gate_inp)
_LAYER_NAMES = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "mlp.gate": "ffn_gate_inp",
    "mlp.shared_expert_gate": "ffn_gate_inp_shexp",
    "mlp.shared_expert.gate_proj": "ffn_gate_shexp",
    "mlp.shared_expert.up_proj": "ffn_up_shexp",
    "mlp.shared_expert.down_proj": "ffn_down_shexp",
}

# tensors convert and llama-quantize keep in F32 whatever the file type
_ALWAYS_F32 = re.compile(r"(_norm\.weight|\.bias|ffn_gate_inp\.weight|ffn_gate_inp_shexp\.weight|rope_freqs\.weight)$")

TENSOR_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q6_K")
# general.file_type for a file whose matrices are all of one type (gguf.LlamaFileType)
_FILE_TYPE = {
    "F32": gguf.LlamaFileType.ALL_F32, "F16": gguf.LlamaFileType.MOSTLY_F16,
    "BF16": gguf.LlamaFileType.MOSTLY_BF16, "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    "Q4_0": gguf.LlamaFileType.MOSTLY_Q4_0, "Q4_1": gguf.LlamaFileType.MOSTLY_Q4_1,
    "Q4_K": gguf.LlamaFileType.MOSTLY_Q4_K_S, "Q5_K": gguf.LlamaFileType.MOSTLY_Q5_K_S,
    "Q6_K": gguf.LlamaFileType.MOSTLY_Q6_K,
}
# llama-quantize's fallback when a row length is not a multiple of the type's block
_FALLBACK = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0", "Q8_0": "F16"}

QK_K = 256


# ---------------------------------------------------------------------------------------------
# Entry point


def write_gguf(model, path, *, tensor_type: str = "F32", tokenizer: Vocab | Any | None = None) -> Path:
    """Write `model` (a transformers CausalLM of a family in ARCH) to `path` as llama.cpp would.

    tensor_type: storage of the 2-D / 3-D weight matrices (TENSOR_TYPES); see the module docstring.
    tokenizer:   None (a `minimal_vocab` of the model's vocab_size), a `Vocab`, or a transformers
                 fast BPE tokenizer.  Returns the path written.
    """
    if tensor_type not in TENSOR_TYPES:
        raise ValueError(f"tensor_type={tensor_type!r}: expected one of {', '.join(TENSOR_TYPES)}")
    config = model.config
    arch = gguf_arch(config)
    vocab = _vocab_for(config, arch, tokenizer)
    encoded = [(name, *encode(name, array, tensor_type)) for name, array in gguf_tensors(model)]
    path = Path(path)
    writer = gguf.GGUFWriter(path, arch)
    for key, value, vtype in metadata(config, tensor_type) + vocab.metadata():
        sub_type = _array_type(value) if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, value, vtype, sub_type=sub_type)
    for name, data, qtype in encoded:
        writer.add_tensor(name, data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def gguf_arch(config) -> str:
    """The GGUF architecture for a transformers config; refuses what llama.cpp's graph would change."""
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCH:
        raise ValueError(f"model_type={model_type!r}: the GGUF writer knows {', '.join(ARCH)}")
    arch = ARCH[model_type]
    if arch in MOE_ARCHS:
        _check_moe(config, arch)
    if arch in ("qwen2", "qwen2moe") and _head_dim(config) * config.num_attention_heads != config.hidden_size:
        raise ValueError(
            f"{model_type}: head_dim={_head_dim(config)} x num_attention_heads={config.num_attention_heads} "
            f"!= hidden_size={config.hidden_size}; llama.cpp's {arch} sizes attn_q as [hidden, hidden]")
    return arch


def _check_moe(config, arch: str) -> None:
    model_type = config.model_type
    if getattr(config, "mlp_only_layers", None):
        raise ValueError(f"{model_type}: mlp_only_layers={config.mlp_only_layers}; llama.cpp's {arch} "
                         "has no dense layers, so the file would describe another model")
    if getattr(config, "decoder_sparse_step", 1) != 1:
        raise ValueError(f"{model_type}: decoder_sparse_step={config.decoder_sparse_step}; llama.cpp's "
                         f"{arch} makes every layer sparse")
    renormalises = arch == "qwen3moe"  # llama.cpp hard-codes it per graph: qwen2moe false, qwen3moe true
    if bool(getattr(config, "norm_topk_prob", False)) != renormalises:
        raise ValueError(f"{model_type}: norm_topk_prob={config.norm_topk_prob}; llama.cpp's {arch} graph "
                         f"always uses {renormalises}, and no GGUF key says otherwise")


# ---------------------------------------------------------------------------------------------
# Metadata


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _rope_parameters(config) -> dict:
    """rope_parameters (transformers 5) or the legacy rope_theta / rope_scaling spelling."""
    params = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    params.setdefault("rope_theta", getattr(config, "rope_theta", None) or 10000.0)
    params.setdefault("rope_type", params.get("type", "default"))
    return params


def _num_experts(config) -> int | None:
    return getattr(config, "num_experts", None) or getattr(config, "num_local_experts", None)


def metadata(config, tensor_type: str = "F32") -> list[tuple[str, Any, gguf.GGUFValueType]]:
    """(key, value, GGUF value type) for every general.* and {arch}.* key convert would write."""
    arch = gguf_arch(config)
    U32, F32, STR = gguf.GGUFValueType.UINT32, gguf.GGUFValueType.FLOAT32, gguf.GGUFValueType.STRING
    kv: list[tuple[str, Any, gguf.GGUFValueType]] = [
        ("general.type", "model", STR),
        ("general.name", f"d2m-test-{config.model_type}", STR),
        (f"{arch}.block_count", config.num_hidden_layers, U32),
        (f"{arch}.context_length", config.max_position_embeddings, U32),
        (f"{arch}.embedding_length", config.hidden_size, U32),
        (f"{arch}.feed_forward_length", config.intermediate_size, U32),
        (f"{arch}.attention.head_count", config.num_attention_heads, U32),
        (f"{arch}.attention.head_count_kv", config.num_key_value_heads, U32),
    ]
    rope = _rope_parameters(config)
    kv += _rope_scaling_metadata(arch, rope)
    kv += [(f"{arch}.rope.freq_base", float(rope["rope_theta"]), F32),
           (f"{arch}.attention.layer_norm_rms_epsilon", float(config.rms_norm_eps), F32)]
    if arch in MOE_ARCHS:
        kv += [(f"{arch}.expert_count", _num_experts(config), U32),
               (f"{arch}.expert_used_count", config.num_experts_per_tok, U32)]
    if getattr(config, "head_dim", None) is not None:
        kv += [(f"{arch}.attention.key_length", config.head_dim, U32),
               (f"{arch}.attention.value_length", config.head_dim, U32)]
    kv.append(("general.file_type", int(_FILE_TYPE[tensor_type]), U32))
    if arch == "llama":
        kv += [(f"{arch}.vocab_size", config.vocab_size, U32),
               (f"{arch}.rope.dimension_count", _head_dim(config), U32)]
    if arch in MOE_ARCHS:
        kv.append((f"{arch}.expert_feed_forward_length", config.moe_intermediate_size, U32))
        shared = getattr(config, "shared_expert_intermediate_size", None)
        if shared is not None:
            kv.append((f"{arch}.expert_shared_feed_forward_length", shared, U32))
    kv.append(("general.quantization_version", gguf.GGML_QUANT_VERSION, U32))
    return kv


def _rope_scaling_metadata(arch: str, rope: dict) -> list[tuple[str, Any, gguf.GGUFValueType]]:
    """{arch}.rope.scaling.* as convert's TextModel writes them; llama3 goes in a tensor instead."""
    F32, STR, U32 = gguf.GGUFValueType.FLOAT32, gguf.GGUFValueType.STRING, gguf.GGUFValueType.UINT32
    rope_type = rope["rope_type"]
    if rope_type == "default":
        return []
    if rope_type == "linear":
        return [(f"{arch}.rope.scaling.type", "linear", STR),
                (f"{arch}.rope.scaling.factor", float(rope["factor"]), F32)]
    if rope_type == "yarn":
        kv = [(f"{arch}.rope.scaling.type", "yarn", STR), (f"{arch}.rope.scaling.factor", float(rope["factor"]), F32),
              (f"{arch}.rope.scaling.original_context_length", rope["original_max_position_embeddings"], U32)]
        optional = {"extrapolation_factor": "yarn_ext_factor", "attention_factor": "yarn_attn_factor",
                    "beta_fast": "yarn_beta_fast", "beta_slow": "yarn_beta_slow"}
        return kv + [(f"{arch}.rope.scaling.{key}", float(rope[hf_key]), F32)
                     for hf_key, key in optional.items() if rope.get(hf_key) is not None]
    if rope_type == "llama3" and arch == "llama":
        return []  # rope_freqs.weight carries it
    raise ValueError(f"rope_type={rope_type!r} on {arch}: convert_hf_to_gguf writes no GGUF form of it "
                     "(llama3 is llama-only; linear, yarn and default are written)")


def llama3_rope_factors(config) -> np.ndarray:
    """[D/2] float32 divisors of the base frequencies (llama.cpp's rope_freqs, the llama3 rule)."""
    rope = _rope_parameters(config)
    dim = _head_dim(config)
    inv_freq = 1.0 / (rope["rope_theta"] ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    factor = rope.get("factor", 8.0)
    low, high = rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    # from rope_parameters, where transformers 5 keeps it (some convert versions read the top level
    # of config.json, falling back to 8192: wrong for transformers-5 configs)
    old_context = rope.get("original_max_position_embeddings", 8192)
    wavelen = 2 * math.pi / inv_freq
    smooth = (old_context / wavelen - low) / (high - low)
    factors = np.where(wavelen < old_context / high, 1.0,
                       np.where(wavelen > old_context / low, factor, 1.0 / ((1 - smooth) / factor + smooth)))
    return factors.astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Tensors


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """[Nh*D, ...] rotate-half rows -> llama.cpp's interleaved rows (convert's LlamaModel.permute)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """The inverse of `permute`: GGUF llama q/k rows back to transformers' order."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_tensors(model) -> list[tuple[str, np.ndarray]]:
    """(GGUF name, float32 array in PyTorch order) for every tensor convert would write, in order."""
    config = model.config
    arch = gguf_arch(config)
    state = {name: t.detach().to("cpu").float().numpy() for name, t in model.state_dict().items()}
    if config.tie_word_embeddings:
        head = state.pop("lm_head.weight", None)
        if head is not None and not np.array_equal(head, state["model.embed_tokens.weight"]):
            raise ValueError("tie_word_embeddings=True but lm_head.weight differs from model.embed_tokens.weight")
    tensors: list[tuple[str, np.ndarray]] = []
    if arch == "llama" and _rope_parameters(config)["rope_type"] == "llama3":
        tensors.append(("rope_freqs.weight", llama3_rope_factors(config)))  # convert yields it first
    tensors.append(("token_embd.weight", state.pop("model.embed_tokens.weight")))
    for i in range(config.num_hidden_layers):
        tensors += _layer_tensors(state, i, config, arch)
    tensors.append(("output_norm.weight", state.pop("model.norm.weight")))
    if "lm_head.weight" in state:
        tensors.append(("output.weight", state.pop("lm_head.weight")))
    if state:
        raise ValueError(f"{config.model_type}: no GGUF name for {sorted(state)[:5]}")
    return tensors


def _layer_tensors(state: dict, i: int, config, arch: str) -> list[tuple[str, np.ndarray]]:
    """Layer i's tensors, popped from `state`: renamed, llama q/k permuted, experts stacked."""
    prefix, out = f"model.layers.{i}.", []
    for hf_name, gguf_name in _LAYER_NAMES.items():
        for suffix in (".weight", ".bias"):
            array = state.pop(prefix + hf_name + suffix, None)
            if array is None:
                continue
            if arch == "llama" and gguf_name == "attn_q":
                array = permute(array, config.num_attention_heads)
            if arch == "llama" and gguf_name == "attn_k":
                array = permute(array, config.num_key_value_heads)
            if gguf_name == "ffn_gate_inp_shexp":
                array = array.reshape(-1)  # [1, H] -> [H]: llama.cpp declares it {n_embd}
            out.append((f"blk.{i}.{gguf_name}{suffix}", array))
        if gguf_name == "ffn_gate_inp":
            out += _experts(state, prefix, i, config)
    return out


def _experts(state: dict, prefix: str, i: int, config) -> list[tuple[str, np.ndarray]]:
    """Stacked expert tensors: from transformers 5's fused gate_up_proj / down_proj, or per expert."""
    fused = state.pop(prefix + "mlp.experts.gate_up_proj", None)
    if fused is not None:
        width = fused.shape[1] // 2  # gate rows first, then up (spec/format.md §1.2)
        gate, up = fused[:, :width, :], fused[:, width:, :]
        down = state.pop(prefix + "mlp.experts.down_proj")
    else:
        n = _num_experts(config) or 0
        names = [prefix + f"mlp.experts.{e}." for e in range(n)]
        if not names or names[0] + "gate_proj.weight" not in state:
            return []
        gate, up, down = (np.stack([state.pop(p + f"{w}_proj.weight") for p in names])
                          for w in ("gate", "up", "down"))
    return [(f"blk.{i}.ffn_gate_exps.weight", gate), (f"blk.{i}.ffn_up_exps.weight", up),
            (f"blk.{i}.ffn_down_exps.weight", down)]


# ---------------------------------------------------------------------------------------------
# Storage types and quantisation


def storage_type(name: str, array: np.ndarray, tensor_type: str) -> str:
    """The ggml type convert / llama-quantize would give this tensor in a `tensor_type` file."""
    if array.ndim <= 1 or _ALWAYS_F32.search(name):
        return "F32"
    qtype = tensor_type
    while qtype in _FALLBACK and array.shape[-1] % gguf.GGML_QUANT_SIZES[QType[qtype]][0] != 0:
        qtype = _FALLBACK[qtype]
    if qtype in ("Q5_0", "Q5_1") and array.shape[-1] % 32 != 0:
        qtype = "F16"
    block = gguf.GGML_QUANT_SIZES[QType[qtype]][0]
    if array.shape[-1] % block != 0:
        raise ValueError(f"{name}: rows of {array.shape[-1]} values are not a multiple of {qtype}'s block "
                         f"of {block} (llama-quantize refuses this too)")
    return qtype


def encode(name: str, array: np.ndarray, tensor_type: str) -> tuple[np.ndarray, QType]:
    """(data for GGUFWriter.add_tensor, ggml type): float arrays for F32/F16, uint8 blocks otherwise."""
    qtype = storage_type(name, array, tensor_type)
    array = np.ascontiguousarray(array, dtype=np.float32)
    if qtype in ("Q4_K", "Q5_K", "Q6_K"):
        return quantize_k(array, qtype), QType[qtype]
    return gguf.quants.quantize(array, QType[qtype]), QType[qtype]


def quantize_k(x: np.ndarray, qtype: str) -> np.ndarray:
    """[..., n*256] float32 -> [..., n*bytes] uint8 blocks of Q4_K, Q5_K or Q6_K (ggml's layout)."""
    blocks = x.reshape(-1, QK_K).astype(np.float32)
    packed = {"Q4_K": _q4_k, "Q5_K": _q5_k, "Q6_K": _q6_k}[qtype](blocks)
    return packed.reshape(*x.shape[:-1], x.shape[-1] // QK_K * packed.shape[-1])


def _f16(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16)


def _div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a / b, 0 where b == 0 (an all-zero sub-block)."""
    return np.divide(a, b, out=np.zeros(np.broadcast_shapes(a.shape, b.shape), np.float32), where=b != 0)


def _affine_k(blocks: np.ndarray, nmax: int):
    """Q4_K / Q5_K: (d, dmin f16 [n], 6-bit sc, m [n, 8], q [n, 8, 32]) for x ~ d*sc*q - dmin*m."""
    sub = blocks.reshape(-1, 8, 32)
    low = np.minimum(sub.min(axis=-1), 0.0)
    scale, offset = (sub.max(axis=-1) - low) / nmax, -low
    d, dmin = _f16(scale.max(axis=-1) / 63), _f16(offset.max(axis=-1) / 63)
    sc = np.clip(np.rint(_div(scale, d.astype(np.float32)[:, None])), 0, 63).astype(np.uint8)
    m = np.clip(np.rint(_div(offset, dmin.astype(np.float32)[:, None])), 0, 63).astype(np.uint8)
    step = d.astype(np.float32)[:, None] * sc
    shift = dmin.astype(np.float32)[:, None] * m
    q = np.clip(np.rint(_div(sub + shift[..., None], step[..., None])), 0, nmax).astype(np.uint8)
    return d, dmin, sc, m, q


def _pack_scales_k(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Eight 6-bit scales and mins -> 12 bytes (inverse of ggml's get_scale_min_k4)."""
    first = (sc[:, :4] & 63) | ((sc[:, 4:] >> 4) << 6)
    second = (m[:, :4] & 63) | ((m[:, 4:] >> 4) << 6)
    third = (sc[:, 4:] & 0xF) | ((m[:, 4:] & 0xF) << 4)
    return np.concatenate([first, second, third], axis=1).astype(np.uint8)


def _nibbles_k(q: np.ndarray) -> np.ndarray:
    """[n, 8, 32] 4-bit values -> [n, 128]: byte 32c+l holds sub-block 2c (low) and 2c+1 (high)."""
    return (q[:, 0::2, :] | (q[:, 1::2, :] << 4)).reshape(-1, 128).astype(np.uint8)


def _q4_k(blocks: np.ndarray) -> np.ndarray:
    d, dmin, sc, m, q = _affine_k(blocks, 15)
    return np.concatenate([d.view(np.uint8).reshape(-1, 2), dmin.view(np.uint8).reshape(-1, 2),
                           _pack_scales_k(sc, m), _nibbles_k(q)], axis=1)


def _q5_k(blocks: np.ndarray) -> np.ndarray:
    d, dmin, sc, m, q = _affine_k(blocks, 31)
    # fifth bits: bit s of byte l is sub-block s's value l
    high = ((q >> 4) & 1).astype(np.uint8) << np.arange(8, dtype=np.uint8)[None, :, None]
    qh = np.bitwise_or.reduce(high, axis=1).astype(np.uint8)
    return np.concatenate([d.view(np.uint8).reshape(-1, 2), dmin.view(np.uint8).reshape(-1, 2),
                           _pack_scales_k(sc, m), qh, _nibbles_k(q & 0xF)], axis=1)


def _q6_k(blocks: np.ndarray) -> np.ndarray:
    group = blocks.reshape(-1, 16, 16)
    scale = np.abs(group).max(axis=-1) / 31
    d = _f16(scale.max(axis=-1) / 127)
    sc = np.clip(np.rint(_div(scale, d.astype(np.float32)[:, None])), 0, 127).astype(np.int8)
    step = d.astype(np.float32)[:, None] * sc
    q = np.clip(np.rint(_div(group, step[..., None])), -32, 31).astype(np.int16).reshape(-1, 2, 4, 32) + 32
    # q[n, half, quarter, l] is value 128*half + 32*quarter + l
    low, high = (q & 0xF).astype(np.uint8), (q >> 4).astype(np.uint8)
    ql = (low[:, :, 0:2, :] | (low[:, :, 2:4, :] << 4)).reshape(-1, 128)
    qh = (high[:, :, 0] | (high[:, :, 1] << 2) | (high[:, :, 2] << 4) | (high[:, :, 3] << 6)).reshape(-1, 64)
    return np.concatenate([ql, qh, sc.view(np.uint8), d.view(np.uint8).reshape(-1, 2)], axis=1).astype(np.uint8)


def dequantize_k(data: np.ndarray, qtype: str) -> np.ndarray:
    """What `quantize_k` meant: uint8 blocks -> float32, written from the layout above (a third
    reading besides gguf-py's and transformers' dequantisers, which the tests compare it with)."""
    size = gguf.GGML_QUANT_SIZES[QType[qtype]][1]
    blocks = data.reshape(-1, size)
    if qtype == "Q6_K":
        low, qh = _q6_low(blocks), blocks[:, 128:192].reshape(-1, 2, 32)
        high = np.stack([(qh >> s) & 3 for s in (0, 2, 4, 6)], axis=2)
        q = (low | (high << 4)).astype(np.int16).reshape(-1, 16, 16) - 32
        sc = blocks[:, 192:208].view(np.int8).astype(np.float32)
        d = blocks[:, 208:210].copy().view(np.float16).astype(np.float32)
        return ((d * sc)[..., None] * q).reshape(-1).astype(np.float32)
    d = blocks[:, 0:2].copy().view(np.float16).astype(np.float32)
    dmin = blocks[:, 2:4].copy().view(np.float16).astype(np.float32)
    s = blocks[:, 4:16]
    sc = np.concatenate([s[:, :4] & 63, (s[:, 8:] & 0xF) | ((s[:, :4] >> 6) << 4)], axis=1).astype(np.float32)
    m = np.concatenate([s[:, 4:8] & 63, (s[:, 8:] >> 4) | ((s[:, 4:8] >> 6) << 4)], axis=1).astype(np.float32)
    nib = blocks[:, -128:].reshape(-1, 4, 32)
    q = np.stack([nib & 0xF, nib >> 4], axis=2).reshape(-1, 8, 32)
    if qtype == "Q5_K":
        qh = blocks[:, 16:48]
        q = q | (np.stack([(qh >> b) & 1 for b in range(8)], axis=1) << 4)
    return ((d * sc)[..., None] * q - (dmin * m)[..., None]).reshape(-1).astype(np.float32)


def _q6_low(blocks: np.ndarray) -> np.ndarray:
    """Q6_K low nibbles as [n, 2, 4, 32]: [n, half, quarter, l] is value 128*half + 32*quarter + l."""
    ql = blocks[:, :128].reshape(-1, 2, 64)
    first, second = ql[:, :, :32], ql[:, :, 32:]
    return np.stack([first & 0xF, second & 0xF, first >> 4, second >> 4], axis=2)


def tensor_types(path) -> dict[str, str]:
    """{tensor name: ggml type name} of a GGUF file (what each tensor was stored as)."""
    reader = gguf.GGUFReader(str(path))
    return {t.name: t.tensor_type.name for t in reader.tensors}


# ---------------------------------------------------------------------------------------------
# Tokenizer metadata


@dataclass(frozen=True)
class Vocab:
    """A byte-level BPE vocabulary as GGUF stores it (tokenizer.ggml.*)."""

    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    bos_token_id: int
    eos_token_id: int
    pre: str
    padding_token_id: int | None = None
    add_bos_token: bool = False
    model: str = "gpt2"

    def metadata(self) -> list[tuple[str, Any, gguf.GGUFValueType]]:
        STR, ARR, U32, BOOL = (gguf.GGUFValueType.STRING, gguf.GGUFValueType.ARRAY,
                               gguf.GGUFValueType.UINT32, gguf.GGUFValueType.BOOL)
        kv = [("tokenizer.ggml.model", self.model, STR), ("tokenizer.ggml.pre", self.pre, STR),
              ("tokenizer.ggml.tokens", list(self.tokens), ARR),
              ("tokenizer.ggml.token_type", [int(t) for t in self.token_types], ARR),
              ("tokenizer.ggml.merges", list(self.merges), ARR),
              ("tokenizer.ggml.bos_token_id", self.bos_token_id, U32),
              ("tokenizer.ggml.eos_token_id", self.eos_token_id, U32)]
        if self.padding_token_id is not None:
            kv.append(("tokenizer.ggml.padding_token_id", self.padding_token_id, U32))
        kv.append(("tokenizer.ggml.add_bos_token", self.add_bos_token, BOOL))
        return kv


def byte_alphabet() -> list[str]:
    """GPT-2's 256 byte characters (bytes_to_unicode), ordered so that a small vocabulary still
    spells plain text: space ("Ġ"), letters, digits, other printable ASCII, newline ("Ċ"), the rest."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    char = {b: chr(b) for b in printable} | {b: chr(256 + n) for n, b in enumerate(others)}
    text = b" abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
    first = [*text, *(b for b in range(33, 127) if b not in text), ord("\n")]
    return [char[b] for b in first] + [char[b] for b in range(256) if b not in first]


def minimal_vocab(vocab_size: int, *, bos_token_id: int | None = None, eos_token_id: int | None = None,
                  pad_token_id: int | None = None, pre: str = "llama-bpe", add_bos_token: bool = False) -> Vocab:
    """A valid byte-level BPE vocabulary of exactly `vocab_size` tokens.

    Control tokens at the bos / eos (/ pad) ids ("<|begin_of_text|>", "<|endoftext|>" -- one shared
    "<|endoftext|>" when bos == eos -- and "<|pad|>"; default bos = eos = vocab_size - 1); the other
    ids in order: `byte_alphabet` characters (as many as fit), then merges of (earlier token,
    character), each listed in `merges` in the order it was made.  At least one eighth of the
    ordinary tokens are merges, so the merges list is never empty.
    """
    eos = vocab_size - 1 if eos_token_id is None else eos_token_id
    bos = eos if bos_token_id is None else bos_token_id
    # "<|endoftext|>" for eos: transformers' GPT2Tokenizer adds that token when it is missing
    specials = {bos: "<|begin_of_text|>", eos: "<|endoftext|>"}
    if pad_token_id is not None:
        specials.setdefault(pad_token_id, "<|pad|>")
    if any(not 0 <= i < vocab_size for i in specials) or vocab_size - len(specials) < 2:
        raise ValueError(f"vocab_size={vocab_size} cannot hold special ids {sorted(specials)} and a vocabulary")
    ordinary = _ordinary_tokens(vocab_size - len(specials))
    pieces = iter(token for token, _ in ordinary)
    tokens = [specials[i] if i in specials else next(pieces) for i in range(vocab_size)]
    types = [int(gguf.TokenType.CONTROL if i in specials else gguf.TokenType.NORMAL) for i in range(vocab_size)]
    merges = [merge for _, merge in ordinary if merge is not None]
    return Vocab(tokens, types, merges, bos, eos, pre, pad_token_id, add_bos_token)


def _ordinary_tokens(count: int) -> list[tuple[str, str | None]]:
    """`count` (token, merge or None): characters first, then (token + character) merges."""
    alphabet = byte_alphabet()
    n_chars = min(len(alphabet), count - max(1, count // 8))
    out: list[tuple[str, str | None]] = [(c, None) for c in alphabet[:n_chars]]
    seen = {t for t, _ in out}
    left = 0
    while len(out) < count:
        for c in alphabet[:n_chars]:
            token = out[left][0] + c
            if token not in seen and len(out) < count:
                seen.add(token)
                out.append((token, f"{out[left][0]} {c}"))
        left += 1
    return out


def vocab_from_tokenizer(tokenizer, vocab_size: int, *, pre: str) -> Vocab:
    """A transformers fast byte-level BPE tokenizer -> Vocab, as convert's get_vocab_base does it:
    ids without a token become "[PAD{i}]" (UNUSED), added special tokens CONTROL, other added tokens
    USER_DEFINED, the rest NORMAL; merges from the tokenizer's BPE model."""
    state = json.loads(tokenizer.backend_tokenizer.to_str())
    if state["model"]["type"] != "BPE":
        raise ValueError(f"tokenizer model {state['model']['type']!r}: only byte-level BPE is written")
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    if max(by_id) >= vocab_size:
        raise ValueError(f"tokenizer has id {max(by_id)} >= vocab_size={vocab_size}")
    added = {a["id"]: a for a in state.get("added_tokens", [])}
    tokens, types = [], []
    for i in range(vocab_size):
        kind = gguf.TokenType.NORMAL
        if i not in by_id:
            kind = gguf.TokenType.UNUSED
        elif i in added:
            kind = gguf.TokenType.CONTROL if added[i].get("special") else gguf.TokenType.USER_DEFINED
        tokens.append(by_id.get(i, f"[PAD{i}]"))
        types.append(int(kind))
    merges = [m if isinstance(m, str) else " ".join(m) for m in state["model"].get("merges", [])]
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else vocab_size - 1
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else eos
    return Vocab(tokens, types, merges, bos, eos, pre, tokenizer.pad_token_id)


def _vocab_for(config, arch: str, tokenizer) -> Vocab:
    pre = "llama-bpe" if arch == "llama" else "qwen2"
    if isinstance(tokenizer, Vocab):
        vocab = tokenizer
    elif tokenizer is not None:
        vocab = vocab_from_tokenizer(tokenizer, config.vocab_size, pre=pre)
    else:
        def in_range(i):
            return i if isinstance(i, int) and 0 <= i < config.vocab_size else None
        vocab = minimal_vocab(config.vocab_size, bos_token_id=in_range(getattr(config, "bos_token_id", None)),
                              eos_token_id=in_range(getattr(config, "eos_token_id", None)),
                              pad_token_id=in_range(getattr(config, "pad_token_id", None)),
                              pre=pre, add_bos_token=arch == "llama")
    if len(vocab.tokens) != config.vocab_size:
        raise ValueError(f"tokenizer has {len(vocab.tokens)} tokens, the model vocab_size={config.vocab_size}")
    return vocab


def _array_type(values: list) -> gguf.GGUFValueType:
    """GGUF element type of a metadata array (strings, int32 like convert's token types)."""
    if values and isinstance(values[0], str):
        return gguf.GGUFValueType.STRING
    return gguf.GGUFValueType.INT32
