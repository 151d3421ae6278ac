"""Candidate traces from a real model: SmolLM2-135M-Instruct run by transformers (torch, CPU) in
float32, float16 or bfloat16, honestly or with one deliberate bug in one layer.

This is the oracle's test bench, not a peer of d2m_ref: d2m_ref.check is measured on these traces
(does it pass the honest runs at every precision, and name the layer of each bug?).  Nothing here
imports d2m_ref except its torch adapter, which records the trace (spec/format.md §2).

    from tests.peer.smollm2_runs import BUGS, run_trace
    trace = run_trace("bfloat16", ids)                             # honest
    trace = run_trace("bfloat16", ids, bug="gqa_mapping", layer=7)  # one bug in layer 7

Models.  The GGUF file (tests/real_models.py) is dequantised by transformers once per process, in
float32; the float16, bfloat16 and float64 models are `.to(dtype)` copies of it, which hold the
same weights as `from_pretrained(..., dtype=...)` gives.  One difference is undone by hand:
`.to(dtype)` also casts the rotary embedding's non-persistent `inv_freq` buffer, which
`from_pretrained` leaves in float32 (see `rope_inv_freq_bf16` for what that costs).  Every model
is cached per process and never modified; a buggy model is a copy of the module tree that shares
every weight tensor with the honest one except the one it changes.

Shapes: SmolLM2 has L=30 layers, H=576, Nh=9 query heads and Nkv=3 key/value heads of D=64, V=49152.
"""

from __future__ import annotations

import copy
import functools
import itertools
import os
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import torch
from torch import nn
from transformers import AutoModelForCausalLM, GgufConfig
from transformers.models.llama.modeling_llama import LlamaForCausalLM, LlamaRotaryEmbedding

from d2m_ref.adapters.torch import record_trace
from tests.real_models import smollm2_gguf

DTYPES: dict[str, torch.dtype] = {"float64": torch.float64, "float32": torch.float32,
                                  "float16": torch.float16, "bfloat16": torch.bfloat16}
ATTN_IMPLS = ("eager", "sdpa")
DEFAULT_LAYER = 7

# The bugs' sizes: see BUGS for what each changes and how much
ROPE_THETA = 100000.0  # SmolLM2's (GGUF llama.rope.freq_base)
WRONG_ROPE_THETA = 10000.0  # Llama-2's default, hard-coded by many ports
WRONG_RMS_NORM_EPS = 1e-2  # SmolLM2: 1e-5
PROJ_SCALE = 1.02
SWAPPED_HEADS = (0, 4)  # query heads of kv groups 0 and 1; swapping them moves attn_out.7 by 80-105%


def _use_all_cores() -> None:
    torch.set_num_threads(os.cpu_count() or 1)


@functools.lru_cache(maxsize=None)
def _float32_model() -> LlamaForCausalLM:
    """The GGUF dequantised by transformers, float32, eager.  `dequantize=True` pins the dense
    path: with the `kernels` package installed transformers 5.24 would otherwise keep the Q4_1
    blocks packed in GgufLinear modules and compute with ggml kernels."""
    _use_all_cores()
    path = smollm2_gguf()
    model = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32, attn_implementation="eager",
        quantization_config=GgufConfig(dequantize=True))
    return model.eval().requires_grad_(False)


def _float32_inv_freq(model: LlamaForCausalLM) -> None:
    """Put the rotary buffers back in float32, as from_pretrained(dtype=...) leaves them."""
    reference = _float32_model().model.rotary_emb
    rotary = model.model.rotary_emb
    rotary.inv_freq = reference.inv_freq.clone()
    rotary.original_inv_freq = reference.original_inv_freq.clone()


def sharing_copy(model: nn.Module) -> nn.Module:
    """A deep copy of the module tree (and its config) whose parameters and buffers are the
    original's tensors, not copies."""
    memo = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    return copy.deepcopy(model, memo)


@functools.lru_cache(maxsize=None)
def hf_model(dtype: str = "float32", attn_impl: str = "eager") -> LlamaForCausalLM:
    """The honest SmolLM2 in `dtype` ("float32" | "float16" | "bfloat16" | "float64"), eval mode,
    computing attention with transformers' `attn_impl` ("eager" | "sdpa"); cached, never modify it."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}: expected one of {sorted(DTYPES)}")
    if attn_impl not in ATTN_IMPLS:
        raise ValueError(f"attn_impl={attn_impl!r}: expected one of {ATTN_IMPLS}")
    if attn_impl != "eager":
        model = sharing_copy(hf_model(dtype, "eager"))
        model.set_attn_implementation(attn_impl)
        return model
    if dtype == "float32":
        return _float32_model()
    model = copy.deepcopy(_float32_model()).to(DTYPES[dtype])
    _float32_inv_freq(model)
    return model


# ---------------------------------------------------------------------------------------------
# Bugs: each changes one decoder layer of a sharing copy, in place.
#
# Effect in float32, layer 7: relative (Frobenius) change of attn_out.7 and hidden.7 against the
# honest run, on prose_recipe (128 tokens) | long_kjv_genesis_1 (1001 tokens).  For scale, the
# honest bfloat16 run differs from the float32 one by 2.5e-2 | 2.1e-2 (attn_out.7) and 1.0e-2 |
# 1.1e-2 (hidden.7); float16 by 3.0e-3 | 2.6e-3 and 1.3e-3 | 1.4e-3.
#
#   bug                 attn_out.7           hidden.7
#   rope_theta_off      0.25    | 0.34       2.3e-2 | 5.0e-2
#   rmsnorm_eps         1.0e-3  | 1.2e-3     9.4e-5 | 1.8e-4
#   proj_scaled         2.0e-2  | 2.0e-2     1.9e-3 | 3.0e-3
#   gqa_mapping         3.2     | 2.4        0.33   | 0.38
#   heads_swapped       0.80    | 0.96       7.3e-2 | 0.14
#   rope_inv_freq_bf16  2.4e-3  | 5.3e-3     2.2e-4 | 8.1e-4
#
# The same bug moves hidden.{i} much less in layers 15-20, where one token's residual stream is
# ~100x larger than the rest (rmsnorm_eps: 2.4e-6 there; 0.23 in layer 0).


class Bug(NamedTuple):
    what: str
    inject: Callable[[LlamaForCausalLM, int], None]


def _attention(model: LlamaForCausalLM, layer: int) -> nn.Module:
    return model.model.layers[layer].self_attn


def rope_from(model: LlamaForCausalLM, layer: int, rotary: nn.Module) -> None:
    """The layer's attention takes (cos, sin) from `rotary` instead of the model's shared rotary
    embedding (LlamaModel.forward computes them once and passes position_embeddings=(cos, sin))."""
    def wrong_position_embeddings(_module, args, kwargs):
        cos, sin = rotary(kwargs["hidden_states"], kwargs["position_ids"])
        return args, {**kwargs, "position_embeddings": (cos, sin)}

    _attention(model, layer).register_forward_pre_hook(wrong_position_embeddings, with_kwargs=True)


def _rope_theta_off(model: LlamaForCausalLM, layer: int) -> None:
    config = copy.deepcopy(model.config)
    config.rope_parameters = {**config.rope_parameters, "rope_theta": WRONG_ROPE_THETA}
    rope_from(model, layer, LlamaRotaryEmbedding(config))


def _rope_inv_freq_bf16(model: LlamaForCausalLM, layer: int) -> None:
    rotary = LlamaRotaryEmbedding(model.config)
    rotary.inv_freq = rotary.inv_freq.to(torch.bfloat16).to(torch.float32)
    rope_from(model, layer, rotary)


def _rmsnorm_eps(model: LlamaForCausalLM, layer: int) -> None:
    model.model.layers[layer].input_layernorm.variance_epsilon = WRONG_RMS_NORM_EPS


def _proj_scaled(model: LlamaForCausalLM, layer: int) -> None:
    o_proj = _attention(model, layer).o_proj
    # scaled in float32 and rounded once to the model dtype, as a faulty converter would
    scaled = (o_proj.weight.to(torch.float32) * PROJ_SCALE).to(o_proj.weight.dtype)
    o_proj.weight = nn.Parameter(scaled, requires_grad=False)


def kv_head_columns(kv_head_of: Callable[[int], int], num_heads: int, head_dim: int) -> torch.Tensor:
    """Columns of a k_proj/v_proj output [.., Nkv*D] that give query head h the key/value head
    kv_head_of(h): [Nh*D] indices."""
    return torch.cat([torch.arange(head_dim) + kv_head_of(h) * head_dim for h in range(num_heads)])


def expand_kv(model: LlamaForCausalLM, layer: int, kv_head_of: Callable[[int], int]) -> None:
    """k_proj and v_proj of the layer emit Nh heads, query head h's own copy of kv head
    kv_head_of(h), and the attention stops repeating kv heads (num_key_value_groups = 1, which both
    eager_attention_forward's repeat_kv and sdpa_attention_forward read)."""
    attn = _attention(model, layer)
    columns = kv_head_columns(kv_head_of, model.config.num_attention_heads, attn.head_dim)
    for proj in (attn.k_proj, attn.v_proj):
        proj.register_forward_hook(lambda _m, _i, out: out[..., columns])
    attn.num_key_value_groups = 1


def _gqa_mapping(model: LlamaForCausalLM, layer: int) -> None:
    n_kv = model.config.num_key_value_heads
    expand_kv(model, layer, lambda h: h % n_kv)


def _heads_swapped(model: LlamaForCausalLM, layer: int) -> None:
    attn = _attention(model, layer)
    heads = list(range(model.config.num_attention_heads))
    a, b = SWAPPED_HEADS
    heads[a], heads[b] = b, a
    columns = torch.cat([torch.arange(attn.head_dim) + h * attn.head_dim for h in heads])  # o_proj input [.., Nh*D]
    attn.o_proj.register_forward_pre_hook(lambda _m, args: (args[0][..., columns], *args[1:]))


BUGS: dict[str, Bug] = {
    "rope_theta_off": Bug(f"the layer's RoPE uses theta={WRONG_ROPE_THETA:g} instead of {ROPE_THETA:g}",
                          _rope_theta_off),
    "rmsnorm_eps": Bug(f"the layer's input_layernorm uses eps={WRONG_RMS_NORM_EPS:g} instead of 1e-5", _rmsnorm_eps),
    "proj_scaled": Bug(f"the layer's o_proj weight is multiplied by {PROJ_SCALE}", _proj_scaled),
    "gqa_mapping": Bug("query head h attends with key/value head h % Nkv instead of h // (Nh/Nkv)", _gqa_mapping),
    "heads_swapped": Bug(f"query heads {SWAPPED_HEADS[0]} and {SWAPPED_HEADS[1]} swap their outputs before o_proj",
                         _heads_swapped),
    "rope_inv_freq_bf16": Bug("the layer's RoPE inverse frequencies are rounded to bfloat16 (what model.to(torch."
                              "bfloat16) does to transformers' float32 inv_freq buffer), angles then in float32",
                              _rope_inv_freq_bf16),
}


@functools.lru_cache(maxsize=64)
def buggy_model(dtype: str, bug: str, layer: int = DEFAULT_LAYER, attn_impl: str = "eager") -> LlamaForCausalLM:
    """hf_model(dtype, attn_impl) with BUGS[bug] in decoder layer `layer` (0-based); cached."""
    if bug not in BUGS:
        raise ValueError(f"bug={bug!r}: expected one of {sorted(BUGS)}")
    honest = hf_model(dtype, attn_impl)
    if not 0 <= layer < honest.config.num_hidden_layers:
        raise ValueError(f"layer={layer}: SmolLM2 has layers 0..{honest.config.num_hidden_layers - 1}")
    model = sharing_copy(honest)
    BUGS[bug].inject(model, layer)
    return model


# ---------------------------------------------------------------------------------------------
# Traces


def run_trace(dtype: str, ids, bug: str | None = None, layer: int | None = None, attn_impl: str = "eager",
              path: str | Path | None = None) -> dict[str, np.ndarray]:
    """record_trace (d2m_ref.adapters.torch) of SmolLM2 in `dtype` on token ids [T], honest or with
    `bug` in `layer` (default DEFAULT_LAYER); written to `path` too (a trace file for
    `python -m d2m_ref.check --candidate`) when given.  Half-precision tensors come back widened
    to float32, exactly."""
    if bug is None and layer is not None:
        raise ValueError(f"layer={layer} without a bug: name one of {sorted(BUGS)}")
    model = (hf_model(dtype, attn_impl) if bug is None
             else buggy_model(dtype, bug, DEFAULT_LAYER if layer is None else layer, attn_impl))
    return record_trace(model, ids, path)
