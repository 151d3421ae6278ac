"""The tokenizer edge: named errors for bad files, unknown ids, ids past the model's vocabulary."""

from __future__ import annotations

from pathlib import Path

import pytest

from d2m_ref.demo import byte_tokenizer
from d2m_ref.errors import InputError
from d2m_ref.tokenizer import load_tokenizer, parse_token_ids, tokenizer_beside


@pytest.fixture
def tok_path(tmp_path) -> Path:
    path = tmp_path / "tokenizer.json"
    path.write_text(byte_tokenizer().to_str())
    return path


def test_ids_past_the_model_vocabulary_are_named(tok_path):
    """A tokenizer bigger than the model is fine until the text produces an id >= vocab_size."""
    tok = load_tokenizer(tok_path)
    assert tok.encode("hi", model_vocab_size=190).tolist() == [104, 105]
    with pytest.raises(InputError, match=r"token 2 'Ã' has id 195, but the model's vocab_size=190"):
        tok.encode("hié", model_vocab_size=190)


def test_undecodable_prompt_is_named_and_shortened(tok_path):
    """Text with surrogate escapes (argv bytes that are not UTF-8) is named, not a TypeError from
    tokenizers; a long prompt is shown by its first ~60 characters."""
    tok = load_tokenizer(tok_path)
    with pytest.raises(InputError, match=r"the prompt 'ab\\udcff' is not valid UTF-8 \(byte 0xff at position 2\)"):
        tok.encode("ab\udcff")
    with pytest.raises(InputError) as info:
        tok.encode("x" * 1000 + "\udcff")
    assert "x" * 50 in str(info.value) and "x" * 100 not in str(info.value) and "1001 characters" in str(info.value)
    with pytest.raises(InputError, match=r"lone surrogate U\+D800 at position 0"):
        tok.encode("\ud800")


def test_decode_names_an_unknown_id(tok_path):
    tok = load_tokenizer(tok_path)
    assert tok.decode([104, 105]) == "hi"
    with pytest.raises(InputError, match="token id 300 at position 1 is not in the tokenizer's vocabulary"):
        tok.decode([104, 300])


@pytest.mark.parametrize("content, culprit", [
    (None, "tokenizer file not found"),
    ("{not json", "not a valid tokenizer.json"),
    ('{"model": 3}', "not a valid tokenizer.json"),
    (b"\xff\xfe", "cannot read tokenizer"),
])
def test_bad_tokenizer_files_are_named(tmp_path, content, culprit):
    path = tmp_path / "tokenizer.json"
    if isinstance(content, str):
        path.write_text(content)
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(InputError, match=culprit) as info:
        load_tokenizer(path)
    assert str(path) in str(info.value)


def test_tokenizer_beside(tmp_path, tok_path):
    assert tokenizer_beside(tmp_path / "model.safetensors") == tok_path
    assert tokenizer_beside(tmp_path) == tok_path
    assert tokenizer_beside(tmp_path / "sub" / "model.safetensors") is None


@pytest.mark.parametrize("text, culprit", [
    ("", "--tokens is empty"), ("1,,2", "item 1 ''"), ("1,-2", "item 1 '-2'"), ("²", "item 0 '²'"),
    ("1" * 19, "item 0"), ("1.5", "item 0 '1.5'"),
])
def test_parse_token_ids_names_the_bad_item(text, culprit):
    with pytest.raises(InputError, match=culprit):
        parse_token_ids(text)


def test_parse_token_ids():
    assert parse_token_ids(" 1, 2 ,30").tolist() == [1, 2, 30]
