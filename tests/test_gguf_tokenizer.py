"""A GGUF file's vocabulary -> tokenizers.Tokenizer, against transformers' own GGUF import (the peer).

Every comparison writes or reads one GGUF file and tokenizes TEXTS both ways: ids must be equal,
and the tokenizer.json components (normalizer, pre-tokenizer, model, added tokens, post-processor,
decoder) too, so a failure names the stage that differs.

The comparisons could fail: test_texts_tell_the_splits_apart shows that on the probe vocabulary
any two of the splits we know, or of the wrong ones a slip could produce, give different ids for at
least one of TEXTS, so a `tokenizer.ggml.pre` mapped to the wrong split is caught.
"""

from __future__ import annotations

import itertools
import json

import pytest
from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers

from d2m_ref.errors import InputError
from d2m_ref.gguf_tokenizer import BYTE_LEVEL_SPLITS, tokenizer_from_gguf

try:  # tests/ is a package (tests/__init__.py) ...
    from tests.real_models import smollm2_gguf
except ImportError:  # ... or a plain directory that pytest put on sys.path
    from real_models import smollm2_gguf

TEXTS = [
    "Hello world",
    " ",
    "",
    "   leading and trailing spaces   ",
    "\n\n\n",
    "a\tb\t\tc \t\n",
    "line one\r\nline two\n\n  indented\n",
    "def f(x):\n    if x:\n        return x  + 1\n\n\nclass A:\n\tpass\n",
    "12345678901234567890",
    "3.14159, 1,000,000 and -42 or 2024-12-07",
    "x  1 and y   22",
    "I'm sure you'll say it's what they've done; WE'D SAY I'LL DON'T",
    "'Tis O'NEIL'S 'Sup?! marks after punctuation: ?!\u0301x ..\u0300\u0301y",
    "日本語のテキストと中文字符，还有标点。",
    "emoji: 😀👍🏽 👨‍👩‍👧 🇫🇷!",
    "Ünïcödé façade naïve — “quotes” ‘single’ … «guillemets»",
    "नमस्ते दुनिया, हिन्दी",
    "Здравствуй, мир! Γειά σου κόσμε. مرحبا بالعالم",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|><|im_end|><|endoftext|>",
    "text<|im_end|>more <|im_start",
    "<think>plan</think> done<｜end▁of▁sentence｜>",
    "  \t \n \u00a0no-break and \u200bzero width",
    "https://example.com/path?q=1&r=2#frag",
    "$$$ ### @@@ !!! ??? ...,,, ---",
    "mixedCase camelCaseWord snake_case_word UPPER_CASE",
    "e\u0301 decomposed vs \u00e9 composed, \u0301 alone",
    "a" * 40 + " " + "ab" * 20,
    "    \n    \n\n\n\t\t",
    "The year 1999's end; 100%!\n\nNext)",
]

# Tokens the small vocabularies below add to what they learn, and so learn nothing of.
ADDED_MARKERS = ("<think>", "</think>", "<｜end▁of▁sentence｜>")

# Enough of each architecture's keys for transformers to build a config (it reads them before the tokenizer).
ARCHITECTURE_KEYS = {"block_count": 1, "context_length": 64, "embedding_length": 8, "feed_forward_length": 16,
                     "attention.head_count": 2, "attention.head_count_kv": 2, "rope.dimension_count": 4,
                     "attention.layer_norm_rms_epsilon": 1e-5}


# --- writing and reading GGUF files, and the peer ---

def write_gguf(path, fields: dict) -> None:
    """A GGUF holding only these metadata fields (no tensors), plus the keys its architecture needs."""
    gguf = pytest.importorskip("gguf")
    architecture = fields.get("general.architecture", "llama")
    writer = gguf.GGUFWriter(str(path), architecture)
    for key, value in {**{f"{architecture}.{k}": v for k, v in ARCHITECTURE_KEYS.items()}, **fields}.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue  # the writer's own
        if isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        elif isinstance(value, str):
            writer.add_string(key, value)
        else:
            writer.add_array(key, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def read_fields(path) -> dict:
    gguf = pytest.importorskip("gguf")
    return {key: field.contents() for key, field in gguf.GGUFReader(path).fields.items()}


def training_texts() -> list[str]:
    """What the small vocabularies learn from: TEXTS with ADDED_MARKERS blanked out."""
    texts = []
    for text in TEXTS:
        for marker in ADDED_MARKERS:
            text = text.replace(marker, " ")
        texts.append(text)
    return texts


def peer(path):
    """transformers' tokenizer for a GGUF file, as `AutoTokenizer.from_pretrained(folder, gguf_file=name)`."""
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def assert_same_as_peer(ours: Tokenizer, theirs, texts=TEXTS) -> None:
    """Equal components, equal ids on every text, equal decoding; a failure names the first culprit."""
    mine, peers = json.loads(ours.to_str()), json.loads(theirs.backend_tokenizer.to_str())
    differing = [part for part in mine if mine[part] != peers[part]]
    assert not differing, (f"components differ: {differing}; ours {json.dumps(mine[differing[0]])[:400]}, "
                           f"transformers {json.dumps(peers[differing[0]])[:400]}")
    for text in texts:
        ids = ours.encode(text).ids
        assert ids == theirs(text)["input_ids"], (f"{text!r}: ours {ours.encode(text).tokens}, transformers "
                                                  f"{theirs.convert_ids_to_tokens(theirs(text)['input_ids'])}")
        assert ours.decode(ids, skip_special_tokens=False) == theirs.decode(ids), text


# --- the real model: SmolLM2-135M-Instruct ---

@pytest.fixture(scope="module")
def smollm2():
    """(path, fields) of the real SmolLM2 GGUF."""
    path = smollm2_gguf()
    return path, read_fields(path)


@pytest.mark.slow
def test_smollm2_matches_transformers(smollm2):
    path, fields = smollm2
    assert fields["tokenizer.ggml.pre"] == "smollm" and fields["tokenizer.ggml.add_bos_token"] is False
    assert_same_as_peer(tokenizer_from_gguf(fields, path.name), peer(path))


@pytest.mark.slow
def test_smollm2_chat_markers_and_round_trips(smollm2):
    """The chat markers are single special tokens; every text decodes back to itself; ids are the
    file's own (no token appended)."""
    path, fields = smollm2
    ours = tokenizer_from_gguf(fields, path.name)
    assert ours.get_vocab_size(with_added_tokens=True) == len(fields["tokenizer.ggml.tokens"]) == 49152
    ids = ours.encode("<|im_start|>user\nHi<|im_end|>\n").ids
    assert ids[0] == 1 and ids[-2] == 2 and ids.count(1) == ids.count(2) == 1
    assert ours.encode("<|im_start|>").ids == [1] and ours.encode("Hello world").ids == [19556, 905]
    for text in TEXTS:
        assert ours.decode(ours.encode(text).ids, skip_special_tokens=False) == text


@pytest.mark.slow
def test_smollm2_vocabulary_under_qwen_files(smollm2, tmp_path):
    """SmolLM2's vocabulary written as a Qwen3 file would name it ('qwen2' split, a Qwen3 architecture,
    for which transformers picks another tokenizer class): still the same as transformers."""
    _, fields = smollm2
    fields = {k: v for k, v in fields.items() if not k.startswith("llama.")}
    fields.update({"general.architecture": "qwen3", "tokenizer.ggml.pre": "qwen2"})
    path = tmp_path / "qwen3.gguf"
    write_gguf(path, fields)
    assert_same_as_peer(tokenizer_from_gguf(fields, path.name), peer(path))


@pytest.mark.slow
def test_smollm_split_is_gpt2s_not_llama_cpps(smollm2):
    """A known difference, pinned: for 'smollm' llama.cpp cuts each digit apart before the GPT-2
    split (llama-vocab.cpp, LLAMA_VOCAB_PRE_TYPE_SMOLLM); transformers, hence we, do not.  The two
    disagree on a digit after a run of spaces."""
    path, fields = smollm2
    ours = tokenizer_from_gguf(fields, path.name)
    digits_first = tokenizer_from_gguf(fields, path.name)
    digits_first.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                          pre_tokenizers.ByteLevel(add_prefix_space=False)])
    assert ours.encode("x  1").tokens == ["x", "Ġ", "Ġ", "1"]
    assert digits_first.encode("x  1").tokens == ["x", "ĠĠ", "1"]


# --- every pre-tokenizer name, on a small byte-level vocabulary trained to notice the split ---

def candidate_splits() -> dict:
    """The splits we know (by a pre name) and wrong ones a slip could produce -> their pre-tokenizers."""
    def regex_then_bytes(pre):
        return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(BYTE_LEVEL_SPLITS[pre]), behavior="isolated"),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])

    return {
        "gpt-2": pre_tokenizers.ByteLevel(add_prefix_space=False),
        **{pre: regex_then_bytes(pre) for pre in ("llama-bpe", "qwen2", "qwen35")},
        "no split": pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        "prefix space": pre_tokenizers.ByteLevel(add_prefix_space=True),
        "digits first (llama.cpp's smollm)": pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]),
    }


def probe_fields() -> dict:
    """A byte-level BPE vocabulary in which every piece any candidate split cuts from TEXTS is one
    token, so two splits that cut a text differently give different ids.  Like a real file: control
    tokens first, user-defined <think> </think>, and a control token written outside the byte
    alphabet (DeepSeek's style), which transformers neither keeps whole nor appends."""
    control = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    pieces = [piece for split in candidate_splits().values() for text in training_texts()
              for piece, _ in split.pre_tokenize_str(text)]
    trainer = trainers.BpeTrainer(vocab_size=100_000, special_tokens=control, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    learner = Tokenizer(models.BPE())  # no pre-tokenizer: each piece is a word, already in the byte alphabet
    learner.train_from_iterator(pieces, trainer)
    learnt = json.loads(learner.to_str())["model"]
    tokens = sorted(learnt["vocab"], key=learnt["vocab"].get)
    merges = [m if isinstance(m, str) else " ".join(m) for m in learnt["merges"]]
    extra = dict(zip(ADDED_MARKERS, (4, 4, 3)))
    return {"general.architecture": "llama", "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "smollm",
            "tokenizer.ggml.tokens": tokens + list(extra),
            "tokenizer.ggml.token_type": [3 if t in control else 1 for t in tokens] + list(extra.values()),
            "tokenizer.ggml.merges": merges, "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
            "tokenizer.ggml.padding_token_id": 0}


# pre name -> (architecture, flags): the names' families, with BOS / EOS settings varied among them
PRE_CASES = {
    "gpt-2": ("llama", {}),
    "default": ("llama", {"tokenizer.ggml.add_bos_token": True, "tokenizer.ggml.add_eos_token": True}),
    "smollm": ("llama", {"tokenizer.ggml.add_bos_token": False}),
    "llama-bpe": ("llama", {"tokenizer.ggml.add_bos_token": True}),
    "llama3": ("llama", {"tokenizer.ggml.add_bos_token": True, "tokenizer.ggml.add_eos_token": False}),
    "llama-v3": ("llama", {}),
    "qwen2": ("qwen3", {"tokenizer.ggml.add_bos_token": False}),
    "qwen35": ("qwen2", {"tokenizer.ggml.add_eos_token": True}),
}


def test_every_known_pre_tokenizer_has_a_case():
    assert set(PRE_CASES) == set(BYTE_LEVEL_SPLITS)


@pytest.mark.slow
@pytest.mark.parametrize("pre", PRE_CASES)
def test_byte_level_matches_transformers(pre, tmp_path):
    architecture, flags = PRE_CASES[pre]
    fields = {**probe_fields(), "general.architecture": architecture, "tokenizer.ggml.pre": pre, **flags}
    path = tmp_path / f"{pre}.gguf"
    write_gguf(path, fields)
    ours = tokenizer_from_gguf(fields, path.name)
    assert_same_as_peer(ours, peer(path))
    ids = ours.encode("hi").ids
    assert (ids[0] == 1) == flags.get("tokenizer.ggml.add_bos_token", False)
    assert (ids[-1] == 2) == flags.get("tokenizer.ggml.add_eos_token", False)
    assert fields["tokenizer.ggml.tokens"].index("<think>") in ours.encode("a<think>b").ids


def test_texts_tell_the_splits_apart():
    """Any two candidate splits give different ids for at least one text on the probe vocabulary,
    so the comparisons above would catch a `tokenizer.ggml.pre` mapped to the wrong split."""
    fields = probe_fields()
    splits = {}
    for name, pre_tokenizer in candidate_splits().items():
        splits[name] = tokenizer_from_gguf(fields, "probe.gguf")
        splits[name].pre_tokenizer = pre_tokenizer
    covered = {BYTE_LEVEL_SPLITS[pre] for pre in ("gpt-2", "llama-bpe", "qwen2", "qwen35")}
    assert covered == set(BYTE_LEVEL_SPLITS.values()), "a known split is missing from candidate_splits"
    for a, b in itertools.combinations(splits, 2):
        assert any(splits[a].encode(t).ids != splits[b].encode(t).ids for t in TEXTS), f"{a} and {b} look alike"


@pytest.mark.slow
def test_no_token_is_appended(tmp_path):
    """A known difference, pinned: when the vocabulary has no '<|endoftext|>' (Llama 3 calls it
    '<|end_of_text|>'), transformers' GPT-2 class appends one as a new id past the file's tokens;
    we keep to the file's ids, so that text is plain text here.  Everything else agrees."""
    fields = probe_fields()
    tokens = fields["tokenizer.ggml.tokens"] = ["<|end_of_text|>", *fields["tokenizer.ggml.tokens"][1:]]
    path = tmp_path / "no-endoftext.gguf"
    write_gguf(path, fields)
    ours, theirs = tokenizer_from_gguf(fields, path.name), peer(path)
    assert ours.get_vocab_size(with_added_tokens=True) == len(tokens) == len(theirs) - 1
    assert theirs("<|endoftext|>")["input_ids"] == [len(tokens)]
    assert max(ours.encode("<|endoftext|>").ids) < len(tokens)
    for text in TEXTS:
        if "<|endoftext|>" not in text:
            assert ours.encode(text).ids == theirs(text)["input_ids"], text


# --- SentencePiece ('llama' model), on a small Llama-2-shaped vocabulary ---

def sentencepiece_fields(with_merges: bool) -> dict:
    """<unk> <s> </s>, the 256 <0xNN> byte tokens, then pieces learnt from TEXTS with score -rank, as
    Llama 2's tokenizer.model has them; the merges listed too, or left to be derived from the scores.
    With the merges, the file also says add_space_prefix false, which transformers ignores."""
    learner = Tokenizer(models.BPE())
    learner.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    learner.train_from_iterator(training_texts(), trainers.BpeTrainer(vocab_size=400, show_progress=False))
    learnt = json.loads(learner.to_str())["model"]
    pieces = sorted(learnt["vocab"], key=learnt["vocab"].get)
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), *pieces, "<think>"]
    fields = {"general.architecture": "llama", "tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens,
              "tokenizer.ggml.scores": [0.0] * 259 + [-float(rank) for rank in range(len(pieces))] + [0.0],
              "tokenizer.ggml.token_type": [2, 3, 3] + [6] * 256 + [1] * len(pieces) + [4],
              "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
              "tokenizer.ggml.unknown_token_id": 0}
    if with_merges:
        fields["tokenizer.ggml.merges"] = [m if isinstance(m, str) else " ".join(m) for m in learnt["merges"]]
        fields["tokenizer.ggml.add_space_prefix"] = False
    return fields


@pytest.mark.slow
@pytest.mark.parametrize("with_merges", [False, True], ids=["merges from scores", "merges listed"])
def test_sentencepiece_matches_transformers(with_merges, tmp_path):
    fields = sentencepiece_fields(with_merges)
    path = tmp_path / "spm.gguf"
    write_gguf(path, fields)
    ours = tokenizer_from_gguf(fields, path.name)
    assert_same_as_peer(ours, peer(path))
    assert ours.encode("hi").ids[0] == 1  # no add_bos_token key: BOS, as llama.cpp does
    assert ours.encode("龍").ids[-3:] == [3 + b for b in "龍".encode()]  # unseen: byte fallback to <0xNN>
    for text in TEXTS:  # decoding strips a leading space (not prepended if there) and reads "▁" as one
        back = (text[1:] if text.startswith(" ") else text).replace("▁", " ")
        assert ours.decode(ours.encode(text).ids, skip_special_tokens=True) == back


def test_sentencepiece_add_bos_false_and_eos():
    fields = {**sentencepiece_fields(False), "tokenizer.ggml.add_bos_token": False,
              "tokenizer.ggml.add_eos_token": True}
    ids = tokenizer_from_gguf(fields, "spm.gguf").encode("hi").ids
    assert ids[0] != 1 and ids[-1] == 2


# --- errors name the file, the key and the value ---

def tiny_fields(**changes) -> dict:
    """A valid five-token byte-level vocabulary: 'ab' is one merge, '<|end|>' a control token."""
    fields = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt-2",
              "tokenizer.ggml.tokens": ["a", "b", "ab", "Ġ", "<|end|>"], "tokenizer.ggml.token_type": [1, 1, 1, 1, 3],
              "tokenizer.ggml.merges": ["a b"], "tokenizer.ggml.bos_token_id": 4}
    fields.update({f"tokenizer.ggml.{k}": v for k, v in changes.items()})
    return {k: v for k, v in fields.items() if v is not None}


def test_tiny_vocabulary_builds():
    tokenizer = tokenizer_from_gguf(tiny_fields(), "tiny.gguf")
    assert tokenizer.encode("ab a<|end|>").ids == [2, 3, 0, 4]
    tokenizer = tokenizer_from_gguf(tiny_fields(add_bos_token=True), "tiny.gguf")
    assert tokenizer.encode("ab").ids == [4, 2]


@pytest.mark.parametrize("changes, culprit", [
    ({"model": None}, "tokenizer.ggml.model is missing (expected a string)"),
    ({"model": "bert"}, "tokenizer.ggml.model = 'bert' is not a tokenizer this reader builds; supported: 'gpt2'"),
    ({"model": 3}, "tokenizer.ggml.model = 3 is not a string"),
    ({"pre": "deepseek-llm"}, "tokenizer.ggml.pre = 'deepseek-llm': the pre-tokenizer of a 'gpt2' vocabulary "
                              "must be one of 'gpt-2', 'default', 'smollm', 'llama-bpe'"),
    ({"pre": None}, "tokenizer.ggml.pre is missing: the pre-tokenizer of a 'gpt2' vocabulary must be one of"),
    ({"tokens": None}, "tokenizer.ggml.tokens is missing (expected a list of strings)"),
    ({"tokens": "ab"}, "tokenizer.ggml.tokens = 'ab' is not a list of strings"),
    ({"tokens": ["a", "b", 7, "Ġ", "x"]}, "tokenizer.ggml.tokens[2] = 7 is not a string"),
    ({"tokens": []}, "tokenizer.ggml.tokens is empty"),
    ({"token_type": [1, 1, 1]}, "tokenizer.ggml.token_type has 3 entries but tokenizer.ggml.tokens has 5"),
    ({"token_type": []}, "tokenizer.ggml.token_type has 0 entries but tokenizer.ggml.tokens has 5"),
    ({"token_type": [1, 1, 1, 1, True]}, "tokenizer.ggml.token_type[4] = True is not an integer"),
    ({"merges": None}, "tokenizer.ggml.merges is missing (expected a list of strings)"),
    ({"merges": ["a b c"]}, "tokenizer.ggml.merges[0] = 'a b c' is not two tokens joined by one space"),
    ({"merges": ["a b", "ab"]}, "tokenizer.ggml.merges[1] = 'ab' is not two tokens joined by one space"),
    ({"merges": ["a  b"]}, "tokenizer.ggml.merges[0] = 'a  b' is not two tokens joined by one space"),
    ({"merges": ["a x"]}, "tokenizer.ggml.merges[0] = 'a x': 'x' is not in tokenizer.ggml.tokens"),
    ({"merges": ["b a"]}, "tokenizer.ggml.merges[0] = 'b a': 'ba' is not in tokenizer.ggml.tokens"),
    ({"bos_token_id": 5}, "tokenizer.ggml.bos_token_id = 5 is not a token id (tokenizer.ggml.tokens has 5: 0..4)"),
    ({"eos_token_id": "</s>"}, "tokenizer.ggml.eos_token_id = '</s>' is not an integer"),
    ({"add_bos_token": "yes"}, "tokenizer.ggml.add_bos_token = 'yes' is not a boolean"),
    ({"add_eos_token": True}, "tokenizer.ggml.add_eos_token is true but tokenizer.ggml.eos_token_id is missing"),
    ({"tokens": ["a", "b", "ab", "Ġ", "<a:b>"], "add_bos_token": True},
     "tokenizer.ggml.bos_token_id = 4 is '<a:b>'; a token with ':' cannot be placed"),
])
def test_byte_level_errors_name_the_culprit(changes, culprit):
    with pytest.raises(InputError) as info:
        tokenizer_from_gguf(tiny_fields(**changes), "tiny.gguf")
    assert str(info.value).startswith("tiny.gguf: ") and culprit in str(info.value), str(info.value)


@pytest.mark.parametrize("changes, culprit", [
    ({"tokenizer.ggml.scores": None}, "tokenizer.ggml.scores is missing (expected a list of numbers)"),
    ({"tokenizer.ggml.scores": [0.0, 1.0]}, "tokenizer.ggml.scores has 2 entries but tokenizer.ggml.tokens has"),
    ({"tokenizer.ggml.scores": ["x"] * 3}, "tokenizer.ggml.scores[0] = 'x' is not a number"),
    ({"tokenizer.ggml.pre": "llama-bpe"}, "tokenizer.ggml.pre = 'llama-bpe' with tokenizer.ggml.model = 'llama'"),
    ({"general.architecture": "gemma2"}, "general.architecture = 'gemma2' with tokenizer.ggml.model = 'llama': "
                                         "this SentencePiece variant is not built here"),
    ({"tokenizer.ggml.bos_token_id": None}, "tokenizer.ggml.add_bos_token is true but tokenizer.ggml.bos_token_id "
                                            "is missing"),
])
def test_sentencepiece_errors_name_the_culprit(changes, culprit):
    fields = {**sentencepiece_fields(False), **changes}
    fields = {k: v for k, v in fields.items() if v is not None}
    with pytest.raises(InputError) as info:
        tokenizer_from_gguf(fields, "spm.gguf")
    assert str(info.value).startswith("spm.gguf: ") and culprit in str(info.value), str(info.value)
