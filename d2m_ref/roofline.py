"""The decode roofline (spec/roofline.md): bytes one batch-1 decode step reads, and the time that takes
on a device whose memory bandwidth bounds it.

    bytes/token = Σ_{tensors a step reads} count × nbytes(tensor, format) + KV cache at the context
    ms/token    = bytes/token / bandwidth

One idea in one place: the benchmarks (`bench memory`, `bench decode`) and `evaluate` all count bytes
here.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import quant
from .config import ModelConfig
from .weights import canonical_params

# Weight formats: CLI name -> storage of the matrices `quantize` quantises; the other tensors
# (embeddings, LM head, norms, routers) stay in FLOAT_OF[format] (spec/quant.md §5).
FORMAT_STORAGE = {"f32": "F32", "f16": "F16", "bf16": "BF16", **quant.FORMATS}
FLOAT_OF = {"f32": "F32", "f16": "F16", "bf16": "BF16", **{k: "BF16" for k in quant.FORMATS}}
ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}


@dataclass(frozen=True)
class Device:
    name: str
    bandwidth_gbps: float  # peak DRAM bandwidth, GB/s (1e9 bytes/s)
    note: str


# Published peak DRAM bandwidth (NVIDIA Jetson Orin module data sheets; spec/roofline.md §3).
DEVICES = (
    Device("orin-agx-64", 204.8, "Jetson AGX Orin 64 GB, LPDDR5 256-bit"),
    Device("orin-nx-16", 102.4, "Jetson Orin NX 16 GB, LPDDR5 128-bit"),
    Device("orin-nano-8", 68.0, "Jetson Orin Nano 8 GB, LPDDR5 128-bit"),
)


def step_reads(cfg: ModelConfig) -> list[tuple[str, tuple[int, ...], int]]:
    """spec/roofline.md §1: (canonical tensor name, shape, times read) for every tensor one decode
    step reads — per layer the kept attention with its norms, the FFN norm, the router and the K chosen
    experts (counted as K reads of expert 0's shapes) or the dense MLP, the shared expert; the final
    norm, the whole LM head and one embedding row."""
    H, D, Nh, Nkv = cfg.hidden_size, cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
    out: list[tuple[str, tuple[int, ...], int]] = [("model.embed_tokens.weight", (1, H), 1)]
    for i, spec in enumerate(cfg.layers):
        p = f"model.layers.{i}."
        if spec.attention:
            out += [(p + "input_layernorm.weight", (H,), 1), (p + "self_attn.q_proj.weight", (Nh * D, H), 1),
                    (p + "self_attn.k_proj.weight", (Nkv * D, H), 1), (p + "self_attn.v_proj.weight", (Nkv * D, H), 1),
                    (p + "self_attn.o_proj.weight", (H, Nh * D), 1)]
            if cfg.qkv_bias:
                out += [(p + f"self_attn.{x}_proj.bias", (n * D,), 1) for x, n in (("q", Nh), ("k", Nkv), ("v", Nkv))]
            if cfg.o_bias:
                out.append((p + "self_attn.o_proj.bias", (H,), 1))
            if cfg.qk_norm == "head":
                out += [(p + "self_attn.q_norm.weight", (D,), 1), (p + "self_attn.k_norm.weight", (D,), 1)]
            elif cfg.qk_norm == "proj":
                out += [(p + "self_attn.q_norm.weight", (Nh * D,), 1), (p + "self_attn.k_norm.weight", (Nkv * D,), 1)]
        out.append((p + "post_attention_layernorm.weight", (H,), 1))
        m = spec.moe
        if m is None:
            F = spec.intermediate_size
            out += [(p + "mlp.gate_proj.weight", (F, H), 1), (p + "mlp.up_proj.weight", (F, H), 1),
                    (p + "mlp.down_proj.weight", (H, F), 1)]
            continue
        F = m.intermediate_size
        out.append((p + "mlp.gate.weight", (m.num_experts, H), 1))
        out += [(p + "mlp.experts.0.gate_proj.weight", (F, H), m.top_k),
                (p + "mlp.experts.0.up_proj.weight", (F, H), m.top_k),
                (p + "mlp.experts.0.down_proj.weight", (H, F), m.top_k)]
        if m.selection_bias:
            out.append((p + "mlp.gate.e_score_correction_bias", (m.num_experts,), 1))
        S = m.shared_expert_intermediate_size
        if S:
            out += [(p + "mlp.shared_expert.gate_proj.weight", (S, H), 1),
                    (p + "mlp.shared_expert.up_proj.weight", (S, H), 1),
                    (p + "mlp.shared_expert.down_proj.weight", (H, S), 1)]
            if m.shared_expert_gate:
                out.append((p + "mlp.shared_expert_gate.weight", (1, H), 1))
    out += [("model.norm.weight", (H,), 1), ("lm_head.weight", (cfg.vocab_size, H), 1)]
    return out


def tensor_bytes(name: str, shape: tuple[int, ...], fmt: str) -> int:
    """Bytes of one tensor in weight format `fmt` as d2m_ref writes it (quantize's rule, spec/quant.md §5)."""
    if fmt not in FORMAT_STORAGE:
        raise ValueError(f"weight format {fmt!r}: one of {', '.join(FORMAT_STORAGE)}")
    storage = FORMAT_STORAGE[fmt]
    if quant.is_quantized(storage) and quant.should_quantize(name):
        return quant.storage_nbytes(storage, shape)
    return int(np.prod(shape)) * ITEMSIZE[FLOAT_OF[fmt]]


def kv_bytes(cfg: ModelConfig, context: int, element_bytes: int = 2) -> int:
    """§2: the keys and values of `context` positions every attention layer reads: 2·Nkv·D·context each."""
    attn = sum(1 for s in cfg.layers if s.attention)
    return attn * 2 * cfg.num_key_value_heads * cfg.head_dim * context * element_bytes


def weight_bytes(cfg: ModelConfig, fmt: str) -> int:
    """§1: weight bytes one decode step reads in format `fmt`."""
    return sum(count * tensor_bytes(name, shape, fmt) for name, shape, count in step_reads(cfg))


def model_weight_bytes(model) -> int:
    """§1 for a loaded model: the same tensors, at the bytes its checkpoint actually stores them in."""
    stored = {name: p.nbytes for name, p in canonical_params(model)}
    vocab = model.config.vocab_size
    total = 0
    for name, shape, count in step_reads(model.config):
        if name == "lm_head.weight" and name not in stored:  # tied: the embedding matrix
            name = "model.embed_tokens.weight"
            total += count * stored[name]
        elif name == "model.embed_tokens.weight":
            total += count * stored[name] // vocab  # one row
        else:
            total += count * stored[name]
    return int(total)


def bytes_per_token(cfg: ModelConfig, fmt: str, context: int, kv_element_bytes: int = 2) -> int:
    """§1 + §2."""
    return weight_bytes(cfg, fmt) + kv_bytes(cfg, context, kv_element_bytes)


def ms_per_token(nbytes: int, bandwidth_gbps: float) -> float:
    """§3: the time a step takes reading `nbytes` at `bandwidth_gbps`, in milliseconds."""
    return nbytes / (bandwidth_gbps * 1e9) * 1e3


def active_parameters(cfg: ModelConfig) -> int:
    """Parameters one token uses (the LM head counted, the embedding row not): §1's tensors in
    elements, embedding row excluded."""
    return sum(count * int(np.prod(shape)) for name, shape, count in step_reads(cfg)
               if name != "model.embed_tokens.weight")
