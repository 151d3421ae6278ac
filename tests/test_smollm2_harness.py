"""The SmolLM2 candidate-trace harness (tests/peer/smollm2_runs.py, tests/peer/prompts.py): the
prompt corpus spans what it claims, each bug changes exactly the layer it names, the honest
float32 run is d2m_ref's model, and the honest half-precision models are what users load."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from d2m_ref import forward, load_model
from d2m_ref.gguf_io import gguf_tokenizer
from tests.peer.dumps import residual_only
from tests.peer.prompts import MAX_TOKENS, MIN_TOKENS, PROMPTS, prompt_ids
from tests.real_models import smollm2_gguf

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("gguf")
from tests.peer import smollm2_runs as runs  # noqa: E402  (needs torch)

PROMPT = "prose_recipe"  # 128 tokens
LAYERS = 30


@pytest.fixture(scope="module")
def ours():
    model = load_model(smollm2_gguf())
    yield model
    model.close()


@pytest.fixture(scope="module")
def prompts(ours) -> dict[str, np.ndarray]:
    return dict(prompt_ids(gguf_tokenizer(ours.checkpoint)))


def _relative(a: np.ndarray, b: np.ndarray) -> float:
    """Frobenius relative difference |a - b| / |b|."""
    return float(np.linalg.norm(a.astype(np.float64) - b) / np.linalg.norm(b.astype(np.float64)))


def _layer_of(name: str) -> int | None:
    match = re.fullmatch(r"[a-z_]+\.(\d+)", name)
    return int(match.group(1)) if match else None


# ---------------------------------------------------------------------------------------------
# The prompt corpus


def test_prompts_span_4_to_1024_tokens(prompts):
    """At least 60 prompts of 4..1024 SmolLM2 tokens, with several very short ones, several of
    300 or more and at least three above 900."""
    lengths = {name: len(ids) for name, ids in prompts.items()}
    assert len(PROMPTS) >= 60 and len(lengths) == len(PROMPTS), "prompt ids must be unique"
    out_of_span = {n: t for n, t in lengths.items() if not MIN_TOKENS <= t <= MAX_TOKENS}
    assert not out_of_span, f"outside {MIN_TOKENS}..{MAX_TOKENS} tokens: {out_of_span}"
    assert min(lengths.values()) == MIN_TOKENS
    assert sum(t <= 8 for t in lengths.values()) >= 5
    assert sum(300 <= t for t in lengths.values()) >= 10
    assert sum(900 < t for t in lengths.values()) >= 3


def test_prompts_cover_every_kind():
    kinds = {name.split("_")[0] for name, _ in PROMPTS}
    assert kinds >= {"short", "prose", "kjv", "code", "num", "chat", "list", "intl", "rep", "long"}
    texts = dict(PROMPTS)
    assert sum("<|im_start|>assistant\n" in t for t in texts.values()) >= 5
    assert any(t.count("<|im_start|>user") >= 2 for t in texts.values()), "a multi-turn chat"
    assert any(not t.isascii() for t in texts.values())


def test_prompt_ids_are_int64_arrays(prompts):
    assert all(ids.dtype == np.int64 and ids.ndim == 1 for ids in prompts.values())


# ---------------------------------------------------------------------------------------------
# residual_only and argument errors (no model needed)


def test_residual_only_keeps_the_residual_stream_and_the_routers():
    names = ["input_ids", "embeddings", "attn_out.0", "ffn_out.0", "hidden.0", "hidden.12", "router_logits.1",
             "router_scores.1", "topk_ids.1", "topk_weights.1", "final_norm", "logits", "hidden", "hidden.x",
             "logits.0", "attn_out.12"]
    trace = {name: np.zeros(1) for name in names}
    assert sorted(residual_only(trace)) == sorted(
        ["input_ids", "hidden.0", "hidden.12", "router_logits.1", "router_scores.1", "topk_ids.1", "topk_weights.1",
         "logits"])


@pytest.mark.parametrize("call, culprit", [
    (lambda: runs.hf_model("float8"), "dtype='float8'"),
    (lambda: runs.hf_model("float32", "flash"), "attn_impl='flash'"),
    (lambda: runs.buggy_model("float32", "no_such_bug"), "bug='no_such_bug'"),
    (lambda: runs.run_trace("float32", [1, 2, 3, 4], layer=3), "layer=3 without a bug"),
])
def test_harness_errors_name_the_culprit(call, culprit):
    with pytest.raises(ValueError, match=re.escape(culprit)):
        call()


# ---------------------------------------------------------------------------------------------
# The honest models


@pytest.mark.slow
def test_honest_float32_logits_agree_with_d2m_ref_float64(ours, prompts):
    """transformers' float32 run of the GGUF against d2m_ref's float64 forward of the same file:
    <= 1e-4 relative (max |difference| / max |logit|)."""
    ids = prompts[PROMPT]
    reference, _ = forward(ours, ids)
    logits = runs.run_trace("float32", ids)["logits"]
    error = float(np.max(np.abs(logits - reference)) / np.max(np.abs(reference)))
    assert error <= 1e-4, f"max relative error {error:.3e}"


@pytest.mark.slow
def test_half_precision_model_is_what_from_pretrained_gives(prompts):
    """hf_model("bfloat16") (a .to() copy with float32 inv_freq) traces bit for bit like
    from_pretrained(dtype=torch.bfloat16) of the GGUF."""
    path = smollm2_gguf()
    loaded = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.bfloat16, attn_implementation="eager",
        quantization_config=transformers.GgufConfig(dequantize=True)).eval()
    assert loaded.model.rotary_emb.inv_freq.dtype == torch.float32
    from d2m_ref.adapters.torch import record_trace
    theirs = record_trace(loaded, prompts[PROMPT])
    ours = runs.run_trace("bfloat16", prompts[PROMPT])
    assert sorted(theirs) == sorted(ours)
    assert [n for n in ours if not np.array_equal(ours[n], theirs[n])] == []


@pytest.mark.slow
def test_sdpa_model_shares_the_weights_and_agrees_with_eager(prompts):
    eager, sdpa = runs.hf_model("float32"), runs.hf_model("float32", "sdpa")
    assert (eager.config._attn_implementation, sdpa.config._attn_implementation) == ("eager", "sdpa")
    assert sdpa.model.layers[3].mlp.up_proj.weight is eager.model.layers[3].mlp.up_proj.weight
    a, b = runs.run_trace("float32", prompts[PROMPT]), runs.run_trace("float32", prompts[PROMPT], attn_impl="sdpa")
    assert _relative(b["logits"], a["logits"]) < 1e-5


# ---------------------------------------------------------------------------------------------
# The bugs


@pytest.mark.slow
@pytest.mark.parametrize("dtype, attn_impl", [("float32", "eager"), ("float32", "sdpa"), ("bfloat16", "eager")])
@pytest.mark.parametrize("layer", [runs.DEFAULT_LAYER, 20])
@pytest.mark.parametrize("bug", sorted(runs.BUGS))
def test_bug_changes_its_layer_and_nothing_before(bug, layer, dtype, attn_impl, prompts):
    """Every tensor before the bug's layer is bit-identical to the honest run's; the layer's
    attention output and residual stream differ (by > 1e-5 and > 1e-6 relative in float32: the
    smallest bug, rmsnorm_eps, moves them by 1.1e-4 and 2.4e-6 in layer 20, where the residual
    stream is largest)."""
    ids = prompts[PROMPT]
    honest = runs.run_trace(dtype, ids, attn_impl=attn_impl)
    buggy = runs.run_trace(dtype, ids, bug=bug, layer=layer, attn_impl=attn_impl)
    assert sorted(buggy) == sorted(honest)
    before = [n for n in honest if n == "embeddings" or (_layer_of(n) is not None and _layer_of(n) < layer)]
    assert len(before) == 1 + 3 * layer
    assert [n for n in before if not np.array_equal(buggy[n], honest[n])] == []
    floor = 1e-6 if dtype == "float32" else 0.0
    assert _relative(buggy[f"attn_out.{layer}"], honest[f"attn_out.{layer}"]) > floor * 10
    assert _relative(buggy[f"hidden.{layer}"], honest[f"hidden.{layer}"]) > floor


@pytest.mark.slow
def test_proj_scaled_scales_attn_out_by_its_factor(prompts):
    ids = prompts[PROMPT]
    honest, buggy = runs.run_trace("float32", ids), runs.run_trace("float32", ids, bug="proj_scaled")
    name = f"attn_out.{runs.DEFAULT_LAYER}"
    assert _relative(buggy[name], honest[name] * runs.PROJ_SCALE) < 1e-6


@pytest.mark.slow
def test_bug_machinery_with_the_right_value_is_the_honest_model(prompts):
    """The hooks the bugs use change nothing when given SmolLM2's own values: RoPE from a fresh
    rotary embedding of the model's config, and query head h reading kv head h // (Nh/Nkv)."""
    from d2m_ref.adapters.torch import record_trace
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
    honest_model = runs.hf_model("float32")
    ids = prompts[PROMPT]
    honest = runs.run_trace("float32", ids)
    model = runs.sharing_copy(honest_model)
    runs.rope_from(model, runs.DEFAULT_LAYER, LlamaRotaryEmbedding(model.config))
    group = model.config.num_attention_heads // model.config.num_key_value_heads
    runs.expand_kv(model, runs.DEFAULT_LAYER, lambda h: h // group)
    assert model.model.layers[runs.DEFAULT_LAYER].self_attn.num_key_value_groups == 1
    trace = record_trace(model, ids)
    assert [n for n in honest if not np.array_equal(trace[n], honest[n])] == []


@pytest.mark.slow
def test_bugs_leave_the_cached_honest_model_alone(prompts):
    ids = prompts["short_capital"]
    before = runs.run_trace("float32", ids)
    for bug in runs.BUGS:
        runs.run_trace("float32", ids, bug=bug, layer=3)
    honest = runs.hf_model("float32")
    hooked = [name for name, m in honest.named_modules() if m._forward_hooks or m._forward_pre_hooks]
    assert hooked == []
    assert honest.model.layers[3].input_layernorm.variance_epsilon == pytest.approx(1e-5)
    after = runs.run_trace("float32", ids)
    assert [n for n in before if not np.array_equal(before[n], after[n])] == []


@pytest.mark.slow
def test_run_trace_writes_a_trace_file(prompts, tmp_path: Path):
    from d2m_ref.tracefile import read_trace
    path = tmp_path / "gqa.safetensors"
    trace = runs.run_trace("bfloat16", prompts["short_capital"], bug="gqa_mapping", path=path)
    tensors, metadata = read_trace(path)
    assert metadata["candidate_dtype"] == "bfloat16"
    assert sorted(tensors) == sorted(trace) and len([n for n in trace if n.startswith("hidden.")]) == LAYERS
