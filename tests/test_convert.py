"""d2m_ref.calibrate and d2m_ref.convert (spec/convert.md): the statistics against a direct computation,
the plan search against brute force, the conversion's exactness, determinism and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from d2m_ref import calibrate as cal
from d2m_ref import convert as conv
from d2m_ref import roofline
from d2m_ref.config import parse_config
from d2m_ref.demo import byte_tokenizer
from d2m_ref.errors import InputError
from d2m_ref.model import attention, forward, mlp, Runtime
from d2m_ref.ops import rms_norm, rope_cos_sin, rope_inv_freq
from d2m_ref.kernels import default_kernels
from d2m_ref.model import KVCache
from d2m_ref.safetensors_io import SafetensorsFile
from d2m_ref.synth import write_checkpoint
from d2m_ref.weights import METADATA_CONFIG_KEY, load_model
from tests.models import dense_config

LAYERS = 6
TEXT = ("In the beginning God created the heaven and the earth. And the earth was without form, and void; "
        "and darkness was upon the face of the deep. ") * 8


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory) -> Path:
    """A dense llama of LAYERS layers, F64 storage (so folding is exact to float64), byte tokenizer."""
    folder = tmp_path_factory.mktemp("dense")
    cfg = dense_config("llama", layers=LAYERS, vocab=257, hidden=32, width=48, max_position_embeddings=256)
    write_checkpoint(parse_config(cfg), folder / "model.safetensors", seed=3, storage="F64",
                     metadata={METADATA_CONFIG_KEY: json.dumps(cfg)})
    (folder / "config.json").write_text(json.dumps(cfg))
    (folder / "tokenizer.json").write_text(byte_tokenizer().to_str())
    (folder / "text.txt").write_text(TEXT)
    return folder


@pytest.fixture(scope="module")
def stats(dense_dir) -> dict:
    model = load_model(dense_dir)
    ids = byte_tokenizer().encode(TEXT).ids
    return cal.calibrate(model, np.asarray(ids), tokens=600, window=200)


@pytest.fixture
def stats_path(tmp_path, stats) -> str:
    """The module's calibration statistics written to a file, as --stats takes them."""
    path = tmp_path / "stats.json"
    path.write_text(json.dumps(stats))
    return str(path)


def logits_of(folder, text: str) -> np.ndarray:
    """float64 logits of the model in `folder` on `text` (byte tokenizer)."""
    return forward(load_model(folder), np.asarray(byte_tokenizer().encode(text).ids))[0]


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    """max |a − b| relative to max |b|."""
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def convert(dense_dir, out, *args) -> int:
    return conv.main(["--weights", str(dense_dir), "--out", str(out), *args])


def write_plan(tmp_path, plan: dict) -> str:
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(plan))
    return str(path)


# ---------------------------------------------------------------------------------------------
# Calibration statistics (spec/convert.md §1)


def test_statistics_equal_a_direct_computation_from_the_trace(dense_dir, stats):
    """The streaming sink's means equal §1.1–1.4 computed from whole traces of the same windows."""
    model = load_model(dense_dir)
    ids = np.asarray(byte_tokenizer().encode(TEXT).ids)[:600]
    traces = []
    for lo in range(0, 600, 200):
        capture = {}
        forward(model, ids[lo:lo + 200], capture=capture)
        traces.append(capture)

    def h(t, i):
        return t["embeddings"] if i < 0 else t[f"hidden.{i}"]

    def mean(f):
        return np.mean(np.concatenate([f(t) for t in traces]))

    def cos(a, b):
        return np.sum(a * b, -1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)

    for i, layer in enumerate(stats["layers"]):
        assert layer["block_influence"] == pytest.approx(mean(lambda t: 1 - cos(h(t, i - 1), h(t, i))), rel=1e-12)
        assert layer["attention_drop"] == pytest.approx(
            mean(lambda t: cos(h(t, i - 1), h(t, i - 1) + t[f"attn_out.{i}"])), rel=1e-12)
        for n, d in enumerate(layer["angular_distance"], start=1):
            want = mean(lambda t: np.arccos(np.clip(cos(h(t, i - 1), h(t, i + n - 1)), -1, 1)) / np.pi)
            assert d == pytest.approx(want, rel=1e-12, abs=1e-15)
        assert len(layer["angular_distance"]) == min(cal.MAX_SPAN, LAYERS - i)
        mid = np.concatenate([h(t, i - 1) + t[f"attn_out.{i}"] for t in traces])
        x = mid / np.sqrt(np.mean(mid ** 2, -1, keepdims=True) + model.config.rms_norm_eps)
        np.testing.assert_allclose(stats["ffn_input_centroids"][i], x.mean(0), rtol=1e-12, atol=1e-15)
    assert stats["tokens"] == 600


def test_calibrate_cli_writes_stats_that_convert_reads(dense_dir, tmp_path, capsys):
    out = tmp_path / "stats.json"
    assert cal.main(["--weights", str(dense_dir), "--text", str(dense_dir / "text.txt"), "--tokens", "400",
                     "--window", "100", "--out", str(out)]) == 0
    assert "window 4/4" in capsys.readouterr().err
    doc = cal.read_stats(out, load_model(dense_dir))
    assert doc["tokens"] == 400 and len(doc["layers"]) == LAYERS
    assert cal.main(["--weights", str(dense_dir), "--text", str(dense_dir / "text.txt"), "--out", str(out)]) == 2
    assert "exists" in capsys.readouterr().err


@pytest.mark.parametrize("tokens, window, why", [(10_000, 100, "--tokens asks for 10000"),
                                                  (400, 1, "at least 2 tokens")])
def test_text_too_short_or_bad_window_is_named(dense_dir, tmp_path, capsys, tokens, window, why):
    out = tmp_path / "s.json"
    assert cal.main(["--weights", str(dense_dir), "--text", str(dense_dir / "text.txt"), "--tokens", str(tokens),
                     "--window", str(window), "--out", str(out)]) == 2
    assert why in capsys.readouterr().err and not out.exists()


def test_stats_of_another_model_are_refused(dense_dir, stats, tmp_path):
    path = tmp_path / "s.json"
    path.write_text(json.dumps({**stats, "model_digest": "0" * 64}))
    with pytest.raises(InputError, match="another model"):
        cal.read_stats(path, load_model(dense_dir))


# ---------------------------------------------------------------------------------------------
# Plans (spec/convert.md §2.1, §3)


def _stats_of(distances: list[list[float]]) -> dict:
    return {"layers": [{"angular_distance": d, "block_influence": d[0], "attention_drop": 1 - d[0]}
                       for d in distances]}


@settings(max_examples=60, deadline=None)
@given(st.integers(4, 11).flatmap(lambda L: st.tuples(
    st.just(L), st.lists(st.lists(st.floats(0, 1), min_size=4, max_size=4), min_size=L, max_size=L),
    st.integers(1, L))))
def test_lfuc_groups_are_the_brute_force_optimum(case):
    """The dynamic programme's groups cost no more than any grouping a brute force finds, remove
    exactly the budget, and it fails exactly when no grouping can."""
    L, dist, remove = case
    stats = _stats_of([d[:min(4, L - i)] for i, d in enumerate(dist)])
    best = None
    inner = range(1, L - 1)

    def groupings(start):
        if start >= L - 1:
            yield []
            return
        yield from groupings(start + 1)
        for n in conv.GROUP_SIZES:
            if start + n <= L - 1:
                for rest in groupings(start + n):
                    yield [tuple(range(start, start + n))] + rest

    for g in groupings(inner.start):
        if sum(len(x) - 1 for x in g) == remove:
            cost = sum(conv.span_cost(stats, x[0], len(x)) for x in g)
            best = cost if best is None else min(best, cost)
    if best is None:
        with pytest.raises(InputError, match="remove at most"):
            conv.lfuc_groups(stats, L, remove)
        return
    got = conv.lfuc_groups(stats, L, remove)
    assert sum(len(g) - 1 for g in got) == remove
    assert all(0 < g[0] and g[-1] < L - 1 and 2 <= len(g) <= 4 for g in got)
    assert sum(conv.span_cost(stats, g[0], len(g)) for g in got) == pytest.approx(best, abs=1e-12)


def test_prune_drops_the_lowest_block_influence():
    stats = _stats_of([[v] * 4 for v in (0.9, 0.1, 0.5, 0.05, 0.3, 0.2, 0.7)])
    assert conv.prune_layers(stats, 7, 3) == (1, 3, 5)
    with pytest.raises(InputError, match="1..5"):
        conv.prune_layers(stats, 7, 6)


# ---------------------------------------------------------------------------------------------
# Exactness (spec/convert.md §2.3, §6)


def test_groups_of_one_layer_give_the_dense_logits(dense_dir, tmp_path):
    plan = write_plan(tmp_path, {"method": "lfuc", "groups": [{"layers": [i], "attention": i} for i in range(LAYERS)]})
    out = tmp_path / "ones"
    assert convert(dense_dir, out, "--method", "lfuc", "--plan", plan, "--router", "zero") == 0
    assert rel_err(logits_of(out, TEXT[:120]), logits_of(dense_dir, TEXT[:120])) <= 1e-12


def test_a_folded_expert_is_its_source_mlp_on_the_source_norm(dense_dir, tmp_path, stats_path):
    out = tmp_path / "lfuc"
    assert convert(dense_dir, out, "--method", "lfuc", "--stats", stats_path, "--remove-attention", "2") == 0
    dense, fused = load_model(dense_dir), load_model(out)
    rt = Runtime(dense.config, np.dtype(np.float64), default_kernels())
    h = np.random.default_rng(1).standard_normal((7, 32)) * 3
    ones = np.ones(32)
    checked = 0
    for j, spec in enumerate(fused.config.layers):
        if spec.moe is None:
            continue
        assert np.array_equal(fused.weights.layers[j].ffn_norm.load(np.float64), ones)
        for e, i in enumerate(spec.source_layers):
            want = mlp(rms_norm(h, dense.weights.layers[i].ffn_norm.load(np.float64), 1e-6), dense.weights.layers[i].ffn, rt)
            got = mlp(rms_norm(h, ones, 1e-6), fused.weights.layers[j].ffn.experts[e], rt)
            assert rel_err(got, want) <= 1e-12
            checked += 1
    assert checked >= 3


def test_a_fused_layer_with_every_expert_at_weight_one_is_the_parallel_sum(dense_dir, tmp_path):
    """K = E, a zero router, normalised weights scaled by E: every weight is 1, and the fused layer is
    h' + Σ_j MLP_j(RMSNorm_j(h')), h' = h + Attn_s(norm_s(h)), computed here from the dense weights."""
    group = [2, 3, 4]
    plan = write_plan(tmp_path, {"method": "lfuc", "groups": [{"layers": group, "attention": 3}]})
    out = tmp_path / "all"
    assert convert(dense_dir, out, "--method", "lfuc", "--plan", plan, "--router", "zero", "--top-k", "all",
                   "--routed-scaling", "3") == 0
    dense, fused = load_model(dense_dir), load_model(out)
    ids = np.asarray(byte_tokenizer().encode(TEXT[:50]).ids)
    capture = {}
    forward(fused, ids, capture=capture)
    assert np.allclose(capture["topk_weights.2"], 1.0, rtol=0, atol=1e-15)
    cfg, eps = dense.config, dense.config.rms_norm_eps
    rt = Runtime(cfg, np.dtype(np.float64), default_kernels())
    h = capture["hidden.1"]
    positions = np.arange(ids.size)
    rope = rope_cos_sin(positions, rope_inv_freq(cfg.rope, cfg.head_dim, np.float64))
    src = dense.weights.layers[3]
    a, _ = attention(rms_norm(h, src.attention.norm.load(np.float64), eps), src.attention, positions, rope,
                     KVCache.empty(cfg, np.float64).layer(3), rt)
    h1 = h + a
    want = h1 + sum(mlp(rms_norm(h1, dense.weights.layers[i].ffn_norm.load(np.float64), eps), dense.weights.layers[i].ffn, rt)
                    for i in group)
    assert rel_err(capture["hidden.2"], want) <= 1e-12


def test_converting_twice_gives_identical_bytes(dense_dir, tmp_path, stats_path):
    for method in ("lfuc", "prune", "upcycle"):
        outs = [tmp_path / f"{method}{k}" for k in (1, 2)]
        for o in outs:
            assert convert(dense_dir, o, "--method", method, "--stats", stats_path, "--remove-attention", "2") == 0
        for name in ("config.json", "model.safetensors", "tokenizer.json"):
            assert (outs[0] / name).read_bytes() == (outs[1] / name).read_bytes(), (method, name)


def test_untrained_upcycling_is_the_dense_model(dense_dir, tmp_path):
    out = tmp_path / "up"
    assert convert(dense_dir, out, "--method", "upcycle", "--experts", "3", "--top-k", "2") == 0
    assert rel_err(logits_of(out, TEXT[:80]), logits_of(dense_dir, TEXT[:80])) <= 1e-12


def test_pruned_model_is_the_source_family_without_the_dropped_layers(dense_dir, tmp_path, stats_path):
    out = tmp_path / "pruned"
    assert convert(dense_dir, out, "--method", "prune", "--stats", stats_path, "--remove-attention", "2") == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["num_hidden_layers"] == LAYERS - 2
    dropped = cfg["conversion"]["plan"]["drop"]
    kept = [i for i in range(LAYERS) if i not in dropped]
    dense, pruned = load_model(dense_dir), load_model(out)
    for j, i in enumerate(kept):
        assert np.array_equal(pruned.weights.layers[j].attention.q.load(np.float64),
                              dense.weights.layers[i].attention.q.load(np.float64))


# ---------------------------------------------------------------------------------------------
# Bad input: named errors, exit 2, nothing left behind


BAD_PLANS = [
    ({"method": "lfuc", "groups": [{"layers": [1, 2], "attention": 1}, {"layers": [2, 3], "attention": 2}]},
     "layer 2 appears twice"),
    ({"method": "lfuc", "groups": [{"layers": [4, 5, 6], "attention": 4}]}, "6 is not a layer of this model"),
    ({"method": "lfuc", "groups": [{"layers": [1, 3], "attention": 1}]}, "must be contiguous"),
    ({"method": "lfuc", "groups": [{"layers": [1, 2], "attention": 3}]}, "must be one of its layers"),
    ({"method": "lfuc", "groups": [{"layers": [1, 2]}]}, "must be {\"layers\""),
    ({"method": "prune", "drop": [0, 1, 2, 3, 4, 5]}, "drop names all 6 layers"),
    ({"method": "lfuc", "groups": []}, "non-empty list"),
    ({"method": "merge"}, "\"method\" one of"),
]


@pytest.mark.parametrize("plan, why", BAD_PLANS)
def test_bad_plans_are_named_and_leave_nothing(dense_dir, tmp_path, capsys, plan, why):
    out = tmp_path / "out"
    method = plan["method"] if plan["method"] in conv.METHODS else "lfuc"
    assert convert(dense_dir, out, "--method", method, "--plan", write_plan(tmp_path, plan), "--router", "zero") == 2
    assert why in capsys.readouterr().err
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["plan.json"]


def test_a_budget_that_cannot_be_met(dense_dir, tmp_path, stats_path, capsys):
    out = tmp_path / "out"
    # layers 1..4 hold one group of 4 at most: 3 attentions
    assert convert(dense_dir, out, "--method", "lfuc", "--stats", stats_path, "--remove-attention", "4") == 2
    assert "remove at most 3 attentions" in capsys.readouterr().err and not out.exists()
    assert convert(dense_dir, out, "--method", "lfuc", "--stats", stats_path) == 2
    assert "needs a budget" in capsys.readouterr().err and not out.exists()


def test_a_converted_model_is_not_converted_again(dense_dir, tmp_path, capsys):
    plan = write_plan(tmp_path, {"method": "lfuc", "groups": [{"layers": [1, 2], "attention": 1}]})
    first = tmp_path / "first"
    assert convert(dense_dir, first, "--method", "lfuc", "--plan", plan, "--router", "zero") == 0
    assert convert(first, tmp_path / "second", "--method", "lfuc", "--plan", plan, "--router", "zero") == 2
    assert "a dense llama/qwen2/qwen3 model is converted; this one is dense2moe" in capsys.readouterr().err
    assert not (tmp_path / "second").exists()


def test_an_existing_output_is_kept_without_force(dense_dir, tmp_path, capsys):
    plan = write_plan(tmp_path, {"method": "lfuc", "groups": [{"layers": [1, 2], "attention": 1}]})
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text("mine")
    assert convert(dense_dir, out, "--method", "lfuc", "--plan", plan, "--router", "zero") == 2
    assert "pass --force" in capsys.readouterr().err
    assert (out / "config.json").read_text() == "mine" and sorted(p.name for p in out.iterdir()) == ["config.json"]
    assert convert(dense_dir, out, "--method", "lfuc", "--plan", plan, "--router", "zero", "--force") == 0
    assert json.loads((out / "config.json").read_text())["model_type"] == "dense2moe"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_the_centroid_router_needs_calibration(dense_dir, tmp_path, capsys):
    plan = write_plan(tmp_path, {"method": "lfuc", "groups": [{"layers": [1, 2], "attention": 1}]})
    assert convert(dense_dir, tmp_path / "out", "--method", "lfuc", "--plan", plan) == 2
    assert "centroid router reads calibration statistics" in capsys.readouterr().err


def test_convert_calibrates_itself_from_text(dense_dir, tmp_path):
    out = tmp_path / "out"
    assert convert(dense_dir, out, "--method", "lfuc", "--text", str(dense_dir / "text.txt"), "--tokens", "300",
                   "--window", "150", "--remove-attention", "1", "--quiet") == 0
    conversion = json.loads((out / "config.json").read_text())["conversion"]
    assert conversion["calibration"]["tokens"] == 300 and conversion["removed_attention"] == 1


def test_a_latency_budget_takes_the_fewest_removals_that_meet_it(dense_dir, tmp_path, stats_path, capsys):
    """The modelled ms of the dense model and of 1, 2, 3 removals; a budget between those of 1 and 2
    removals gives 2; one below 3 (the most: layers 1..4 in one group) cannot be met."""
    ms = []
    for n in (1, 2, 3):
        out = tmp_path / f"n{n}"
        assert convert(dense_dir, out, "--method", "lfuc", "--stats", stats_path, "--remove-attention", str(n)) == 0
        ms.append(roofline.ms_per_token(roofline.bytes_per_token(load_model(out).config, "bf16", 1024), 204.8))
    assert ms[0] > ms[1] > ms[2]
    out = tmp_path / "budget"
    assert convert(dense_dir, out, "--method", "lfuc", "--stats", stats_path,
                   "--latency-budget", str((ms[0] + ms[1]) / 2)) == 0
    conversion = json.loads((out / "config.json").read_text())["conversion"]
    assert conversion["removed_attention"] == 2 and "the fewest that meet" in conversion["chosen_by"]
    with SafetensorsFile(out / "model.safetensors") as a, SafetensorsFile(tmp_path / "n2" / "model.safetensors") as b:
        assert a.names() == b.names() and all(np.array_equal(a.raw(n), b.raw(n)) for n in a.names())
    capsys.readouterr()
    assert convert(dense_dir, tmp_path / "x", "--method", "lfuc", "--stats", stats_path,
                   "--latency-budget", str(ms[2] * 0.99)) == 2
    assert "cannot be met" in capsys.readouterr().err and not (tmp_path / "x").exists()
    assert convert(dense_dir, tmp_path / "x", "--method", "prune", "--stats", stats_path,
                   "--latency-budget", "1000") == 2
    assert "the dense model already takes" in capsys.readouterr().err


def test_bench_convert_writes_its_table(tmp_path, capsys):
    """`bench convert` on a tiny shape: both children's peak RSS reported; --table writes the page."""
    from d2m_ref import bench
    table = tmp_path / "t.md"
    assert bench.main(["convert", "--shape", "tiny", "--remove-attention", "1", "--table", str(table)]) == 0
    out = capsys.readouterr().out
    assert "calibrate  peak RSS" in out and "convert    peak RSS" in out and "within budget" in out
    page = table.read_text()
    assert page.startswith("# `python -m d2m_ref.bench convert --shape tiny --remove-attention 1`")
    assert "convert    peak RSS" in page
    assert bench.main(["convert", "--shape", "tiny", "--table", str(table)]) == 2
    assert "pass --force" in capsys.readouterr().err and table.read_text() == page


def test_a_quantised_source_is_refused(dense_dir, tmp_path, capsys):
    from d2m_ref.quantize import main as quantize
    q = tmp_path / "q"
    assert quantize(["--weights", str(dense_dir), "--format", "int8", "--out", str(q)]) == 0
    plan = write_plan(tmp_path, {"method": "lfuc", "groups": [{"layers": [1, 2], "attention": 1}]})
    capsys.readouterr()
    assert convert(q, tmp_path / "out", "--method", "lfuc", "--plan", plan, "--router", "zero") == 2
    assert "is quantised (Q8): convert the float checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_convert_never_writes_over_its_source(dense_dir, tmp_path, capsys):
    """--out the source folder itself: refused even with --force (config.json and model.safetensors
    there are being read); the folder is byte-identical afterwards."""
    plan = write_plan(tmp_path, {"method": "lfuc", "groups": [{"layers": [1, 2], "attention": 1}]})
    before = {p.name: p.read_bytes() for p in dense_dir.iterdir()}
    assert convert(dense_dir, dense_dir, "--method", "lfuc", "--plan", plan, "--router", "zero", "--force") == 2
    assert "is the same file as" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in dense_dir.iterdir()} == before
