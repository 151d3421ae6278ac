"""The demo model: reproducible to the byte, shows every layer-plan feature, loads and tokenizes."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from d2m_ref import load_model
from d2m_ref.demo import EOS_ID, EOS_TOKEN, FILES, REGENERATE, build_demo
from d2m_ref.errors import OutputExistsError
from d2m_ref.safetensors_io import SafetensorsFile
from d2m_ref.tokenizer import load_tokenizer

GOLDEN = Path(__file__).resolve().parent.parent / "golden" / "demo"


@pytest.fixture(scope="module")
def rebuilt(tmp_path_factory) -> Path:
    return build_demo(tmp_path_factory.mktemp("demo"))


@pytest.mark.parametrize("name", [f for f in FILES if f != "tokenizer.json"])
def test_golden_demo_is_current(rebuilt, name):
    """golden/demo/<file> is byte-for-byte what build_demo writes today."""
    golden = GOLDEN / name
    assert golden.is_file(), f"{golden} is missing; regenerate with: {REGENERATE}"
    assert (rebuilt / name).read_bytes() == golden.read_bytes(), (
        f"{golden} differs from what d2m_ref.demo builds now; regenerate with: {REGENERATE}")


def test_golden_demo_tokenizer_is_current(rebuilt):
    """golden/demo/tokenizer.json tokenizes like the one build_demo writes today.  Compared by behaviour,
    not bytes: another `tokenizers` release may serialise the same tokenizer differently."""
    golden, fresh = load_tokenizer(GOLDEN / "tokenizer.json"), load_tokenizer(rebuilt / "tokenizer.json")
    text = "The capital of France is Paris. \u00e9\u4e2d\U0001f600 " + bytes(range(32, 127)).decode()
    assert np.array_equal(golden.encode(text, 257), fresh.encode(text, 257)), f"regenerate with: {REGENERATE}"
    ids = list(range(257))
    assert golden.decode(ids) == fresh.decode(ids), f"regenerate with: {REGENERATE}"


def test_build_is_reproducible(rebuilt, tmp_path):
    """Two builds in different directories give identical files (no paths, times or hash order leak in)."""
    again = build_demo(tmp_path / "again")
    for name in FILES:
        assert (again / name).read_bytes() == (rebuilt / name).read_bytes(), name


def test_build_refuses_to_overwrite(tmp_path):
    """Without force an existing file is named and nothing is written; with force it is replaced."""
    (tmp_path / "tokenizer.json").write_text("mine")
    with pytest.raises(OutputExistsError, match="tokenizer.json: file exists; pass --force to overwrite it"):
        build_demo(tmp_path)
    assert not (tmp_path / "model.safetensors").exists()
    assert (tmp_path / "tokenizer.json").read_text() == "mine"
    build_demo(tmp_path, force=True)
    assert (tmp_path / "tokenizer.json").read_text() != "mine"


def test_build_replaces_files_atomically(tmp_path):
    """With force, config.json and tokenizer.json are replaced by new files (write to a temporary,
    rename), never rewritten in place: a hard link to the old file keeps the old content."""
    build_demo(tmp_path)
    for name in ("config.json", "tokenizer.json"):
        (tmp_path / name).unlink()
        (tmp_path / f"{name}.mine").write_text("mine")
        os.link(tmp_path / f"{name}.mine", tmp_path / name)
    build_demo(tmp_path, force=True)
    for name in ("config.json", "tokenizer.json"):
        assert (tmp_path / f"{name}.mine").read_text() == "mine", name
        assert (tmp_path / name).read_text() != "mine", name
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*FILES, "config.json.mine", "tokenizer.json.mine"])


def test_demo_plan_shows_every_feature(rebuilt):
    """Dense, fused MoE with attention, attention-free sigmoid MoE with selection bias, gated shared
    expert, attention-free dense last; provenance filled in; BF16 weights with the config in metadata."""
    model = load_model(rebuilt / "model.safetensors")
    try:
        cfg = model.config
        dense, fused, free, shared, dense2, last = cfg.layers
        assert cfg.family == "dense2moe" and cfg.max_position_embeddings == 512 and cfg.hidden_size == 64
        assert dense.attention and dense.moe is None
        assert fused.attention and (fused.moe.top_k, fused.moe.num_experts, fused.moe.scoring) == (1, 2, "softmax")
        assert fused.moe.norm_topk_prob and fused.source_layers == (1, 2) and fused.attention_source == 1
        assert not free.attention and (free.moe.top_k, free.moe.num_experts) == (2, 3)
        assert free.moe.scoring == "sigmoid" and free.moe.selection_bias
        assert shared.moe.shared_expert_gate and shared.moe.shared_expert_intermediate_size > 0
        assert dense2.attention and dense2.moe is None
        assert not last.attention and last.moe is None
        sources = [s for spec in cfg.layers for s in spec.source_layers]
        assert sources == sorted(sources) and len(sources) >= 9
        assert all(p.storage == "BF16" for p in (model.weights.embed, model.weights.lm_head))
    finally:
        model.close()
    with SafetensorsFile(rebuilt / "model.safetensors") as f:
        assert "layer_plan" in f.metadata["config"]


def test_demo_tokenizer_is_byte_level(rebuilt):
    """Token id b is byte b; <|endoftext|> is 256; decode(encode(text)) == text for any UTF-8 text."""
    tok = load_tokenizer(rebuilt / "tokenizer.json")
    text = "Hé, 世界!\n\t\x00"
    ids = tok.encode(text)
    assert ids.tolist() == list(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert tok.token_id(EOS_TOKEN) == EOS_ID == tok.vocab_size - 1
    assert tok.encode("a" + EOS_TOKEN).tolist() == [ord("a"), EOS_ID]
    assert np.array_equal(tok.encode("".join(map(chr, range(32, 127)))), np.arange(32, 127))
