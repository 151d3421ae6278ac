"""The oracle catches real bugs at the right layer, and does not cry wolf on honest low precision.

Candidates are backends built from tests/peer/buggy.py — a plain-torch Dense2MoE written from
spec/architecture.md, independent of d2m_ref's NumPy code — each with one deliberate bug, recorded
with d2m_ref.adapters.torch.record_trace (forward hooks, as a user would) and checked with
d2m_ref.check against the float64 reference of the same checkpoint.

The catalog model (CATALOG, qwen2 base: q/k/v biases; 6 query heads over 2 kv heads) is laid out
so that each bug first acts in a known layer, and the test asserts the checker's first divergence
is exactly that layer and stage:

    layer 0  no attention, dense MLP              the first RMSNorm (eps bug)
    layer 1  attention + MoE top-2 of 3, softmax,  first attention (RoPE, GQA, bias, mask bugs),
             norm_topk_prob, experts from dense    first router (fp16 router, norm flip), first
             layers 1, 2, 3 (two absorbed)         experts (permuted, unfolded norm)
    layer 2  no attention, MoE top-1 of 2, sigmoid
    layer 3  attention + MoE top-2 of 4, softmax   first softmax router without renormalisation
             without renormalisation, gated shared (softmax after top-k), first shared-expert gate
             expert
    layer 4  attention + dense MLP

The embedding table is scaled by 0.01 (about the std of trained embeddings and of transformers'
init): the first RMSNorm then sees mean(x²) ≈ 1e-4 against eps = 1e-5, where eps inside or outside
the square root differs by ~5 %, as in real models' first layer.

"Norm weight of an absorbed layer not folded": when Dense2MoE fuses dense layers 1, 2, 3 into layer
1's MoE, each expert needs its own source layer's post-attention norm weight w_s (folded into its
gate/up projections: W·diag(w_s)), while the fused layer keeps layer 1's norm.  The reference
checkpoint holds the folded experts.  The buggy candidate is a backend whose converter did not fold:
every expert sees the input normalised with the kept layer's weight w_1 instead of its own, which we
model as multiplying expert e's input features by w_1 / w_e (e = 1, 2; expert 0 is layer 1's own and
is right).  The router is untouched.  So only the experts absorbed from other layers are wrong.

Precisions: every bug is asserted in float32, float16 and bfloat16 candidates, except router_fp16 in
float16 and bfloat16 (a float16 router is no bug in a half-precision backend).  Each is asserted
twice: with the whole trace dumped (first divergence = the stage the bug acts in), and residual-only
(input_ids, hidden.{i}, router tensors, logits: first divergence in the layer the bug is in, found by
recomputing the layer from the candidate's own hidden.{i-1}) — except norm_topk_prob_flipped in
bfloat16 residual-only, flagged in layer 1 or 2 (RESIDUAL_CAUGHT_LATER says why).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import d2m_ref  # noqa: E402
from d2m_ref.adapters.torch import record_trace  # noqa: E402
from d2m_ref.check import check  # noqa: E402
from d2m_ref.synth import model_from_arrays, random_arrays  # noqa: E402

try:
    from peer import buggy
    from peer.dumps import residual_only
except ImportError:  # pragma: no cover
    from tests.peer import buggy
    from tests.peer.dumps import residual_only

CATALOG = {
    "model_type": "dense2moe", "base_model_type": "qwen2", "vocab_size": 97, "hidden_size": 48,
    "intermediate_size": 64, "num_attention_heads": 6, "num_key_value_heads": 2, "head_dim": 8,
    "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 64, "tie_word_embeddings": False,
    "moe_intermediate_size": 64, "num_experts_per_tok": 2,
    "layer_plan": [
        {"attention": False, "ffn": "dense", "source_layers": [0]},
        {"attention": True, "ffn": "moe", "num_experts": 3, "num_experts_per_tok": 2, "norm_topk_prob": True,
         "source_layers": [1, 2, 3], "attention_source": 1},
        {"attention": False, "ffn": "moe", "num_experts": 2, "num_experts_per_tok": 1, "scoring_func": "sigmoid",
         "source_layers": [4, 5]},
        {"attention": True, "ffn": "moe", "num_experts": 4, "num_experts_per_tok": 2, "norm_topk_prob": False,
         "shared_expert_intermediate_size": 32, "shared_expert_gate": True, "source_layers": [6, 7, 8, 9],
         "attention_source": 6},
        {"attention": True, "ffn": "dense", "source_layers": [10]},
    ]}

# bug -> the stage where it first acts in CATALOG (the first divergence the checker must name)
EXPECTED = {
    "rope_interleaved": "attn_out.1",
    "gqa_modulo": "attn_out.1",
    "norm_topk_prob_flipped": "topk_weights.1",
    "softmax_after_topk": "topk_weights.3",
    "experts_permuted": "ffn_out.1",
    "eps_outside_sqrt": "ffn_out.0",
    "no_qkv_bias": "attn_out.1",
    "router_fp16": "router_logits.1",
    "causal_off_by_one": "attn_out.1",
    "shared_gate_dropped": "ffn_out.3",
    "norm_not_folded": "ffn_out.1",
}
# Residual-only, caught but not always in the first layer it acts in: the layer-local recompute of
# topk_weights.1 passes through layer 1's attention (attn_out not dumped), whose honest bfloat16 error
# on the router input is as large as what renormalising 2 of 3 weights does; in 3 of the 5 seeds it is
# flagged in layer 1, in the others in layer 2 (a top-1 sigmoid router, where it sets the weight to 1).
RESIDUAL_CAUGHT_LATER = {("norm_topk_prob_flipped", "bfloat16")}
# (bug, precision) pairs not asserted, and why (see the module docstring)
NOT_ASSERTED = {("router_fp16", "float16"): "not a bug at this precision",
                ("router_fp16", "bfloat16"): "not a bug at this precision"}
BUG_SEEDS = range(5)
HONEST_SEEDS = range(20)
T = 12


def catalog(seed: int):
    cfg = d2m_ref.parse_config(CATALOG)
    arrays = random_arrays(cfg, seed, "F32")
    arrays["model.embed_tokens.weight"] = (arrays["model.embed_tokens.weight"] * 0.01).astype(np.float32)
    return cfg, arrays


def fold_factors(cfg, seed: int) -> dict:
    """Layer 1's experts 1 and 2 came from dense layers 2 and 3: the unfolded candidate gives them the
    kept layer's norm weight w_1 where they need their own, i.e. input features times w_1 / w_e."""
    w = 1 + 0.2 * np.random.default_rng([seed, 7]).standard_normal((3, cfg.hidden_size))
    return {1: {1: w[0] / w[1], 2: w[0] / w[2]}}


def run(seed: int, dtype: str, bugs=frozenset(), quant=None, precision=None, config=CATALOG, arrays=None,
        residual: bool = False):
    if arrays is None:
        cfg, arrays = catalog(seed)
    else:
        cfg = d2m_ref.parse_config(config)
    model = model_from_arrays(cfg, arrays, "F32")
    ids = np.random.default_rng(seed).integers(0, cfg.vocab_size, T)
    candidate = buggy.build_candidate(config, arrays, dtype, set(bugs), quant, fold_factors(cfg, seed))
    trace = record_trace(candidate, ids)
    return check(model, residual_only(trace) if residual else trace, precision or dtype)


def test_expected_layers_cover_every_bug():
    assert set(EXPECTED) == set(buggy.BUGS)


@pytest.mark.parametrize("precision", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("bug", sorted(buggy.BUGS))
def test_bug_is_caught_at_the_layer_where_it_first_acts(bug, precision):
    """Each deliberate bug: the checker fails, and its first divergence is the stage where the bug acts."""
    if (bug, precision) in NOT_ASSERTED:
        pytest.skip(NOT_ASSERTED[(bug, precision)])
    for seed in BUG_SEEDS:
        report = run(seed, precision, {bug})
        first = report.first_divergence
        assert first is not None, f"{bug} in a {precision} candidate (seed {seed}) passed"
        assert first.stage.name == EXPECTED[bug], (
            f"{bug} ({precision}, seed {seed}): first divergence {first.stage.name}, expected {EXPECTED[bug]}")


@pytest.mark.parametrize("precision", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("bug", sorted(buggy.BUGS))
def test_bug_is_caught_in_its_layer_from_the_residual_stream_alone(bug, precision):
    """A candidate that dumped only input_ids, hidden.{i}, the router tensors and the logits: the layer
    recomputed from its own hidden.{i-1} (spec/tolerances.md §2.4) fails in the layer the bug is in."""
    if (bug, precision) in NOT_ASSERTED:
        pytest.skip(NOT_ASSERTED[(bug, precision)])
    layer = int(EXPECTED[bug].split(".")[-1])
    for seed in BUG_SEEDS:
        first = run(seed, precision, {bug}, residual=True).first_divergence
        assert first is not None, f"{bug} in a residual-only {precision} candidate (seed {seed}) passed"
        if (bug, precision) in RESIDUAL_CAUGHT_LATER:
            assert first.stage.layer in (layer, layer + 1), (bug, precision, seed, first.stage.name)
            continue
        assert first.stage.layer == layer and first.local is not None and not first.local.ok, (
            f"{bug} ({precision}, seed {seed}): first divergence {first.stage.name}, expected layer {layer}")


@pytest.mark.parametrize("precision", ["float16", "bfloat16", "float32"])
@pytest.mark.parametrize("residual", [False, True], ids=["full", "residual_only"])
def test_honest_candidates_pass_catalog(precision, residual):
    """An honest candidate (no bug) passes on every seed: zero false alarms, route flips replayed."""
    for seed in HONEST_SEEDS:
        report = run(seed, precision, residual=residual)
        assert report.exit_code == 0, f"seed {seed}: false alarm\n{report.verdict()}"


@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_honest_weight_quantised_candidates_pass(quant):
    """int8/int4 weights (bf16 activations) judged with --candidate-dtype int8w / int4w: no false alarms."""
    for seed in HONEST_SEEDS:
        report = run(seed, "bfloat16", quant=quant, precision=f"{quant}w")
        assert report.exit_code == 0, f"seed {seed}: false alarm\n{report.verdict()}"


DEEP = dict(CATALOG, layer_plan=[
    ({"attention": True, "ffn": "moe", "num_experts": 3, "num_experts_per_tok": 2, "norm_topk_prob": i % 2 == 0}
     if i % 3 else {"attention": i % 2 == 0, "ffn": "dense"}) for i in range(12)])


@pytest.mark.parametrize("precision", ["float16", "bfloat16"])
def test_honest_candidates_pass_twelve_layers(precision):
    """Depth: a 12-layer model (drift tolerances grow as √depth) gives no false alarm either."""
    cfg = d2m_ref.parse_config(DEEP)
    for seed in HONEST_SEEDS:
        report = run(seed, precision, config=DEEP, arrays=random_arrays(cfg, seed, "F32"))
        assert report.exit_code == 0, f"seed {seed}: false alarm\n{report.verdict()}"


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["float16", "bfloat16"])
def test_honest_transformers_candidates_pass(precision, tmp_path):
    """transformers itself as the candidate (seven families and the Dense2MoE peer, cast to f16/bf16 from
    the float64 checkpoint the reference reads): zero false alarms over 20 seeds."""
    pytest.importorskip("transformers")
    try:
        from peer import dense2moe as d2m_peer, hf
    except ImportError:  # pragma: no cover
        from tests.peer import dense2moe as d2m_peer, hf
    dt = buggy.torch_dtype(precision)
    builders = [(c.name, lambda s, c=c: hf.build(c, torch.float64, s), hf.save) for c in hf.FAMILIES]
    builders += [(c.name, lambda s, c=c: d2m_peer.build_dense2moe(c.config, torch.float64, s),
                  lambda m, d, c=c: d2m_peer.save_dense2moe(m, c.config, d)) for c in d2m_peer.DENSE2MOE_CASES]
    alarms = []
    for seed in HONEST_SEEDS:
        for name, build, save in builders:
            m64 = build(seed)
            folder = tmp_path / f"{name}_{seed}"
            save(m64, folder)
            model = d2m_ref.load_model(folder)
            ids = np.random.default_rng(seed).integers(0, model.config.vocab_size, 11)
            report = check(model, record_trace(copy.deepcopy(m64).to(dt), ids), precision)
            model.close()
            if report.exit_code:
                alarms.append(f"{name} seed {seed}: {report.verdict()}")
    assert not alarms, "\n".join(alarms)


# ---------------------------------------------------------------------------------------------
# The README table: python -m tests.test_bug_catalog


def catalog_table(seeds=BUG_SEEDS) -> str:
    """bug -> where it is caught, per precision and mode (whole trace: the stage; residual-only: the
    layer), over `seeds`; and the float16 whole-trace margin (how many times its bound)."""
    cols = [(p, r) for r in (False, True) for p in ("float32", "float16", "bfloat16")]
    lines = ["| bug | acts first at | " + " | ".join(f"{p}{' residual-only' if r else ''}" for p, r in cols)
             + " | float16 margin |", "|---" * (len(cols) + 3) + "|"]
    for bug in buggy.BUGS:
        cells, metric = [], ""
        want_layer = int(EXPECTED[bug].split(".")[-1])
        for precision, residual in cols:
            if (bug, precision) in NOT_ASSERTED:
                cells.append("n/a")
                continue
            found = [run(seed, precision, {bug}, residual=residual).first_divergence for seed in seeds]
            names = [f.stage.name if f else "passed" for f in found]
            right = sum((f is not None and f.stage.layer == want_layer) if residual else n == EXPECTED[bug]
                        for f, n in zip(found, names))
            cell = f"{right}/{len(names)}"
            others = sorted({n for f, n in zip(found, names)
                             if not ((f is not None and f.stage.layer == want_layer) if residual else n == EXPECTED[bug])})
            cells.append(cell + (f" (else {', '.join(others)})" if others else ""))
            if (precision, residual) == ("float16", False) and found[0] is not None and found[0].worst is not None:
                c = found[0].worst
                metric = f"{c.score:.0f}× ({'local' if c is found[0].local else 'drift'})"
        lines.append(f"| {bug}: {buggy.BUGS[bug]} | {EXPECTED[bug]} | " + " | ".join(cells) + f" | {metric} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(catalog_table())
