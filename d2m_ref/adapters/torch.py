"""Record a trace (spec/format.md §2) from a torch model with forward hooks.  Needs torch; nothing
else in d2m_ref imports it.

    from d2m_ref.adapters.torch import record_trace
    tensors = record_trace(model, input_ids, "candidate.safetensors")
    # then: python -m d2m_ref.check --weights W --candidate candidate.safetensors

Works on transformers' decoder families (llama, qwen2, qwen3, qwen2_moe, qwen3_moe, mixtral, olmoe)
and on any module tree with the recommended Dense2MoE names (HF names, MoE as Qwen2-MoE names it):

    model.embed_tokens                                 -> embeddings
    model.layers.{i}.self_attn    (output [0])         -> attn_out.{i}   (absent, or parameter-free
                                                          stand-in: attention-free layer)
    model.layers.{i}.mlp  (or .block_sparse_moe)       -> ffn_out.{i}
    model.layers.{i}      (output [0])                 -> hidden.{i}
    mlp.gate  returning (router_logits, topk_weights, topk_ids), as transformers 5's routers do
                                                       -> router_logits.{i}, topk_weights.{i}, topk_ids.{i}
    mlp.gate  returning router_logits alone (an nn.Linear): topk_ids.{i} is read from which tokens
              reach each mlp.experts.{e} module (ordered best-first by the candidate's own logits);
              topk_weights.{i} is then not recorded
    model.norm                                          -> final_norm
    lm_head                                             -> logits

Everything is recorded at batch 1 as [T, ...]; half-precision tensors are widened to float32
(exactly), and the trace's metadata says which precision the model computed in
(`candidate_dtype`), which `python -m d2m_ref.check` takes as its default --candidate-dtype.
router_scores are not recorded: no torch module returns them, and recomputing them here would
check the checker, not the model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from .. import SPEC_VERSION
from ..tracefile import TRACE_FORMAT, TRACE_VERSION, write_trace


def _first(output):
    return output[0] if isinstance(output, (tuple, list)) else output


def _rows(t: torch.Tensor) -> torch.Tensor:
    """[1, T, ...] -> [T, ...]; [T, ...] unchanged."""
    return t[0] if t.dim() >= 2 and t.shape[0] == 1 else t


def _decoder(model: nn.Module) -> nn.Module:
    for path in ("model", "model.model", "transformer"):
        m = model
        for part in path.split("."):
            m = getattr(m, part, None)
            if m is None:
                break
        if m is not None and hasattr(m, "layers") and hasattr(m, "embed_tokens"):
            return m
    if hasattr(model, "layers") and hasattr(model, "embed_tokens"):
        return model
    raise ValueError("record_trace: no decoder found: expected model.model.{embed_tokens, layers, norm} "
                     "(transformers' layout and the recommended Dense2MoE names)")


def _has_parameters(m: nn.Module | None) -> bool:
    return m is not None and any(True for _ in m.parameters())


class _Recorder:
    """Forward hooks that copy outputs into `tensors` under trace names."""

    def __init__(self, wide: torch.dtype):
        self.tensors: dict[str, np.ndarray] = {}
        self.handles: list = []
        self.wide = wide
        self.expert_tokens: dict[int, dict[int, list[np.ndarray]]] = {}

    def put(self, name: str, t: torch.Tensor) -> None:
        t = _rows(t.detach())
        self.tensors[name] = (t.to(torch.int64) if not t.is_floating_point() else t.to(self.wide)).cpu().numpy()

    def hook(self, module: nn.Module, name: str) -> None:
        self.handles.append(module.register_forward_hook(lambda _m, _i, out: self.put(name, _first(out))))

    def router(self, gate: nn.Module, i: int) -> None:
        def grab(_m, _inputs, out):
            if isinstance(out, (tuple, list)):
                tensors = [t for t in out if isinstance(t, torch.Tensor)]
                ints = [t for t in tensors if not t.is_floating_point()]
                floats = [t for t in tensors if t.is_floating_point()]
                if ints:
                    self.put(f"topk_ids.{i}", ints[0])
                    k = ints[0].shape[-1]
                    for f in floats:  # logits are [T, E], weights [T, K] (E > K; E == K: order decides)
                        if f.shape[-1] == k and f"topk_weights.{i}" not in self.tensors and f is not floats[0]:
                            self.put(f"topk_weights.{i}", f)
                    self.put(f"router_logits.{i}", floats[0])
                    return
                out = tensors[0]
            self.put(f"router_logits.{i}", out)

        self.handles.append(gate.register_forward_hook(grab))

    def experts(self, experts: nn.Module, i: int) -> None:
        """Per-expert modules: which token rows reach expert e (matched by value against the MoE input)."""
        self.expert_tokens[i] = {}
        for e, expert in enumerate(experts):
            def seen(_m, inputs, _out, e=e):
                self.expert_tokens[i].setdefault(e, []).append(inputs[0].detach().to(self.wide).cpu().numpy())
            self.handles.append(expert.register_forward_hook(seen))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _routes_from_experts(x: np.ndarray, seen: dict[int, list[np.ndarray]], logits: np.ndarray) -> np.ndarray | None:
    """Token rows each expert received -> topk_ids [T, K], best first by the candidate's logits."""
    chosen: list[list[int]] = [[] for _ in range(x.shape[0])]
    for e, batches in seen.items():
        for rows in batches:
            for r in rows.reshape(-1, x.shape[-1]):
                hits = np.nonzero(np.all(x == r, axis=-1))[0]
                for t in hits:
                    if e not in chosen[t]:
                        chosen[t].append(e)
    ks = {len(c) for c in chosen}
    if len(ks) != 1 or 0 in ks:
        return None  # tokens with equal inputs or a different K per token: cannot tell
    return np.array([sorted(c, key=lambda e: -logits[t, e]) for t, c in enumerate(chosen)], dtype=np.int64)


def record_trace(model: nn.Module, input_ids, path: str | Path | None = None, *,
                 call: Callable[[nn.Module, torch.Tensor], object] | None = None,
                 config: dict | None = None, force: bool = False) -> dict[str, np.ndarray]:
    """Run `model` once on `input_ids` [T] or [1, T] (batch 1, as every transformers caller holds
    it; a torch tensor or anything array-like) and return (and write to `path`, if given) the trace
    tensors its modules produced, under trace names.

    `call(model, ids [1, T])` runs the model (default: `model(input_ids=ids)`, plus use_cache=False
    for transformers models).  `config`: the config JSON to store in the trace metadata (default:
    the model's own `config`, if it has one).
    """
    ids = _one_sequence(input_ids)
    params = [p for p in model.parameters() if p.is_floating_point()]
    model_dtype = params[0].dtype if params else torch.float32
    wide = torch.float64 if model_dtype == torch.float64 else torch.float32
    rec = _Recorder(wide)
    moe_inputs = _hook(model, rec, wide)
    try:
        out = _run(model, ids[None], call)
    finally:
        rec.remove()
    tensors = {"input_ids": ids.numpy().copy(), **_completed(rec, out, moe_inputs)}
    if path is not None:
        _write(path, model, tensors, config, model_dtype, wide, force)
    return tensors


def _one_sequence(input_ids) -> torch.Tensor:
    """input_ids [T] or [1, T] (a tensor or array-like) -> int64 [T]; ValueError for anything else."""
    if isinstance(input_ids, torch.Tensor):
        input_ids = input_ids.detach().cpu().numpy()
    ids = torch.as_tensor(np.asarray(input_ids, dtype=np.int64))
    if ids.dim() == 2 and ids.shape[0] == 1:
        ids = ids[0]  # the [1, T] batch of one
    if ids.dim() != 1:
        raise ValueError(f"record_trace: input_ids must be [T] or a batch of one [1, T], got shape "
                         f"{tuple(ids.shape)} (d2m_ref traces one sequence)")
    return ids


def _hook(model: nn.Module, rec: _Recorder, wide: torch.dtype) -> dict[int, list[np.ndarray]]:
    """Forward hooks on every module whose output is a trace tensor; returns where each MoE layer's
    inputs will be collected (to infer routes from which experts saw which tokens)."""
    decoder = _decoder(model)
    rec.hook(decoder.embed_tokens, "embeddings")
    moe_inputs: dict[int, list[np.ndarray]] = {}
    for i, layer in enumerate(decoder.layers):
        attn = getattr(layer, "self_attn", None)
        if _has_parameters(attn):
            rec.hook(attn, f"attn_out.{i}")
        ffn = getattr(layer, "mlp", None) or getattr(layer, "block_sparse_moe", None)
        if ffn is not None:
            rec.hook(ffn, f"ffn_out.{i}")
            gate = getattr(ffn, "gate", None)
            if isinstance(gate, nn.Module) and hasattr(ffn, "experts"):  # an MoE (dense MLPs have gate_proj)
                rec.router(gate, i)
                if isinstance(ffn.experts, (nn.ModuleList, nn.Sequential)):
                    rec.experts(ffn.experts, i)
                    rec.handles.append(ffn.register_forward_hook(
                        lambda _m, inputs, _o, i=i: moe_inputs.setdefault(i, []).append(
                            _rows(inputs[0].detach()).reshape(-1, inputs[0].shape[-1]).to(wide).cpu().numpy())))
        rec.hook(layer, f"hidden.{i}")
    if getattr(decoder, "norm", None) is not None:
        rec.hook(decoder.norm, "final_norm")
    head = getattr(model, "lm_head", None)
    if head is not None:
        rec.hook(head, "logits")
    return moe_inputs


def _run(model: nn.Module, batch: torch.Tensor, call) -> object:
    with torch.no_grad():
        if call is not None:
            return call(model, batch)
        if hasattr(model, "config") and hasattr(model, "generation_config"):
            return model(input_ids=batch, use_cache=False)
        return model(input_ids=batch)


def _completed(rec: _Recorder, out, moe_inputs: dict[int, list[np.ndarray]]) -> dict[str, np.ndarray]:
    """The recorded tensors, plus the logits from the output when no lm_head module gave them, and
    routes inferred from the experts' inputs where no module returned them."""
    tensors = rec.tensors
    if "logits" not in tensors:  # a model without an lm_head module: take its output
        logits = getattr(out, "logits", out)
        if isinstance(logits, torch.Tensor):
            rec.put("logits", logits)
    for i, seen in rec.expert_tokens.items():
        if f"topk_ids.{i}" not in tensors and seen and i in moe_inputs and f"router_logits.{i}" in tensors:
            routes = _routes_from_experts(moe_inputs[i][0], seen, tensors[f"router_logits.{i}"])
            if routes is not None:
                tensors[f"topk_ids.{i}"] = routes
    return tensors


def _write(path, model: nn.Module, tensors: dict, config: dict | None, model_dtype: torch.dtype,
           wide: torch.dtype, force: bool) -> None:
    """The trace file with its metadata (spec/format.md §2)."""
    if config is None:
        cfg = getattr(model, "config", None)
        config = cfg.to_dict() if hasattr(cfg, "to_dict") else {}
    metadata = {"format": TRACE_FORMAT, "trace_version": TRACE_VERSION, "spec_version": SPEC_VERSION,
                "dtype": "float64" if wide == torch.float64 else "float32",
                "command": f"d2m_ref.adapters.torch.record_trace({type(model).__name__}, T={tensors['input_ids'].size})",
                "config": json.dumps(config, separators=(",", ":"), default=str),
                "weights": "", "candidate_dtype": str(model_dtype).replace("torch.", "")}
    write_trace(path, tensors, metadata, force=force)
