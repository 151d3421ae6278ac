"""An independent plain-torch Dense2MoE decoder, with one switch per deliberate bug.

Written from spec/architecture.md alone (not from d2m_ref's NumPy code, and not from transformers'
modules): it is the "candidate backend" of the checker's tests.  Without bugs it is an honest
low-precision backend; each entry of BUGS turns on one mistake real ports make.

An honest backend in half precision computes the way deployed ones do: weights and activations in
the model dtype, matrix products accumulated by torch (float32 inside on CPU), RMSNorm, the RoPE
angles and both softmaxes in float32 and cast back (transformers' habit).  `weight_quant` makes an
honest weight-only quantised backend: every linear weight except the embedding and the routers is
quantised and dequantised (int8: symmetric per output row, absmax/127; int4: symmetric per group
of 32 input features, absmax/7).

The module tree uses the recommended Dense2MoE names (HF names, MoE as Qwen2-MoE names them), so
d2m_ref.adapters.torch.record_trace can hook it:

    model.embed_tokens, model.layers.{i}.{input_layernorm, self_attn, post_attention_layernorm, mlp},
    mlp.gate (returns router_logits, topk_weights, topk_ids, as transformers 5's routers do),
    mlp.experts.{e}, mlp.shared_expert, mlp.shared_expert_gate, model.norm, lm_head

Shapes: batch 1; T tokens, H hidden, Nh / Nkv heads, D head_dim, E experts, K top-k, V vocab.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn

# bug name -> what the candidate does wrong (and the spec section it violates)
BUGS: dict[str, str] = {
    "rope_interleaved": "RoPE rotates adjacent pairs (x0,x1),(x2,x3).. (GPT-J) instead of halves (§2.3)",
    "gqa_modulo": "query head h reads key/value head h % Nkv instead of h // (Nh/Nkv) (§3.4)",
    "norm_topk_prob_flipped": "renormalises the top-k weights exactly where the config says not to, and back (§4.2.4)",
    "softmax_after_topk": "top-k of the raw router logits, then a softmax over the k chosen (§4.2.2-4)",
    "experts_permuted": "expert e computes with the weights of expert (e+1) % E (§4.2.5)",
    "eps_outside_sqrt": "RMSNorm x / (sqrt(mean x²) + eps) instead of x / sqrt(mean x² + eps) (§2.1)",
    "no_qkv_bias": "drops the q/k/v projection biases (§3.1)",
    "router_fp16": "computes the router logits in float16 while the rest runs in the model dtype (§0, §4.2.1)",
    "causal_off_by_one": "a query at position p also sees the key at p+1 (§3.4)",
    "shared_gate_dropped": "adds the shared expert without its sigmoid gate (§4.2.5)",
    "norm_not_folded": "applies the kept layer's post-attention norm weight to experts absorbed from other "
                       "layers, whose own norm weight was never folded in (§1.2, LF-UC folding)",
}

_TORCH_DTYPES = {"float64": torch.float64, "float32": torch.float32, "float16": torch.float16,
                 "bfloat16": torch.bfloat16}


def torch_dtype(name: str) -> torch.dtype:
    return _TORCH_DTYPES[name]


# ---------------------------------------------------------------------------------------------
# Config (a dense2moe config.json dict), read here independently of d2m_ref.config


def layer_settings(config: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One dict per layer: attention, ffn, and for MoE every key with the spec's defaults applied."""
    if config["model_type"] != "dense2moe":
        raise NotImplementedError(f"model_type={config['model_type']!r}: this candidate implements dense2moe only")
    out = []
    for entry in config["layer_plan"]:
        s = {"attention": entry["attention"], "ffn": entry["ffn"],
             "intermediate_size": entry.get("intermediate_size", config["intermediate_size"])}
        if entry["ffn"] == "moe":
            s.update(
                num_experts=entry["num_experts"],
                top_k=entry.get("num_experts_per_tok", config.get("num_experts_per_tok")),
                width=entry.get("moe_intermediate_size", config.get("moe_intermediate_size", config["intermediate_size"])),
                scoring=entry.get("scoring_func", config.get("scoring_func", "softmax")),
                norm_topk_prob=entry.get("norm_topk_prob", config.get("norm_topk_prob", False)),
                scaling=entry.get("routed_scaling_factor", config.get("routed_scaling_factor", 1.0)),
                selection_bias=entry.get("selection_bias", False),
                shared_width=entry.get("shared_expert_intermediate_size", 0),
                shared_gate=entry.get("shared_expert_gate", False),
            )
        out.append(s)
    return out


def rope_theta(config: Mapping[str, Any]) -> float:
    params = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if params.get("rope_type", params.get("type", "default")) != "default":
        raise NotImplementedError("this candidate implements default RoPE only")
    return float(params.get("rope_theta", config.get("rope_theta", 10000.0)))


# ---------------------------------------------------------------------------------------------
# Weight-only quantisation (honest int8w / int4w candidates)


def quantize_dequantize(w: torch.Tensor, scheme: str | None) -> torch.Tensor:
    """[R, C] float64 -> the same weights after symmetric int8 (per row) or int4 (groups of 32) rounding."""
    if scheme is None:
        return w
    if scheme == "int8":
        scale = w.abs().amax(dim=1, keepdim=True) / 127
        return torch.round(w / scale) * scale
    if scheme == "int4":
        R, C = w.shape
        g = 32 if C % 32 == 0 else C
        blocks = w.reshape(R, C // g, g)
        scale = blocks.abs().amax(dim=2, keepdim=True) / 7
        return (torch.clamp(torch.round(blocks / scale), -8, 7) * scale).reshape(R, C)
    raise ValueError(f"weight_quant={scheme!r}")


# ---------------------------------------------------------------------------------------------
# Modules


class RMSNorm(nn.Module):
    """x / sqrt(mean(x²) + eps) · w, the mean in float32 (or float64) and cast back."""

    def __init__(self, weight: torch.Tensor, eps: float, eps_outside: bool):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.eps, self.eps_outside = eps, eps_outside

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        wide = x.to(torch.float64 if x.dtype == torch.float64 else torch.float32)
        ms = wide.pow(2).mean(-1, keepdim=True)
        if self.eps_outside:
            normed = wide / (torch.sqrt(ms) + self.eps)
        else:
            normed = wide * torch.rsqrt(ms + self.eps)
        return normed.to(x.dtype) * self.weight


class Linear(nn.Module):
    """y = x·Wᵀ (+ b), W [out, in]."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x @ self.weight.T
        return y if self.bias is None else y + self.bias


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """[T, N, D] with cos/sin [T, D/2] (one angle per pair) -> [T, N, D]."""
    half = x.shape[-1] // 2
    if interleaved:  # the bug: pairs (2i, 2i+1)
        a, b = x[..., 0::2], x[..., 1::2]
    else:  # spec: pairs (i, i + D/2)
        a, b = x[..., :half], x[..., half:]
    c, s = cos[:, None, :], sin[:, None, :]
    ra, rb = a * c - b * s, b * c + a * s
    if interleaved:
        return torch.stack([ra, rb], dim=-1).flatten(-2)
    return torch.cat([ra, rb], dim=-1)


class Attention(nn.Module):
    """Grouped-query causal self-attention with RoPE (spec §3)."""

    def __init__(self, w: dict[str, torch.Tensor], cfg: Mapping[str, Any], bugs: set[str], eps: float):
        super().__init__()
        self.Nh, self.Nkv = cfg["num_attention_heads"], cfg.get("num_key_value_heads", cfg["num_attention_heads"])
        self.D = cfg.get("head_dim") or cfg["hidden_size"] // self.Nh
        self.theta, self.bugs = rope_theta(cfg), bugs
        bias = {n: None if "no_qkv_bias" in bugs else w.get(f"{n}_proj.bias") for n in "qkv"}
        self.q_proj = Linear(w["q_proj.weight"], bias["q"])
        self.k_proj = Linear(w["k_proj.weight"], bias["k"])
        self.v_proj = Linear(w["v_proj.weight"], bias["v"])
        self.o_proj = Linear(w["o_proj.weight"])
        if "q_norm.weight" in w:  # qwen3: per-head RMSNorm over D
            self.q_norm = RMSNorm(w["q_norm.weight"], eps, "eps_outside_sqrt" in bugs)
            self.k_norm = RMSNorm(w["k_norm.weight"], eps, "eps_outside_sqrt" in bugs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        T = x.shape[0]
        q = self.q_proj(x).reshape(T, self.Nh, self.D)
        k = self.k_proj(x).reshape(T, self.Nkv, self.D)
        v = self.v_proj(x).reshape(T, self.Nkv, self.D)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        wide = torch.float64 if x.dtype == torch.float64 else torch.float32
        inv_freq = self.theta ** (-torch.arange(0, self.D, 2, dtype=torch.float64) / self.D)
        angles = torch.arange(T, dtype=wide)[:, None] * inv_freq.to(wide)[None, :]
        cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
        interleaved = "rope_interleaved" in self.bugs
        q, k = rotate(q, cos, sin, interleaved), rotate(k, cos, sin, interleaved)
        group = self.Nh // self.Nkv
        heads = torch.arange(self.Nh)
        kv_of = heads % self.Nkv if "gqa_modulo" in self.bugs else heads // group
        k, v = k[:, kv_of], v[:, kv_of]  # [T, Nh, D]
        scores = torch.einsum("thd,shd->hts", q, k) / math.sqrt(self.D)
        reach = 1 if "causal_off_by_one" in self.bugs else 0
        allowed = torch.arange(T)[None, :] <= torch.arange(T)[:, None] + reach
        scores = scores.masked_fill(~allowed[None], float("-inf"))
        probs = torch.softmax(scores.to(wide), dim=-1).to(x.dtype)
        out = torch.einsum("hts,shd->thd", probs, v).reshape(T, self.Nh * self.D)
        return self.o_proj(out)


class MLP(nn.Module):
    """down(silu(gate x) ⊙ up x) (spec §4.1)."""

    def __init__(self, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = Linear(gate), Linear(up), Linear(down)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(torch.nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class Router(nn.Module):
    """x [T, H] -> (router_logits [T, E], topk_weights [T, K], topk_ids [T, K]) (spec §4.2 steps 1-4)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, s: dict[str, Any], bugs: set[str]):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.e_score_correction_bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.s, self.bugs = s, bugs

    def forward(self, x: torch.Tensor):
        if "router_fp16" in self.bugs:
            logits = (x.to(torch.float16) @ self.weight.to(torch.float16).T).to(x.dtype)
        else:
            logits = x @ self.weight.T
        wide = torch.float64 if x.dtype == torch.float64 else torch.float32
        norm = self.s["norm_topk_prob"] != ("norm_topk_prob_flipped" in self.bugs)
        if "softmax_after_topk" in self.bugs and self.s["scoring"] == "softmax":
            top_logits, ids = torch.topk(logits.to(wide), self.s["top_k"], dim=-1)
            weights = torch.softmax(top_logits, dim=-1)
        else:
            scores = torch.softmax(logits.to(wide), -1) if self.s["scoring"] == "softmax" else torch.sigmoid(logits.to(wide))
            choice = scores if self.e_score_correction_bias is None else scores + self.e_score_correction_bias.to(wide)
            ids = torch.topk(choice, self.s["top_k"], dim=-1).indices
            weights = scores.gather(1, ids)
            if norm:
                weights = weights / weights.sum(-1, keepdim=True)
        weights = weights * self.s["scaling"]
        return logits, weights.to(x.dtype), ids


class MoE(nn.Module):
    """Σ_k weight_k · expert_{id_k}(x) (+ [sigmoid gate ·] shared expert) (spec §4.2 step 5)."""

    def __init__(self, router: Router, experts: list[MLP], shared: MLP | None, shared_gate: Linear | None,
                 bugs: set[str]):
        super().__init__()
        self.gate = router
        self.experts = nn.ModuleList(experts)
        if shared is not None:
            self.shared_expert = shared
        if shared_gate is not None:
            self.shared_expert_gate = shared_gate
        self.bugs = bugs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, weights, ids = self.gate(x)
        y = torch.zeros_like(x)
        E = len(self.experts)
        for e in range(E):
            tokens, slot = torch.nonzero(ids == e, as_tuple=True)
            if tokens.numel():
                expert = self.experts[(e + 1) % E] if "experts_permuted" in self.bugs else self.experts[e]
                y = y.index_add(0, tokens, weights[tokens, slot][:, None] * expert(x[tokens]))
        if hasattr(self, "shared_expert"):
            shared = self.shared_expert(x)
            if hasattr(self, "shared_expert_gate") and "shared_gate_dropped" not in self.bugs:
                shared = torch.sigmoid(self.shared_expert_gate(x)) * shared
            y = y + shared
        return y


class DecoderLayer(nn.Module):
    def __init__(self, attention: Attention | None, input_norm: RMSNorm | None, post_norm: RMSNorm, mlp: nn.Module):
        super().__init__()
        if attention is not None:
            self.input_layernorm, self.self_attn = input_norm, attention
        self.post_attention_layernorm, self.mlp = post_norm, mlp

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "self_attn"):
            h = h + self.self_attn(self.input_layernorm(h))
        return h + self.mlp(self.post_attention_layernorm(h))


class Decoder(nn.Module):
    def __init__(self, embed: torch.Tensor, layers: list[DecoderLayer], norm: RMSNorm):
        super().__init__()
        self.embed_tokens = nn.Embedding.from_pretrained(embed, freeze=True)
        self.layers = nn.ModuleList(layers)
        self.norm = norm

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed_tokens(ids)
        for layer in self.layers:
            h = layer(h)
        return self.norm(h)


class Candidate(nn.Module):
    """The whole model.  forward(input_ids [1, T]) -> logits [1, T, V]."""

    def __init__(self, model: Decoder, lm_head: Linear):
        super().__init__()
        self.model, self.lm_head = model, lm_head

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if input_ids.dim() != 2 or input_ids.shape[0] != 1:
            raise ValueError(f"input_ids must be [1, T], got {tuple(input_ids.shape)}")
        return self.lm_head(self.model(input_ids[0]))[None]


# ---------------------------------------------------------------------------------------------
# Building


def build_candidate(config: Mapping[str, Any], arrays: Mapping[str, np.ndarray], dtype: str = "float32",
                    bugs: set[str] | frozenset[str] = frozenset(), weight_quant: str | None = None,
                    fold_factors: Mapping[int, Mapping[int, np.ndarray]] | None = None) -> Candidate:
    """A candidate backend for a dense2moe `config` with the checkpoint `arrays` (our tensor names,
    float arrays), computing in `dtype`, with the given `bugs` (keys of BUGS).

    fold_factors {layer: {expert: [H] factor}} is what `norm_not_folded` multiplies into that expert's
    input: the kept layer's norm weight over the expert's own source-layer weight.
    """
    unknown = set(bugs) - set(BUGS)
    if unknown:
        raise ValueError(f"unknown bugs {sorted(unknown)}")
    bugs = set(bugs)
    dt = torch_dtype(dtype)
    eps = float(config.get("rms_norm_eps", 1e-6))
    eps_out = "eps_outside_sqrt" in bugs

    def t(name: str, quant: bool = True) -> torch.Tensor:
        w = torch.from_numpy(np.asarray(arrays[name], dtype=np.float64).copy())
        if quant and w.dim() == 2:
            w = quantize_dequantize(w, weight_quant)
        return w.to(dt)

    def mlp(prefix: str, in_factor: np.ndarray | None = None) -> MLP:
        gate, up = (torch.from_numpy(np.asarray(arrays[f"{prefix}{n}_proj.weight"], np.float64).copy())
                    for n in ("gate", "up"))
        if in_factor is not None:  # the unfolded norm weight, applied to the expert's input features
            f = torch.from_numpy(np.asarray(in_factor, np.float64))
            gate, up = gate * f[None, :], up * f[None, :]
        q = lambda w: quantize_dequantize(w, weight_quant).to(dt)  # noqa: E731
        return MLP(q(gate), q(up), t(f"{prefix}down_proj.weight"))

    layers = []
    for i, s in enumerate(layer_settings(config)):
        p = f"model.layers.{i}."
        attention = norm_in = None
        if s["attention"]:
            a = f"{p}self_attn."
            w = {n[len(a):]: t(n, quant=not n.endswith("norm.weight")) for n in arrays if n.startswith(a)}
            attention = Attention(w, config, bugs, eps)
            norm_in = RMSNorm(t(f"{p}input_layernorm.weight"), eps, eps_out)
        post = RMSNorm(t(f"{p}post_attention_layernorm.weight"), eps, eps_out)
        if s["ffn"] == "dense":
            ffn: nn.Module = mlp(f"{p}mlp.")
        else:
            factors = (fold_factors or {}).get(i, {}) if "norm_not_folded" in bugs else {}
            bias = t(f"{p}mlp.gate.e_score_correction_bias") if s["selection_bias"] else None
            router = Router(t(f"{p}mlp.gate.weight", quant=False), bias, s, bugs)
            experts = [mlp(f"{p}mlp.experts.{e}.", factors.get(e)) for e in range(s["num_experts"])]
            shared = mlp(f"{p}mlp.shared_expert.") if s["shared_width"] else None
            gate = Linear(t(f"{p}mlp.shared_expert_gate.weight", quant=False)) if s["shared_gate"] else None
            ffn = MoE(router, experts, shared, gate, bugs)
        layers.append(DecoderLayer(attention, norm_in, post, ffn))
    embed = t("model.embed_tokens.weight", quant=False)
    decoder = Decoder(embed, layers, RMSNorm(t("model.norm.weight"), eps, eps_out))
    head = embed if config.get("tie_word_embeddings", False) else t("lm_head.weight")
    return Candidate(decoder, Linear(head)).eval()


def run_logits(model: Candidate, input_ids: np.ndarray) -> np.ndarray:
    """[T] -> [T, V] float64."""
    with torch.no_grad():
        return model(torch.from_numpy(np.asarray(input_ids, np.int64))[None])[0].to(torch.float64).numpy()
