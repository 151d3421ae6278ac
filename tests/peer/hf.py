"""Hugging Face transformers as an independent peer of d2m_ref, made float64 where it is not.

Stock transformers 5.24, asked for `dtype=torch.float64`, still computes four things in float32
(read in its modeling code; test_stock_float64_is_not_float64 in tests/test_vs_transformers.py
measures what it costs), in every family used here:

  1. RMSNorm    `<Family>RMSNorm.forward`: `hidden_states.to(torch.float32)` before the variance
                (also Qwen3's per-head q_norm/k_norm and OLMoE's q_norm/k_norm: same class).
  2. RoPE       `<Family>RotaryEmbedding`: `inv_freq` built in float32 at construction (the
                class's `compute_default_rope_parameters`, or `modeling_rope_utils.ROPE_INIT_FUNCTIONS`
                for 'linear' / 'llama3'), and `forward` takes cos/sin of float32 `freqs`.
  3. attention  `modeling_<family>.eager_attention_forward`: `softmax(..., dtype=torch.float32)`.
  4. router     `<Family>TopKRouter.forward`: `softmax(router_logits, dtype=torch.float)`
                (Mixtral: `softmax(router_logits.float())`).

`float64_transformers()` replaces exactly those callables, for the eight families, by the same
formulas with float64 arithmetic (it also covers `DeepseekV3TopkRouter`, whose router casts to
float32, because the Dense2MoE peer borrows it), and puts the originals back on exit.  Before
patching it checks that each original still contains the float32 cast it is meant to replace, so
a transformers upgrade that moves one fails loudly instead of silently comparing the wrong thing.

Shapes: T tokens, H hidden, V vocab.  Everything runs at batch 1, without a KV cache.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import math
from pathlib import Path
from typing import Any, Iterator, NamedTuple
from unittest import mock

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

# family (transformers model_type) -> class-name prefix in modeling_<family>.py
_PREFIX = {
    "llama": "Llama",
    "mistral": "Mistral",
    "qwen2": "Qwen2",
    "qwen3": "Qwen3",
    "qwen2_moe": "Qwen2Moe",
    "qwen3_moe": "Qwen3Moe",
    "mixtral": "Mixtral",
    "olmoe": "Olmoe",
}
MOE_FAMILIES = ("qwen2_moe", "qwen3_moe", "mixtral", "olmoe")


class HFCase(NamedTuple):
    """One test model: a name and the transformers config kwargs (with `model_type`)."""

    name: str
    config: dict[str, Any]


# Awkward on purpose: GQA ratios 1, 2, 3, 4 and 7; head_dim != hidden/heads where the family
# allows it (llama, qwen2/3, mixtral; OLMoE sizes q_norm by hidden_size, so it cannot); vocab
# sizes that are not powers of two; dense layers among MoE ones.  MoE defaults differ by family,
# so num_experts_per_tok is always given.
FAMILIES: list[HFCase] = [
    HFCase("llama_llama3rope_tied_gqa7", dict(
        model_type="llama", vocab_size=97, hidden_size=56, intermediate_size=80, num_hidden_layers=3,
        num_attention_heads=7, num_key_value_heads=1, head_dim=10, max_position_embeddings=64,
        rms_norm_eps=1e-5, tie_word_embeddings=True,
        # theta 500, head_dim 10: wavelengths 6.3, 22, 75, 261, 905 against original 32 -> high
        # (< 8, kept), medium (smoothed) and low (/ factor) frequencies all occur.
        rope_parameters=dict(rope_type="llama3", rope_theta=500.0, factor=4.0, low_freq_factor=1.0,
                             high_freq_factor=4.0, original_max_position_embeddings=32))),
    HFCase("llama_linearrope_bias_gqa2", dict(
        model_type="llama", vocab_size=131, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, attention_bias=True,
        tie_word_embeddings=False, rope_parameters=dict(rope_type="linear", rope_theta=10000.0, factor=2.0))),
    HFCase("qwen2_gqa3", dict(
        model_type="qwen2", vocab_size=203, hidden_size=48, intermediate_size=64, num_hidden_layers=3,
        num_attention_heads=6, num_key_value_heads=2, head_dim=12, max_position_embeddings=64,
        rope_theta=1_000_000.0, tie_word_embeddings=False)),  # legacy top-level rope_theta spelling
    HFCase("qwen3_gqa1", dict(
        model_type="qwen3", vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, head_dim=16, max_position_embeddings=64,
        rope_parameters=dict(rope_type="default", rope_theta=1_000_000.0), tie_word_embeddings=False)),
    HFCase("qwen2_moe_shared_mlponly_gqa1", dict(
        model_type="qwen2_moe", vocab_size=131, hidden_size=48, intermediate_size=72, num_hidden_layers=4,
        num_attention_heads=6, num_key_value_heads=6, max_position_embeddings=64,
        num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=40,
        decoder_sparse_step=1, mlp_only_layers=[0, 2], norm_topk_prob=False, tie_word_embeddings=False)),
    HFCase("qwen2_moe_step2_norm_tied_gqa7", dict(
        model_type="qwen2_moe", vocab_size=97, hidden_size=56, intermediate_size=64, num_hidden_layers=4,
        num_attention_heads=7, num_key_value_heads=1, head_dim=6, max_position_embeddings=64,
        num_experts=5, num_experts_per_tok=3, moe_intermediate_size=24, shared_expert_intermediate_size=48,
        decoder_sparse_step=2, mlp_only_layers=[], norm_topk_prob=True, tie_word_embeddings=True)),
    HFCase("qwen3_moe_norm_mlponly_gqa2", dict(
        model_type="qwen3_moe", vocab_size=203, hidden_size=40, intermediate_size=64, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=12, max_position_embeddings=64,
        num_experts=6, num_experts_per_tok=2, moe_intermediate_size=24, norm_topk_prob=True,
        mlp_only_layers=[1], tie_word_embeddings=False)),
    # Mistral without a sliding window is Llama's math under another name (and no biases)
    HFCase("mistral_nowindow_gqa4", dict(
        model_type="mistral", vocab_size=89, hidden_size=64, intermediate_size=80, num_hidden_layers=2,
        num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=64, sliding_window=None,
        rope_parameters=dict(rope_type="default", rope_theta=1_000_000.0), tie_word_embeddings=False)),
    HFCase("mixtral_gqa4", dict(
        model_type="mixtral", vocab_size=97, hidden_size=64, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=8, num_key_value_heads=2, head_dim=12, max_position_embeddings=64,
        num_local_experts=4, num_experts_per_tok=2, rms_norm_eps=1e-5,
        rope_parameters=dict(rope_type="default", rope_theta=1_000_000.0), tie_word_embeddings=False)),
    HFCase("olmoe_gqa2", dict(
        model_type="olmoe", vocab_size=131, hidden_size=48, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=6, num_key_value_heads=3, max_position_embeddings=64,
        num_experts=4, num_experts_per_tok=2, norm_topk_prob=False, rms_norm_eps=1e-5,
        tie_word_embeddings=False, eos_token_id=None)),  # OLMoE's default eos id 50279 is outside V
    # transformers' OlmoeAttention clamps q, k, v AFTER q_norm/k_norm (allenai/OLMo clamps the raw
    # fused projection, before any norm); released OLMoE configs have clip_qkv null.
    HFCase("olmoe_clipqkv_norm_gqa1", dict(
        model_type="olmoe", vocab_size=97, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
        num_experts=3, num_experts_per_tok=2, norm_topk_prob=True, clip_qkv=1.0,  # clips ~1/3 of q, k, v
        tie_word_embeddings=False, eos_token_id=None)),
]


def case(name: str) -> HFCase:
    """The FAMILIES entry called `name`."""
    for c in FAMILIES:
        if c.name == name:
            return c
    raise KeyError(f"no FAMILIES case named {name!r}")


# ---------------------------------------------------------------------------------------------
# Building, saving and running models


def make_config(hf_case: HFCase):
    """HFCase -> a transformers config object."""
    kwargs = dict(hf_case.config)
    return AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)


def random_tensor(name: str, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """A float64 tensor for parameter `name`, larger than HF's init (std 0.02) so the check bites.

    Matrices get std 1/sqrt(fan_in) (0.12-0.18 here), so every projection keeps activations O(1);
    embeddings std 1; norm weights uniform in [0.6, 1.4]; biases std 0.2; routers std
    2/sqrt(H), giving router logits of std ~2: decisive routes, not a saturated softmax.
    """
    def normal(std: float) -> torch.Tensor:
        return torch.randn(shape, generator=generator, dtype=torch.float64) * std

    if name.endswith("norm.weight"):
        return 0.6 + 0.8 * torch.rand(shape, generator=generator, dtype=torch.float64)
    if name.endswith(".bias") or name.endswith("e_score_correction_bias"):
        return normal(0.2)
    if "embed_tokens" in name:
        return normal(1.0)
    if name.endswith("mlp.gate.weight") or name.endswith("block_sparse_moe.gate.weight"):
        return normal(2.0 / math.sqrt(shape[-1]))
    if len(shape) >= 2:
        return normal(1.0 / math.sqrt(shape[-1]))
    raise ValueError(f"no initialisation rule for parameter {name} {tuple(shape)}")


def randomize_(model: nn.Module, seed: int) -> nn.Module:
    """Overwrite every parameter of a float64 `model` from one seeded generator, in name order."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            param.copy_(random_tensor(name, tuple(param.shape), generator))
    return model


def build(hf_case: HFCase, dtype: torch.dtype = torch.float64, seed: int = 0) -> nn.Module:
    """A random `AutoModelForCausalLM` for `hf_case`, eager attention and eager experts.

    Weights are drawn in float64 and then cast, so build(c, torch.float32) is build(c) rounded.
    """
    cfg = make_config(hf_case)
    kwargs = dict(dtype=torch.float64, attn_implementation="eager")
    if cfg.model_type in MOE_FAMILIES:
        kwargs["experts_implementation"] = "eager"  # the default grouped matmul refuses float64
    model = AutoModelForCausalLM.from_config(cfg, **kwargs)
    randomize_(model, seed)
    return model.to(dtype).eval()


def save(model: nn.Module, directory: str | Path) -> Path:
    """`save_pretrained`: config.json + model.safetensors, as transformers writes them."""
    directory = Path(directory)
    model.save_pretrained(directory)
    return directory


def _input_tensor(input_ids: np.ndarray) -> torch.Tensor:
    ids = np.asarray(input_ids)
    if ids.ndim != 1 or ids.dtype != np.int64:
        raise ValueError(f"input_ids must be a 1-D int64 array, got {ids.dtype} {ids.shape}")
    return torch.from_numpy(ids.copy())[None]


def logits(model: nn.Module, input_ids: np.ndarray) -> np.ndarray:
    """[T] int64 -> [T, V] float64 logits (batch 1, no cache), whatever dtype the model runs in."""
    with torch.no_grad():
        out = model(input_ids=_input_tensor(input_ids), use_cache=False)
    return out.logits[0].to(torch.float64).numpy()


def hidden_states(model: nn.Module, input_ids: np.ndarray) -> list[np.ndarray]:
    """[T] int64 -> one [T, H] float64 array per decoder layer: that layer's output (residual stream).

    Taken with forward hooks on `model.model.layers`, so the list is exactly the layer outputs
    (before the final norm), independent of how transformers assembles `output_hidden_states`.
    """
    captured: list[np.ndarray] = []

    def hook(_module, _inputs, output):
        hidden = output[0] if isinstance(output, tuple) else output
        captured.append(hidden[0].detach().to(torch.float64).numpy())

    handles = [layer.register_forward_hook(hook) for layer in model.model.layers]
    try:
        with torch.no_grad():
            model(input_ids=_input_tensor(input_ids), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return captured


# ---------------------------------------------------------------------------------------------
# float64 versions of the four float32 places (transformers' formulas, float64 arithmetic)


def _rms_norm_forward_float64(self, hidden_states: torch.Tensor) -> torch.Tensor:
    """`<Family>RMSNorm.forward` with the variance in float64 instead of float32."""
    input_dtype = hidden_states.dtype
    hidden_states = hidden_states.to(torch.float64)
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
    return self.weight * hidden_states.to(input_dtype)


def rope_inv_freq_float64(config) -> torch.Tensor:
    """[D/2] float64 inverse frequencies: transformers' default / linear / llama3 formulas in float64.

    Same lines as `compute_default_rope_parameters`, `_compute_linear_scaling_rope_parameters` and
    `_compute_llama3_parameters` (modeling_rope_utils.py), with torch.float64 for torch.float.
    """
    params = config.rope_parameters
    rope_type = params.get("rope_type", "default")
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise NotImplementedError(f"partial_rotary_factor={params['partial_rotary_factor']}")
    base = params["rope_theta"]
    dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).to(dtype=torch.float64) / dim))
    if rope_type == "default":
        return inv_freq
    if rope_type == "linear":
        return inv_freq / params["factor"]
    if rope_type == "llama3":
        factor = params["factor"]
        low_freq_factor = params["low_freq_factor"]
        high_freq_factor = params["high_freq_factor"]
        old_context_len = params["original_max_position_embeddings"]
        low_freq_wavelen = old_context_len / low_freq_factor
        high_freq_wavelen = old_context_len / high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        inv_freq_llama = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
        smooth_factor = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
        smoothed_inv_freq = (1 - smooth_factor) * inv_freq_llama / factor + smooth_factor * inv_freq_llama
        is_medium_freq = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
        return torch.where(is_medium_freq, smoothed_inv_freq, inv_freq_llama)
    raise NotImplementedError(f"rope_type={rope_type!r}: only default, linear and llama3 are made float64")


def _rotary_forward_float64(self, x: torch.Tensor, position_ids: torch.Tensor):
    """`<Family>RotaryEmbedding.forward`, inv_freq recomputed in float64 from the config (the
    float32 `inv_freq` buffer is ignored), cos/sin of float64 angles."""
    inv_freq = rope_inv_freq_float64(self.config).to(x.device)
    freqs = position_ids[..., None].to(torch.float64) * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    cos = emb.cos() * self.attention_scaling
    sin = emb.sin() * self.attention_scaling
    return cos.to(dtype=x.dtype), sin.to(dtype=x.dtype)


def _repeat_kv(hidden_states: torch.Tensor, n_rep: int) -> torch.Tensor:
    batch, num_key_value_heads, slen, head_dim = hidden_states.shape
    if n_rep == 1:
        return hidden_states
    hidden_states = hidden_states[:, :, None, :, :].expand(batch, num_key_value_heads, n_rep, slen, head_dim)
    return hidden_states.reshape(batch, num_key_value_heads * n_rep, slen, head_dim)


def _eager_attention_forward_float64(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """`eager_attention_forward` (identical in the eight modeling files) with a float64 softmax."""
    key_states = _repeat_kv(key, module.num_key_value_groups)
    value_states = _repeat_kv(value, module.num_key_value_groups)
    attn_weights = torch.matmul(query, key_states.transpose(2, 3)) * scaling
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask
    attn_weights = nn.functional.softmax(attn_weights, dim=-1, dtype=torch.float64).to(query.dtype)
    attn_weights = nn.functional.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value_states)
    attn_output = attn_output.transpose(1, 2).contiguous()
    return attn_output, attn_weights


def _topk_router_forward_float64(self, hidden_states: torch.Tensor):
    """Qwen2Moe/Qwen3Moe/Olmoe `TopKRouter.forward` with the softmax in float64."""
    hidden_states = hidden_states.reshape(-1, self.hidden_dim)
    router_logits = F.linear(hidden_states, self.weight)
    router_probs = torch.nn.functional.softmax(router_logits, dtype=torch.float64, dim=-1)
    router_top_value, router_indices = torch.topk(router_probs, self.top_k, dim=-1)
    if self.norm_topk_prob:
        router_top_value /= router_top_value.sum(dim=-1, keepdim=True)
    router_top_value = router_top_value.to(router_logits.dtype)
    return router_logits, router_top_value, router_indices


def _mixtral_router_forward_float64(self, hidden_states: torch.Tensor):
    """`MixtralTopKRouter.forward` (always renormalises) with the softmax in float64."""
    hidden_states = hidden_states.reshape(-1, self.hidden_dim)
    router_logits = F.linear(hidden_states, self.weight)
    router_probs = torch.nn.functional.softmax(router_logits.to(torch.float64), dim=-1)
    router_top_value, router_indices = torch.topk(router_probs, self.top_k, dim=-1)
    router_top_value /= router_top_value.sum(dim=-1, keepdim=True)
    return router_logits, router_top_value, router_indices


def _deepseek_v3_router_forward_float64(self, hidden_states: torch.Tensor):
    """`DeepseekV3TopkRouter.forward` with float64 where it casts to float32 (used by dense2moe.py)."""
    hidden_states = hidden_states.view(-1, self.hidden_dim)
    router_logits = F.linear(hidden_states.type(torch.float64), self.weight.type(torch.float64))
    scores = router_logits.sigmoid()
    scores_for_choice = scores + self.e_score_correction_bias
    group_scores = (
        scores_for_choice.view(-1, self.num_group, self.num_experts // self.num_group)
        .topk(2, dim=-1)[0]
        .sum(dim=-1)
    )
    group_idx = torch.topk(group_scores, k=self.topk_group, dim=-1, sorted=False)[1]
    group_mask = torch.zeros_like(group_scores)
    group_mask.scatter_(1, group_idx, 1)
    score_mask = (
        group_mask.unsqueeze(-1)
        .expand(-1, self.num_group, self.num_experts // self.num_group)
        .reshape(-1, self.num_experts)
    )
    scores_for_choice = scores_for_choice.masked_fill(~score_mask.bool(), float("-inf"))
    topk_indices = torch.topk(scores_for_choice, k=self.top_k, dim=-1, sorted=False)[1]
    topk_weights = scores.gather(1, topk_indices)
    if self.norm_topk_prob:
        denominator = topk_weights.sum(dim=-1, keepdim=True) + 1e-20
        topk_weights /= denominator
    topk_weights = topk_weights * self.routed_scaling_factor
    return router_logits, topk_weights, topk_indices


def _require_source(obj: Any, *snippets: str) -> None:
    """Refuse to patch `obj` unless its source still has the float32 lines we replace."""
    source = inspect.getsource(obj)
    missing = [s for s in snippets if s not in source]
    if missing:
        raise RuntimeError(f"{obj.__module__}.{obj.__qualname__} no longer contains {missing}: "
                           "transformers changed; re-read it before trusting float64_transformers()")


def patch_targets() -> list[tuple[Any, str, Any]]:
    """(owner, attribute, float64 replacement) for every place float64_transformers() patches."""
    targets: list[tuple[Any, str, Any]] = []
    for family, prefix in _PREFIX.items():
        module = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
        rms_norm = getattr(module, f"{prefix}RMSNorm")
        _require_source(rms_norm.forward, "hidden_states.to(torch.float32)",
                        "variance = hidden_states.pow(2).mean(-1, keepdim=True)",
                        "return self.weight * hidden_states.to(input_dtype)")
        targets.append((rms_norm, "forward", _rms_norm_forward_float64))

        rotary = getattr(module, f"{prefix}RotaryEmbedding")
        _require_source(rotary.forward, "position_ids[..., None].float()", "torch.cat((freqs, freqs), dim=-1)")
        _require_source(rotary.compute_default_rope_parameters, "torch.arange(0, dim, 2, dtype=torch.float)")
        targets.append((rotary, "forward", _rotary_forward_float64))

        _require_source(module.eager_attention_forward, "softmax(attn_weights, dim=-1, dtype=torch.float32)")
        targets.append((module, "eager_attention_forward", _eager_attention_forward_float64))

        if family in MOE_FAMILIES:
            router = getattr(module, f"{prefix}TopKRouter")
            if family == "mixtral":
                _require_source(router.forward, "softmax(router_logits.float(), dim=-1)",
                                "router_top_value /= router_top_value.sum(dim=-1, keepdim=True)")
                targets.append((router, "forward", _mixtral_router_forward_float64))
            else:
                _require_source(router.forward, "softmax(router_logits, dtype=torch.float, dim=-1)",
                                "if self.norm_topk_prob:")
                targets.append((router, "forward", _topk_router_forward_float64))

    deepseek = importlib.import_module("transformers.models.deepseek_v3.modeling_deepseek_v3")
    _require_source(deepseek.DeepseekV3TopkRouter.forward, "hidden_states.type(torch.float32)",
                    "topk_weights = topk_weights * self.routed_scaling_factor")
    targets.append((deepseek.DeepseekV3TopkRouter, "forward", _deepseek_v3_router_forward_float64))

    rope_utils = importlib.import_module("transformers.modeling_rope_utils")
    _require_source(rope_utils._compute_llama3_parameters, "dtype=torch.float) / dim))")
    _require_source(rope_utils._compute_linear_scaling_rope_parameters, "inv_freq /= factor")
    return targets


@contextlib.contextmanager
def float64_transformers() -> Iterator[None]:
    """Inside: the eight families' RMSNorm, RoPE, eager attention softmax and router softmax run in
    float64 (transformers' formulas).  Applies to models already built.  Restores on exit."""
    with contextlib.ExitStack() as stack:
        for owner, attribute, replacement in patch_targets():
            stack.enter_context(mock.patch.object(owner, attribute, replacement))
        yield


def non_float64_ops(model: nn.Module, input_ids: np.ndarray) -> dict[str, set[str]]:
    """aten op -> dtypes of the non-float64 floating tensors it read or wrote during one forward.

    Empty for a float64 model under float64_transformers(): proof that nothing drops to float32.
    """
    from torch.utils._python_dispatch import TorchDispatchMode  # private, but stable since torch 2.0
    from torch.utils._pytree import tree_flatten

    found: dict[str, set[str]] = {}

    class Spy(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in tree_flatten((args, kwargs, out))[0]:
                if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64:
                    found.setdefault(str(func), set()).add(str(t.dtype))
            return out

    with Spy():
        logits(model, input_ids)
    return found


def relative_error(candidate: np.ndarray, reference: np.ndarray) -> float:
    """max |candidate - reference| / max |reference|: a relative error that does not blow up
    where single reference entries are near zero."""
    candidate, reference = np.asarray(candidate, np.float64), np.asarray(reference, np.float64)
    if candidate.shape != reference.shape:
        raise ValueError(f"shapes differ: {candidate.shape} vs {reference.shape}")
    return float(np.max(np.abs(candidate - reference)) / np.max(np.abs(reference)))
