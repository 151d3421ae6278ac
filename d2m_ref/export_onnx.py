"""`python -m d2m_ref.export_onnx`: the forward pass of spec/architecture.md as one static ONNX graph.

    python -m d2m_ref.export_onnx --weights W [--config C] --out model.onnx [--dtype float32|float16]
                                  [--outputs trace|logits] [--opset N] [--force]

The graph (spec/onnx.md) takes `input_ids` int64 [T] (T dynamic, batch 1: the trace contract's
shape) and gives the trace tensors of spec/format.md §2 as graph outputs under their trace names
(`--outputs trace`, the default), or `logits` only.  It is built with the `onnx` package from
d2m_ref's own Model — any model d2m_ref runs, every family and Dense2MoE layer plan — with
standard ONNX operators only, so TensorRT, ONNX Runtime or any other ONNX backend can run it and
`python -m d2m_ref.check` can judge what it computed.

Weights are written one Param at a time to `<out>.data` beside the graph (ONNX external data,
always; spec/onnx.md §6): memory stays one weight, and a model of any size fits the protobuf
limit.  Both files are written to temporary names and renamed; an existing file is kept unless
--force.  "spec §N" below is spec/architecture.md; dimension letters as in d2m_ref/model.py.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Mapping

import numpy as np

from . import SPEC_VERSION, __version__
from .config import ModelConfig, MoESpec
from .errors import InputError, WeightsError
from .files import atomic_write, atomic_write_bytes, check_output, refuse_existing, refuse_input
from .ops import rope_inv_freq
from .weights import AttentionWeights, LayerWeights, MLPWeights, Model, MoEWeights, Param, load_model

try:  # the exporter's one dependency, named when an export is asked for without it
    import onnx
    from onnx import helper, numpy_helper
except ImportError:  # pragma: no cover
    onnx = None

PROG = "python -m d2m_ref.export_onnx"
EXPORT_DTYPES = {"float32": np.dtype(np.float32), "float16": np.dtype(np.float16)}
OUTPUTS = ("trace", "logits")
DEFAULT_OPSET = 17  # what TensorRT 8.6 (JetPack 6.0) parses; newer TensorRT parses it too
MIN_OPSET = 13  # Squeeze/Unsqueeze/ReduceSum/Slice take axes as inputs, Softmax is over one axis
ALIGN = 4096  # each weight starts on a page boundary of the data file, so a runtime may map it
F32, I64, BOOL = np.dtype(np.float32), np.dtype(np.int64), np.dtype(np.bool_)
ONNX_INSTALL = "pip install onnx==1.23.2"


@dataclass(frozen=True)
class Bugs:
    """Deliberate errors, for the tests that show python -m d2m_ref.check catches them in the right
    layer (tests/test_export_onnx.py).  The command line never sets one."""

    rope_interleaved: frozenset[int] = frozenset()  # layers whose RoPE rotates interleaved pairs (GPT-J)
    # (layer, expert) -> [H] factor on that expert's input: a norm weight that was not folded (spec/convert.md §2.3)
    expert_input_scale: Mapping[tuple[int, int], np.ndarray] = field(default_factory=dict)
    shared_gate_dropped: frozenset[int] = frozenset()  # layers whose shared expert loses its sigmoid gate


# ---------------------------------------------------------------------------------------------
# The graph under construction


class Graph:
    """Nodes, initializers and outputs of the graph being built, with each tensor's dtype.

    `act` is the export dtype (activations and weights); float32 islands are cast explicitly.
    Weights stream to `data` (the external data file, named `location` relative to the graph);
    small constants stay inline.  `mode` 'trace' makes every trace tensor a graph output,
    'logits' only the logits."""

    def __init__(self, act: np.dtype, data: BinaryIO, location: str, mode: str):
        self.act, self.data, self.location, self.mode = np.dtype(act), data, location, mode
        self.nodes: list = []
        self.initializers: list = []
        self.inputs: list = []
        self.outputs: list = []
        self.dtypes: dict[str, np.dtype] = {}
        self.offset = 0
        self._consts: dict[tuple, str] = {}
        self._params: dict[tuple[int, str], str] = {}
        self._count = 0
        self._taken: set[str] = set()  # every name given out, renamed ones included

    def fresh(self, hint: str) -> str:
        """A new tensor name: the hint, made unique."""
        name = hint
        while name in self._taken:
            self._count += 1
            name = f"{hint}_{self._count}"
        self._taken.add(name)
        return name

    def input(self, name: str, dtype: np.dtype, shape: list) -> str:
        self._taken.add(name)
        self.dtypes[name] = np.dtype(dtype)
        self.inputs.append(helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(np.dtype(dtype)), shape))
        return name

    def op(self, op_type: str, inputs: list[str], hint: str | None = None, outputs: int = 1, **attrs):
        """Append one node; -> its output name (or names, `outputs` > 1)."""
        names = [self.fresh(hint or op_type.lower()) for _ in range(outputs)]
        for name, dtype in zip(names, self._result_dtypes(op_type, inputs, attrs, outputs)):
            self.dtypes[name] = dtype
        if op_type == "Cast":
            attrs["to"] = helper.np_dtype_to_tensor_dtype(np.dtype(attrs["to"]))
        self.nodes.append(helper.make_node(op_type, inputs, names, name=f"{names[0]}/{op_type}", **attrs))
        return names[0] if outputs == 1 else names

    def _result_dtypes(self, op_type: str, inputs: list[str], attrs: dict, outputs: int) -> list[np.dtype]:
        if op_type == "Cast":
            return [np.dtype(attrs["to"])]
        if op_type == "Shape":
            return [I64]
        if op_type in ("Equal", "Greater", "Less"):
            return [BOOL]
        if op_type == "Where":
            return [self.dtypes[inputs[1]]]
        if op_type == "ConstantOfShape":
            return [numpy_helper.to_array(attrs["value"]).dtype]
        if op_type == "TopK":
            return [self.dtypes[inputs[0]], I64]
        return [self.dtypes[inputs[0]]] * outputs

    def rename_last(self, old: str, new: str) -> str:
        """Give an output of the last node another name (nothing has read it yet)."""
        node = self.nodes[-1]
        node.output[list(node.output).index(old)] = new
        self._taken.add(new)
        if node.output[0] == new:
            node.name = f"{new}/{node.op_type}"
        self.dtypes[new] = self.dtypes.pop(old)
        return new

    def const(self, value, dtype) -> str:
        """A small constant (inline initializer), shared by every use of the same value."""
        array = np.asarray(value, dtype=dtype)
        key = (array.dtype.str, array.shape, array.tobytes())
        if key not in self._consts:
            name = self.fresh("const")
            self.initializers.append(numpy_helper.from_array(array, name))
            self.dtypes[name] = array.dtype
            self._consts[key] = name
        return self._consts[key]

    def param(self, p: Param) -> str:
        """A weight as an initializer in the export dtype, written to the data file now (spec/onnx.md §6).
        The same Param twice (the tied LM head) is one initializer."""
        key = (id(p), self.act.str)
        if key not in self._params:
            self._params[key] = self._write_weight(p)
        return self._params[key]

    def _write_weight(self, p: Param) -> str:
        array = export_array(p, self.act)
        name = self.fresh(re.sub(r"[^A-Za-z0-9_.]", "_", p.name))
        pad = -self.offset % ALIGN
        self.data.write(b"\0" * pad)
        data = array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()
        self.data.write(data)
        tensor = onnx.TensorProto()
        tensor.name = name
        tensor.data_type = helper.np_dtype_to_tensor_dtype(array.dtype)
        tensor.dims.extend(array.shape)
        tensor.data_location = onnx.TensorProto.EXTERNAL
        for key, value in (("location", self.location), ("offset", self.offset + pad), ("length", len(data))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, str(value)
        self.offset += pad + len(data)
        self.initializers.append(tensor)
        self.dtypes[name] = array.dtype
        return name

    def cast(self, x: str, dtype) -> str:
        """x in `dtype` (no node when it is already)."""
        return x if self.dtypes[x] == np.dtype(dtype) else self.op("Cast", [x], f"{x}.{np.dtype(dtype).name}", to=dtype)

    def trace(self, x: str, name: str, shape: list) -> str:
        """x, just made by the last node, as the trace tensor `name` (spec/format.md §2): renamed, or
        for a float32 island of a float16 export a Cast to `name` beside it (trace outputs only).
        A graph output when the mode asks for it.  -> the name to read x by from here on."""
        wanted = self.mode == "trace" or name == "logits"
        floating = self.dtypes[x].kind == "f"
        if floating and self.dtypes[x] != self.act:
            if wanted:
                self.op("Cast", [x], name, to=self.act)
        else:
            x = self.rename_last(x, name)
        if wanted:
            dtype = self.act if floating else self.dtypes[x]
            self.outputs.append(helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(dtype), shape))
        return x


def export_array(p: Param, dtype: np.dtype) -> np.ndarray:
    """A weight in the export dtype, rounded once from its storage: F64 through float64, everything
    else through float32 (which holds F32, F16 and BF16 exactly).  A value beyond the export dtype's
    range is an error naming the weight, never an Inf in the graph."""
    source = p.load(np.float64 if p.storage == "F64" else np.float32)
    with np.errstate(over="ignore"):  # reported below, by name
        array = source.astype(dtype)
    overflow = np.isfinite(source) & ~np.isfinite(array)
    if overflow.any():
        raise WeightsError(f"{p.name}: |value| up to {float(np.max(np.abs(source[overflow]))):.6g} does not fit "
                           f"{np.dtype(dtype).name} (at most {float(np.finfo(dtype).max):.6g}); export --dtype float32")
    return array


# ---------------------------------------------------------------------------------------------
# Building blocks (spec/architecture.md §2; spec/onnx.md §2)


def linear(g: Graph, x: str, w: Param, bias: Param | None = None, hint: str = "linear") -> str:
    """[T, C], weight [R, C] (+ bias [R]) -> [T, R]: Gemm(x, W, b, transB=1), the weight in its
    checkpoint layout.  spec §3.1."""
    inputs = [x, g.param(w)] + ([g.param(bias)] if bias is not None else [])
    return g.op("Gemm", inputs, hint, transB=1)


def rms_norm(g: Graph, x: str, w: Param, eps: float, hint: str) -> str:
    """[..., N], weight [N] -> [..., N]: x / sqrt(mean(x²) + eps) ⊙ w, in float32.  spec §2.1.
    The mean as the reference takes it (sum, then / N); ReduceSum takes its axes the same way in
    every opset from 13 on (ReduceMean changed at 18)."""
    x32 = g.cast(x, F32)
    n = w.shape[0]
    square_sum = g.op("ReduceSum", [g.op("Mul", [x32, x32], f"{hint}.sq"), g.const([-1], I64)], f"{hint}.sum",
                      keepdims=1)
    variance = g.op("Div", [square_sum, g.const(n, F32)], f"{hint}.var")
    rms = g.op("Sqrt", [g.op("Add", [variance, g.const(eps, F32)], f"{hint}.var_eps")], f"{hint}.rms")
    y = g.op("Mul", [g.op("Div", [x32, rms], f"{hint}.unit"), g.cast(g.param(w), F32)], f"{hint}.out32")
    return g.cast(y, g.act)


def positions_and_mask(g: Graph, ids: str) -> tuple[str, str]:
    """input_ids [T] -> positions [T] int64 (0 … T−1: a prompt on an empty cache, spec §5.2) and
    future [T, T] bool, true where the key comes after the query (spec §3.4's −∞ entries)."""
    T = g.op("Gather", [g.op("Shape", [ids], "T_shape"), g.const(0, I64)], "T", axis=0)
    positions = g.op("Range", [g.const(0, I64), T, g.const(1, I64)], "positions")
    keys = g.op("Unsqueeze", [positions, g.const([0], I64)], "key_positions")  # [1, T]
    queries = g.op("Unsqueeze", [positions, g.const([1], I64)], "query_positions")  # [T, 1]
    return positions, g.op("Greater", [keys, queries], "future")


def rope_tables(g: Graph, cfg: ModelConfig, positions: str, interleaved: bool = False) -> tuple[str, str]:
    """positions [T] int64 -> cos, sin [T, 1, D] in the export dtype, from float32 angles p·inv_freq
    (inv_freq [D/2] computed in float64, rounded once to float32), each half repeated.  spec §2.3.
    `interleaved` (Bugs.rope_interleaved): each angle repeated in place instead, the GPT-J layout."""
    hint = "rope_pairs" if interleaved else "rope"
    inv_freq = g.const(rope_inv_freq(cfg.rope, cfg.head_dim, np.float64).astype(np.float32), F32)
    p = g.op("Unsqueeze", [g.cast(positions, F32), g.const([1], I64)], f"{hint}.positions")  # [T, 1]
    angles = g.op("Mul", [p, inv_freq], f"{hint}.angles")  # [T, D/2]
    if interleaved:  # a0 a0 a1 a1 ...
        angles = g.op("Unsqueeze", [angles, g.const([2], I64)], f"{hint}.angles3")
        angles = g.op("Reshape", [g.op("Concat", [angles, angles], f"{hint}.pairs", axis=2),
                                  g.const([0, cfg.head_dim], I64)], f"{hint}.angles_full")
    else:  # a0 a1 ... a0 a1 ...
        angles = g.op("Concat", [angles, angles], f"{hint}.angles_full", axis=1)  # [T, D]
    return tuple(g.op("Unsqueeze", [g.cast(g.op(f, [angles], f"{hint}.{f.lower()}32"), g.act), g.const([1], I64)],
                      f"{hint}.{f.lower()}") for f in ("Cos", "Sin"))


def rotate_half(g: Graph, x: str, D: int, hint: str) -> str:
    """[T, N, D] -> [T, N, D]: (x₁, x₂) -> (−x₂, x₁), halves of the last axis.  spec §2.3."""
    axis = g.const([2], I64)
    x1 = g.op("Slice", [x, g.const([0], I64), g.const([D // 2], I64), axis], f"{hint}.x1")
    x2 = g.op("Slice", [x, g.const([D // 2], I64), g.const([D], I64), axis], f"{hint}.x2")
    return g.op("Concat", [g.op("Neg", [x2], f"{hint}.neg_x2"), x1], f"{hint}.rotated", axis=2)


def rotate_pairs(g: Graph, x: str, D: int, hint: str) -> str:
    """Bugs.rope_interleaved: [T, N, D] -> [T, N, D]: each pair (x₂ᵢ, x₂ᵢ₊₁) -> (−x₂ᵢ₊₁, x₂ᵢ)."""
    pairs = g.op("Reshape", [x, g.const([0, 0, D // 2, 2], I64)], f"{hint}.pairs")
    axis = g.const([3], I64)
    even = g.op("Slice", [pairs, g.const([0], I64), g.const([1], I64), axis], f"{hint}.even")
    odd = g.op("Slice", [pairs, g.const([1], I64), g.const([2], I64), axis], f"{hint}.odd")
    rotated = g.op("Concat", [g.op("Neg", [odd], f"{hint}.neg_odd"), even], f"{hint}.rotated_pairs", axis=3)
    return g.op("Reshape", [rotated, g.const([0, 0, D], I64)], f"{hint}.rotated")


def apply_rope(g: Graph, x: str, cos: str, sin: str, D: int, hint: str, interleaved: bool = False) -> str:
    """[T, N, D], cos/sin [T, 1, D] -> [T, N, D]: x ⊙ cos + rotate_half(x) ⊙ sin.  spec §2.3."""
    rotated = rotate_pairs(g, x, D, hint) if interleaved else rotate_half(g, x, D, hint)
    return g.op("Add", [g.op("Mul", [x, cos], f"{hint}.cos"), g.op("Mul", [rotated, sin], f"{hint}.sin")],
                f"{hint}.roped")


# ---------------------------------------------------------------------------------------------
# Attention block (spec §3)


def qkv(g: Graph, x: str, w: AttentionWeights, cfg: ModelConfig, hint: str) -> tuple[str, str, str]:
    """[T, H] normed -> q [T, Nh, D], k [T, Nkv, D], v [T, Nkv, D], before RoPE.  spec §3.1–§3.2:
    projections (+ biases), the OLMoE norm over the whole projection, clip_qkv, the Qwen3 norm per head."""
    q = linear(g, x, w.q, w.q_bias, f"{hint}.q")
    k = linear(g, x, w.k, w.k_bias, f"{hint}.k")
    v = linear(g, x, w.v, w.v_bias, f"{hint}.v")
    if cfg.qk_norm == "proj":
        q = rms_norm(g, q, w.q_norm, cfg.rms_norm_eps, f"{hint}.q_norm")
        k = rms_norm(g, k, w.k_norm, cfg.rms_norm_eps, f"{hint}.k_norm")
    if cfg.clip_qkv is not None:
        lo, hi = g.const(-cfg.clip_qkv, g.act), g.const(cfg.clip_qkv, g.act)
        q, k, v = (g.op("Clip", [t, lo, hi], f"{hint}.{n}_clip") for t, n in ((q, "q"), (k, "k"), (v, "v")))
    D = cfg.head_dim
    q = g.op("Reshape", [q, g.const([0, cfg.num_attention_heads, D], I64)], f"{hint}.q_heads")
    k = g.op("Reshape", [k, g.const([0, cfg.num_key_value_heads, D], I64)], f"{hint}.k_heads")
    v = g.op("Reshape", [v, g.const([0, cfg.num_key_value_heads, D], I64)], f"{hint}.v_heads")
    if cfg.qk_norm == "head":
        q = rms_norm(g, q, w.q_norm, cfg.rms_norm_eps, f"{hint}.q_norm")
        k = rms_norm(g, k, w.k_norm, cfg.rms_norm_eps, f"{hint}.k_norm")
    return q, k, v


def repeat_kv(g: Graph, x: str, cfg: ModelConfig, hint: str) -> str:
    """[T, Nkv, D] -> [T, Nh, D]: query head h reads key/value head ⌊h / G⌋, G = Nh / Nkv.  spec §3.4.
    Unsqueeze to [T, Nkv, 1, D], Expand to [T, Nkv, G, D] (a shape of ones and G: no T needed), Reshape."""
    G = cfg.num_attention_heads // cfg.num_key_value_heads
    if G == 1:
        return x
    x = g.op("Unsqueeze", [x, g.const([2], I64)], f"{hint}.unsq")
    x = g.op("Expand", [x, g.const([1, 1, G, 1], I64)], f"{hint}.expand")
    return g.op("Reshape", [x, g.const([0, cfg.num_attention_heads, cfg.head_dim], I64)], f"{hint}.repeated")


def causal_attention(g: Graph, q: str, k: str, v: str, future: str, cfg: ModelConfig, hint: str) -> str:
    """q [T, Nh, D], k/v [T, Nkv, D], future [T, T] bool (key after query) -> [T, Nh·D].  spec §3.4:
    scores q·kᵀ (export dtype, MatMul), then in float32: / √D, future keys set to the lowest float32,
    Softmax over keys; probabilities back in the export dtype, times v."""
    k, v = repeat_kv(g, k, cfg, f"{hint}.k"), repeat_kv(g, v, cfg, f"{hint}.v")
    q = g.op("Transpose", [q], f"{hint}.q_t", perm=[1, 0, 2])  # [Nh, T, D]
    k = g.op("Transpose", [k], f"{hint}.k_t", perm=[1, 2, 0])  # [Nh, D, T]
    v = g.op("Transpose", [v], f"{hint}.v_t", perm=[1, 0, 2])  # [Nh, T, D]
    scores = g.cast(g.op("MatMul", [q, k], f"{hint}.qk"), F32)  # [Nh, T, T]
    scores = g.op("Div", [scores, g.const(np.sqrt(cfg.head_dim), F32)], f"{hint}.scores")
    scores = g.op("Where", [future, g.const(np.finfo(np.float32).min, F32), scores], f"{hint}.masked")
    probs = g.cast(g.op("Softmax", [scores], f"{hint}.probs32", axis=-1), g.act)
    out = g.op("Transpose", [g.op("MatMul", [probs, v], f"{hint}.pv")], f"{hint}.heads", perm=[1, 0, 2])
    return g.op("Reshape", [out, g.const([0, cfg.num_attention_heads * cfg.head_dim], I64)], f"{hint}.merged")


def attention(g: Graph, x: str, w: AttentionWeights, cfg: ModelConfig, rope: tuple[str, str], future: str,
              hint: str, interleaved: bool = False) -> str:
    """[T, H] normed input -> [T, H]: q/k/v, RoPE on q and k, causal GQA attention, o_proj.  spec §3."""
    q, k, v = qkv(g, x, w, cfg, hint)
    cos, sin = rope
    q = apply_rope(g, q, cos, sin, cfg.head_dim, f"{hint}.q_rope", interleaved)
    k = apply_rope(g, k, cos, sin, cfg.head_dim, f"{hint}.k_rope", interleaved)
    return linear(g, causal_attention(g, q, k, v, future, cfg, hint), w.o, w.o_bias, f"{hint}.o")


# ---------------------------------------------------------------------------------------------
# FFN (spec §4)


def mlp(g: Graph, x: str, w: MLPWeights, hint: str) -> str:
    """[T, H] -> [T, H]: down(silu(gate·x) ⊙ up·x), silu(z) = z·sigmoid(z).  spec §4.1."""
    gate, up = linear(g, x, w.gate, hint=f"{hint}.gate"), linear(g, x, w.up, hint=f"{hint}.up")
    silu = g.op("Mul", [gate, g.op("Sigmoid", [gate], f"{hint}.sigmoid")], f"{hint}.silu")
    return linear(g, g.op("Mul", [silu, up], f"{hint}.act"), w.down, hint=f"{hint}.down")


def route(g: Graph, x: str, w: MoEWeights, spec: MoESpec, i: int) -> str:
    """[T, H] -> the dense routing weights [T, E] in the export dtype: topk_weights scattered at
    topk_ids, 0 elsewhere.  spec §4.2 steps 1–4, scores and weights in float32; records
    router_logits, router_scores, topk_ids, topk_weights.{i}."""
    E, K = spec.num_experts, spec.top_k
    logits = g.trace(linear(g, x, w.router, hint=f"l{i}.router"), f"router_logits.{i}", ["T", E])
    logits32 = g.cast(logits, F32)
    scoring = "Softmax" if spec.scoring == "softmax" else "Sigmoid"
    scores = g.op(scoring, [logits32], f"l{i}.scores", **({"axis": -1} if scoring == "Softmax" else {}))
    scores = g.trace(scores, f"router_scores.{i}", ["T", E])
    choice = scores  # the bias chooses, never weighs (step 3)
    if w.selection_bias is not None:
        choice = g.op("Add", [scores, g.cast(g.param(w.selection_bias), F32)], f"l{i}.choice")
    _, ids = g.op("TopK", [choice, g.const([K], I64)], f"l{i}.topk", outputs=2, axis=-1, largest=1, sorted=1)
    ids = g.trace(ids, f"topk_ids.{i}", ["T", K])
    weights = topk_weights(g, scores, ids, spec, f"l{i}")
    weights = g.trace(weights, f"topk_weights.{i}", ["T", K])
    zeros = g.op("ConstantOfShape", [g.op("Shape", [scores], f"l{i}.scores_shape")], f"l{i}.zeros",
                 value=numpy_helper.from_array(np.zeros(1, np.float32)))
    dense = g.op("ScatterElements", [zeros, ids, weights], f"l{i}.dense_weights", axis=1)  # [T, E]
    return g.cast(dense, g.act)


def topk_weights(g: Graph, scores: str, ids: str, spec: MoESpec, hint: str) -> str:
    """scores [T, E], topk_ids [T, K] -> [T, K] float32: the chosen scores, renormalised to sum 1 if
    norm_topk_prob (a token whose chosen scores are all 0 keeps 0: the sum is replaced by 1 there,
    no ε), times routed_scaling_factor.  spec §4.2 step 4."""
    w = g.op("GatherElements", [scores, ids], f"{hint}.chosen", axis=1)
    if spec.norm_topk_prob:
        total = g.op("ReduceSum", [w, g.const([1], I64)], f"{hint}.chosen_sum", keepdims=1)
        safe = g.op("Where", [g.op("Greater", [total, g.const(0.0, F32)], f"{hint}.sum_pos"), total,
                              g.const(1.0, F32)], f"{hint}.divisor")
        w = g.op("Div", [w, safe], f"{hint}.renormed")
    if spec.routed_scaling_factor != 1.0:
        w = g.op("Mul", [w, g.const(spec.routed_scaling_factor, F32)], f"{hint}.scaled")
    return w


def moe(g: Graph, x: str, w: MoEWeights, spec: MoESpec, i: int, bugs: Bugs) -> str:
    """[T, H] -> [T, H]: Σ_e dense_weights[:, e] · expert_e(x) (+ gated shared expert).  spec §4.2 step 5.
    Every expert runs on every token (no data-dependent shapes, spec/onnx.md §4); an expert's
    output reaches the sum only where its weight is not 0, so an overflow in an expert a token did
    not choose cannot poison that token."""
    dense = route(g, x, w, spec, i)
    zero = g.const(0.0, g.act)
    terms = []
    for e, expert in enumerate(w.experts):
        h = f"l{i}.expert{e}"
        xe = x
        if (i, e) in bugs.expert_input_scale:
            xe = g.op("Mul", [x, g.const(bugs.expert_input_scale[(i, e)], g.act)], f"{h}.bug_scaled")
        we = g.op("Slice", [dense, g.const([e], I64), g.const([e + 1], I64), g.const([1], I64)], f"{h}.weight")
        weighted = g.op("Mul", [mlp(g, xe, expert, h), we], f"{h}.weighted")  # [T, H] · [T, 1]
        terms.append(g.op("Where", [g.op("Equal", [we, zero], f"{h}.unchosen"), zero, weighted], f"{h}.term"))
    if w.shared is not None:
        shared = mlp(g, x, w.shared, f"l{i}.shared")
        if w.shared_gate is not None and i not in bugs.shared_gate_dropped:
            gate = g.op("Sigmoid", [linear(g, x, w.shared_gate, hint=f"l{i}.shared_gate")], f"l{i}.gate")  # [T, 1]
            shared = g.op("Mul", [gate, shared], f"l{i}.shared_gated")
        terms.append(shared)
    return g.op("Sum", terms, f"l{i}.moe")


# ---------------------------------------------------------------------------------------------
# Layer and model (spec §5)


def decoder_layer(g: Graph, h: str, w: LayerWeights, cfg: ModelConfig, i: int, rope: dict[bool, tuple[str, str]],
                  future: str | None, bugs: Bugs) -> str:
    """[T, H] residual -> [T, H].  spec §5.1: h += attn(input_layernorm(h)) when the layer has
    attention; h += FFN(post_attention_layernorm(h))."""
    spec, H = cfg.layers[i], cfg.hidden_size
    if spec.attention:
        interleaved = i in bugs.rope_interleaved
        x = rms_norm(g, h, w.attention.norm, cfg.rms_norm_eps, f"l{i}.input_norm")
        a = attention(g, x, w.attention, cfg, rope[interleaved], future, f"l{i}.attn", interleaved)
        a = g.trace(a, f"attn_out.{i}", ["T", H])
        h = g.op("Add", [h, a], f"l{i}.residual")
    x = rms_norm(g, h, w.ffn_norm, cfg.rms_norm_eps, f"l{i}.post_attention_norm")
    f = mlp(g, x, w.ffn, f"l{i}.mlp") if spec.moe is None else moe(g, x, w.ffn, spec.moe, i, bugs)
    f = g.trace(f, f"ffn_out.{i}", ["T", H])
    return g.trace(g.op("Add", [h, f]), f"hidden.{i}", ["T", H])


def build_model(model: Model, data: BinaryIO, location: str, dtype: np.dtype, outputs: str, opset: int,
                bugs: Bugs | None = None) -> "onnx.ModelProto":
    """The graph of spec §5.2 for `model`: input_ids [T] -> trace outputs (or logits), weights written
    to `data` (named `location` beside the graph), one Param at a time."""
    cfg, w, bugs = model.config, model.weights, bugs or Bugs()
    g = Graph(dtype, data, location, outputs)
    H, V = cfg.hidden_size, cfg.vocab_size
    ids = g.input("input_ids", I64, ["T"])
    rope, future = {}, None
    if any(s.attention for s in cfg.layers):  # an attention-free model has no positions at all
        positions, future = positions_and_mask(g, ids)
        rope = {False: rope_tables(g, cfg, positions)}
        if bugs.rope_interleaved:
            rope[True] = rope_tables(g, cfg, positions, interleaved=True)
    h = g.trace(g.op("Gather", [g.param(w.embed), ids], axis=0), "embeddings", ["T", H])  # (1)
    for i, lw in enumerate(w.layers):  # (2)
        h = decoder_layer(g, h, lw, cfg, i, rope, future, bugs)
    h = g.trace(rms_norm(g, h, w.norm, cfg.rms_norm_eps, "final.norm"), "final_norm", ["T", H])  # (3)
    g.trace(linear(g, h, w.lm_head), "logits", ["T", V])  # (4)
    graph = helper.make_graph(g.nodes, "d2m_ref", g.inputs, g.outputs, g.initializers)
    opsets = [helper.make_opsetid("", opset)]
    proto = helper.make_model(graph, opset_imports=opsets, ir_version=helper.find_min_ir_version_for(opsets),
                              producer_name="d2m_ref", producer_version=__version__,
                              doc_string="d2m_ref forward pass (spec/architecture.md, spec/onnx.md)")
    helper.set_model_props(proto, {"d2m_ref.spec_version": SPEC_VERSION, "d2m_ref.dtype": np.dtype(dtype).name,
                                   "d2m_ref.outputs": outputs, "d2m_ref.config": json.dumps(cfg.source)})
    return proto


# ---------------------------------------------------------------------------------------------
# Export: checks, then the two files


def export_dtype(name: str) -> np.dtype:
    if name not in EXPORT_DTYPES:
        raise InputError(f"--dtype {name}: the export dtypes are {', '.join(EXPORT_DTYPES)} (a bfloat16 or "
                         "int8 engine is the backend's choice: export float32 and let it convert)")
    return EXPORT_DTYPES[name]


def check_opset(opset: int) -> None:
    newest = onnx.defs.onnx_opset_version()
    if not MIN_OPSET <= opset <= newest:
        raise InputError(f"--opset {opset}: d2m_ref exports opsets {MIN_OPSET} (axes as inputs of Squeeze, "
                         f"Unsqueeze, ReduceSum; Softmax over one axis) to {newest} (the newest onnx "
                         f"{onnx.__version__} knows); default {DEFAULT_OPSET}, which TensorRT 8.6 parses")


def data_path(out: Path) -> Path:
    """The external data file of graph `out`: `<out>.data` beside it."""
    return out.with_name(out.name + ".data")


def check_export_options(out: Path, dtype: str, outputs: str, opset: int, force: bool) -> np.dtype:
    """Every option checked before any work: -> the export dtype."""
    if onnx is None:
        raise InputError(f"exporting ONNX needs the onnx package: {ONNX_INSTALL}")
    np_dtype = export_dtype(dtype)
    if outputs not in OUTPUTS:
        raise InputError(f"--outputs {outputs}: choose one of {', '.join(OUTPUTS)}")
    check_opset(opset)
    check_output(out, force, "--out")
    refuse_existing(data_path(out), force)
    return np_dtype


def export_onnx(model: Model, out: str | Path, *, dtype: str = "float32", outputs: str = "trace",
                opset: int = DEFAULT_OPSET, force: bool = False, bugs: Bugs | None = None) -> dict:
    """Write `out` (the graph) and `<out>.data` (the weights).  -> a summary.

    The data file is written first, then the graph; a failure leaves neither (the data file is
    removed if the graph cannot be written), and an existing file is never replaced without `force`."""
    out = Path(out)
    np_dtype = check_export_options(out, dtype, outputs, opset, force)
    data = data_path(out)
    built = {}

    def write_data(f: BinaryIO) -> None:
        built["proto"] = build_model(model, f, data.name, np_dtype, outputs, opset, bugs)

    atomic_write(data, write_data, force=force)
    proto = built["proto"]
    try:
        atomic_write_bytes(out, proto.SerializeToString(), force=force)
    except BaseException:
        data.unlink(missing_ok=True)
        raise
    return {"nodes": len(proto.graph.node), "outputs": len(proto.graph.output), "data_bytes": data.stat().st_size,
            "initializers": len(proto.graph.initializer)}


# ---------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Export the forward pass as a static ONNX graph whose "
                                "outputs are the trace tensors (spec/onnx.md).",
                                epilog="exit status: 0 written, 2 bad input")
    p.add_argument("--weights", type=Path, required=True, metavar="PATH",
                   help="model.safetensors, an index json, a directory holding one, or a GGUF file")
    p.add_argument("--config", type=Path, metavar="config.json", help="the model's config (default: beside the weights)")
    p.add_argument("--out", type=Path, required=True, metavar="model.onnx",
                   help="the graph; the weights go to <out>.data beside it")
    p.add_argument("--dtype", default="float32", metavar="float32|float16",
                   help="weights and activations (default float32); float16 keeps norms, softmaxes, RoPE angles "
                        "and the router in float32")
    p.add_argument("--outputs", default="trace", metavar="trace|logits",
                   help="trace: every trace tensor is a graph output (default); logits: the logits only")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (default {DEFAULT_OPSET})")
    p.add_argument("--force", action="store_true", help="overwrite --out and its .data file")
    from .cli import add_strict_config_option  # the command-line plumbing only for the command
    add_strict_config_option(p)
    return p


def run(args: argparse.Namespace) -> int:
    check_export_options(args.out, args.dtype, args.outputs, args.opset, args.force)  # before loading
    from .cli import model_files, warn_unverified
    model = load_model(args.weights, args.config, strict_config=args.strict_config)
    warn_unverified(model)
    try:
        for path in (args.out, data_path(args.out)):  # never the checkpoint being read, --force or not
            refuse_input(path, "--out", model_files(args, model))
        summary = export_onnx(model, args.out, dtype=args.dtype, outputs=args.outputs, opset=args.opset,
                              force=args.force)
    finally:
        model.close()
    print(f"wrote {args.out} ({summary['nodes']} nodes, {summary['outputs']} outputs, opset {args.opset}, "
          f"{args.dtype}) and {data_path(args.out)} ({summary['data_bytes'] / 1e6:.1f} MB, "
          f"{summary['initializers']} initializers)")
    return 0


def main(argv: list[str] | None = None) -> int:
    from . import cli
    return cli.main_with_status(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
