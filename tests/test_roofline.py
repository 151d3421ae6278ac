"""d2m_ref.roofline, d2m_ref.perplexity, d2m_ref.evaluate and d2m_ref.corpus (spec/roofline.md,
spec/convert.md §5)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from d2m_ref import corpus, evaluate, roofline
from d2m_ref.config import parse_config
from d2m_ref.demo import byte_tokenizer
from d2m_ref.model import forward
from d2m_ref.perplexity import perplexity, token_nll
from d2m_ref.quant import FORMATS
from d2m_ref.quantize import write_quantized
from d2m_ref.synth import random_model, write_checkpoint
from d2m_ref.weights import METADATA_CONFIG_KEY, canonical_params, load_model
from tests.models import dense2moe_config, dense_config

PLAN = [{"attention": True, "ffn": "dense"},
        {"attention": False, "ffn": "moe", "num_experts": 4, "num_experts_per_tok": 2,
         "shared_expert_intermediate_size": 16, "shared_expert_gate": True},
        {"attention": True, "ffn": "moe", "num_experts": 3, "selection_bias": True}]


@pytest.mark.parametrize("fmt", list(roofline.FORMAT_STORAGE))
@pytest.mark.parametrize("config", [dense2moe_config(PLAN, base="qwen2", hidden=64, width=64),
                                    dense_config("qwen3", layers=2, hidden=64, width=96, tie=True)],
                         ids=["dense2moe-qwen2", "qwen3-tied"])
def test_modelled_bytes_are_the_bytes_a_written_checkpoint_stores(tmp_path, fmt, config):
    """§1: the bytes counted from the config in a format equal those of the same tensors in a
    checkpoint of that format, as synth and quantize write it."""
    cfg = parse_config(config)
    meta = {METADATA_CONFIG_KEY: json.dumps(config)}
    storage = roofline.FORMAT_STORAGE[fmt]
    path = tmp_path / "m.safetensors"
    if fmt in FORMATS:
        src = write_checkpoint(cfg, tmp_path / "bf16.safetensors", 0, "BF16", meta)
        write_quantized(load_model(src), storage, fmt, path, False, "test")
    else:
        write_checkpoint(cfg, path, 0, storage, meta)
    assert roofline.weight_bytes(cfg, fmt) == roofline.model_weight_bytes(load_model(path))


def test_bytes_of_a_step_by_hand():
    """A dense llama, f32: every matrix and vector once, one embedding row, the LM head; KV of the
    attention layers only."""
    H, F, V, L, Nh, Nkv, D = 32, 48, 97, 3, 4, 2, 8
    cfg = parse_config(dense_config("llama", layers=L, hidden=H, width=F, vocab=V, heads=Nh, kv_heads=Nkv, head_dim=D))
    per_layer = 2 * H + 2 * Nh * D * H + 2 * Nkv * D * H + 3 * F * H
    assert roofline.weight_bytes(cfg, "f32") == 4 * (H + L * per_layer + H + V * H)
    assert roofline.kv_bytes(cfg, 100, 2) == L * 2 * Nkv * D * 100 * 2
    moe = parse_config(dense2moe_config(PLAN))
    assert roofline.kv_bytes(moe, 10, 4) == 2 * 2 * 2 * 8 * 10 * 4  # two of three layers attend
    assert roofline.ms_per_token(204_800_000, 204.8) == pytest.approx(1.0)


def test_moe_step_bytes_from_the_checkpoint_itself():
    """The MoE plan's step, counted independently of step_reads from the tensors a checkpoint holds:
    every tensor once but the embedding (one row), experts (K of each layer's E: all one shape) and the
    LM head (read in full, also when tied)."""
    cfg = parse_config(dense2moe_config(PLAN, base="qwen2", hidden=64, width=64))
    model = random_model(cfg, 0, "F32")
    K = {i: s.moe.top_k for i, s in enumerate(cfg.layers) if s.moe is not None}
    want = 0
    for name, p in canonical_params(model):
        parts = name.split(".")
        if name == "model.embed_tokens.weight":
            want += p.nbytes // cfg.vocab_size + (p.nbytes if cfg.tie_word_embeddings else 0)
        elif "experts" in parts and int(parts[parts.index("experts") + 1]) >= K[int(parts[2])]:
            continue
        else:
            want += p.nbytes
    assert roofline.weight_bytes(cfg, "f32") == roofline.model_weight_bytes(model) == want


def test_active_parameters_count_k_experts():
    cfg = parse_config(dense2moe_config([{"attention": True, "ffn": "moe", "num_experts": 4}], top_k=1))
    one = roofline.active_parameters(cfg)
    two = roofline.active_parameters(parse_config(dense2moe_config([{"attention": True, "ffn": "moe", "num_experts": 4}],
                                                                   top_k=2)))
    assert two - one == 3 * 32 * 24  # one more expert of width moe_intermediate_size = 24


def test_token_nll_is_minus_the_log_softmax():
    logits = np.random.default_rng(0).standard_normal((5, 11)) * 30
    targets = np.array([0, 3, 10, 7, 7])
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    np.testing.assert_allclose(token_nll(logits, targets), -np.log(p[np.arange(5), targets]), rtol=1e-12)


def test_perplexity_predicts_every_token_but_each_windows_first():
    model = random_model(parse_config(dense_config("llama", vocab=97)), 1, "F64")
    ids = np.random.default_rng(2).integers(0, 97, 30)
    parts = [ids[:12], ids[12:24], ids[24:]]
    nll = []
    for w in parts:
        logits, _ = forward(model, w)
        nll += list(token_nll(logits[:-1], w[1:]))
    got = perplexity(model, parts)
    assert got["predicted_tokens"] == 27 and got["windows"] == 3
    assert got["perplexity"] == pytest.approx(np.exp(np.mean(nll)), rel=1e-12)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("eval")
    out = []
    for name, config in (("dense", dense_config("llama", vocab=257, max_position_embeddings=256)),
                         ("fused", dense2moe_config([{"attention": True, "ffn": "dense"},
                                                     {"attention": True, "ffn": "moe", "num_experts": 2}],
                                                    vocab=257, max_position_embeddings=256))):
        d = folder / name
        d.mkdir()
        write_checkpoint(parse_config(config), d / "model.safetensors", 0, "F32", {METADATA_CONFIG_KEY: json.dumps(config)})
        (d / "tokenizer.json").write_text(byte_tokenizer().to_str())
        out.append(d)
    text = folder / "text.txt"
    text.write_text("And God said, Let there be light: and there was light. " * 10)
    return out, text


def test_evaluate_writes_the_table_json_and_png(models, tmp_path, capsys):
    paths, text = models
    js, png = tmp_path / "e.json", tmp_path / "e.png"
    args = ["--weights", *map(str, paths), "--text", str(text), "--tokens", "400", "--window", "100",
            "--json", str(js), "--png", str(png), "--quiet", "--measure-decode", "--decode-steps", "3"]
    assert evaluate.main(args) == 0
    out = capsys.readouterr().out
    assert "| dense | dense | 3 | 3 |" in out and "| fused | dense |" in out and "here ratio" in out
    doc = json.loads(js.read_text())
    dense, fused = doc["rows"]
    assert dense["predicted_tokens"] == 396 and dense["modelled"]["bf16"]["orin-agx-64"] > 0
    assert fused["modelled"]["bf16"]["bytes_per_token"] == roofline.bytes_per_token(
        load_model(paths[1]).config, "bf16", 1024)
    assert dense["here"]["fixed_ms"] > 0 and dense["here"]["ratio"] > 0 and doc["cpu"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert evaluate.main(args) == 2 and "pass --force" in capsys.readouterr().err


def test_evaluate_names_a_text_too_short(models, capsys):
    paths, text = models
    assert evaluate.main(["--weights", str(paths[0]), "--text", str(text), "--tokens", "100000", "--quiet"]) == 2
    assert "--tokens asks for 100000" in capsys.readouterr().err


def test_corpus_splits_are_disjoint_and_cover_the_book(tmp_path):
    calib, held = corpus.kjv_text("calibration", ["Ruth"]), corpus.kjv_text("heldout", ["Ruth"])
    assert held.startswith("Now it came to pass in the days when the judges ruled")  # Ruth 1:1, no number
    assert calib.startswith("And Naomi had a kinsman of her husband's")  # Ruth 2:1
    assert not set(calib.splitlines()) & set(held.splitlines())
    import sqlite3
    with sqlite3.connect(corpus.kjv_database()) as con:  # Ruth: book 8 of the Old Testament
        passages = con.execute("SELECT COUNT(*) FROM Bible WHERE TestamentID = 1 AND BookID = 8").fetchone()[0]
    assert len(calib.splitlines()) + len(held.splitlines()) == passages == 68
    out = tmp_path / "ruth.txt"
    assert corpus.main(["kjv", "--split", "heldout", "--books", "Ruth", "--out", str(out)]) == 0
    assert out.read_text() == held
    assert corpus.main(["kjv", "--split", "heldout", "--books", "Ruht", "--out", str(tmp_path / "x")]) == 2
