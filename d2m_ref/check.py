"""`python -m d2m_ref.check`: does a backend compute this model right?  Stage by stage, layer by layer.

    python -m d2m_ref.check --weights W [--config C] --candidate dump.safetensors
    python -m d2m_ref.check --golden CASE --candidate dump.safetensors
        [--candidate-dtype float32|float16|bfloat16|int8w|int4w|float64] [--map names.json]
        [--tokens 1,2,3 | --inputs inputs.json] [--runner NAME] [--iteration N] [--json report.json [--force]]
        [--keep-going] [--quiet]

The candidate is a trace (spec/format.md §2) or any file of tensors under trace names (.safetensors,
.npz, Polygraphy RunResults .json; `--map` renames a backend's own names).  It may hold any subset
of the trace: missing tensors are listed, not fatal.  The reference is d2m_ref's float64 forward
pass on the candidate's own input_ids (or the golden case's committed trace).

Each stage is compared twice with the one comparator of d2m_ref.compare:
  drift  the candidate against the reference forward pass (errors accumulated over the layers
         before it: the tolerance grows with depth);
  local  the candidate against this stage recomputed in float64 from the candidate's *own* inputs
         (its hidden state entering the layer, its attention output, its routes): only this
         stage's rounding, so a layer that computes wrong stands out however much drift came before.
Stages are visited in forward order and the first one that fails either check is the first
divergence; later stages are not judged (they inherit its error) unless --keep-going.

Routing: where the candidate's top-k experts differ from the reference's, the reference's margin
between the experts involved is set against the logit error the candidate's precision explains.
Within it: a near-tie FLIP, reported, and from there on the reference is recomputed with the
candidate's routes forced, so later layers are compared fairly.  Beyond it: a routing error.

Exit status: 0 every compared stage OK, 1 a mismatch, 2 bad input (named, no traceback).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import SPEC_VERSION
from .adapters import Candidate, apply_map, load_candidate, name_map
from .compare import KAPPA, KAPPA_KL, KAPPA_RMS, Comparison, compare, logit_stats
from .cli import add_strict_config_option, main_with_status, model_files, warn_unverified
from .files import atomic_write, check_output
from .config import ModelConfig
from .errors import InputError, NonFiniteError
from .generate import first_non_finite
from .kernels import default_kernels
from .model import LayerKV, Runtime, attention, forward, mlp, moe, route_problem
from .ops import rms_norm, rope_cos_sin, rope_inv_freq, router_scores, top_k
from .rounding import ARITHMETIC, ErrorModel, config_reduction, expected_kl
from .weights import Model, load_model

PROG = "python -m d2m_ref.check"
EXIT_OK, EXIT_MISMATCH, EXIT_BAD_INPUT = 0, 1, 2
# Precisions the checker knows; float64 is there to check another float64 implementation.
CANDIDATE_DTYPES = ("float32", "float16", "bfloat16", "int8w", "int4w", "float64")


# ---------------------------------------------------------------------------------------------
# Stages


@dataclass(frozen=True)
class Stage:
    """One trace tensor in forward order.  depth: layers computed up to and including this stage."""

    name: str
    kind: str
    layer: int | None
    depth: int


def stage_plan(cfg: ModelConfig) -> list[Stage]:
    """Every trace tensor of `cfg` but input_ids, in the order the forward pass makes them."""
    plan = [Stage("embeddings", "embeddings", None, 0)]
    for i, spec in enumerate(cfg.layers):
        kinds = (["attn_out"] if spec.attention else []) + (
            ["router_logits", "router_scores", "topk_ids", "topk_weights"] if spec.moe else []) + ["ffn_out", "hidden"]
        plan += [Stage(f"{k}.{i}", k, i, i + 1) for k in kinds]
    L = cfg.num_hidden_layers
    return plan + [Stage("final_norm", "final_norm", None, L), Stage("logits", "logits", None, L)]


@dataclass
class StageResult:
    stage: Stage
    status: str  # OK | NOT OK | FLIP | MISSING | NOT COMPARED
    drift: Comparison | None = None
    local: Comparison | None = None
    message: str = ""
    hint: str = ""
    flips: list[dict] = field(default_factory=list)

    @property
    def worst(self) -> Comparison | None:
        """The comparison (drift or local) furthest past its tolerance."""
        cs = [c for c in (self.drift, self.local) if c is not None]
        return max(cs, key=lambda c: c.score) if cs else None

    def as_dict(self) -> dict:
        return {"stage": self.stage.name, "kind": self.stage.kind, "layer": self.stage.layer, "status": self.status,
                "drift": self.drift.as_dict() if self.drift else None,
                "local": self.local.as_dict() if self.local else None,
                "message": self.message, "hint": self.hint, "flips": self.flips}


@dataclass
class Report:
    precision: str
    candidate: str
    reference: str
    tokens: int
    stages: list[StageResult]
    missing: list[str]
    unknown: list[str]
    notes: list[str]
    forced_layers: list[int]
    logits: dict | None = None
    unverified_config_keys: tuple[str, ...] = ()  # config keys d2m_ref accepted without knowing them

    @property
    def first_divergence(self) -> StageResult | None:
        return next((r for r in self.stages if r.status == "NOT OK"), None)

    @property
    def compared(self) -> int:
        return sum(r.status in ("OK", "NOT OK", "FLIP") for r in self.stages)

    @property
    def exit_code(self) -> int:
        return EXIT_MISMATCH if self.first_divergence is not None else EXIT_OK

    def verdict(self) -> str:
        flips = sum(len(r.flips) for r in self.stages if r.status == "FLIP")
        flip_note = (f"; {flips} near-tie route flip(s) in layer(s) {', '.join(map(str, self.forced_layers))} "
                     "replayed") if flips else ""
        first = self.first_divergence
        if first is None:
            return (f"PASS: {self.compared} stages agree with the reference within {self.precision} "
                    f"tolerances{flip_note}")
        where = f"layer {first.stage.layer}" if first.stage.layer is not None else first.stage.name
        return f"FAIL: first divergence at {where} ({first.stage.name}){flip_note}"

    def as_dict(self) -> dict:
        first = self.first_divergence
        return {"verdict": "PASS" if first is None else "FAIL", "exit_code": self.exit_code,
                "summary": self.verdict(), "precision": self.precision,
                "unit_roundoff": ARITHMETIC[self.precision].u, "candidate": self.candidate,
                "reference": self.reference, "tokens": self.tokens, "spec_version": SPEC_VERSION,
                "first_divergence": divergence_dict(first) if first else None,
                "stages": [r.as_dict() for r in self.stages], "missing": self.missing, "unknown": self.unknown,
                "forced_routes_layers": self.forced_layers, "logits": self.logits, "notes": self.notes,
                "unverified_config_keys": list(self.unverified_config_keys)}


def divergence_dict(r: StageResult) -> dict:
    c = r.worst
    d = {"layer": r.stage.layer, "tensor": r.stage.name, "message": r.message, "hint": r.hint}
    if c is not None:
        d.update(token=c.where[0] if c.where else None, index=c.where[1] if len(c.where) > 1 else None,
                 candidate=c.candidate, reference=c.reference, ratio=c.ratio, rms_ratio=c.rms_ratio,
                 check="local" if c is r.local else "drift")
    return d


# ---------------------------------------------------------------------------------------------
# The reference, recomputed when routes are forced


class Reference:
    """The float64 reference trace for `input_ids`; `force(layer, ids)` replays a candidate's routes."""

    def __init__(self, model: Model, input_ids: np.ndarray, trace: dict[str, np.ndarray] | None = None):
        self.model, self.input_ids = model, input_ids
        self.forced: dict[int, np.ndarray] = {}
        self.trace = trace if trace is not None else self._run()

    def _run(self) -> dict[str, np.ndarray]:
        capture: dict[str, np.ndarray] = {}
        forward(self.model, self.input_ids, capture=capture, forced_routes=dict(self.forced) or None)
        stage = first_non_finite(capture)
        if stage is not None:  # no candidate can be judged against NaN: bad input, not a mismatch
            raise NonFiniteError(f"the float64 reference is not finite: first in {stage} — the weights hold "
                                 "NaN/Inf, or a value overflowed float64")
        return capture

    def force(self, layer: int, topk_ids: np.ndarray) -> None:
        self.forced[layer] = np.asarray(topk_ids, np.int64)
        self.trace = self._run()


def layer_from_inputs(model: Model, i: int, h_in: np.ndarray, attn_out: np.ndarray | None = None,
                      routes: np.ndarray | None = None, ffn: bool = True) -> dict[str, np.ndarray]:
    """Layer i in float64 from given inputs (the local check): h_in [T, H] the residual entering it;
    attn_out [T, H], if given, is the FFN's input's attention part (the layer's own is not computed);
    routes [T, K] force the MoE's choice; ffn=False stops after the attention.
    -> {trace name: tensor} of that layer (positions 0..T-1), hidden.{i} included."""
    cfg, spec, w = model.config, model.config.layers[i], model.weights.layers[i]
    out: dict[str, np.ndarray] = {}
    rt = Runtime(cfg, np.dtype(np.float64), default_kernels(), out, None if routes is None else {i: routes})
    T = h_in.shape[0]
    h = h_in
    if spec.attention and attn_out is not None:
        h = h_in + attn_out
    elif spec.attention:
        positions = np.arange(T)
        rope = rope_cos_sin(positions, rope_inv_freq(cfg.rope, cfg.head_dim, np.float64))
        empty = np.zeros((0, cfg.num_key_value_heads, cfg.head_dim))
        a, _ = attention(rt.norm(h_in, w.attention.norm), w.attention, positions, rope, LayerKV(empty, empty, None), rt)
        out[f"attn_out.{i}"] = a
        h = h_in + a
    if not ffn:
        return out
    x = rt.norm(h, w.ffn_norm)
    f = mlp(x, w.ffn, rt) if spec.moe is None else moe(x, w.ffn, spec.moe, rt, i)
    out[f"ffn_out.{i}"] = f
    out[f"hidden.{i}"] = h + f
    return out


# ---------------------------------------------------------------------------------------------
# Routing


def choice_values(model: Model, i: int, router_logits: np.ndarray) -> tuple[np.ndarray, np.ndarray, bool]:
    """-> (values the top-k is taken over, scores, biased?).  Without a selection bias the order is the
    logits' own (softmax and sigmoid are monotone), so the logits are returned as the values."""
    spec = model.config.layers[i].moe
    scores = router_scores(router_logits, spec.scoring)
    bias = model.weights.layers[i].ffn.selection_bias
    if bias is None:
        return router_logits, scores, False
    return scores + bias.load(np.float64), scores, True


def classify_routes(model: Model, i: int, ref_logits: np.ndarray, ref_ids: np.ndarray, cand_ids: np.ndarray,
                    sigma: np.ndarray) -> list[dict]:
    """Per token whose expert set differs: the reference's margin between what it chose and what the
    candidate chose, against what errors of κσ per router logit (σ [T, E], the drift σ) explain.

    margin = max over experts the reference chose and the candidate dropped of v − min over experts the
    candidate took instead of v (v: logits, or scores + selection bias, converted to that scale with the
    first-order derivative of the score).  near_tie: margin ≤ allowance.
    """
    values, scores, biased = choice_values(model, i, ref_logits)
    spec = model.config.layers[i].moe
    out = []
    for t in range(ref_ids.shape[0]):
        r, c = set(ref_ids[t].tolist()), set(cand_ids[t].tolist())
        if r == c:
            continue
        dropped, added = sorted(r - c), sorted(c - r)
        allowed = KAPPA * np.asarray(sigma[t], np.float64)
        if biased:  # d score / d logit, first order: softmax p(1-p), sigmoid σ(1-σ)
            allowed = allowed * scores[t] * (1 - scores[t])
        worst_f = max(dropped, key=lambda e: values[t, e])
        worst_e = min(added, key=lambda e: values[t, e])
        margin = float(values[t, worst_f] - values[t, worst_e])
        allowance = float(allowed[worst_f] + allowed[worst_e])
        out.append({"token": t, "reference": sorted(r), "candidate": sorted(c), "margin": margin,
                    "allowance": allowance, "near_tie": margin <= allowance,
                    "scale": "choice scores" if biased else "logits",
                    "note": "" if spec.top_k < spec.num_experts else "K = E"})
    return out


def infer_routes(model: Model, i: int, cand_logits: np.ndarray) -> np.ndarray:
    """The candidate's routes as its own router logits imply them (the spec's rule, §4.2 step 3)."""
    values, _, _ = choice_values(model, i, np.asarray(cand_logits, np.float64))
    return top_k(values, model.config.layers[i].moe.top_k)


# ---------------------------------------------------------------------------------------------
# The check


class _Checker:
    def __init__(self, model: Model, cand: dict[str, np.ndarray], precision: str, ref: Reference, keep_going: bool):
        self.model, self.cand, self.precision, self.ref, self.keep_going = model, cand, precision, ref, keep_going
        self.arithmetic = ARITHMETIC[precision]
        self.routes: dict[int, np.ndarray] = {}  # the candidate's routes per MoE layer, when known
        self.usable: dict[str, np.ndarray] = {}  # candidate tensors that passed shape/finite checks
        self._local: dict[int, dict | None] = {}  # layer i recomputed from the candidate's own inputs
        self._local_sigma: dict[int, dict] = {}  # and the σ of that recompute's rounding
        self.notes: list[str] = []
        self.logits: dict | None = None  # logits_summary, once the logits are compared
        # The drift σ of every stage, in step with the stages: the pass reads the reference's routes of
        # an MoE layer when it gets there, after the checker has forced the candidate's (spec/tolerances.md §2.4)
        self.errors = ErrorModel(model, precision)
        self._drift = self.errors.drift(ref.input_ids, lambda i: self.ref.trace[f"topk_ids.{i}"])
        self._drift_sigma: dict[str, np.ndarray] = {}

    def drift_sigma(self, name: str) -> np.ndarray:
        """σ of the candidate's accumulated error at trace tensor `name` (the pass advances to it)."""
        while name not in self._drift_sigma:
            got, _, sigma = next(self._drift)
            # router_logits are kept: the routes stage reads them after the scores
            self._drift_sigma = {k: v for k, v in self._drift_sigma.items() if k.startswith("router_logits")}
            self._drift_sigma[got] = sigma
        return self._drift_sigma[name]

    # -- candidate tensors ------------------------------------------------------------------
    def candidate(self, st: Stage, ref: np.ndarray) -> tuple[np.ndarray | None, str]:
        """The candidate tensor as float64 of the reference's shape, or (None, why it cannot be compared)."""
        a = self.cand.get(st.name)
        if a is None:
            return None, "missing"
        a = np.asarray(a)
        while a.ndim > ref.ndim and a.shape[0] == 1:  # a batch axis of 1
            a = a[0]
        if a.shape != ref.shape:
            return None, f"shape {list(a.shape)} but the reference is {list(ref.shape)}"
        a = a.astype(np.float64)
        bad = ~np.isfinite(a)
        if bad.any():
            where = tuple(int(v) for v in np.argwhere(bad)[0])
            return None, (f"{int(bad.sum())} non-finite value(s) (NaN/Inf), first at {list(where)}: "
                          f"{a[where]!r}")
        return a, ""

    # -- local references -------------------------------------------------------------------
    def layer_input(self, i: int) -> np.ndarray | None:
        """The candidate's residual entering layer i: hidden.{i-1}, or its embeddings; for layer 0 of a
        candidate that did not dump them, the embedding rows themselves (a lookup: the candidate's
        differ by their storage rounding, which the local σ allows for)."""
        if i > 0:
            return self.usable.get(f"hidden.{i - 1}")
        return self.usable.get("embeddings", self.ref.trace["embeddings"])

    def dumped_var(self, x: np.ndarray) -> np.ndarray:
        """The variance of one rounding of a dumped input (units of u²): a backend may compute on in
        a wider format and dump a rounded copy, so its inputs as dumped are one rounding away from
        what it used (spec/tolerances.md §2.4)."""
        return self.arithmetic.rounding_var(x)

    def own_attention(self, i: int) -> np.ndarray | None:
        """The candidate's attn_out.i, which its FFN read (None: not dumped, or no attention)."""
        return self.usable.get(f"attn_out.{i}") if self.model.config.layers[i].attention else None

    def local_layer(self, i: int) -> tuple[dict, dict] | None:
        """Layer i recomputed in float64 from the candidate's hidden.{i-1}, its attn_out if dumped and
        its routes if known, and the σ of the rounding a candidate makes on that path (the error model
        evaluated at the candidate's own inputs): ({name: tensor}, {name: σ})."""
        if i not in self._local:
            h_in = self.layer_input(i)
            if h_in is None:
                return None
            own_attn, routes = self.own_attention(i), self.routes.get(i)
            self._local[i] = layer_from_inputs(self.model, i, h_in, own_attn, routes)
            stages = self.errors.layer(i, h_in, self.dumped_var(h_in), lambda: routes, own_attn, inherited=False)
            self._local_sigma[i] = {name: self.errors.sigma(var) for name, _, var in stages}
        return self._local[i], self._local_sigma[i]

    def local_attention(self, i: int) -> tuple[np.ndarray, np.ndarray] | None:
        """attn_out.i recomputed from the candidate's hidden.{i-1}, and its σ."""
        h_in = self.layer_input(i)
        if h_in is None:
            return None
        ref = layer_from_inputs(self.model, i, h_in, ffn=False)[f"attn_out.{i}"]
        (_, _, var), = self.errors.layer(i, h_in, self.dumped_var(h_in), lambda: None, ffn=False, inherited=False)
        return ref, self.errors.sigma(var)

    def local_reference(self, st: Stage) -> tuple[np.ndarray | None, np.ndarray | None, str]:
        """This stage recomputed from the candidate's own inputs, the σ of the rounding on that path,
        and what it was recomputed from; (None, None, "") if the inputs are not there."""
        w, cfg, e = self.model.weights, self.model.config, self.errors
        none = (None, None, "")
        if st.kind == "embeddings":
            return none
        last = self.usable.get(f"hidden.{cfg.num_hidden_layers - 1}")
        if st.kind == "final_norm":
            if last is None:
                return none
            _, var = e.final_norm(last, self.dumped_var(last))
            return rms_norm(last, w.norm.load(np.float64), cfg.rms_norm_eps), e.sigma(var), "final hidden"
        if st.kind == "logits":
            x = self.usable.get("final_norm")
            if x is not None:
                _, var = e.logits(x, self.dumped_var(x))
                return default_kernels().linear(x, w.lm_head), e.sigma(var), "final_norm"
            if last is None:
                return none
            xn, vx = e.final_norm(last, self.dumped_var(last))
            _, var = e.logits(xn, vx)
            x = rms_norm(last, w.norm.load(np.float64), cfg.rms_norm_eps)
            return default_kernels().linear(x, w.lm_head), e.sigma(var), "final hidden"
        i = st.layer
        if st.kind == "attn_out":
            got = self.local_attention(i)
            return none if got is None else (got[0], got[1], "layer input")
        h_in, f = self.layer_input(i), self.usable.get(f"ffn_out.{i}")
        attn = self.own_attention(i)
        if st.kind == "hidden" and h_in is not None and f is not None and (attn is not None or
                                                                             not cfg.layers[i].attention):
            h = h_in + (0.0 if attn is None else attn)  # the two additions alone
            var = sum(self.dumped_var(t) for t in (h_in, f, h + f) + ((attn, h) if attn is not None else ()))
            return h + f, e.sigma(var), "own inputs"
        local = self.local_layer(i)
        if local is None:
            return none
        values, sigmas = local
        source = "own inputs" if attn is not None or not cfg.layers[i].attention else "layer input"
        return values.get(st.name), sigmas.get(st.name), source

    # -- one stage ------------------------------------------------------------------------
    def tensor_stage(self, st: Stage) -> StageResult:
        ref = self.ref.trace[st.name]
        a, why = self.candidate(st, ref)
        if a is None:
            return StageResult(st, "MISSING" if why == "missing" else "NOT OK", message="" if why == "missing" else why)
        local_ref, s_local, source = self.local_reference(st)
        s_drift = self.drift_sigma(st.name)
        if st.kind == "topk_weights":
            a, ref, local_ref, s_drift, s_local = self.align_weights(st.layer, a, ref, local_ref, s_drift, s_local)
        self.usable[st.name] = a
        u = self.arithmetic.u
        drift = compare(a, ref, s_drift, u)
        local = None if local_ref is None else compare(a, local_ref, s_local, u)
        ok = drift.ok and (local is None or local.ok)
        r = StageResult(st, "OK" if ok else "NOT OK", drift, local)
        if local is not None and source == "layer input" and st.kind != "attn_out":
            r.message = "local: the layer recomputed from the candidate's residual stream"
        if st.kind == "logits":
            self.logits = logits_summary(a, ref, s_drift)
            if self.logits["kl_mean"] > self.logits["kl_budget"]:
                ok, r.status = False, "NOT OK"
                r.message = (f"mean KL(reference ‖ candidate) {self.logits['kl_mean']:.3g} over the {self.precision} "
                             f"budget {self.logits['kl_budget']:.3g} (κ_rms² × the {self.logits['kl_expected']:.3g} "
                             "its rounding explains)")
        if not ok:
            r.hint = diagnose(self, st, a, ref, local_ref, r, s_drift if local is None or local.ok else s_local)
        return r

    def align_weights(self, i, a, ref, local_ref, s_drift, s_local):
        """topk_weights side by side by expert id (a backend may order its top-k differently); σ follows
        the reference's order."""
        cand_ids = self.routes.get(i)
        ref_ids = self.ref.trace[f"topk_ids.{i}"]
        if cand_ids is None or not all(set(x) == set(y) for x, y in zip(cand_ids.tolist(), ref_ids.tolist())):
            return a, ref, local_ref, s_drift, s_local
        ca, ra = np.argsort(cand_ids, axis=1), np.argsort(ref_ids, axis=1)
        a = np.take_along_axis(a, ca, 1)
        ref, s_drift = np.take_along_axis(ref, ra, 1), np.take_along_axis(s_drift, ra, 1)
        if local_ref is not None:
            local_ref = np.take_along_axis(local_ref, ca, 1)  # the local recompute used the candidate's routes
            s_local = np.take_along_axis(s_local, ra, 1)
        return a, ref, local_ref, s_drift, s_local

    def routes_stage(self, st: Stage) -> StageResult:
        i, spec = st.layer, self.model.config.layers[st.layer].moe
        ref_ids = self.ref.trace[st.name]
        raw = self.cand.get(st.name)
        source = "dumped"
        if raw is None:
            logits = self.usable.get(f"router_logits.{i}")
            if logits is None:
                return StageResult(st, "MISSING", message="routes unknown: near-tie flips cannot be told from errors here")
            raw, source = infer_routes(self.model, i, logits), "inferred from the candidate's router_logits"
        ids = np.asarray(raw)
        while ids.ndim > 2 and ids.shape[0] == 1:
            ids = ids[0]
        if ids.dtype.kind == "f":
            if not np.all(np.isfinite(ids)) or not np.all(ids == np.round(ids)):
                return StageResult(st, "NOT OK", message="topk_ids holds non-integer values")
            ids = ids.astype(np.int64)
        problem = route_problem(ids, ref_ids.shape[0], spec)
        if problem is not None:
            return StageResult(st, "NOT OK", message=problem)
        ids = ids.astype(np.int64)
        self.routes[i] = ids
        self._local.pop(i, None)  # the FFN's local recompute now replays these routes
        flips = classify_routes(self.model, i, self.ref.trace[f"router_logits.{i}"], ref_ids, ids,
                                self.drift_sigma(f"router_logits.{i}"))
        for f in flips:
            f["source"] = source
        errors = [f for f in flips if not f["near_tie"]]
        if errors:
            f = errors[0]
            r = StageResult(st, "NOT OK", flips=flips, message=(
                f"routing error at token {f['token']}: candidate chose experts {f['candidate']}, reference "
                f"{f['reference']}; reference margin {f['margin']:.3g} in {f['scale']} > {f['allowance']:.3g} "
                f"that {self.precision} explains ({len(errors)} token(s) like this)"))
            if self.keep_going:
                self.ref.force(i, ids)
            return r
        if flips:
            self.ref.force(i, ids)
            n = len(flips)
            worst = max(flips, key=lambda f: f["margin"] / max(f["allowance"], 1e-300))
            return StageResult(st, "FLIP", flips=flips, message=(
                f"{n} near-tie flip(s) ({source}), e.g. token {worst['token']}: {worst['reference']}→"
                f"{worst['candidate']}, margin {worst['margin']:.2g} ≤ {worst['allowance']:.2g}; reference "
                f"recomputed with the candidate's routes from layer {i} on"))
        return StageResult(st, "OK", message=f"same experts for all {ids.shape[0]} tokens ({source})")

    def run(self) -> list[StageResult]:
        results: list[StageResult] = []
        failed = False
        for st in stage_plan(self.model.config):
            if failed and not self.keep_going:
                results.append(StageResult(st, "NOT COMPARED" if st.name in self.cand else "MISSING"))
                continue
            r = self.routes_stage(st) if st.kind == "topk_ids" else self.tensor_stage(st)
            results.append(r)
            failed = failed or r.status == "NOT OK"
        return results


def check(model: Model, candidate: dict[str, np.ndarray], precision: str, *,
          input_ids: np.ndarray | None = None, reference_trace: dict[str, np.ndarray] | None = None,
          keep_going: bool = False, candidate_source: str = "candidate", reference_source: str = "reference",
          notes: list[str] | None = None) -> Report:
    """Compare a candidate's tensors (trace names) with the reference forward pass of `model`."""
    if precision not in ARITHMETIC:
        raise InputError(f"candidate dtype {precision!r} is not one of {', '.join(CANDIDATE_DTYPES)}")
    ids = candidate_ids(candidate, input_ids, reference_trace)
    check_token_count(candidate, ids.size, {s.name for s in stage_plan(model.config)})
    ref = Reference(model, ids, reference_trace)
    checker = _Checker(model, candidate, precision, ref, keep_going)
    stages = checker.run()
    known = {s.name for s in stage_plan(model.config)} | {"input_ids"}
    report = Report(precision=precision, candidate=candidate_source, reference=reference_source, tokens=int(ids.size),
                    stages=stages, missing=[r.stage.name for r in stages if r.status == "MISSING"],
                    unknown=sorted(set(candidate) - known), notes=list(notes or []) + checker.notes,
                    forced_layers=sorted(ref.forced), logits=checker.logits,
                    unverified_config_keys=model.config.unverified_keys)
    if report.compared == 0:
        raise InputError(f"{candidate_source}: none of its tensors is a trace tensor of this model "
                         f"(it holds {', '.join(sorted(candidate)[:6])}{' ...' if len(candidate) > 6 else ''}); "
                         "use --map to rename a backend's names to trace names (spec/format.md §2)")
    return report


def candidate_ids(candidate: dict, given: np.ndarray | None, reference_trace: dict | None) -> np.ndarray:
    """The token ids the candidate ran on: its own input_ids, --tokens, or the golden trace's; all that are
    given must agree."""
    found = []
    if "input_ids" in candidate:
        found.append(("the candidate's input_ids", dumped_ids(np.asarray(candidate["input_ids"]))))
    if given is not None:
        found.append(("--tokens", np.asarray(given, np.int64)))
    if reference_trace is not None:
        found.append(("the golden trace's input_ids", np.asarray(reference_trace["input_ids"], np.int64)))
    if not found:
        raise InputError("the candidate holds no input_ids: give the token ids it ran on with --tokens 1,2,3")
    for name, ids in found[1:]:
        if ids.shape != found[0][1].shape or np.any(ids != found[0][1]):
            raise InputError(f"{found[0][0]} {found[0][1].tolist()[:12]} differ from {name} {ids.tolist()[:12]}")
    return found[0][1]


def dumped_ids(ids: np.ndarray) -> np.ndarray:
    """A candidate's input_ids -> int64 [T]: integers, or floats that hold whole numbers (some dumps
    store everything as float); anything else (fractions, NaN, Inf) is an InputError, never truncated."""
    ids = ids.reshape(-1)
    if ids.dtype.kind == "f":
        bad = ~np.isfinite(ids) | (ids != np.round(ids))
        if bad.any():
            k = int(np.argmax(bad))
            raise InputError(f"the candidate's input_ids hold a value that is not a token id: {ids[k]!r} at "
                             f"position {k}")
    elif ids.dtype.kind not in "iu":
        raise InputError(f"the candidate's input_ids are {ids.dtype}, not integer token ids")
    return ids.astype(np.int64)


def check_token_count(candidate: dict, T: int, names: set[str]) -> None:
    """Every trace tensor has one row per token: a candidate whose tensors hold another number of rows
    ran on other tokens than the ones given (bad input, not a wrong result)."""
    for name in sorted(names & set(candidate)):
        shape = np.shape(candidate[name])
        rows = shape[1] if len(shape) == 3 and shape[0] == 1 else shape[0] if shape else None  # [1, T, X] or [T, X]
        if rows is not None and rows != T:
            raise InputError(f"the candidate's {name} has {rows} token rows (shape {list(shape)}) but its input ids "
                             f"have {T} tokens: were the ids (--tokens) the ones the backend ran on?")


def logits_summary(a: np.ndarray, b: np.ndarray, sigma: np.ndarray) -> dict:
    """KL, same-top-1, whether each top-1 disagreement is a near tie of the reference's two best logits
    (closer than κ(σ₁ + σ₂)), and the mean-KL budget: κ_KL × the mean KL that errors of σ explain
    (spec/tolerances.md §3.3)."""
    stats = logit_stats(a, b)
    ties = []
    for t in stats["top1_differs_at"]:
        top2 = np.argsort(b[t])[-2:]
        margin = float(b[t, top2[1]] - b[t, top2[0]])
        allowance = float(KAPPA * (sigma[t, top2[0]] + sigma[t, top2[1]]))
        ties.append({"token": t, "margin": margin, "allowance": allowance, "near_tie": margin <= allowance})
    stats["top1_differences"] = ties
    stats["kl_expected"] = float(np.mean(expected_kl(b, sigma)))
    # KL is itself computed in float64: each log-probability errs by ~4 roundings of the largest |logit|
    floor = float(np.mean(8 * np.finfo(np.float64).eps * (np.max(np.abs(b), axis=-1) + 1)))
    stats["kl_budget"] = KAPPA_KL * stats["kl_expected"] + floor
    return stats


# ---------------------------------------------------------------------------------------------
# Hints for the first divergence: what the pattern of the error suggests


def effective_u(precision: str, n: int) -> float:
    """u + u_acc·√n: the scale of one stage's rounding in `precision` (for comparing precisions in hints)."""
    a = ARITHMETIC[precision]
    return a.u + a.u_acc * np.sqrt(n)


def _token_ratios(a: np.ndarray, b: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    """[T, N] -> [T]: each token's score, the larger of its worst |a − b| / κσ and its
    √mean(((a − b)/σ)²) / κ_rms (> 1: the token is off)."""
    z = np.abs(a - b) / np.maximum(sigma, 1e-300)
    return np.maximum(np.max(z, axis=-1) / KAPPA, np.sqrt(np.mean(np.square(z), axis=-1)) / KAPPA_RMS)


def rope_pattern(ratios: np.ndarray) -> bool:
    """Whether per-token error ratios [T] look like a RoPE error: token 0 (no rotation) within its
    bound, most later tokens beyond it, and the error growing with position (rank correlation ≥ 0.5
    over tokens 1..T-1) — not one or two elements of one token, which is what rounding gives."""
    if ratios.shape[0] < 4 or ratios[0] > 1:
        return False
    later = ratios[1:]
    if np.mean(later > 1) < 0.5:
        return False
    ranks = np.argsort(np.argsort(later))
    pos = np.arange(later.shape[0])
    return float(np.corrcoef(pos, ranks)[0, 1]) >= 0.5 or np.mean(later > 1) >= 0.9


def diagnose(checker: _Checker, st: Stage, a: np.ndarray, ref: np.ndarray, local_ref: np.ndarray | None,
             r: StageResult, sigma: np.ndarray) -> str:
    """One or two sentences on what the error pattern points to (heuristics, said as such): whether the
    layer itself is wrong, then the pattern of the stage's kind, then whether a wider rounding explains it."""
    c = r.local if (r.local is not None and not r.local.ok) else r.drift
    against = ref if c is r.drift else local_ref
    cfg = checker.model.config
    hints = [locality_hint(r)]
    if st.kind == "attn_out" and against is not None and against.ndim == 2 and against.shape[0] > 1:
        hints.append(attention_hint(_token_ratios(a, against, sigma)))
    if st.kind == "topk_weights" and st.layer is not None:
        hints.append(topk_weights_hint(cfg.layers[st.layer].moe, a, ref))
    if st.kind == "ffn_out" and st.layer is not None and cfg.layers[st.layer].moe is not None and against is not None:
        routes = checker.routes.get(st.layer, checker.ref.trace[f"topk_ids.{st.layer}"])
        hints.append(experts_hint(cfg.layers[st.layer].moe.num_experts, routes, _token_ratios(a, against, sigma) > 1))
    hints.append(precision_hint(checker.precision, c.score, config_reduction(cfg)))
    return "; ".join(h for h in hints if h)


def locality_hint(r: StageResult) -> str:
    """Whether the stage is wrong from the candidate's own inputs (its layer) or was handed an error."""
    if r.local is None:
        return ""
    return ("the layer computes wrong from its own inputs (local check fails)" if not r.local.ok else
            "this stage is right given the candidate's own inputs (local check passes): the error was "
            "accumulated before it")


def attention_hint(ratios: np.ndarray) -> str:
    """attn_out: which tokens are off ([T] ratios to the bound) points at RoPE, the mask or the projections."""
    bad = ratios > 1
    if rope_pattern(ratios):
        return ("token 0 agrees (position 0: no rotation, sees only itself) and the later ones are off, more so "
                "further on: suspect the RoPE convention (rotate-half vs interleaved pairs), θ or its scaling")
    if not bad[-1] and bad[:-1].any():
        return ("only the last token agrees: earlier tokens see something extra, suspect the causal mask (off "
                "by one lets a token see the next)")
    if bad[0]:
        return ("token 0 is wrong too (it attends only to itself): suspect q/k/v/o projections, their biases, "
                "the q/k norm, or the GQA head → key/value head mapping")
    return ""


def topk_weights_hint(spec, a: np.ndarray, ref: np.ndarray) -> str:
    """topk_weights: a renormalisation one side does and the other does not."""
    s_c, s_r = a.sum(-1) / spec.routed_scaling_factor, ref.sum(-1) / spec.routed_scaling_factor
    if np.allclose(s_c, 1, atol=1e-2) and not np.allclose(s_r, 1, atol=1e-2):
        return ("the candidate's top-k weights sum to 1 per token, the reference's do not (norm_topk_prob=false): "
                "it renormalises, or takes a softmax over the chosen logits")
    if np.allclose(s_r, 1, atol=1e-2) and not np.allclose(s_c, 1, atol=1e-2):
        return "the reference renormalises the top-k weights (norm_topk_prob=true), the candidate does not"
    return ""


def experts_hint(num_experts: int, routes: np.ndarray, bad: np.ndarray) -> str:
    """ffn_out of an MoE: which experts the wrong tokens ([T] bool) share."""
    experts = range(num_experts)
    used = [e for e in experts if np.any(routes == e)]
    suspects = [e for e in used if bad[np.any(routes == e, axis=1)].all()]
    clean = [e for e in used if not bad[np.any(routes == e, axis=1)].any()]
    if bad.all():
        return ("every token is off: suspect what all tokens share (the shared expert or its gate, the norm before "
                "the FFN) or experts most tokens use (expert order, an absorbed layer's norm weight not folded "
                "into its expert)")
    if clean:
        return (f"tokens routed only among experts {clean} are right, others not: suspect the weights of experts "
                f"{[e for e in experts if e not in clean]} (expert order, or an absorbed layer's norm weight that "
                "was not folded into its gate/up projections)")
    if suspects:
        return f"the wrong tokens all use experts {suspects}"
    return ""


def precision_hint(precision: str, score: float, n: float) -> str:
    """An error of `score` × the bound that a wider rounding than `precision` would explain."""
    explained = [p for p in ("float32", "float16", "bfloat16")
                 if ARITHMETIC[p].u > ARITHMETIC[precision].u and score * effective_u(precision, n) <= effective_u(p, n)]
    if not explained:
        return ""
    return (f"an error this size is what {explained[0]} rounding gives: a stage computed in {explained[0]} (or a "
            "wrong --candidate-dtype)?")


# ---------------------------------------------------------------------------------------------
# Text report


def _fmt(x: float) -> str:
    return f"{x:.4g}" if abs(x) >= 1e-3 or x == 0 else f"{x:.3e}"


def _where(st: Stage, c: Comparison) -> str:
    if len(c.where) != 2:
        return str(list(c.where))
    label = {"logits": "v", "router_logits": "e", "router_scores": "e", "topk_weights": "k"}.get(st.kind, "h")
    if st.kind == "topk_weights":
        label = "k"  # slot after sorting by expert id
    return f"t{c.where[0]} {label}{c.where[1]}"


def _compress(names: list[str]) -> str:
    """['hidden.0', 'hidden.1', 'logits'] -> 'hidden.{0,1}, logits'."""
    groups: dict[str, list[str]] = {}
    for n in names:
        kind, _, layer = n.partition(".")
        groups.setdefault(kind, []).append(layer)
    parts = [k if layers == [""] else f"{k}.{{{','.join(layers)}}}" if len(layers) > 1 else f"{k}.{layers[0]}"
             for k, layers in groups.items()]
    return ", ".join(parts)


def format_report(report: Report, quiet: bool = False) -> str:
    """The text report: header, one line per stage, what was not compared, the logits' summary, then
    the first divergence and the verdict (only those two with `quiet`)."""
    lines = [] if quiet else report_header(report) + stage_table(report) + report_footer(report) + [""]
    return "\n".join(lines + divergence_lines(report.first_divergence) + [report.verdict()])


def report_header(report: Report) -> list[str]:
    u = ARITHMETIC[report.precision].u
    lines = [f"candidate {report.candidate} ({report.precision}, u = {u:.2e}) vs reference {report.reference} "
             f"(float64), {report.tokens} tokens",
             f"check: |Δ| ≤ {KAPPA:g}σ per element and rms(Δ/σ) ≤ {KAPPA_RMS:g} per tensor, σ the error "
             f"{report.precision} rounding explains there; drift: against the reference pass (σ of every rounding "
             "since the embeddings); local: recomputed from the candidate's own inputs (σ of this stage's, or this "
             "layer's, roundings). Columns: the worse of the two ratios (≤ 1 is OK)."]
    lines += [f"note: {note}" for note in report.notes]
    if report.unverified_config_keys:
        lines.append(f"note: config key(s) not verified (d2m_ref does not know what they change): "
                     f"{', '.join(report.unverified_config_keys)}")
    return lines + [""]


def stage_table(report: Report) -> list[str]:
    """One line per compared stage; a count of those not compared after the first divergence."""
    header = f"{'stage':<18}{'drift':>9}{'local':>9}{'max |Δ|':>11}  {'where':<11}{'candidate':>12}{'reference':>12}  verdict"
    lines, skipped = [header, "-" * len(header)], 0
    for r in report.stages:
        if r.status == "NOT COMPARED":
            skipped += 1
        elif r.status != "MISSING":
            lines.append(stage_line(r))
    if skipped:
        lines.append(f"({skipped} later stages not compared: they inherit the first divergence; --keep-going "
                     "compares them anyway)")
    return lines


def stage_line(r: StageResult) -> str:
    if r.stage.kind == "topk_ids":
        return f"{r.stage.name:<18}{'':>9}{'':>9}{'':>11}  {r.message}  {r.status}"
    c = r.worst
    if c is None:
        return f"{r.stage.name:<18}  {r.message}  {r.status}"
    drift = f"{r.drift.score:.2f}" if r.drift else "-"
    local = f"{r.local.score:.2f}" + ("L" if r.message.startswith("local: the layer") else "") if r.local else "-"
    return (f"{r.stage.name:<18}{drift:>9}{local:>9}{_fmt(c.max_abs):>11}  {_where(r.stage, c):<11}"
            f"{_fmt(c.candidate):>12}{_fmt(c.reference):>12}  {r.status}")


def report_footer(report: Report) -> list[str]:
    """What the candidate lacked or added, and the logits' token-level summary."""
    lines = []
    if report.missing:
        lines.append(f"missing from the candidate (not compared): {_compress(report.missing)}")
    if report.unknown:
        lines.append(f"candidate tensors that are not trace names (ignored; see --map): {', '.join(report.unknown[:8])}"
                     + (" ..." if len(report.unknown) > 8 else ""))
    if report.logits:
        lg = report.logits
        ties = sum(d["near_tie"] for d in lg["top1_differences"])
        lines.append(f"logits: same top-1 {100 * lg['same_top1']:.1f} % ({len(lg['top1_differs_at'])} differ, "
                     f"{ties} of them near ties), KL(ref‖cand) mean {lg['kl_mean']:.3g} (budget "
                     f"{lg['kl_budget']:.3g}), max {lg['kl_max']:.3g}")
    return lines


def divergence_lines(first: StageResult | None) -> list[str]:
    """The first divergence: where, the values, the check that failed, the message and the hint."""
    if first is None:
        return []
    c = first.worst
    where = f"layer {first.stage.layer}" if first.stage.layer is not None else "after the layers"
    if c is None:
        return [f"first divergence: {where}, {first.stage.name}: {first.message}"] + \
            ([f"  hint: {first.hint}"] if first.hint else [])
    which = "local" if c is first.local else "drift"
    lines = [f"first divergence: {where}, {first.stage.name}, token {c.where[0] if c.where else '-'}"
             f"{', index ' + str(c.where[1]) if len(c.where) > 1 else ''}: candidate {c.candidate:.6g}, "
             f"reference {c.reference:.6g} ({which} check: {c.ratio:.2f}× the allowed error per element, {c.bad} of "
             f"{c.size} elements over; {c.rms_ratio:.2f}× the allowed RMS)"]
    if first.message:
        lines.append(f"  {first.message}")
    if first.hint:
        lines.append(f"  hint: {first.hint}")
    return lines


# ---------------------------------------------------------------------------------------------
# Command line


def golden_dir() -> Path:
    """The repository's golden/ folder (beside the package, in a source checkout)."""
    return Path(__file__).resolve().parent.parent / "golden"


def resolve_golden(case: str) -> Path:
    p = Path(case)
    if p.is_dir():
        return p
    g = golden_dir() / case
    if g.is_dir() and (g / "trace.safetensors").is_file():
        return g
    known = sorted(d.name for d in golden_dir().glob("*") if (d / "trace.safetensors").is_file()) \
        if golden_dir().is_dir() else []
    raise InputError(f"--golden {case}: no such case" + (f"; cases: {', '.join(known)}" if known else
                                                          " (and no golden/ folder beside the package: give a path)"))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Check a backend's intermediate tensors against the "
                                "float64 reference, layer by layer, routing-aware.",
                                epilog="exit status: 0 pass, 1 mismatch, 2 bad input")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--weights", type=Path, metavar="PATH", help="the model (safetensors file, index or directory)")
    src.add_argument("--golden", metavar="CASE", help="a golden case (name under golden/, or its directory)")
    p.add_argument("--config", type=Path, metavar="config.json", help="the model's config (default: beside the weights)")
    p.add_argument("--candidate", type=Path, required=True, metavar="FILE",
                   help="the backend's tensors: .safetensors (trace or dump), .npz, or Polygraphy RunResults .json")
    p.add_argument("--candidate-dtype", choices=CANDIDATE_DTYPES,
                   help="what the backend computed in (sets the tolerances; default: what the file says)")
    p.add_argument("--map", type=Path, metavar="names.json", help="{backend tensor name: trace name}; '{i}' matches a layer")
    ids = p.add_mutually_exclusive_group()
    ids.add_argument("--tokens", metavar="IDS", help="the token ids the candidate ran on, if it did not dump input_ids")
    ids.add_argument("--inputs", type=Path, metavar="inputs.json",
                     help="Polygraphy: the inputs it fed (`polygraphy run ... --save-inputs inputs.json`): input_ids")
    p.add_argument("--runner", help="Polygraphy: which runner's outputs (when the file holds several)")
    p.add_argument("--iteration", type=int, default=0, help="Polygraphy: which iteration (default 0)")
    p.add_argument("--json", type=Path, metavar="report.json", help="also write the report as JSON")
    p.add_argument("--force", action="store_true", help="overwrite an existing --json file")
    p.add_argument("--keep-going", action="store_true", help="judge every stage, also after the first divergence")
    p.add_argument("--quiet", action="store_true", help="print only the first divergence and the verdict")
    add_strict_config_option(p)
    return p


def main(argv: list[str] | None = None) -> int:
    return main_with_status(build_parser(), run, argv)


def polygraphy_input_ids(path: Path, iteration: int) -> np.ndarray:
    """input_ids [T] from Polygraphy's saved inputs (a batch axis of 1 dropped)."""
    from .adapters.polygraphy import read_inputs
    feeds = read_inputs(path, iteration)
    if "input_ids" not in feeds:
        raise InputError(f"--inputs {path}: holds {', '.join(sorted(feeds)) or 'no inputs'}, not input_ids")
    ids = np.asarray(feeds["input_ids"])
    while ids.ndim > 1 and ids.shape[0] == 1:
        ids = ids[0]
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
        raise InputError(f"--inputs {path}: input_ids is {ids.dtype} {list(ids.shape)}, expected integer [T]")
    return ids.astype(np.int64)


def run(args: argparse.Namespace) -> int:
    case = resolve_golden(args.golden) if args.golden is not None else None
    cand: Candidate = load_candidate(args.candidate, runner=args.runner, iteration=args.iteration)
    tensors, notes = cand.tensors, list(cand.notes)
    if args.map is not None:
        tensors, map_notes = apply_map(tensors, name_map(args.map))
        notes += map_notes
    precision = args.candidate_dtype or cand.dtype_hint
    if precision is None or precision not in ARITHMETIC:
        raise InputError(f"{args.candidate}: cannot tell what precision the backend computed in"
                         f"{f' (file says {precision!r})' if precision else ''}: pass --candidate-dtype "
                         f"({', '.join(CANDIDATE_DTYPES)})")
    tokens = None
    if args.tokens is not None:
        from .tokenizer import parse_token_ids
        tokens = parse_token_ids(args.tokens)
    if args.inputs is not None:
        tokens = polygraphy_input_ids(args.inputs, args.iteration)
    trace = None
    if case is not None:
        from .tracefile import read_trace
        model = load_model(case / "model.safetensors", args.config or case / "config.json",
                           strict_config=args.strict_config)
        trace, _ = read_trace(case / "trace.safetensors")
        reference = f"golden {case.name}"
    else:
        model = load_model(args.weights, args.config, strict_config=args.strict_config)
        reference = str(args.weights)
    warn_unverified(model)
    try:
        inputs = [("the candidate", args.candidate), ("the name map", args.map), ("the Polygraphy inputs", args.inputs)]
        if case is not None:
            inputs += [("a golden file", case / name) for name in ("model.safetensors", "config.json", "trace.safetensors")]
        else:
            inputs += model_files(args, model)
        check_output(args.json, args.force, "--json", inputs)  # before the work, not after it
        report = check(model, tensors, precision, input_ids=tokens, reference_trace=trace,
                       keep_going=args.keep_going, candidate_source=cand.source, reference_source=reference,
                       notes=notes)
    finally:
        model.close()
    print(format_report(report, quiet=args.quiet))
    if args.json is not None:
        data = (json.dumps(report.as_dict(), indent=1) + "\n").encode("utf-8")
        atomic_write(args.json, lambda f: f.write(data), force=args.force)
    return report.exit_code


if __name__ == "__main__":
    sys.exit(main())
