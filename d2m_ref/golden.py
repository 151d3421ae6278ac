"""The golden suite: small models of every supported family and Dense2MoE layout, with their float64 traces.

    python -m d2m_ref.golden regenerate [--case NAME ...] [--dir golden]
    python -m d2m_ref.golden verify     [--case NAME ...] [--dir golden]
    python -m d2m_ref.golden list

Each case is a folder golden/<name>/ holding
    config.json          the model (HF config; dense2moe with a layer_plan)
    model.safetensors    its weights: d2m_ref.synth random tensors of the case's seed, stored BF16,
                         under the family's own names (transformers loads them as they are)
    trace.safetensors    the float64 reference trace of the case's input ids (spec/format.md §2;
                         __metadata__ carries spec_version, trace_version and the regenerating command)
Everything is a pure function of the definitions below (no torch, no download): `regenerate`
rewrites the files, `verify` proves the committed ones are what the code computes now — weights
and config byte for byte, the trace to 1e-12 of each tensor's RMS (not bitwise: float64 BLAS
summation order differs between machines and libraries, which moves the last few bits; 1e-12 is
~5000 ulps, far below any real change), expert choices exactly.  Input ids are chosen so that
every router margin (k-th vs (k+1)-th expert) is above MIN_ROUTER_MARGIN: rounding cannot flip a
route on another machine.

`python -m d2m_ref.check --golden NAME --candidate dump.safetensors` checks a backend against a case.
Exit status: 0 done / verified, 1 a case differs (verify), 2 bad input.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import SPEC_VERSION
from .config import parse_config
from .errors import D2MError, InputError
from .ops import router_scores
from .safetensors_io import save_streaming
from .synth import random_tensor, to_storage
from .tracefile import capture_trace, read_trace, trace_metadata, write_trace
from .weights import expected_tensors, load_model

PROG = "python -m d2m_ref.golden"
REGENERATE = f"{PROG} regenerate"
RTOL = 1e-12
MIN_ROUTER_MARGIN = 1e-6
FILES = ("config.json", "model.safetensors", "trace.safetensors")


@dataclass(frozen=True)
class Case:
    name: str
    what: str  # one line for golden/README.md
    config: dict
    seed: int
    tokens: int = 8


def _dense(family: str, **extra) -> dict:
    d = {"model_type": family, "vocab_size": 61, "hidden_size": 32, "intermediate_size": 48,
         "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
         "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "max_position_embeddings": 64, "tie_word_embeddings": False}
    d.update(extra)
    return d


def _d2m(base: str, plan: list[dict], **extra) -> dict:
    d = _dense("dense2moe", base_model_type=base, num_hidden_layers=len(plan), moe_intermediate_size=32,
               num_experts_per_tok=2, layer_plan=plan)
    d.update(extra)
    return d


CASES: tuple[Case, ...] = (
    Case("llama_llama3rope_tied", "llama, llama3 RoPE scaling (all three frequency bands), tied embeddings, GQA 2",
         _dense("llama", num_hidden_layers=3, tie_word_embeddings=True, rope_theta=None,
                rope_parameters={"rope_type": "llama3", "rope_theta": 500.0, "factor": 4.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 32}), seed=101),
    Case("llama_bias_linearrope", "llama with attention_bias (q, k, v, o biases), linear RoPE scaling, MHA",
         _dense("llama", num_key_value_heads=4, attention_bias=True,
                rope_scaling={"rope_type": "linear", "factor": 2.0}), seed=102),
    Case("qwen2", "qwen2: q/k/v biases, GQA 4 (8 query heads over 2 kv heads)",
         _dense("qwen2", num_attention_heads=8, head_dim=4, rope_theta=1e6), seed=103),
    Case("qwen3", "qwen3: per-head q/k RMSNorm, head_dim ≠ hidden/heads",
         _dense("qwen3", head_dim=12, rope_theta=1e6), seed=104),
    Case("qwen2_moe", "qwen2_moe: top-2 of 4, no renormalisation, gated shared expert, layer 0 dense (mlp_only_layers)",
         _dense("qwen2_moe", num_hidden_layers=3, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24,
                shared_expert_intermediate_size=40, mlp_only_layers=[0], norm_topk_prob=False), seed=105),
    Case("qwen3_moe", "qwen3_moe: top-2 of 4 with norm_topk_prob, q/k norm",
         _dense("qwen3_moe", num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24, norm_topk_prob=True),
         seed=106),
    Case("mixtral", "mixtral: top-2 of 4, always renormalised; Mixtral's own tensor names "
         "(block_sparse_moe, experts w1/w3/w2)",
         _dense("mixtral", num_local_experts=4, num_experts_per_tok=2), seed=107),
    Case("olmoe", "olmoe: q/k RMSNorm over the whole projection, clip_qkv, top-2 of 4",
         _dense("olmoe", num_experts=4, num_experts_per_tok=2, clip_qkv=1.0, norm_topk_prob=False), seed=108),
    Case("d2m_top1_attnfree_start", "Dense2MoE (llama): attention-free MoE first (group of 2, top-1 softmax, "
         "norm_topk_prob: weight 1), dense, then a group of 3 with attention (top-1, raw probability)",
         _d2m("llama", [
             {"attention": False, "ffn": "moe", "num_experts": 2, "num_experts_per_tok": 1, "norm_topk_prob": True,
              "source_layers": [0, 1]},
             {"attention": True, "ffn": "dense", "source_layers": [2], "attention_source": 2},
             {"attention": True, "ffn": "moe", "num_experts": 3, "num_experts_per_tok": 1, "norm_topk_prob": False,
              "source_layers": [3, 4, 5], "attention_source": 3}]), seed=201),
    Case("d2m_sigmoid_shared_attnfree_middle", "Dense2MoE (qwen3): top-2 sigmoid with selection bias, scaling "
         "2.5 and a gated shared expert (group of 4); attention-free group of 2 in the middle; dense with attention",
         _d2m("qwen3", [
             {"attention": True, "ffn": "moe", "num_experts": 4, "scoring_func": "sigmoid", "norm_topk_prob": True,
              "selection_bias": True, "routed_scaling_factor": 2.5, "shared_expert_intermediate_size": 24,
              "shared_expert_gate": True, "source_layers": [0, 1, 2, 3], "attention_source": 0},
             {"attention": False, "ffn": "moe", "num_experts": 2, "num_experts_per_tok": 1,
              "source_layers": [4, 5]},
             {"attention": True, "ffn": "dense", "source_layers": [6], "attention_source": 6}]), seed=202),
    Case("d2m_softmax_groups_attnfree_end", "Dense2MoE (qwen2): dense; top-2 softmax without renormalisation "
         "and an ungated shared expert (group of 4); attention-free top-2 of 2 sigmoid (group of 2); "
         "attention-free dense last; tied embeddings",
         _d2m("qwen2", [
             {"attention": True, "ffn": "dense", "source_layers": [0], "attention_source": 0},
             {"attention": True, "ffn": "moe", "num_experts": 4, "norm_topk_prob": False,
              "shared_expert_intermediate_size": 16, "source_layers": [1, 2, 3, 4], "attention_source": 1},
             {"attention": False, "ffn": "moe", "num_experts": 2, "scoring_func": "sigmoid", "norm_topk_prob": True,
              "source_layers": [5, 6]},
             {"attention": False, "ffn": "dense", "source_layers": [7]}], tie_word_embeddings=True), seed=203),
    Case("d2m_top2_norm_fused3", "Dense2MoE (llama): every layer fused: groups of 3 and 2, top-2 softmax with "
         "norm_topk_prob, attention kept in both",
         _d2m("llama", [
             {"attention": True, "ffn": "moe", "num_experts": 3, "norm_topk_prob": True,
              "source_layers": [0, 1, 2], "attention_source": 0},
             {"attention": True, "ffn": "moe", "num_experts": 2, "norm_topk_prob": True,
              "source_layers": [3, 4], "attention_source": 3}]), seed=204),
)


def _clean(config: dict) -> dict:
    """Drop keys set to None in a case definition (so a case can remove a default key)."""
    return {k: v for k, v in config.items() if v is not None}


def case_named(name: str) -> Case:
    for c in CASES:
        if c.name == name:
            return c
    raise InputError(f"no golden case named {name!r}; cases: {', '.join(c.name for c in CASES)}")


def input_ids(case: Case) -> np.ndarray:
    """The case's tokens: a fixed formula of its seed (no tokenizer, no file)."""
    return np.random.default_rng([case.seed, 1]).integers(0, case.config["vocab_size"], case.tokens).astype(np.int64)


def router_margins(model, trace: dict[str, np.ndarray]) -> float:
    """The smallest gap, over MoE layers and tokens, between the k-th and (k+1)-th choice value
    (scores + selection bias) relative to the row's largest: how close any route is to flipping."""
    smallest = np.inf
    for i, spec in enumerate(model.config.layers):
        if spec.moe is None or spec.moe.top_k == spec.moe.num_experts:
            continue
        values = router_scores(trace[f"router_logits.{i}"], spec.moe.scoring)
        bias = model.weights.layers[i].ffn.selection_bias
        if bias is not None:
            values = values + bias.load(np.float64)
        ordered = -np.sort(-values, axis=1)
        gap = (ordered[:, spec.moe.top_k - 1] - ordered[:, spec.moe.top_k]) / np.max(np.abs(values), axis=1)
        smallest = min(smallest, float(gap.min()))
    return smallest


def _stored_name(name: str, family: str) -> str:
    """Our canonical tensor name -> the name the family's own checkpoints use (Mixtral: block_sparse_moe,
    experts w1 = gate, w3 = up, w2 = down), so transformers loads the golden files too."""
    if family != "mixtral" or ".mlp." not in name:
        return name
    name = name.replace(".mlp.", ".block_sparse_moe.")
    for ours, theirs in (("gate_proj", "w1"), ("up_proj", "w3"), ("down_proj", "w2")):
        name = name.replace(f".{ours}.weight", f".{theirs}.weight")
    return name


def write_weights(case: Case, path: Path, force: bool = False) -> None:
    """model.safetensors of the case: synth.random_tensor(name, shape, seed) of every tensor, BF16."""
    config = _clean(case.config)
    cfg = parse_config(config, where=f"golden case {case.name}")
    shapes = {_stored_name(n, cfg.family): (n, s) for n, s in expected_tensors(cfg)}
    save_streaming(path, [(stored, "BF16", s) for stored, (_, s) in shapes.items()],
                   lambda stored: to_storage(random_tensor(shapes[stored][0], shapes[stored][1], case.seed), "BF16"),
                   metadata={"format": "pt", "generated_by": f"{REGENERATE} --case {case.name}"}, force=force)


def config_text(config: dict) -> str:
    return json.dumps(config, indent=2) + "\n"


def regenerate(case: Case, root: Path) -> Path:
    """Write the case's three files under root/<name>/ (overwriting)."""
    folder = root / case.name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(config_text(_clean(case.config)), encoding="utf-8")
    write_weights(case, folder / "model.safetensors", force=True)
    model = load_model(folder / "model.safetensors")
    try:
        ids = input_ids(case)
        trace = capture_trace(model, ids, np.float64)
        margin = router_margins(model, trace)
        if margin < MIN_ROUTER_MARGIN:
            raise InputError(f"golden case {case.name}: a route is a near tie (relative margin {margin:.2e} < "
                             f"{MIN_ROUTER_MARGIN:.0e}); change its seed")
        meta = trace_metadata(model, f"golden/{case.name}/model.safetensors", np.float64,
                              f"{REGENERATE} --case {case.name}")
        meta["golden_case"] = case.name
        write_trace(folder / "trace.safetensors", trace, meta, force=True)
    finally:
        model.close()
    return folder


def verify(case: Case, root: Path) -> list[str]:
    """Problems with the committed files of `case` (empty: they are what the code computes now)."""
    folder = root / case.name
    fix = f"regenerate with: {REGENERATE} --case {case.name}"
    missing = [f for f in FILES if not (folder / f).is_file()]
    if missing:
        return [f"{folder}: missing {', '.join(missing)}; {fix}"]
    problems = []
    config = _clean(case.config)
    if (folder / "config.json").read_text(encoding="utf-8") != config_text(config):
        problems.append(f"{folder}/config.json differs from the case definition; {fix}")
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp) / "model.safetensors"
        write_weights(case, fresh)
        if fresh.read_bytes() != (folder / "model.safetensors").read_bytes():
            problems.append(f"{folder}/model.safetensors differs from what d2m_ref.synth writes now; {fix}")
    trace, meta = read_trace(folder / "trace.safetensors")
    if meta.get("spec_version") != SPEC_VERSION:
        problems.append(f"{folder}/trace.safetensors: spec_version {meta.get('spec_version')!r}, code {SPEC_VERSION!r}; {fix}")
    model = load_model(folder / "model.safetensors")
    try:
        if not np.array_equal(trace.get("input_ids"), input_ids(case)):
            problems.append(f"{folder}: input_ids differ from the case's formula; {fix}")
            return problems
        now = capture_trace(model, trace["input_ids"], np.float64)
    finally:
        model.close()
    if set(now) != set(trace):
        problems.append(f"{folder}/trace.safetensors: tensors {sorted(set(now) ^ set(trace))} added or removed; {fix}")
    for name in sorted(set(now) & set(trace)):
        a, b = now[name], trace[name]
        if a.shape != b.shape:
            problems.append(f"{folder}: {name} has shape {list(a.shape)}, committed {list(b.shape)}; {fix}")
        elif a.dtype.kind == "f" and not np.isfinite(b).all():  # NaN compares as no difference: say it
            problems.append(f"{folder}: {name} holds {int(np.sum(~np.isfinite(b)))} non-finite value(s) (NaN/Inf) "
                            f"in the committed trace; {fix}")
        elif a.dtype.kind in "iu":
            if not np.array_equal(a, b):
                problems.append(f"{folder}: {name} differs (expert choice or ids): {a.tolist()} vs {b.tolist()}")
        else:
            scale = float(np.sqrt(np.mean(np.square(b)))) or 1.0
            err = float(np.max(np.abs(a - b))) / scale
            if err > RTOL:
                problems.append(f"{folder}: {name} differs by {err:.2e} of its RMS (> {RTOL:.0e}); if the change "
                                f"is intended, {fix}")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description="Regenerate or verify the golden cases.")
    parser.add_argument("command", choices=("regenerate", "verify", "list"))
    parser.add_argument("--case", action="append", metavar="NAME", help="only this case (repeatable)")
    parser.add_argument("--dir", type=Path, default=Path(__file__).resolve().parent.parent / "golden",
                        help="the golden folder (default: golden/ of this checkout)")
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 2
    try:
        cases = [case_named(n) for n in args.case] if args.case else list(CASES)
        if args.command == "list":
            for c in cases:
                print(f"{c.name:40} {c.what}")
            return 0
        if args.command == "regenerate":
            for c in cases:
                print(f"wrote {regenerate(c, args.dir)}")
            return 0
        failed = 0
        for c in cases:
            problems = verify(c, args.dir)
            print(f"{'OK    ' if not problems else 'DIFFER'} {c.name}")
            for p in problems:
                print(f"  {p}")
            failed += bool(problems)
        print(f"{len(cases) - failed} passed, {failed} failed")
        return 1 if failed else 0
    except D2MError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
