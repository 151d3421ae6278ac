"""Adapters: recording traces from torch models (transformers' families and a module tree with the
recommended Dense2MoE names), and reading TensorRT-style outputs (Polygraphy RunResults JSON, .npz)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from pathlib import Path

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import d2m_ref  # noqa: E402
from d2m_ref import check as chk  # noqa: E402
from d2m_ref.adapters import CandidateError, apply_map, load_candidate  # noqa: E402
from d2m_ref.adapters.torch import record_trace  # noqa: E402
from d2m_ref.synth import model_from_arrays, random_arrays  # noqa: E402
from d2m_ref.tracefile import read_trace  # noqa: E402

try:
    from peer import buggy, hf
except ImportError:  # pragma: no cover
    from tests.peer import buggy, hf

from .models import dense2moe_config  # noqa: E402

IDS = np.array([3, 14, 15, 92, 65, 35, 89, 79, 32, 38], dtype=np.int64)


@pytest.mark.parametrize("name", [c.name for c in hf.FAMILIES])
def test_record_trace_from_transformers_matches_reference_in_float64(name, tmp_path):
    """Hooks on a transformers model (made float64 throughout) give every trace tensor under the right
    name: checked at float64 tolerance, every recorded stage agrees with d2m_ref."""
    case = hf.case(name)
    m64 = hf.build(case, torch.float64, seed=1)
    hf.save(m64, tmp_path)
    model = d2m_ref.load_model(tmp_path)
    ids = IDS % model.config.vocab_size
    with hf.float64_transformers():
        tensors = record_trace(m64, ids)
    report = chk.check(model, tensors, "float64")
    assert report.exit_code == 0, chk.format_report(report)
    names = {s.name for s in chk.stage_plan(model.config)}
    expected = names - {n for n in names if n.startswith("router_scores")}  # no torch module returns them
    assert expected <= set(tensors), sorted(expected - set(tensors))
    assert not report.unknown


def test_record_trace_takes_the_batch_of_one_torch_callers_hold():
    """input_ids as transformers callers have them, a [1, T] torch tensor, gives the same trace as
    [T]; a real batch is refused by name."""
    m64 = hf.build(hf.FAMILIES[0], torch.float64, seed=1)
    ids = IDS % m64.config.vocab_size
    flat = record_trace(m64, ids)
    batched = record_trace(m64, torch.from_numpy(ids)[None])
    assert flat.keys() == batched.keys() and all(np.array_equal(flat[k], batched[k]) for k in flat)
    with pytest.raises(ValueError, match=r"\[T\] or a batch of one \[1, T\], got shape \(2, 10\)"):
        record_trace(m64, np.stack([ids, ids]))


def test_record_trace_writes_a_trace_that_says_its_precision(tmp_path, capsys):
    """A bf16 model's trace is stored float32 (exact) with candidate_dtype=bfloat16; check takes that as
    its default --candidate-dtype."""
    cfg_dict = dense2moe_config([{"attention": True, "ffn": "moe", "num_experts": 3, "num_experts_per_tok": 2},
                                 {"attention": False, "ffn": "dense"}])
    cfg = d2m_ref.parse_config(cfg_dict)
    arrays = random_arrays(cfg, 4, "F32")
    from d2m_ref.safetensors_io import save
    (tmp_path / "config.json").write_text(json.dumps(cfg_dict))
    save(tmp_path / "model.safetensors", arrays)
    cand = buggy.build_candidate(cfg_dict, arrays, "bfloat16")
    path = tmp_path / "cand.safetensors"
    tensors = record_trace(cand, IDS, path)
    stored, meta = read_trace(path)
    assert meta["candidate_dtype"] == "bfloat16" and meta["dtype"] == "float32"
    assert set(stored) == set(tensors) and stored["hidden.1"].dtype == np.float32
    assert load_candidate(path).dtype_hint == "bfloat16"
    assert chk.main(["--weights", str(tmp_path), "--candidate", str(path)]) == 0
    assert "(bfloat16, u = " in capsys.readouterr().out


class LinearGateMoE(torch.nn.Module):
    """An MoE whose `gate` is a plain nn.Linear (returns logits only) and whose experts are a ModuleList:
    the adapter must read the routes from which tokens reach each expert."""

    def __init__(self, router: torch.Tensor, experts: list, top_k: int):
        super().__init__()
        self.gate = torch.nn.Linear(router.shape[1], router.shape[0], bias=False, dtype=router.dtype)
        with torch.no_grad():
            self.gate.weight.copy_(router)
        self.experts = torch.nn.ModuleList(experts)
        self.top_k = top_k

    def forward(self, x):
        probs = torch.softmax(self.gate(x), -1)
        weights, ids = torch.topk(probs, self.top_k, dim=-1, sorted=False)  # unsorted, on purpose
        y = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            tokens, slot = torch.nonzero(ids == e, as_tuple=True)
            if tokens.numel():
                y = y.index_add(0, tokens, weights[tokens, slot][:, None] * expert(x[tokens]))
        return y


def test_record_trace_reads_routes_from_expert_hooks_when_the_gate_is_linear():
    cfg_dict = dense2moe_config([{"attention": False, "ffn": "moe", "num_experts": 4, "num_experts_per_tok": 2},
                                 {"attention": True, "ffn": "dense"}])
    cfg = d2m_ref.parse_config(cfg_dict)
    arrays = random_arrays(cfg, 5, "F32")
    cand = buggy.build_candidate(cfg_dict, arrays, "float64")
    old = cand.model.layers[0].mlp
    cand.model.layers[0].mlp = LinearGateMoE(old.gate.weight.data, list(old.experts), 2)
    tensors = record_trace(cand, IDS)
    model = model_from_arrays(cfg, arrays, "F32")
    ref: dict = {}
    d2m_ref.forward(model, IDS, capture=ref)
    assert "topk_weights.0" not in tensors
    np.testing.assert_array_equal(tensors["topk_ids.0"], ref["topk_ids.0"])  # best first, by its own logits
    assert chk.check(model, tensors, "float64").exit_code == 0


# ---------------------------------------------------------------------------------------------
# TensorRT: Polygraphy RunResults and .npz


def onnx_style(tensors: dict) -> dict:
    """Trace names -> names an ONNX export with per-layer outputs would give them."""
    out = {}
    for name, t in tensors.items():
        kind, _, layer = name.partition(".")
        out[f"/model/layers.{layer}/{kind}_output_0" if layer else f"{name}_out"] = t
    return out


NAME_MAP = {"/model/layers.{i}/hidden_output_0": "hidden.{i}", "/model/layers.{i}/attn_out_output_0": "attn_out.{i}",
            "/model/layers.{i}/ffn_out_output_0": "ffn_out.{i}", "/model/layers.{i}/topk_ids_output_0": "topk_ids.{i}",
            "/model/layers.{i}/topk_weights_output_0": "topk_weights.{i}",
            "/model/layers.{i}/router_logits_output_0": "router_logits.{i}",
            "logits_out": "logits", "final_norm_out": "final_norm", "embeddings_out": "embeddings",
            "input_ids_out": "input_ids"}


@pytest.fixture(scope="module")
def trt_like(tmp_path_factory):
    """A float16 candidate's tensors, as a TensorRT engine would return them: [1, T, ...], ONNX names,
    int32 ids, float16 values."""
    d = tmp_path_factory.mktemp("trt")
    plan = [{"attention": True, "ffn": "moe", "num_experts": 4, "num_experts_per_tok": 2},
            {"attention": True, "ffn": "dense"}]
    cfg_dict = dense2moe_config(plan)
    cfg = d2m_ref.parse_config(cfg_dict)
    arrays = random_arrays(cfg, 6, "F32")
    from d2m_ref.safetensors_io import save
    (d / "config.json").write_text(json.dumps(cfg_dict))
    save(d / "model.safetensors", arrays)
    tensors = record_trace(buggy.build_candidate(cfg_dict, arrays, "float16"), IDS)
    engine = {k: (v.astype(np.float16) if v.dtype.kind == "f" else v.astype(np.int32))[None]
              for k, v in onnx_style(tensors).items()}
    (d / "map.json").write_text(json.dumps(NAME_MAP))
    return d, engine


def test_polygraphy_run_results_written_by_polygraphy_are_checked(trt_like, tmp_path):
    pytest.importorskip("polygraphy")
    from polygraphy.comparator import IterationResult, RunResults
    d, engine = trt_like
    results = RunResults()
    results.add([IterationResult(engine, runner_name="trt-runner-N0-01/01/26")], runner_name="trt-runner-N0-01/01/26")
    results.add([IterationResult({k: v.astype(np.float32) for k, v in engine.items()}, runner_name="onnxrt-runner")],
                runner_name="onnxrt-runner")
    path = tmp_path / "out.json"
    results.save(str(path))
    base = ["--weights", str(d), "--candidate", str(path), "--map", str(d / "map.json")]
    assert chk.main(base) == 2  # two runners: which one?
    assert chk.main(base + ["--runner", "trt-runner-N0-01/01/26"]) == 0
    cand = load_candidate(path, runner="trt-runner-N0-01/01/26")
    assert cand.dtype_hint == "float16" and cand.tensors["logits_out"].dtype == np.float16
    with pytest.raises(CandidateError, match="no runner 'x'"):
        load_candidate(path, runner="x")
    with pytest.raises(CandidateError, match="out of range"):
        load_candidate(path, runner="onnxrt-runner", iteration=3)


def test_polygraphy_reader_catches_a_wrong_engine(trt_like, tmp_path, capsys):
    """The same file with layer 1's FFN output off: exit 1, first divergence named in trace terms."""
    pytest.importorskip("polygraphy")
    from polygraphy.comparator import IterationResult, RunResults
    d, engine = trt_like
    broken = dict(engine)
    broken["/model/layers.1/ffn_out_output_0"] = broken["/model/layers.1/ffn_out_output_0"] * np.float16(1.1)
    results = RunResults()
    results.add([IterationResult(broken, runner_name="trt")], runner_name="trt")
    results.save(str(tmp_path / "out.json"))
    code = chk.main(["--weights", str(d), "--candidate", str(tmp_path / "out.json"), "--map", str(d / "map.json")])
    assert code == 1 and "first divergence: layer 1, ffn_out.1" in capsys.readouterr().out


def test_npz_with_batch_axis_and_int32_ids(trt_like, tmp_path):
    d, engine = trt_like
    np.savez(tmp_path / "out.npz", **engine)
    assert chk.main(["--weights", str(d), "--candidate", str(tmp_path / "out.npz"), "--map", str(d / "map.json"),
                     "--quiet"]) == 0


def test_polygraphy_json_reader_without_polygraphy(tmp_path):
    """The reader is our own: a hand-written file in Polygraphy's encoding (base64 .npy in a LazyArray)."""
    import base64
    import io
    buf = io.BytesIO()
    np.save(buf, np.arange(6, dtype=np.float32).reshape(2, 3))
    arr = {"values": {"array": base64.b64encode(buf.getvalue()).decode(), "polygraphy_class": "ndarray"},
           "polygraphy_class": "LazyArray"}
    doc = {"lst": [["r", [{"outputs": {"x": arr}, "runtime": None, "runner_name": "r",
                            "polygraphy_class": "IterationResult"}]]], "polygraphy_class": "RunResults"}
    (tmp_path / "a.json").write_text(json.dumps(doc))
    cand = load_candidate(tmp_path / "a.json")
    np.testing.assert_array_equal(cand.tensors["x"], np.arange(6, dtype=np.float32).reshape(2, 3))
    doc["lst"][0][1][0]["outputs"]["x"] = {"values": {"tensor": "AAAA"}}
    (tmp_path / "b.json").write_text(json.dumps(doc))
    with pytest.raises(CandidateError, match="torch.Tensor"):
        load_candidate(tmp_path / "b.json")


def test_name_map_collision_names_both():
    with pytest.raises(CandidateError, match="'a' and 'b' become 'hidden.0'"):
        apply_map({"a": np.zeros(1), "b": np.zeros(1)}, {"a": "hidden.0", "b": "hidden.0"})
    out, notes = apply_map({"L3.out": np.zeros(1)}, {"L{i}.out": "hidden.{i}", "gone": "logits"})
    assert set(out) == {"hidden.3"} and "does not have: gone" in notes[1]


@pytest.mark.parametrize("which", ["map", "polygraphy"])
def test_deeply_nested_json_is_a_named_error(tmp_path, capsys, which):
    """A name map or Polygraphy file nested 100,000 deep: exit 2 naming the file, no RecursionError
    traceback (issue 22)."""
    from d2m_ref import check as chk
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    golden = Path(__file__).resolve().parents[1] / "golden" / "qwen2"
    argv = ["--golden", "qwen2", "--candidate", str(golden / "trace.safetensors"), "--map", str(deep)] \
        if which == "map" else ["--golden", "qwen2", "--candidate", str(deep)]
    assert chk.main(argv) == 2
    err = capsys.readouterr().err
    assert "not a readable JSON file (RecursionError" in err and str(deep) in err
