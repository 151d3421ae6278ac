"""The decoder: attention block, FFN (dense or MoE), layer, forward.  spec/architecture.md §3–§5.

Dimension letters, used in every docstring of the package:
    T tokens in this call, S keys in the cache (previous + these T), H hidden_size,
    Nh attention heads, Nkv key/value heads, D head_dim, E experts, K experts per token,
    F expert (or MLP) width, V vocabulary.

`forward` is the entry point (`residual_stream` stops before the final norm): prefill is `forward(model, prompt_ids)`, decode is
`forward(model, [next_id], cache=cache)`.  The KV cache is an explicit value; `capture` (a dict)
receives the trace tensors of spec/format.md §2 when given.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Callable, Mapping, NamedTuple

import numpy as np

from .config import LayerSpec, ModelConfig, MoESpec
from .errors import InputError, NonFiniteError
from .kernels import NumpyKernels, default_kernels
from .ops import (apply_rope, causal_attention, rms_norm, rope_cos_sin, rope_inv_freq, router_scores,
                  sigmoid, top_k, topk_weights)
from .weights import AttentionWeights, LayerWeights, MLPWeights, Model, MoEWeights

COMPUTE_DTYPES = (np.dtype(np.float64), np.dtype(np.float32))
ATTENTION_BLOCK_BYTES = 64 * 2**20  # largest attention score block held at once


KV_MIN_SLACK = 64  # positions a KV buffer grows by, at least


class LayerKV(NamedTuple):
    """One attention layer's cache: keys, values [S, Nkv, D], and the KVStore they are views of
    (None when they are not: an empty cache, or arrays a user put in a KVCache)."""

    keys: np.ndarray | None
    values: np.ndarray | None
    store: "KVStore | None"


class KVStore:
    """One attention layer's keys and values, each in a buffer [capacity, Nkv, D] whose first
    `filled` positions are written.  A cache of length S reads read-only views of the first S.
    Appending to that cache writes in place when it is the first continuation and there is room (a
    decode loop), else into new buffers: continuing one cache twice never changes what the first
    continuation reads.  spec §6."""

    __slots__ = ("keys", "values", "filled")
    _claim = threading.Lock()  # check-and-advance of `filled`, for caches shared across threads

    def __init__(self, keys: np.ndarray, values: np.ndarray, filled: int):
        self.keys, self.values, self.filled = keys, values, filled

    def _holds(self, keys: np.ndarray, values: np.ndarray) -> bool:
        """Whether keys, values are views of this store's first positions (not arrays that merely
        have the same length: a cache rebuilt with other arrays must be read as given)."""
        return all(a.ctypes.data == buf.ctypes.data and a.strides == buf.strides and a.dtype == buf.dtype
                   for a, buf in ((keys, self.keys), (values, self.values)))

    def claim(self, past: LayerKV, T: int) -> bool:
        """Whether positions S0 .. S0+T-1 after past (S0 positions) are past's to write; if so
        they are taken."""
        S0 = past.keys.shape[0]
        with KVStore._claim:
            if self.filled != S0 or S0 + T > self.keys.shape[0] or not self._holds(past.keys, past.values):
                return False
            self.filled = S0 + T
            return True

    def view(self, S: int) -> LayerKV:
        keys, values = self.keys[:S], self.values[:S]
        keys.flags.writeable = values.flags.writeable = False  # a cache is a value
        return LayerKV(keys, values, self)


def append_kv(past: LayerKV, k: np.ndarray, v: np.ndarray, limit: int) -> LayerKV:
    """past keys, values [S0, Nkv, D], new k, v [T, Nkv, D] -> keys, values [S0+T, Nkv, D].
    spec §3.3.  New buffers: for an empty cache (a prompt), the prompt's size; for a cache that
    must grow, a quarter more room (KV_MIN_SLACK at least, `limit` positions at most), so a long
    decode copies each position a few times, not once per step."""
    S0, T = past.keys.shape[0], k.shape[0]
    S = S0 + T
    store = past.store
    if store is None or not store.claim(past, T):
        capacity = S if S0 == 0 else max(S, min(limit, S + max(KV_MIN_SLACK, S // 4)))
        store = KVStore(np.empty((capacity,) + k.shape[1:], k.dtype), np.empty((capacity,) + v.shape[1:], v.dtype), S)
        store.keys[:S0], store.values[:S0] = past.keys, past.values
    store.keys[S0:S], store.values[S0:S] = k, v
    return store.view(S)


@dataclass(frozen=True)
class KVCache:
    """Keys and values of the tokens seen so far: per layer [S, Nkv, D] (None without attention),
    and the KVStore each pair is a view of (`stores`; None for arrays given by hand)."""

    length: int
    keys: tuple[np.ndarray | None, ...]
    values: tuple[np.ndarray | None, ...]
    stores: tuple[KVStore | None, ...] = field(default=(), repr=False, compare=False)

    def __post_init__(self):
        if not self.stores:
            object.__setattr__(self, "stores", (None,) * len(self.keys))

    @staticmethod
    def empty(cfg: ModelConfig, dtype: np.dtype) -> "KVCache":
        shape = (0, cfg.num_key_value_heads, cfg.head_dim)
        kv = tuple(np.zeros(shape, dtype) if s.attention else None for s in cfg.layers)
        return KVCache(0, kv, kv)

    def layer(self, i: int) -> LayerKV:
        return LayerKV(self.keys[i], self.values[i], self.stores[i])

    @staticmethod
    def of(length: int, layers: list[LayerKV]) -> "KVCache":
        return KVCache(length, tuple(kv.keys for kv in layers), tuple(kv.values for kv in layers),
                       tuple(kv.store for kv in layers))


@dataclass(frozen=True)
class Runtime:
    """What every layer needs besides its weights: compute dtype, kernels, trace sink, progress."""

    cfg: ModelConfig
    dtype: np.dtype
    kernels: NumpyKernels
    capture: dict | None = None
    forced_routes: Mapping[int, np.ndarray] | None = None
    progress: Callable[[int, int], None] | None = None

    def record(self, name: str, value: np.ndarray) -> None:
        if self.capture is not None:
            self.capture[name] = value

    def norm(self, x: np.ndarray, weight) -> np.ndarray:
        """RMSNorm with a weight Param (spec §2.1)."""
        return rms_norm(x, weight.load(self.dtype), self.cfg.rms_norm_eps)


# ---------------------------------------------------------------------------------------------
# Attention (spec §3)


def _project(x: np.ndarray, w, bias, rt: Runtime) -> np.ndarray:
    """[T, H] -> [T, R]: x·Wᵀ (+ b)."""
    y = rt.kernels.linear(x, w)
    return y if bias is None else y + bias.load(rt.dtype)


def qkv(x: np.ndarray, w: AttentionWeights, rt: Runtime) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """[T, H] -> q [T, Nh, D], k [T, Nkv, D], v [T, Nkv, D], before RoPE.  spec §3.1–§3.2."""
    cfg, T = rt.cfg, x.shape[0]
    q, k, v = (_project(x, w.q, w.q_bias, rt), _project(x, w.k, w.k_bias, rt), _project(x, w.v, w.v_bias, rt))
    if cfg.qk_norm == "proj":  # OLMoE: RMSNorm over the whole projection
        q, k = rt.norm(q, w.q_norm), rt.norm(k, w.k_norm)
    if cfg.clip_qkv is not None:  # OLMoE as transformers runs it: clamp after the q/k norm
        q, k, v = (np.clip(t, -cfg.clip_qkv, cfg.clip_qkv) for t in (q, k, v))
    q = q.reshape(T, cfg.num_attention_heads, cfg.head_dim)
    k = k.reshape(T, cfg.num_key_value_heads, cfg.head_dim)
    v = v.reshape(T, cfg.num_key_value_heads, cfg.head_dim)
    if cfg.qk_norm == "head":  # Qwen3: RMSNorm per head over D
        q, k = rt.norm(q, w.q_norm), rt.norm(k, w.k_norm)
    return q, k, v


def attention(x: np.ndarray, w: AttentionWeights, positions: np.ndarray, rope: tuple[np.ndarray, np.ndarray],
              past: LayerKV, rt: Runtime) -> tuple[np.ndarray, LayerKV]:
    """[T, H] normed input, the layer's cache of S0 positions -> output [T, H], the cache of
    S = S0 + T positions.  spec §3."""
    q, k, v = qkv(x, w, rt)
    cos, sin = rope
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    kv = append_kv(past, k, v, rt.cfg.max_position_embeddings)
    keys, values = kv.keys, kv.values
    k_positions = np.arange(keys.shape[0])
    # Queries in blocks, so the [Nh, block, S] score matrix stays bounded on long prompts (§6).
    block = max(1, ATTENTION_BLOCK_BYTES // (q.shape[1] * keys.shape[0] * q.dtype.itemsize))
    out = np.concatenate([causal_attention(q[lo:lo + block], keys, values, positions[lo:lo + block], k_positions)
                          for lo in range(0, q.shape[0], block)])  # [T, Nh, D]
    out = out.reshape(x.shape[0], rt.cfg.num_attention_heads * rt.cfg.head_dim)
    return _project(out, w.o, w.o_bias, rt), kv


# ---------------------------------------------------------------------------------------------
# FFN (spec §4)


def mlp(x: np.ndarray, w: MLPWeights, rt: Runtime) -> np.ndarray:
    """[T, H] -> [T, H]: down(silu(gate·x) ⊙ up·x).  spec §4.1."""
    return rt.kernels.expert(x, w)


def route(x: np.ndarray, w: MoEWeights, spec: MoESpec, rt: Runtime,
          forced_ids: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """[T, H] -> router_logits [T, E], scores [T, E], topk_ids [T, K], topk_weights [T, K].  spec §4.2."""
    router_logits = rt.kernels.linear(x, w.router)
    scores = router_scores(router_logits, spec.scoring)
    if forced_ids is not None:
        topk_ids = forced_ids
    else:
        choice = scores if w.selection_bias is None else scores + w.selection_bias.load(rt.dtype)
        topk_ids = top_k(choice, spec.top_k)
    weights = topk_weights(scores, topk_ids, spec.norm_topk_prob, spec.routed_scaling_factor)
    return router_logits, scores, topk_ids, weights


def moe(x: np.ndarray, w: MoEWeights, spec: MoESpec, rt: Runtime, i: int) -> np.ndarray:
    """[T, H] -> [T, H]: Σ_k topk_weights_k · expert_{topk_ids_k}(x) (+ gated shared expert).  spec §4.2."""
    forced = None if rt.forced_routes is None else rt.forced_routes.get(i)
    if forced is not None:
        forced = check_routes(forced, x.shape[0], spec, i)
    router_logits, scores, topk_ids, weights = route(x, w, spec, rt, forced)
    if not np.isfinite(router_logits).all() and np.isfinite(x).all():
        # from the router's own weights: top-k would give a NaN score weight 0 and drop experts unseen (a NaN
        # input instead reaches the logits through the experts, where the caller names its first stage)
        raise NonFiniteError(f"router_logits.{i} hold NaN/Inf from a finite input: layer {i}'s router weights "
                             "(mlp.gate.weight) are not finite")
    rt.record(f"router_logits.{i}", router_logits)
    rt.record(f"router_scores.{i}", scores)
    rt.record(f"topk_ids.{i}", topk_ids)
    rt.record(f"topk_weights.{i}", weights)
    y = rt.kernels.experts_topk(x, w.experts, topk_ids, weights)  # the routed sum, step 5
    if w.shared is not None:
        shared = mlp(x, w.shared, rt)
        if w.shared_gate is not None:
            shared = sigmoid(rt.kernels.linear(x, w.shared_gate)) * shared  # [T, 1] gate
        y = y + shared
    return y


def check_forced_layers(forced_routes: Mapping | None, cfg: ModelConfig) -> None:
    """Every key of forced_routes must name an MoE layer: a forced route that silently applies to
    nothing would make a replay look like agreement."""
    if not forced_routes:
        return
    moe_layers = [i for i, s in enumerate(cfg.layers) if s.moe is not None]
    for key in forced_routes:
        if isinstance(key, bool) or not isinstance(key, (int, np.integer)) or int(key) not in moe_layers:
            raise InputError(f"forced routes name layer {key!r}, which is not an MoE layer of this model "
                             f"(MoE layers: {moe_layers})")


def route_problem(ids: np.ndarray, T: int, spec: MoESpec) -> str | None:
    """What makes topk_ids [T, K] invalid for an MoE layer of `spec` (spec §4.2), or None: integer
    [T, K], ids in 0 … E−1, distinct within a token.  The one definition the forward pass (forced
    routes) and the checker (a candidate's routes) both apply."""
    if ids.shape != (T, spec.top_k) or not np.issubdtype(ids.dtype, np.integer):
        return f"expected integer [T={T}, K={spec.top_k}], found {ids.dtype} {list(ids.shape)}"
    if ids.size and (ids.min() < 0 or ids.max() >= spec.num_experts):
        return f"expert ids must be in 0..{spec.num_experts - 1}, found {int(ids.min())}..{int(ids.max())}"
    if spec.top_k > 1 and np.any(np.diff(np.sort(ids, axis=1), axis=1) == 0):
        return "a token names the same expert twice"
    return None


def check_routes(ids: np.ndarray, T: int, spec: MoESpec, i: int) -> np.ndarray:
    """Validate forced topk_ids [T, K] for layer i (a candidate's routes, spec §4.2)."""
    ids = np.asarray(ids)
    problem = route_problem(ids, T, spec)
    if problem is not None:
        raise InputError(f"forced routes for layer {i}: {problem}")
    return ids.astype(np.int64)


# ---------------------------------------------------------------------------------------------
# Layer and model (spec §5)


def layer(h: np.ndarray, w: LayerWeights, spec: LayerSpec, i: int, positions: np.ndarray,
          rope: tuple[np.ndarray, np.ndarray], past: LayerKV, rt: Runtime) -> tuple[np.ndarray, LayerKV]:
    """[T, H] residual, the layer's cache -> [T, H], its cache extended by T.  spec §5.1:
    h += Attn(input_layernorm(h)) when the layer has attention; h += FFN(post_attention_layernorm(h))."""
    kv = past
    if spec.attention:
        a, kv = attention(rt.norm(h, w.attention.norm), w.attention, positions, rope, past, rt)
        rt.record(f"attn_out.{i}", a)
        h = h + a
    x = rt.norm(h, w.ffn_norm)
    f = mlp(x, w.ffn, rt) if spec.moe is None else moe(x, w.ffn, spec.moe, rt, i)
    rt.record(f"ffn_out.{i}", f)
    h = h + f
    rt.record(f"hidden.{i}", h)
    return h, kv


def check_input_ids(input_ids, cfg: ModelConfig, past: int) -> np.ndarray:
    """input ids -> int64 [T], or InputError naming the offending token / length."""
    ids = np.asarray(input_ids)
    if ids.ndim != 1 or (ids.size and not np.issubdtype(ids.dtype, np.integer)):
        raise InputError(f"input_ids must be a 1-D list of integer token ids, found {ids.dtype} {list(ids.shape)}")
    if ids.size == 0:
        raise InputError("input_ids is empty: give at least one token")
    bad = np.nonzero((ids < 0) | (ids >= cfg.vocab_size))[0]
    if bad.size:
        raise InputError(f"token id {int(ids[bad[0]])} at position {int(bad[0])} is out of range: "
                         f"vocab_size={cfg.vocab_size} (ids 0..{cfg.vocab_size - 1})")
    if past + ids.size > cfg.max_position_embeddings:
        raise InputError(f"sequence of {past + ids.size} tokens ({past} cached + {ids.size} new) is longer "
                         f"than the model allows: max_position_embeddings={cfg.max_position_embeddings}")
    return ids.astype(np.int64)


def forward(model: Model, input_ids, *, cache: KVCache | None = None, dtype=np.float64,
            capture: dict | None = None, kernels: NumpyKernels | None = None,
            forced_routes: Mapping[int, np.ndarray] | None = None,
            progress: Callable[[int, int], None] | None = None) -> tuple[np.ndarray, KVCache]:
    """input_ids [T] -> logits [T, V] in `dtype`, and the cache extended by these T tokens.  spec §5.2.

    `capture`: a dict that receives the trace tensors (spec/format.md §2).  `forced_routes`:
    {layer: topk_ids [T, K]} replaces the router's choice there (the checker's forced routes).
    `progress(done, total)` is called after each layer.
    """
    h, cache, rt = _decode(model, input_ids, cache, dtype, capture, kernels, forced_routes, progress)
    h = rt.norm(h, model.weights.norm)  # spec §5.2 (3)
    rt.record("final_norm", h)
    logits = rt.kernels.linear(h, model.weights.lm_head)  # (4)
    rt.record("logits", logits)
    return logits, cache


def residual_stream(model: Model, input_ids, *, dtype=np.float64, capture: dict | None = None,
                    kernels: NumpyKernels | None = None,
                    progress: Callable[[int, int], None] | None = None) -> np.ndarray:
    """input_ids [T] -> the residual h [T, H] after the last layer, before the final norm: spec §5.2
    steps 1–2 on an empty cache, without the LM head ([T, V], the largest activation) — what
    calibration reads.  `capture` receives the same trace tensors as forward's, up to hidden.{L-1}."""
    return _decode(model, input_ids, None, dtype, capture, kernels, None, progress)[0]


def _decode(model, input_ids, cache, dtype, capture, kernels, forced_routes, progress):
    """spec §5.2 steps 1–2: (h [T, H] after the last layer, the extended cache, the Runtime)."""
    cfg, w = model.config, model.weights
    dtype = np.dtype(dtype)
    if dtype not in COMPUTE_DTYPES:
        raise InputError(f"dtype={dtype} is not a compute dtype: use float64 or float32")
    cache = cache or KVCache.empty(cfg, dtype)
    if any(k is not None and k.dtype != dtype for k in cache.keys):
        raise InputError(f"the KV cache holds {next(k.dtype for k in cache.keys if k is not None)}, "
                         f"this call computes in {dtype}")
    ids = check_input_ids(input_ids, cfg, cache.length)
    check_forced_layers(forced_routes, cfg)
    rt = Runtime(cfg, dtype, kernels or default_kernels(), capture, forced_routes, progress)
    positions = np.arange(cache.length, cache.length + ids.size)
    rope = rope_cos_sin(positions, rope_inv_freq(cfg.rope, cfg.head_dim, dtype))
    rt.record("input_ids", ids)
    h = w.embed.take(ids, dtype)  # spec §5.2 (1)
    rt.record("embeddings", h)
    kv = [cache.layer(i) for i in range(len(cfg.layers))]
    for i, (lw, spec) in enumerate(zip(w.layers, cfg.layers)):  # (2)
        h, kv[i] = layer(h, lw, spec, i, positions, rope, kv[i], rt)
        if progress is not None:
            progress(i + 1, len(cfg.layers))
    return h, KVCache.of(cache.length + ids.size, kv), rt
