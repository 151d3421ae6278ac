"""The golden suite: the committed files are what the code computes now, and the cases cover what they claim."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

import d2m_ref
from d2m_ref import check as chk
from d2m_ref import golden
from d2m_ref.config import parse_config
from d2m_ref.safetensors_io import save
from d2m_ref.tracefile import read_trace

ROOT = Path(__file__).resolve().parent.parent / "golden"


@pytest.mark.parametrize("name", [c.name for c in golden.CASES])
def test_committed_case_is_current(name):
    """config and weights byte for byte, the float64 trace to 1e-12 of each tensor's RMS, routes exactly
    (1e-12 rather than bitwise: BLAS summation order differs across machines)."""
    assert golden.verify(golden.case_named(name), ROOT) == []


HF_CASES = [c.name for c in golden.CASES if golden._clean(c.config)["model_type"] != "dense2moe"]


@pytest.mark.parametrize("name", HF_CASES)
def test_golden_logits_match_transformers(name):
    """An independent peer reads the committed files as they are: transformers (made float64 throughout)
    loads golden/<case>/ with from_pretrained and gives the committed logits to 1e-12."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    try:
        from peer import hf
    except ImportError:  # pragma: no cover
        from tests.peer import hf
    kwargs = dict(dtype=torch.float64, attn_implementation="eager")
    if golden._clean(golden.case_named(name).config)["model_type"] in hf.MOE_FAMILIES:
        kwargs["experts_implementation"] = "eager"
    transformers.logging.set_verbosity_error()
    model = transformers.AutoModelForCausalLM.from_pretrained(ROOT / name, **kwargs).eval()
    trace, _ = read_trace(ROOT / name / "trace.safetensors")
    with hf.float64_transformers():
        logits = hf.logits(model, trace["input_ids"])
    assert hf.relative_error(logits, trace["logits"]) < 1e-12


def test_cases_cover_every_family_and_layout():
    """Every family; llama3 RoPE and tied embeddings; Dense2MoE top-1/top-2, softmax/sigmoid, norm_topk_prob
    on/off, shared expert, fused groups of 2-4, attention-free layers at start, middle and end."""
    cfgs = [parse_config(golden._clean(c.config)) for c in golden.CASES]
    assert {c.family for c in cfgs} >= {"llama", "qwen2", "qwen3", "qwen2_moe", "qwen3_moe", "mixtral", "olmoe",
                                        "dense2moe"}
    assert any(c.rope.rope_type == "llama3" and c.tie_word_embeddings for c in cfgs)
    d2m = [c for c in cfgs if c.family == "dense2moe"]
    moes = [s.moe for c in d2m for s in c.layers if s.moe is not None]
    assert {m.top_k for m in moes} >= {1, 2} and {m.scoring for m in moes} == {"softmax", "sigmoid"}
    assert {m.norm_topk_prob for m in moes} == {True, False}
    assert any(m.shared_expert_intermediate_size and m.shared_expert_gate for m in moes)
    assert any(m.shared_expert_intermediate_size and not m.shared_expert_gate for m in moes)
    assert {m.num_experts for m in moes} >= {2, 3, 4}
    where = set()
    for c in d2m:
        for i, s in enumerate(c.layers):
            if not s.attention:
                where.add("start" if i == 0 else "end" if i == len(c.layers) - 1 else "middle")
    assert where == {"start", "middle", "end"}


def test_golden_folder_is_small_and_indexed():
    size = sum(p.stat().st_size for p in ROOT.rglob("*") if p.is_file() and "demo" not in p.parts)
    assert size < 4 * 2**20, f"golden/ is {size / 2**20:.1f} MiB"
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for c in golden.CASES:
        assert f"`{c.name}`" in readme, f"golden/README.md does not index {c.name}"
    for c in golden.CASES:
        _, meta = read_trace(ROOT / c.name / "trace.safetensors")
        assert meta["spec_version"] == d2m_ref.SPEC_VERSION and meta["command"].startswith(golden.REGENERATE)


def test_regenerate_reproduces_the_committed_files(tmp_path):
    case = golden.case_named("d2m_sigmoid_shared_attnfree_middle")
    golden.regenerate(case, tmp_path)
    for name in ("config.json", "model.safetensors"):
        assert (tmp_path / case.name / name).read_bytes() == (ROOT / case.name / name).read_bytes()
    assert golden.verify(case, tmp_path) == []


def test_verify_names_the_change_and_the_command(tmp_path):
    case = golden.case_named("qwen3_moe")
    shutil.copytree(ROOT / case.name, tmp_path / case.name)
    trace, meta = read_trace(tmp_path / case.name / "trace.safetensors")
    trace["hidden.1"] = trace["hidden.1"] * (1 + 1e-9)
    save(tmp_path / case.name / "trace.safetensors", trace, metadata=meta, force=True)
    problems = golden.verify(case, tmp_path)
    assert len(problems) == 1 and "hidden.1 differs" in problems[0]
    assert "python -m d2m_ref.golden regenerate --case qwen3_moe" in problems[0]
    assert golden.main(["verify", "--case", "qwen3_moe", "--dir", str(tmp_path)]) == 1


def test_verify_refuses_a_committed_trace_with_nan(tmp_path):
    """A NaN in the committed trace compared as no difference, and verify passed (issue 22)."""
    case = golden.case_named("qwen3_moe")
    shutil.copytree(ROOT / case.name, tmp_path / case.name)
    trace, meta = read_trace(tmp_path / case.name / "trace.safetensors")
    trace["hidden.1"] = trace["hidden.1"].copy()
    trace["hidden.1"][0, 3] = np.nan
    save(tmp_path / case.name / "trace.safetensors", trace, metadata=meta, force=True)
    problems = golden.verify(case, tmp_path)
    assert len(problems) == 1 and "hidden.1 holds 1 non-finite value(s)" in problems[0]


def test_check_against_a_golden_case(tmp_path, capsys):
    """--golden: the committed trace is the reference; a float32 rounding of it passes, a broken stage fails."""
    trace, _ = read_trace(ROOT / "qwen2_moe" / "trace.safetensors")
    cand = {k: (v.astype(np.float32) if v.dtype.kind == "f" else v) for k, v in trace.items()}
    save(tmp_path / "ok.safetensors", cand)
    assert chk.main(["--golden", "qwen2_moe", "--candidate", str(tmp_path / "ok.safetensors")]) == 0
    cand["topk_weights.2"] = cand["topk_weights.2"] / cand["topk_weights.2"].sum(-1, keepdims=True)  # renormalised
    save(tmp_path / "bad.safetensors", cand)
    assert chk.main(["--golden", "qwen2_moe", "--candidate", str(tmp_path / "bad.safetensors")]) == 1
    out = capsys.readouterr().out
    assert "first divergence: layer 2, topk_weights.2" in out and "norm_topk_prob=false" in out
    other = dict(cand, input_ids=cand["input_ids"][::-1].copy())
    save(tmp_path / "ids.safetensors", other)
    assert chk.main(["--golden", "qwen2_moe", "--candidate", str(tmp_path / "ids.safetensors")]) == 2
