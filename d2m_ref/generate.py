"""Text generation over `forward` with the KV cache: prefill once, then one token at a time.

Sampling: temperature 0 (or None) is greedy — argmax, the lowest id on ties; otherwise
softmax(logits / temperature) restricted to the nucleus (the fewest most likely tokens whose
probability reaches top_p), drawn with a NumPy Generator seeded by `seed`.  Along the way it
counts how often each expert of each MoE layer was chosen (prefill and decode tokens) and times
the two phases.  Dimension letters as in d2m_ref/model.py.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Iterable

import numpy as np

from .errors import InputError
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


def sample(logits: np.ndarray, temperature: float | None, top_p: float, rng: np.random.Generator) -> int:
    """[V] -> one token id.  spec: greedy when temperature is 0/None, else nucleus sampling of
    softmax(logits / temperature) in float64 (so float32 and float64 runs share the sampler)."""
    if not temperature:
        return greedy(logits)
    order = np.argsort(-logits, kind="stable")  # descending, lower id first on ties, as greedy
    scaled = logits[order].astype(np.float64) / temperature
    probs = np.exp(scaled - scaled[0])
    probs /= probs.sum()
    n = nucleus_size(probs, top_p)
    kept = np.cumsum(probs[:n])
    j = int(np.searchsorted(kept, rng.random() * kept[-1], side="right"))
    return int(order[min(j, n - 1)])


def check_sampling(max_new_tokens: int, temperature: float | None, top_p: float) -> None:
    """InputError naming the bad setting."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 0:
        raise InputError(f"max_new_tokens={max_new_tokens!r} must be an integer >= 0")
    if temperature is not None and not (math.isfinite(temperature) and temperature >= 0):
        raise InputError(f"temperature={temperature!r} must be a finite number >= 0 (0: greedy)")
    if not (math.isfinite(top_p) and 0 < top_p <= 1):
        raise InputError(f"top_p={top_p!r} must be in (0, 1]")


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
             dtype=np.float64, progress: Progress | None = None) -> Generation:
    """prompt ids [P] -> Generation.  Stops after max_new_tokens, after an id in eos_ids, or when
    the sequence fills max_position_embeddings (the next token would have no position)."""
    check_sampling(max_new_tokens, temperature, top_p)
    prompt = check_input_ids(prompt_ids, model.config, 0)
    eos = frozenset(int(e) for e in eos_ids)
    rng = np.random.default_rng(seed)
    try:
        return _loop(model, prompt, max_new_tokens, temperature, top_p, rng, eos, dtype, progress)
    finally:
        if progress:
            progress.close()


def _loop(model: Model, prompt: np.ndarray, max_new_tokens: int, temperature: float | None, top_p: float,
          rng: np.random.Generator, eos: frozenset, dtype, progress: Progress | None) -> Generation:
    """The prefill, then sample / stop checks / one-token forward until a stop (arguments checked)."""
    cfg = model.config
    counts = {i: np.zeros(cfg.layers[i].moe.num_experts, np.int64) for i in moe_layers(model)}
    start = time.perf_counter()
    capture: dict = {}
    logits, cache = forward(model, prompt, dtype=dtype, capture=capture,
                            progress=progress.stage("prefill", "layers") if progress else None)
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
        logits, cache = forward(model, [token], cache=cache, dtype=dtype, capture=capture)
        count_experts(counts, capture)
        steps += 1
    decode_seconds = time.perf_counter() - start
    return Generation(prompt_ids=prompt, new_ids=np.asarray(new, dtype=np.int64), stop_reason=reason,
                      expert_counts=counts, tokens_processed=int(prompt.size) + steps,
                      prefill_seconds=prefill_seconds, decode_seconds=decode_seconds, decode_steps=steps)
