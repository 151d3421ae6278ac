"""The checker (d2m_ref.check, d2m_ref.compare): comparator, stages, routing, reports, command line.

Candidates here are made from d2m_ref's own float64 trace (exact copies, edited on purpose), so
each test knows exactly what the checker must say.  Independent candidates (torch, transformers)
are in test_bug_catalog.py and test_adapters.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import d2m_ref
from d2m_ref import check as chk
from d2m_ref.compare import KAPPA, KAPPA_KL, KAPPA_RMS, compare
from d2m_ref.rounding import ARITHMETIC
from d2m_ref.safetensors_io import save
from d2m_ref.synth import model_from_arrays, random_arrays, write_checkpoint

from .models import dense2moe_config

PLAN = [
    {"attention": True, "ffn": "dense"},
    {"attention": True, "ffn": "moe", "num_experts": 4, "num_experts_per_tok": 2, "norm_topk_prob": False},
    {"attention": False, "ffn": "moe", "num_experts": 3, "num_experts_per_tok": 1, "scoring_func": "sigmoid",
     "selection_bias": True},
    {"attention": True, "ffn": "dense"},
]


def small_model(seed: int = 0, plan=PLAN):
    cfg = d2m_ref.parse_config(dense2moe_config(plan))
    arrays = random_arrays(cfg, seed, "F32")
    return cfg, arrays, model_from_arrays(cfg, arrays, "F32")


def reference_trace(model, ids, forced=None) -> dict:
    capture: dict = {}
    d2m_ref.forward(model, ids, capture=capture, forced_routes=forced)
    return capture


IDS = np.array([5, 17, 3, 88, 41, 9, 60, 2, 33])


# ---------------------------------------------------------------------------------------------
# The comparator and the table


def test_comparator_reports_worst_element_and_both_values():
    """compare() names the element furthest past |a-b| <= κσ, with both values and its σ."""
    b = np.array([[1.0, -2.0, 3.0, 0.5], [0.1, 0.2, -0.1, 0.05]])
    sigma = np.full_like(b, 1e-4)
    sigma[1, 2] = 2e-4
    a = b.copy()
    a[1, 2] += 0.01
    c = compare(a, b, sigma, 2.0 ** -8)
    assert c.where == (1, 2) and c.candidate == a[1, 2] and c.reference == b[1, 2] and c.sigma == 2e-4
    assert c.ratio == pytest.approx(0.01 / (KAPPA * 2e-4))
    assert not c.ok and c.bad == 1 and c.max_abs == pytest.approx(0.01)
    assert compare(b, b, sigma, 2.0 ** -8).ratio == 0 and compare(b, b, sigma, 2.0 ** -8).cos_min == pytest.approx(1.0)


def test_comparator_aggregate_catches_an_error_spread_over_every_element():
    """Every element off by 3σ: each inside κσ, but no rounding moves them all at once (rms(z) = 3 > κ_rms)."""
    rng = np.random.default_rng(0)
    b = rng.standard_normal((16, 64))
    sigma = np.full_like(b, 1e-3)
    spread = compare(b + 3e-3 * np.sign(rng.standard_normal(b.shape)), b, sigma, 2.0 ** -8)
    assert spread.ratio < 1 and spread.rms_ratio == pytest.approx(3 / KAPPA_RMS) and not spread.ok
    honest = compare(b + 1e-3 * rng.standard_normal(b.shape), b, sigma, 2.0 ** -8)
    assert honest.ok and honest.rms_ratio == pytest.approx(1 / KAPPA_RMS, rel=0.1)
    rows = np.zeros(16, bool)
    rows[3] = True
    assert compare(b + 3e-3, b, sigma, 2.0 ** -8, rows=rows).size == 64


def test_sigma_floor_only_where_the_model_says_exact():
    """σ = 0 (an exact 0·0) is floored at a tiny fraction of the tensor's scale, not left to divide by zero."""
    b = np.array([[0.0, 1.0], [0.0, -1.0]])
    sigma = np.array([[0.0, 1e-3], [0.0, 1e-3]])
    assert compare(b, b, sigma, 2.0 ** -8).ok
    off = b.copy()
    off[0, 0] = 1e-6  # far beyond the floor (2^-20 · u · rms)
    assert not compare(off, b, sigma, 2.0 ** -8).ok


def test_every_precision_has_a_reason():
    for name, a in ARITHMETIC.items():
        assert 0 < a.u_acc <= a.u and a.why and a.weight_form in ("element", "row"), name
    assert ARITHMETIC["bfloat16"].u > ARITHMETIC["float16"].u > ARITHMETIC["float32"].u > ARITHMETIC["float64"].u
    assert KAPPA_KL == KAPPA_RMS ** 2


# ---------------------------------------------------------------------------------------------
# check() on edited copies of the reference


def test_exact_copy_passes_and_every_stage_is_compared():
    cfg, _, model = small_model()
    trace = reference_trace(model, IDS)
    report = chk.check(model, trace, "float64")
    assert report.exit_code == 0 and report.first_divergence is None
    assert [r.stage.name for r in report.stages] == [s.name for s in chk.stage_plan(cfg)]
    assert all(r.status == "OK" for r in report.stages) and not report.missing
    assert report.logits["same_top1"] == 1.0


def test_first_divergence_names_layer_token_tensor_and_values():
    """An error planted in attn_out.3 at token 4, feature 7 is the first divergence, and nothing before it."""
    _, _, model = small_model()
    trace = reference_trace(model, IDS)
    trace["attn_out.3"] = trace["attn_out.3"].copy()
    trace["attn_out.3"][4, 7] += 0.5
    report = chk.check(model, trace, "float32")
    first = report.first_divergence
    assert report.exit_code == 1
    assert (first.stage.name, first.stage.layer) == ("attn_out.3", 3)
    assert first.worst.where == (4, 7)
    assert first.worst.candidate == pytest.approx(first.worst.reference + 0.5)
    assert all(r.status == "OK" for r in report.stages[:report.stages.index(first)])
    assert all(r.status == "NOT COMPARED" for r in report.stages[report.stages.index(first) + 1:])
    text = chk.format_report(report)
    assert "first divergence: layer 3, attn_out.3, token 4, index 7" in text
    assert text.splitlines()[-1] == "FAIL: first divergence at layer 3 (attn_out.3)"
    assert "the layer computes wrong from its own inputs" in first.hint


def test_inherited_error_is_told_apart_from_a_local_one():
    """An error in hidden.0 that later stages inherit: the local check of the next layer passes."""
    _, _, model = small_model()
    ids = IDS
    trace = reference_trace(model, ids)
    bad = dict(trace)
    noise = np.random.default_rng(0).standard_normal(trace["hidden.0"].shape)
    bad["hidden.0"] = trace["hidden.0"] + 1e-2 * noise  # as if layer 0 had gone wrong
    # the rest of the candidate is computed from that drifted state, correctly
    bad.update({k: v for k, v in chk.layer_from_inputs(model, 1, bad["hidden.0"]).items()})
    report = chk.check(model, bad, "float32", keep_going=True)
    attn1 = next(r for r in report.stages if r.stage.name == "attn_out.1")
    assert attn1.local.ok and not attn1.drift.ok
    assert "accumulated before it" in attn1.hint


def test_keep_going_judges_every_stage():
    _, _, model = small_model()
    trace = reference_trace(model, IDS)
    trace["embeddings"] = trace["embeddings"] + 1.0
    report = chk.check(model, trace, "float32", keep_going=True)
    assert report.first_divergence.stage.name == "embeddings"
    assert not any(r.status == "NOT COMPARED" for r in report.stages)


def test_missing_tensors_are_listed_not_fatal():
    cfg, _, model = small_model()
    trace = reference_trace(model, IDS)
    partial = {k: v for k, v in trace.items() if k in ("input_ids", "hidden.1", "hidden.3", "logits")}
    report = chk.check(model, partial, "bfloat16")
    assert report.exit_code == 0
    assert "attn_out.0" in report.missing and "topk_ids.1" in report.missing and "hidden.1" not in report.missing
    assert "missing from the candidate (not compared): embeddings, attn_out.{0,1,3}" in chk.format_report(report)


def test_nan_in_candidate_is_a_mismatch_naming_the_tensor():
    _, _, model = small_model()
    trace = reference_trace(model, IDS)
    trace["ffn_out.1"] = trace["ffn_out.1"].copy()
    trace["ffn_out.1"][2, 5] = np.nan
    report = chk.check(model, trace, "bfloat16")
    first = report.first_divergence
    assert first.stage.name == "ffn_out.1" and "non-finite" in first.message and "[2, 5]" in first.message
    assert "first divergence: layer 1, ffn_out.1: 1 non-finite value(s)" in chk.format_report(report)


def test_batch_axis_is_squeezed_and_wrong_shapes_are_reported():
    _, _, model = small_model()
    trace = reference_trace(model, IDS)
    cand = {k: (v[None] if k != "input_ids" else v) for k, v in trace.items()}  # [1, T, ...] as backends dump
    assert chk.check(model, cand, "float64").exit_code == 0
    cand["hidden.2"] = cand["hidden.2"][:, :, :-1]
    first = chk.check(model, cand, "float64").first_divergence
    assert first.stage.name == "hidden.2" and "shape" in first.message


def test_top_k_order_within_a_token_does_not_matter():
    """A backend may list a token's experts in another order (torch.topk(sorted=False)): same set, same weights."""
    _, _, model = small_model()
    trace = reference_trace(model, IDS)
    trace["topk_ids.1"] = trace["topk_ids.1"][:, ::-1].copy()
    trace["topk_weights.1"] = trace["topk_weights.1"][:, ::-1].copy()
    assert chk.check(model, trace, "float64").exit_code == 0


def test_candidate_needs_input_ids_or_tokens():
    _, _, model = small_model()
    trace = reference_trace(model, IDS)
    del trace["input_ids"]
    with pytest.raises(d2m_ref.InputError, match="--tokens"):
        chk.check(model, trace, "float32")
    assert chk.check(model, trace, "float32", input_ids=IDS).exit_code == 0
    with pytest.raises(d2m_ref.InputError, match="differ"):
        chk.check(model, {**trace, "input_ids": IDS}, "float32", input_ids=IDS[::-1].copy())


# ---------------------------------------------------------------------------------------------
# Routing


def near_tie_model(seed: int = 0):
    """Layer 1's routers for experts 2 and 3 are almost the same row: their logits differ by ~1e-5,
    so every token sits on a near tie between them."""
    cfg, arrays, _ = small_model(seed)
    name = "model.layers.1.mlp.gate.weight"
    router = arrays[name].copy()
    router[3] = router[2] + 1e-5 * np.random.default_rng(seed).standard_normal(router.shape[1]).astype(np.float32)
    arrays[name] = router
    return cfg, model_from_arrays(cfg, arrays, "F32")


def flipped_candidate(model, layer: int, ids: np.ndarray, want: tuple[int, int]):
    """A float64 candidate that took the other expert of the pair `want` wherever the reference took one
    of them: a perfect backend except for the route flips."""
    ref = reference_trace(model, ids)
    routes = ref[f"topk_ids.{layer}"].copy()
    a, b = want
    swapped = np.where(routes == a, b, np.where(routes == b, a, routes))
    swapped = np.where(np.sort(swapped, 1)[:, :1] == np.sort(swapped, 1)[:, 1:2], routes, swapped)  # no duplicates
    return ref, reference_trace(model, ids, {layer: swapped}), swapped


def test_near_tie_flip_is_reported_and_replayed():
    """Flips between two experts whose logits differ by ~1e-5 are near ties at bf16: FLIP, the reference
    is recomputed with the candidate's routes, and every later stage then agrees."""
    _, model = near_tie_model()
    ref, cand, routes = flipped_candidate(model, 1, IDS, (2, 3))
    assert np.any(routes != ref["topk_ids.1"])
    report = chk.check(model, cand, "bfloat16")
    topk = next(r for r in report.stages if r.stage.name == "topk_ids.1")
    assert topk.status == "FLIP" and all(f["near_tie"] for f in topk.flips) and report.exit_code == 0
    assert report.forced_layers == [1]
    assert "near-tie route flip(s) in layer(s) 1 replayed" in report.verdict()
    after = [r for r in report.stages[report.stages.index(topk) + 1:] if r.drift is not None]
    assert max(r.drift.ratio for r in after) < 1e-6  # the candidate is exact once its routes are replayed


def test_flip_is_replayed_from_router_logits_when_topk_ids_are_missing():
    _, model = near_tie_model()
    _, cand, routes = flipped_candidate(model, 1, IDS, (2, 3))
    cand = dict(cand)
    del cand["topk_ids.1"]
    cand["router_logits.1"] = cand["router_logits.1"].copy()
    # the candidate's own logits (within bf16 error of the reference's) explain its choice
    for t in range(len(IDS)):
        hi, lo = (2, 3) if 2 in routes[t] else (3, 2)
        cand["router_logits.1"][t, hi] = max(cand["router_logits.1"][t, hi], cand["router_logits.1"][t, lo]) + 1e-6
    report = chk.check(model, cand, "bfloat16")
    topk = next(r for r in report.stages if r.stage.name == "topk_ids.1")
    assert topk.status == "FLIP" and "inferred from the candidate's router_logits" in topk.message
    assert report.exit_code == 0


def test_flip_beyond_the_margin_is_a_routing_error():
    """The same swap on an ordinary router (margins O(1)) is no near tie for a float32 candidate."""
    _, _, model = small_model()
    ref, cand, routes = flipped_candidate(model, 1, IDS, (0, 1))
    assert np.any(routes != ref["topk_ids.1"])
    report = chk.check(model, cand, "float32")
    first = report.first_divergence
    assert first.stage.name == "topk_ids.1" and "routing error" in first.message
    assert not all(f["near_tie"] for f in first.flips)


def test_without_routes_a_flip_shows_as_an_ffn_mismatch():
    """A candidate that dumps neither topk_ids nor router_logits: the checker cannot replay its flip,
    and says so (the stage is MISSING with a note) before the FFN mismatch it causes."""
    _, model = near_tie_model()
    _, cand, _ = flipped_candidate(model, 1, IDS, (2, 3))
    cand = {k: v for k, v in cand.items() if not k.startswith(("topk_ids", "router_logits", "router_scores",
                                                                 "topk_weights"))}
    report = chk.check(model, cand, "bfloat16")
    assert report.first_divergence.stage.name == "ffn_out.1"
    topk = next(r for r in report.stages if r.stage.name == "topk_ids.1")
    assert topk.status == "MISSING" and "routes unknown" in topk.message


def test_malformed_routes_are_a_mismatch():
    _, _, model = small_model()
    trace = reference_trace(model, IDS)
    trace["topk_ids.1"] = trace["topk_ids.1"].copy()
    trace["topk_ids.1"][0] = [1, 1]
    assert "same expert twice" in chk.check(model, trace, "float32").first_divergence.message
    trace["topk_ids.1"][0] = [1, 9]
    assert "expert ids must be in" in chk.check(model, trace, "float32").first_divergence.message


# ---------------------------------------------------------------------------------------------
# Command line


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    cfg = d2m_ref.parse_config(dense2moe_config(PLAN))
    (d / "config.json").write_text(json.dumps(dense2moe_config(PLAN)))
    write_checkpoint(cfg, d / "model.safetensors", seed=3, storage="BF16")
    model = d2m_ref.load_model(d)
    trace = reference_trace(model, IDS)
    model.close()
    return d, trace


def run_cli(*argv) -> int:
    return chk.main([str(a) for a in argv])


def test_cli_pass_and_json(checkpoint, tmp_path, capsys):
    d, trace = checkpoint
    cand = tmp_path / "cand.safetensors"
    save(cand, {k: (v.astype(np.float32) if v.dtype.kind == "f" else v) for k, v in trace.items()})
    assert run_cli("--weights", d, "--candidate", cand, "--json", tmp_path / "r.json") == 0
    out = capsys.readouterr().out
    assert "candidate precision float32 inferred" in out and out.strip().splitlines()[-1].startswith("PASS")
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["verdict"] == "PASS" and report["exit_code"] == 0 and report["precision"] == "float32"
    assert {s["stage"] for s in report["stages"]} >= {"embeddings", "topk_ids.1", "logits"}


def test_cli_mismatch_exit_1_with_map(checkpoint, tmp_path, capsys):
    """A backend's own names, renamed with --map (a '{i}' pattern covers every layer)."""
    d, trace = checkpoint
    names = {"hidden.0": "/model/layers.0/Add_1_output_0", "hidden.3": "/model/layers.3/Add_1_output_0",
             "logits": "logits_out", "input_ids": "input_ids"}
    arrays = {names[k]: v.astype(np.float16) if v.dtype.kind == "f" else v for k, v in trace.items() if k in names}
    arrays["logits_out"] = arrays["logits_out"] * np.float16(1.2)
    np.savez(tmp_path / "out.npz", **arrays)
    (tmp_path / "map.json").write_text(json.dumps({"/model/layers.{i}/Add_1_output_0": "hidden.{i}",
                                                   "logits_out": "logits"}))
    code = run_cli("--weights", d, "--candidate", tmp_path / "out.npz", "--map", tmp_path / "map.json", "--quiet",
                   "--json", tmp_path / "r.json")
    out = capsys.readouterr().out
    assert code == 1 and "first divergence: after the layers, logits" in out
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["first_divergence"]["tensor"] == "logits" and report["verdict"] == "FAIL"
    assert [s["stage"] for s in report["stages"] if s["status"] == "OK"] == ["hidden.0", "hidden.3"]


@pytest.mark.parametrize("args, message", [
    (["--candidate", "{tmp}/nope.safetensors"], "no such file"),
    (["--candidate", "{tmp}/x.txt"], "unknown candidate format"),
    (["--candidate", "{tmp}/noids.npz"], "--tokens"),
    (["--candidate", "{tmp}/noids.npz", "--tokens", "1,2"], "sequence|differ|shape|no trace|none of"),
    (["--candidate", "{tmp}/strange.npz", "--candidate-dtype", "float16"], "none of its tensors"),
    (["--candidate", "{tmp}/noids.npz", "--map", "{tmp}/bad.json"], "name map"),
    (["--candidate", "{tmp}/pg.json"], "not a Polygraphy RunResults"),
])
def test_cli_bad_input_exit_2_names_the_culprit(checkpoint, tmp_path, capsys, args, message):
    d, trace = checkpoint
    (tmp_path / "x.txt").write_text("hello")
    np.savez(tmp_path / "noids.npz", **{"hidden.0": trace["hidden.0"].astype(np.float32)})
    np.savez(tmp_path / "strange.npz", input_ids=IDS, foo=np.zeros(3, np.float16))
    (tmp_path / "bad.json").write_text("[1, 2]")
    (tmp_path / "pg.json").write_text('{"hello": 1}')
    code = run_cli("--weights", d, *[a.format(tmp=tmp_path) for a in args])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and "Traceback" not in err
    import re
    assert re.search(message, err), err


def test_cli_unknown_golden_case_lists_the_cases(capsys):
    assert run_cli("--golden", "no_such_case", "--candidate", "x.safetensors") == 2
    assert "cases: " in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Hints


def _attn_layer(model) -> int:
    return next(i for i, s in enumerate(model.config.layers) if s.attention)


def test_rope_hint_only_for_a_rope_pattern():
    """The RoPE hint needs RoPE's pattern: token 0 right, the later tokens off, more so further on.
    One element of one token just over its bound (what rounding does at worst) gets no RoPE hint."""
    cfg, _, model = small_model()
    trace = reference_trace(model, IDS)
    i = _attn_layer(model)
    name = f"attn_out.{i}"
    grows = dict(trace)
    a = trace[name].copy()
    a[1:] += 0.02 * np.arange(1, a.shape[0])[:, None] * np.abs(a[1:]).mean()
    grows[name] = a
    hint = chk.check(model, grows, "float32").first_divergence.hint
    assert "RoPE" in hint, hint
    one = dict(trace)
    b = trace[name].copy()
    b[4, 3] += 1e-4 * np.abs(b).max()
    one[name] = b
    first = chk.check(model, one, "float32").first_divergence
    assert first is not None and first.stage.name == name and "RoPE" not in first.hint, first.hint


def test_mean_kl_verdict_fails_what_every_element_allows():
    """Each position's 4 most likely logits 7σ high: each element inside 8σ, the tensor's rms(Δ/σ) tiny, but
    the token distributions move by more than 4x the KL rounding explains: FAIL at logits, by KL."""
    from d2m_ref.rounding import ErrorModel

    cfg, _, model = small_model()
    trace = reference_trace(model, IDS)
    *_, (name, _, sigma) = ErrorModel(model, "float32").drift(IDS, lambda i: trace[f"topk_ids.{i}"])
    assert name == "logits"
    logits = trace["logits"].copy()
    top = np.argsort(logits, axis=-1)[:, -4:]  # the 4 most likely tokens of each position
    rows = np.arange(len(top))[:, None]
    logits[rows, top] += 7 * sigma[rows, top]
    report = chk.check(model, {"input_ids": trace["input_ids"], "logits": logits}, "float32")
    stage = next(r for r in report.stages if r.stage.name == "logits")
    assert stage.drift.ratio < 1 and stage.drift.rms_ratio < 1
    assert stage.status == "NOT OK" and "KL" in stage.message and report.exit_code == 1


@pytest.mark.parametrize("victim", ["candidate", "weights", "config", "map", "report"])
def test_json_never_replaces_an_input_and_keeps_a_report_without_force(checkpoint, tmp_path, capsys, victim):
    """check --json: an existing report is kept unless --force; the candidate, the weights, the config
    and the map are refused even with --force (all were overwritten before: issue 22, "Data lost")."""
    d, trace = checkpoint
    cand = tmp_path / "cand.safetensors"
    save(cand, {k: (v.astype(np.float32) if v.dtype.kind == "f" else v) for k, v in trace.items()})
    (tmp_path / "map.json").write_text(json.dumps({"logits": "logits"}))
    (tmp_path / "report.json").write_text("my old report")
    target = {"candidate": cand, "weights": Path(d) / "model.safetensors", "config": Path(d) / "config.json",
              "map": tmp_path / "map.json", "report": tmp_path / "report.json"}[victim]
    before = target.read_bytes()
    argv = ["--weights", d, "--candidate", cand, "--map", tmp_path / "map.json", "--json", target, "--quiet"]
    assert run_cli(*argv) == 2
    err = capsys.readouterr().err
    assert ("pass --force" in err) if victim == "report" else ("is the same file as" in err)
    assert target.read_bytes() == before
    if victim == "report":
        assert run_cli(*argv, "--force") == 0 and json.loads(target.read_text())["verdict"] == "PASS"
    else:
        assert run_cli(*argv, "--force") == 2 and target.read_bytes() == before


def test_fractional_input_ids_are_refused_by_name(checkpoint, tmp_path, capsys):
    """input_ids stored as floats: whole numbers are ids, a fraction is bad input (it used to be
    truncated to another token and checked against it: issue 22, "Wrong verdicts")."""
    d, trace = checkpoint
    arrays = {k: (v.astype(np.float32) if v.dtype.kind == "f" else v) for k, v in trace.items()}
    arrays["input_ids"] = trace["input_ids"].astype(np.float32)
    np.savez(tmp_path / "whole.npz", **arrays)
    assert run_cli("--weights", d, "--candidate", tmp_path / "whole.npz", "--quiet") == 0
    arrays["input_ids"][1] += 0.5
    np.savez(tmp_path / "frac.npz", **arrays)
    capsys.readouterr()
    assert run_cli("--weights", d, "--candidate", tmp_path / "frac.npz", "--quiet") == 2
    assert "input_ids hold a value that is not a token id" in capsys.readouterr().err


def test_non_finite_reference_weights_are_bad_input(checkpoint, tmp_path, capsys):
    """A NaN in the reference weights: exit 2 naming the first non-finite stage, not a "mismatch"
    (exit 1) amid NumPy warnings (issue 22)."""
    import warnings
    from d2m_ref.safetensors_io import SafetensorsFile
    d, trace = checkpoint
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_bytes((Path(d) / "config.json").read_bytes())
    with SafetensorsFile(Path(d) / "model.safetensors") as f:
        tensors = {n: np.array(f.raw(n)) for n in f.names()}
    name = next(n for n in tensors if n.endswith("layers.1.mlp.experts.0.down_proj.weight") or
                n.endswith("layers.1.mlp.down_proj.weight"))
    tensors[name] = tensors[name].copy()
    tensors[name].flat[0] = 0x7FC0  # a bfloat16 NaN (the checkpoint is BF16: uint16 bits)
    save(bad / "model.safetensors", tensors, dtypes={n: "BF16" for n in tensors})
    cand = tmp_path / "cand.safetensors"
    save(cand, {k: (v.astype(np.float32) if v.dtype.kind == "f" else v) for k, v in trace.items()})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no NumPy RuntimeWarning on the way
        assert run_cli("--weights", bad, "--candidate", cand, "--quiet") == 2
    err = capsys.readouterr().err
    assert "the float64 reference is not finite: first in" in err and "layer 1" in err


def test_a_nan_router_stops_the_forward_by_name():
    """All-NaN router weights: the top-k masked NaN scores to weight 0 and the layer's experts were
    dropped without a word (run exited 0: issue 22); now a NonFiniteError naming the layer."""
    from d2m_ref.errors import NonFiniteError
    cfg, arrays, _ = small_model()
    name = next(n for n in arrays if n.startswith("model.layers.1.") and n.endswith("mlp.gate.weight"))
    arrays = {**arrays, name: np.full(arrays[name].shape, np.nan, np.float32)}
    with pytest.raises(NonFiniteError, match=r"router_logits.1 hold NaN/Inf from a finite input: layer 1"):
        d2m_ref.forward(model_from_arrays(cfg, arrays, "F32"), IDS)
