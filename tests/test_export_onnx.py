"""The ONNX export (spec/onnx.md): a backend running the exported graph agrees with the reference,
stage by stage, and a wrongly exported graph is caught at the layer that is wrong.

Every golden case (golden/*/ with a config.json, demo included) is exported in float32 and float16,
run on ONNX Runtime's CPU provider and judged by d2m_ref.check at the export's precision.  Deliberate
errors (export_onnx.Bugs: RoPE on interleaved pairs, an expert whose folded norm weight is replaced by
ones, a shared expert without its gate) must make check fail with the first divergence at the stage
they act in.  The Polygraphy tests run the command a TensorRT user runs (with --onnxrt instead of
--trt) and read its RunResults JSON back through d2m_ref.adapters.polygraphy and the check command.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx", reason="pip install onnx==1.23.2")
ort = pytest.importorskip("onnxruntime", reason="pip install onnxruntime==1.32.0")

from d2m_ref import check as check_cli  # noqa: E402
from d2m_ref import export_onnx as ex  # noqa: E402
from d2m_ref.adapters import load_candidate  # noqa: E402
from d2m_ref.check import check  # noqa: E402
from d2m_ref.config import parse_config  # noqa: E402
from d2m_ref.errors import WeightsError  # noqa: E402
from d2m_ref.synth import model_from_arrays, random_arrays  # noqa: E402
from d2m_ref.tokenizer import load_tokenizer  # noqa: E402
from d2m_ref.tracefile import read_trace  # noqa: E402
from d2m_ref.weights import load_model  # noqa: E402

GOLDEN = Path(__file__).resolve().parent.parent / "golden"
CASES = sorted(p.name for p in GOLDEN.iterdir() if (p / "config.json").is_file())
DEMO_TEXT = "Hello, world: a demo of eight or more tokens."  # the demo folder has no trace to take ids from


@pytest.fixture(scope="module")
def cases():
    """name -> (model, input ids, the committed float64 trace or None), loaded once."""
    loaded = {}
    yield loaded
    for model, _, _ in loaded.values():
        model.close()


def golden_case(cases, name):
    """golden/<name>: its model, its trace's input ids and the trace (demo: ids of DEMO_TEXT, no trace)."""
    if name not in cases:
        folder = GOLDEN / name
        model = load_model(folder / "model.safetensors", folder / "config.json")
        if (folder / "trace.safetensors").is_file():
            trace, _ = read_trace(folder / "trace.safetensors")
            ids = trace["input_ids"]
        else:
            trace, ids = None, load_tokenizer(folder / "tokenizer.json").encode(DEMO_TEXT, model.config.vocab_size)
        cases[name] = (model, np.asarray(ids, np.int64), trace)
    return cases[name]


def run_onnx(path: Path, ids: np.ndarray) -> dict[str, np.ndarray]:
    """ONNX Runtime, CPU provider: {output name: array}."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1  # the machine is shared; the graphs are tiny
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, {"input_ids": ids})))


def export_and_check(model, ids, trace, tmp_path, dtype, **options):
    """Export, run on ONNX Runtime, check at the export's precision -> (Report, outputs, path)."""
    out = tmp_path / f"model.{dtype}.onnx"
    ex.export_onnx(model, out, dtype=dtype, **options)
    outputs = run_onnx(out, ids)
    return check(model, outputs, dtype, input_ids=ids, reference_trace=trace), outputs, out


# ---------------------------------------------------------------------------------------------
# Every golden case, float32 and float16


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("name", CASES)
def test_golden_case_passes_check(cases, name, dtype, tmp_path):
    """ONNX Runtime running the export gives every trace tensor within the export precision's tolerance
    of the float64 reference, with the same routes; full_check passes; only the default domain is used."""
    model, ids, trace = golden_case(cases, name)
    report, outputs, path = export_and_check(model, ids, trace, tmp_path, dtype)
    assert report.exit_code == 0, f"{name} {dtype}: {report.verdict()} ({report.first_divergence})"
    assert report.missing == []
    if dtype == "float32":  # the cases' routes are ≥ 1e-3 (relative) from flipping: float16 may flip one (FLIP is a pass)
        assert report.forced_layers == []
    assert all(a.dtype == np.dtype(dtype) for k, a in outputs.items() if not k.startswith("topk_ids"))
    onnx.checker.check_model(str(path), full_check=True)
    proto = onnx.load(str(path), load_external_data=False)
    assert {(o.domain, o.version) for o in proto.opset_import} == {("", ex.DEFAULT_OPSET)}
    assert {n.domain for n in proto.graph.node} == {""}


def test_output_names_follow_the_trace_contract(cases, tmp_path):
    """The graph's outputs are the trace's tensors (input_ids aside), in forward order, with the trace's
    shapes; the weights are external data in <out>.data, page-aligned."""
    model, ids, trace = golden_case(cases, "d2m_softmax_groups_attnfree_end")
    out = tmp_path / "m.onnx"
    ex.export_onnx(model, out)
    proto = onnx.load(str(out), load_external_data=False)
    names = [o.name for o in proto.graph.output]
    assert names == [k for k in trace if k != "input_ids"]
    assert [i.name for i in proto.graph.input] == ["input_ids"]
    outputs = run_onnx(out, ids)
    for name in names:
        assert outputs[name].shape == trace[name].shape, name
    external = [t for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert len(external) > 0
    for t in external:
        entries = {e.key: e.value for e in t.external_data}
        assert entries["location"] == "m.onnx.data" and int(entries["offset"]) % ex.ALIGN == 0


def test_logits_only_export(cases, tmp_path):
    """--outputs logits: the one output is the logits, and they pass check on their own."""
    model, ids, trace = golden_case(cases, "qwen2_moe")
    report, outputs, _ = export_and_check(model, ids, trace, tmp_path, "float16", outputs="logits")
    assert list(outputs) == ["logits"]
    assert report.exit_code == 0 and report.compared == 1


@pytest.mark.parametrize("opset", [ex.MIN_OPSET, 18, 21])
def test_other_opsets(cases, tmp_path, opset):
    """The same graph in the oldest opset taken and across ReduceMean's change (18): runs, passes check."""
    model, ids, trace = golden_case(cases, "olmoe")
    report, _, path = export_and_check(model, ids, trace, tmp_path, "float32", opset=opset)
    assert report.exit_code == 0
    onnx.checker.check_model(str(path), full_check=True)


def test_topk_ties_go_to_the_lower_expert_index(tmp_path):
    """spec/onnx.md §5: ONNX TopK breaks ties to the lower index, as spec/architecture.md §4.2 does.
    A router of zeros ties every expert: every token chooses experts 0 … K−1, in that order."""
    cfg = parse_config(dict(_tiny_d2m(), layer_plan=[
        {"attention": True, "ffn": "moe", "num_experts": 4, "num_experts_per_tok": 3},
        {"attention": False, "ffn": "moe", "num_experts": 3, "num_experts_per_tok": 2, "scoring_func": "sigmoid"}]))
    arrays = random_arrays(cfg, seed=3)
    for i in range(2):
        arrays[f"model.layers.{i}.mlp.gate.weight"][:] = 0
    model = model_from_arrays(cfg, arrays)
    ids = np.arange(9, dtype=np.int64)
    report, outputs, _ = export_and_check(model, ids, None, tmp_path, "float32")
    assert np.array_equal(outputs["topk_ids.0"], np.tile([0, 1, 2], (9, 1)))
    assert np.array_equal(outputs["topk_ids.1"], np.tile([0, 1], (9, 1)))
    assert report.exit_code == 0


def test_a_model_without_attention(tmp_path):
    """A layer plan with no attention at all: no positions, no RoPE tables, no mask in the graph."""
    cfg = parse_config(dict(_tiny_d2m(), layer_plan=[
        {"attention": False, "ffn": "dense"},
        {"attention": False, "ffn": "moe", "num_experts": 2, "num_experts_per_tok": 1,
         "shared_expert_intermediate_size": 8, "shared_expert_gate": True}]))
    model = model_from_arrays(cfg, random_arrays(cfg, seed=4))
    ids = np.array([5, 1, 7, 7, 2], np.int64)
    report, _, path = export_and_check(model, ids, None, tmp_path, "float16")
    assert report.exit_code == 0
    ops = {n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node}
    assert not ops & {"Range", "Cos", "Sin", "MatMul", "Transpose"}


def _tiny_d2m() -> dict:
    return {"model_type": "dense2moe", "base_model_type": "llama", "vocab_size": 16, "hidden_size": 16,
            "intermediate_size": 24, "moe_intermediate_size": 12, "num_attention_heads": 4,
            "num_key_value_heads": 2, "head_dim": 4, "rms_norm_eps": 1e-6, "max_position_embeddings": 32}


# ---------------------------------------------------------------------------------------------
# Deliberately wrong exports fail at the layer that is wrong


def _unfolded(H: int) -> np.ndarray:
    """The factor an expert's input gets when its norm weight w (as trained weights scatter, around 1)
    was replaced by ones: 1 / w."""
    return (1.0 / (1.0 + 0.2 * np.random.default_rng(7).standard_normal(H))).astype(np.float32)


BUGS = {  # name: (golden case, the bug, the stage it acts in, what check's hint says)
    # RoPE on interleaved pairs (GPT-J layout) in layer 1 only: its attention is the first thing wrong
    "rope_interleaved": ("qwen2", ex.Bugs(rope_interleaved=frozenset({1})), "attn_out.1", "RoPE convention"),
    # layer 1 fuses two dense layers; expert 1 is the absorbed one, its norm weight not folded
    "norm_not_folded": ("d2m_top2_norm_fused3", ex.Bugs(expert_input_scale={(1, 1): _unfolded(32)}), "ffn_out.1",
                        "norm weight not folded"),
    # the gated shared expert of the first MoE layer (qwen3 base, sigmoid top-2, selection bias) ungated
    "shared_gate_dropped": ("d2m_sigmoid_shared_attnfree_middle", ex.Bugs(shared_gate_dropped=frozenset({0})),
                            "ffn_out.0", "shared expert or its gate"),
}


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("bug", list(BUGS))
def test_wrong_export_fails_at_its_layer(cases, bug, dtype, tmp_path):
    """check's first divergence is the stage the bug acts in, and the layer is wrong from its own
    inputs (the local check fails), not by inheritance."""
    name, bugs, stage, hint = BUGS[bug]
    model, ids, trace = golden_case(cases, name)
    report, _, _ = export_and_check(model, ids, trace, tmp_path, dtype, bugs=bugs)
    first = report.first_divergence
    assert report.exit_code == 1 and first is not None
    assert first.stage.name == stage, f"{bug} {dtype}: {report.verdict()}"
    assert first.local is not None and not first.local.ok
    assert hint in first.hint


# ---------------------------------------------------------------------------------------------
# Bad input: named, exit status 2, nothing written


def test_bad_dtype(tmp_path, capsys):
    out = tmp_path / "m.onnx"
    assert ex.main(["--weights", str(GOLDEN / "qwen2"), "--out", str(out), "--dtype", "bfloat16"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --dtype bfloat16") and "float32, float16" in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("opset", [12, 0, None])
def test_bad_opset(tmp_path, capsys, opset):
    opset = onnx.defs.onnx_opset_version() + 1 if opset is None else opset
    out = tmp_path / "m.onnx"
    assert ex.main(["--weights", str(GOLDEN / "qwen2"), "--out", str(out), "--opset", str(opset)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --opset {opset}:") and f"{ex.MIN_OPSET}" in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("existing", ["m.onnx", "m.onnx.data"])
def test_existing_output_is_kept_without_force(tmp_path, capsys, existing):
    """Either file existing refuses the export and stays byte for byte; --force replaces both."""
    (tmp_path / existing).write_bytes(b"keep me")
    args = ["--weights", str(GOLDEN / "qwen2"), "--out", str(tmp_path / "m.onnx")]
    assert ex.main(args) == 2
    assert "file exists; pass --force" in capsys.readouterr().err
    assert (tmp_path / existing).read_bytes() == b"keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == [existing]
    assert ex.main(args + ["--force"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data"]
    onnx.checker.check_model(str(tmp_path / "m.onnx"), full_check=True)


def test_float16_overflow_is_named(tmp_path):
    """A weight beyond float16's range: WeightsError naming it, no file left behind."""
    cfg = parse_config(dict(_tiny_d2m(), layer_plan=[{"attention": True, "ffn": "dense"}]))
    arrays = random_arrays(cfg, seed=1)
    arrays["model.layers.0.mlp.up_proj.weight"][3, 2] = 1e5
    model = model_from_arrays(cfg, arrays)
    with pytest.raises(WeightsError, match=r"model\.layers\.0\.mlp\.up_proj\.weight: \|value\| up to 100000 does not fit float16"):
        ex.export_onnx(model, tmp_path / "m.onnx", dtype="float16")
    assert list(tmp_path.iterdir()) == []
    ex.export_onnx(model, tmp_path / "m.onnx", dtype="float32")  # float32 holds it


# ---------------------------------------------------------------------------------------------
# Polygraphy end to end: what a TensorRT user runs, with --onnxrt


POLYGRAPHY = "import sys; from polygraphy.tools import main; sys.argv[0] = 'polygraphy'; sys.exit(main())"
LOADER = '''import numpy as np

def load_data():
    yield {{"input_ids": np.array([{ids}], dtype=np.int64)}}
'''


def polygraphy_run(model_path: Path, ids: np.ndarray, tmp_path: Path) -> Path:
    """`polygraphy run model.onnx --onnxrt --data-loader-script ids.py --save-outputs out.json`."""
    pytest.importorskip("polygraphy", reason="pip install polygraphy==0.53.6")
    loader = tmp_path / "ids.py"
    loader.write_text(LOADER.format(ids=", ".join(map(str, ids.tolist()))), encoding="utf-8")
    out = tmp_path / "out.json"
    done = subprocess.run([sys.executable, "-c", POLYGRAPHY, "run", str(model_path), "--onnxrt",
                           "--data-loader-script", str(loader), "--save-outputs", str(out),
                           "--save-inputs", str(tmp_path / "inputs.json")],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return out


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_polygraphy_run_passes_check(cases, tmp_path, capsys, dtype):
    """Polygraphy's RunResults JSON, read by d2m_ref.adapters.polygraphy, passes check; so does the
    command line a user runs on it (`python -m d2m_ref.check --candidate out.json --tokens ...`)."""
    model, ids, _ = golden_case(cases, "demo")
    onnx_path = tmp_path / "model.onnx"
    ex.export_onnx(model, onnx_path, dtype=dtype)
    out = polygraphy_run(onnx_path, ids, tmp_path)
    cand = load_candidate(out)
    assert check(model, cand.tensors, dtype, input_ids=ids).exit_code == 0
    argv = ["--weights", str(GOLDEN / "demo"), "--candidate", str(out), "--candidate-dtype", dtype,
            "--tokens", ",".join(map(str, ids.tolist())), "--quiet"]
    assert check_cli.main(argv) == 0
    assert "PASS" in capsys.readouterr().out
    # the ids from Polygraphy's own --save-inputs file instead of --tokens
    argv = argv[:-3] + ["--inputs", str(tmp_path / "inputs.json"), "--quiet"]
    assert check_cli.main(argv) == 0
    assert "PASS" in capsys.readouterr().out
    assert check_cli.main(argv[:-3] + ["--inputs", str(out), "--quiet"]) == 2
    assert "not Polygraphy's saved inputs" in capsys.readouterr().err


def test_polygraphy_run_of_a_wrong_export_fails_at_its_layer(cases, tmp_path):
    """RoPE on interleaved pairs in the demo's layer 3 (attention, MoE with a gated shared expert),
    through Polygraphy: first divergence attn_out.3."""
    model, ids, _ = golden_case(cases, "demo")
    onnx_path = tmp_path / "model.onnx"
    ex.export_onnx(model, onnx_path, dtype="float16", bugs=ex.Bugs(rope_interleaved=frozenset({3})))
    report = check(model, load_candidate(polygraphy_run(onnx_path, ids, tmp_path)).tensors, "float16", input_ids=ids)
    assert report.exit_code == 1 and report.first_divergence.stage.name == "attn_out.3"


# ---------------------------------------------------------------------------------------------
# A real model


SMOLLM2_PROMPT = ("<|im_start|>user\nExplain in two sentences why a mixture-of-experts layer can be cheaper "
                  "to run than a dense layer of the same size.<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.slow
def test_smollm2_export_passes_check(tmp_path):
    """SmolLM2-135M (imported from the PyPI-shipped GGUF to float32 safetensors), exported in float32 and
    float16, run by ONNX Runtime on ~40 prompt tokens: check passes at the export's precision."""
    pytest.importorskip("gguf")
    from tests.real_models import smollm2_folder
    folder = smollm2_folder()
    model = load_model(folder / "model.safetensors")
    try:
        ids = load_tokenizer(folder / "tokenizer.json").encode(SMOLLM2_PROMPT, model.config.vocab_size)
        assert 30 <= ids.size <= 50
        for dtype in ("float32", "float16"):
            report, _, path = export_and_check(model, ids, None, tmp_path, dtype)
            assert report.exit_code == 0, f"{dtype}: {report.verdict()}"
            assert report.logits["same_top1"] == 1.0
            path.unlink()
            ex.data_path(path).unlink()
    finally:
        model.close()
