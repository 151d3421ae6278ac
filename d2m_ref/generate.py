"""Text generation over `forward` with the KV cache: prefill once, then one token at a time.

Sampling: temperature 0 (or None) is greedy — argmax, the lowest id on ties; otherwise
softmax(logits / temperature) restricted to the nucleus (the fewest most likely tokens whose
probability reaches top_p), drawn with a NumPy Generator seeded by `seed` (used only when
sampling).  Along the way it counts how often each expert of each MoE layer was chosen (prefill
and decode tokens) and times the two phases.  Dimension letters as in d2m_ref/model.py.

`forward` is the oracle and hands back NaN/Inf as it computes them; generation stops at the first
forward whose logits are not all finite (NonFiniteError), naming the first non-finite stage of
its capture, instead of sampling a plausible-looking token from them.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Iterable

import numpy as np

from .errors import InputError, NonFiniteError
from .model import check_input_ids, forward
from .progress import Progress
from .weights import Model

STOP_REASONS = ("max_new_tokens", "eos", "max_position_embeddings")


@dataclass(frozen=True)
class Generation:
    """The result of `generate`."""

    prompt_ids: np.ndarray  # [P] int64
    new_ids: np.ndarray  # [N] int64, the continuation (an EOS that stopped it included)
    stop_reason: str  # one of STOP_REASONS
    expert_counts: dict[int, np.ndarray]  # MoE layer index -> [E] int64 times each expert was chosen
    tokens_processed: int  # tokens that went through forward: P + decode_steps
    prefill_seconds: float  # the forward over the prompt
    decode_seconds: float  # everything after it: sampling and the one-token forwards
    decode_steps: int  # one-token forwards (the last sampled token is never fed back)


# ---------------------------------------------------------------------------------------------
# Sampling


def greedy(logits: np.ndarray) -> int:
    """[V] -> the id of the largest logit; on ties the lowest id (np.argmax takes the first)."""
    return int(np.argmax(logits))


def nucleus_size(sorted_probs: np.ndarray, top_p: float) -> int:
    """[V] probabilities in descending order -> how many of the first ones make the nucleus:
    the fewest whose sum reaches top_p (at least 1; all of them if rounding keeps the sum < top_p)."""
    n = int(np.searchsorted(np.cumsum(sorted_probs), top_p, side="left")) + 1
    return min(n, sorted_probs.size)


def sample(logits: np.ndarray, temperature: float | None, top_p: float, rng: np.random.Generator | None) -> int:
    """[V] -> one token id.  spec: greedy when temperature is 0/None (rng unused), else nucleus
    sampling of softmax(logits / temperature) in float64 (so float32 and float64 runs share the
    sampler), computed as exp((logits - max) / temperature): the exponent is <= 0, so a tiny
    temperature (1e-310) cannot overflow to inf - inf = NaN; it tends to greedy, as it should."""
    if not temperature:
        return greedy(logits)
    order = np.argsort(-logits, kind="stable")  # descending, lower id first on ties, as greedy
    ranked = logits[order].astype(np.float64)
    with np.errstate(over="ignore"):  # (l - max) / T -> -inf: probability 0
        probs = np.exp((ranked - ranked[0]) / temperature)
    probs /= probs.sum()
    n = nucleus_size(probs, top_p)
    kept = np.cumsum(probs[:n])
    j = int(np.searchsorted(kept, rng.random() * kept[-1], side="right"))
    return int(order[min(j, n - 1)])


def check_sampling(max_new_tokens: int, temperature: float | None, top_p: float, seed: int | None = None) -> None:
    """InputError naming the bad setting (the seed only when sampling: greedy never uses it)."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 0:
        raise InputError(f"max_new_tokens={max_new_tokens!r} must be an integer >= 0")
    if temperature is not None and not (math.isfinite(temperature) and temperature >= 0):
        raise InputError(f"temperature={temperature!r} must be a finite number >= 0 (0: greedy)")
    if not (math.isfinite(top_p) and 0 < top_p <= 1):
        raise InputError(f"top_p={top_p!r} must be in (0, 1]")
    if temperature and seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer))
                                             or seed < 0):
        raise InputError(f"seed={seed!r} must be an integer >= 0 (it seeds the sampler)")


# ---------------------------------------------------------------------------------------------
# Non-finite values

# What each capture name (spec/format.md §2) holds, for messages; {i} is the layer.
STAGES = {"input_ids": "input token ids", "embeddings": "token embeddings", "attn_out": "layer {i} attention output",
          "router_logits": "layer {i} router logits", "router_scores": "layer {i} router scores",
          "topk_ids": "layer {i} chosen experts", "topk_weights": "layer {i} routing weights",
          "ffn_out": "layer {i} FFN output", "hidden": "layer {i} residual stream", "final_norm": "final norm output",
          "logits": "logits"}


def first_non_finite(capture: dict[str, np.ndarray]) -> str | None:
    """'ffn_out.0 (layer 0 FFN output)': the first float tensor of a capture dict holding NaN or Inf
    (the dict is filled in forward order, so this is where they appeared), or None."""
    for name, tensor in capture.items():
        if tensor.dtype.kind in "fc" and not np.isfinite(tensor).all():
            stage, _, i = name.partition(".")
            return f"{name} ({STAGES.get(stage, stage).format(i=i)})"
    return None


def check_finite(logits: np.ndarray, capture: dict[str, np.ndarray], where: str) -> None:
    """NonFiniteError unless logits [T, V] are all finite; `capture` is that forward's capture dict,
    `where` says which forward ('in the prefill', 'at decode step 3')."""
    if np.isfinite(logits).all():
        return
    stage = first_non_finite(capture) or "logits"
    raise NonFiniteError(f"non-finite values {where}: first in {stage} — the weights hold NaN/Inf, "
                         f"or a value overflowed {logits.dtype}")


# ---------------------------------------------------------------------------------------------
# The loop


def moe_layers(model: Model) -> list[int]:
    """Indices of the MoE layers."""
    return [i for i, spec in enumerate(model.config.layers) if spec.moe is not None]


def count_experts(counts: dict[int, np.ndarray], capture: dict) -> None:
    """Add each MoE layer's topk_ids [T, K] of one forward (its capture dict) to counts[layer] [E]."""
    for i, c in counts.items():
        c += np.bincount(capture[f"topk_ids.{i}"].ravel(), minlength=c.size)


def generate(model: Model, prompt_ids, *, max_new_tokens: int = 32, temperature: float | None = None,
             top_p: float = 1.0, seed: int | None = None, eos_ids: Iterable[int] = (),
             dtype=np.float64, progress: Progress | None = None, kernels=None) -> Generation:
    """prompt ids [P] -> Generation.  Stops after max_new_tokens, after an id in eos_ids, or when
    the sequence fills max_position_embeddings (the next token would have no position)."""
    check_sampling(max_new_tokens, temperature, top_p, seed)
    prompt = check_input_ids(prompt_ids, model.config, 0)
    eos = frozenset(int(e) for e in eos_ids)
    rng = np.random.default_rng(seed) if temperature else None
    try:
        return _loop(model, prompt, max_new_tokens, temperature, top_p, rng, eos, dtype, progress, kernels)
    finally:
        if progress:
            progress.close()


def _loop(model: Model, prompt: np.ndarray, max_new_tokens: int, temperature: float | None, top_p: float,
          rng: np.random.Generator | None, eos: frozenset, dtype, progress: Progress | None,
          kernels) -> Generation:
    """The prefill, then sample / stop checks / one-token forward until a stop (arguments checked)."""
    cfg = model.config
    counts = {i: np.zeros(cfg.layers[i].moe.num_experts, np.int64) for i in moe_layers(model)}
    start = time.perf_counter()
    capture: dict = {}
    logits, cache = forward(model, prompt, dtype=dtype, capture=capture, kernels=kernels,
                            progress=progress.stage("prefill", "layers") if progress else None)
    check_finite(logits, capture, "in the prefill")
    count_experts(counts, capture)
    prefill_seconds = time.perf_counter() - start

    start = time.perf_counter()
    on_token = progress.stage("decode", "tokens") if progress and max_new_tokens else None
    new: list[int] = []
    steps = 0
    reason = "max_new_tokens"
    while len(new) < max_new_tokens:
        if cache.length >= cfg.max_position_embeddings:  # the next token would sit at position max_pos
            reason = "max_position_embeddings"
            break
        token = sample(logits[-1], temperature, top_p, rng)
        new.append(token)
        if on_token:
            on_token(len(new), max_new_tokens)
        if token in eos:
            reason = "eos"
            break
        if len(new) == max_new_tokens:
            break
        capture = {}
        logits, cache = forward(model, [token], cache=cache, dtype=dtype, capture=capture, kernels=kernels)
        steps += 1
        check_finite(logits, capture, f"at decode step {steps}")
        count_experts(counts, capture)
    decode_seconds = time.perf_counter() - start
    return Generation(prompt_ids=prompt, new_ids=np.asarray(new, dtype=np.int64), stop_reason=reason,
                      expert_counts=counts, tokens_processed=int(prompt.size) + steps,
                      prefill_seconds=prefill_seconds, decode_seconds=decode_seconds, decode_steps=steps)
