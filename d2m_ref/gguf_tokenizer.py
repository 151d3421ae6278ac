"""A Hugging Face `tokenizers.Tokenizer` rebuilt from a GGUF file's own vocabulary.

A GGUF carries no tokenizer.json.  llama.cpp stores the vocabulary as metadata instead: the tokens
(`tokenizer.ggml.tokens`), a type per token (`token_type`: 3 control, 4 user-defined), the BPE
merges or the SentencePiece scores, and the *name* of a pre-tokenizer (`tokenizer.ggml.pre`).  From
these we build the tokenizer that transformers' GGUF import builds (`AutoTokenizer.from_pretrained(
folder, gguf_file=name)`, transformers 5.24: integrations/gguf/gguf_tokenizer_mapping.py and the
TokenizersBackend it hands the result to), so that both give the same ids for the same text:

  gpt2   byte-level BPE: the vocabulary spelled in GPT-2's byte alphabet, the file's merges in
         their order, no normalizer, the split named by `tokenizer.ggml.pre` (BYTE_LEVEL_SPLITS)
         before the byte mapping, and a ByteLevel decoder.
  llama  SentencePiece as BPE: byte fallback to the <0xNN> tokens, the file's merges or else merges
         ranked by the token scores (merges_from_scores), "▁" for a space and prepended to the
         text's first piece, no normalizer.

Both: control tokens are special added tokens and user-defined ones plain added tokens (so
`<|im_start|>` or `<think>` stays one token), the bos/eos/unk/pad tokens the file names are special
too, and a post-processor adds BOS / EOS as `tokenizer.ggml.add_bos_token` / `add_eos_token` say
(a SentencePiece file without the key adds BOS, as llama.cpp and transformers both do).

Where transformers departs from llama.cpp, or from the model's own tokenizer, we follow transformers,
since it is our peer.  The differences are facts about the files, kept here:
- "smollm": llama.cpp cuts every digit apart before the GPT-2 split; transformers does the GPT-2
  split alone.  The ids differ where a digit follows a run of spaces: "x  1" (pinned in the tests).
  "default": llama.cpp's split for it is not GPT-2's either; transformers uses GPT-2's.
- "llama-bpe" (Llama 3): llama.cpp takes a piece that is itself a token whole (`ignore_merges`);
  transformers' GGUF import runs the merges on it.  A file without `add_bos_token`: llama.cpp adds
  BOS for this pre-tokenizer, transformers does not.
- Qwen2/Qwen3: transformers' own Qwen2Tokenizer normalizes to NFC; its GGUF import replaces that
  backend with one that has no normalizer (llama.cpp has none either).
- "llama": `tokenizer.ggml.add_space_prefix` is ignored and "▁" is prepended only when the text
  does not start with a space already; llama.cpp honours the flag and always prepends.
Where transformers appends tokens the file does not have (its classes' default "<|endoftext|>",
"<unk>", "<s>", "</s>" when the vocabulary lacks them, or a named special token spelled outside the
byte alphabet), we do not: every id is a position in `tokenizer.ggml.tokens`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

from .errors import InputError

# llama.cpp's token types (gguf.TokenType)
CONTROL = 3
USER_DEFINED = 4

# The splits tokenizer.json files give these families (transformers copies them; llama.cpp rewrites
# the case-insensitive contractions by hand).  Pieces are split off, then mapped to the byte alphabet.
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
               r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN35_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"  # marks join letters
                r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
GPT2_SPLIT = None  # ByteLevel's built-in regex: 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+

# tokenizer.ggml.pre -> split, for the pre-tokenizer names of the Llama 3, SmolLM2, Qwen2/2.5/3/3.5
# and GPT-2 files.  Others are refused rather than guessed: transformers would split them like GPT-2.
BYTE_LEVEL_SPLITS: dict[str, str | None] = {
    "gpt-2": GPT2_SPLIT,
    "default": GPT2_SPLIT,
    "smollm": GPT2_SPLIT,
    "llama-bpe": LLAMA3_SPLIT,
    "llama3": LLAMA3_SPLIT,
    "llama-v3": LLAMA3_SPLIT,
    "qwen2": QWEN2_SPLIT,
    "qwen35": QWEN35_SPLIT,
}

# SentencePiece files of these architectures need other builders in transformers (Gemma renames
# space tokens and ranks merges by position; Phi-3 prefixes every space); not built here.
SENTENCEPIECE_ELSEWHERE = ("gemma", "gemma2", "gemma3", "phi3")

SPACE_MARK = "\u2581"  # "▁", SentencePiece's space
NAMED_SPECIAL_IDS = ("bos_token_id", "eos_token_id", "unknown_token_id", "padding_token_id")
SHOWN_ITEMS = 3  # an error quotes at most this many items of a list


def tokenizer_from_gguf(fields: Mapping[str, Any], where: str) -> Tokenizer:
    """GGUF metadata {key: decoded value} -> the tokenizer transformers' GGUF import builds.

    `where` (the file name) starts every error message.  A missing key, a value of the wrong type,
    lists of different lengths, an unknown tokenizer model or pre-tokenizer, merges that do not
    parse: InputError naming the key and the value."""
    model = required(fields, "tokenizer.ggml.model", str, where)
    if model not in ("gpt2", "llama"):
        raise InputError(f"{where}: tokenizer.ggml.model = {model!r} is not a tokenizer this reader builds; "
                         "supported: 'gpt2' (byte-level BPE: Llama 3, SmolLM2, Qwen2/3) and 'llama' "
                         "(SentencePiece: Llama 2, TinyLlama, Mistral 7B v0.1)")
    tokens = required(fields, "tokenizer.ggml.tokens", list_of(str), where)
    if not tokens:
        raise InputError(f"{where}: tokenizer.ggml.tokens is empty")
    token_types = optional(fields, "tokenizer.ggml.token_type", list_of(int), where, [0] * len(tokens))
    check_length(fields, "tokenizer.ggml.token_type", len(token_types), len(tokens), where)
    named = named_special_tokens(fields, tokens, where)
    if model == "gpt2":
        # A token outside the byte alphabet lives in the vocabulary respelled, so it cannot be an
        # added token under its own text (transformers would append it as a new id).
        tokenizer, addable = byte_level_bpe(fields, tokens, where), in_byte_alphabet
    else:
        tokenizer, addable = sentencepiece_bpe(fields, tokens, where), lambda token: True
    add_file_tokens(tokenizer, tokens, token_types, named, addable)
    tokenizer.post_processor = bos_eos_template(fields, tokens, model, where)
    return tokenizer


def byte_level_bpe(fields: Mapping[str, Any], tokens: list[str], where: str) -> Tokenizer:
    """The 'gpt2' model: byte-level BPE, split as `tokenizer.ggml.pre` names.

    A token already in the byte alphabet is kept as it is; any other (a control token written in
    plain UTF-8, say) is respelled byte by byte, as transformers does."""
    pre = optional(fields, "tokenizer.ggml.pre", str, where)
    if pre not in BYTE_LEVEL_SPLITS:
        stated = "is missing" if pre is None else f"= {pre!r}"
        raise InputError(f"{where}: tokenizer.ggml.pre {stated}: the pre-tokenizer of a 'gpt2' vocabulary must "
                         f"be one of {', '.join(map(repr, BYTE_LEVEL_SPLITS))}")
    alphabet = byte_alphabet()
    vocab = {token if in_byte_alphabet(token) else "".join(alphabet[b] for b in token.encode("utf-8")): i
             for i, token in enumerate(tokens)}  # a repeated token keeps its last id, as in transformers
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=parsed_merges(fields, vocab, where), dropout=None,
                                     continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False))
    split = BYTE_LEVEL_SPLITS[pre]
    if split is GPT2_SPLIT:
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def sentencepiece_bpe(fields: Mapping[str, Any], tokens: list[str], where: str) -> Tokenizer:
    """The 'llama' model: SentencePiece as BPE with byte fallback, as transformers' LlamaTokenizer."""
    architecture = optional(fields, "general.architecture", str, where)
    if architecture in SENTENCEPIECE_ELSEWHERE:
        raise InputError(f"{where}: general.architecture = {architecture!r} with tokenizer.ggml.model = 'llama': "
                         "this SentencePiece variant is not built here (supported: Llama 2 style vocabularies)")
    pre = optional(fields, "tokenizer.ggml.pre", str, where)
    if pre not in (None, "default"):
        raise InputError(f"{where}: tokenizer.ggml.pre = {pre!r} with tokenizer.ggml.model = 'llama': a SentencePiece "
                         "vocabulary is expected to name no pre-tokenizer, or 'default'")
    vocab = {token: i for i, token in enumerate(tokens)}
    if "tokenizer.ggml.merges" in fields:
        merges = parsed_merges(fields, vocab, where)
    else:
        scores = required(fields, "tokenizer.ggml.scores", list_of(float), where)
        check_length(fields, "tokenizer.ggml.scores", len(scores), len(tokens), where)
        merges = merges_from_scores(tokens, scores)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, dropout=None, fuse_unk=True, byte_fallback=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SPACE_MARK, prepend_scheme="first", split=False)
    tokenizer.decoder = decoders.Sequence([decoders.Replace(SPACE_MARK, " "), decoders.ByteFallback(),
                                           decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    return tokenizer


def merges_from_scores(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """SentencePiece keeps scores, not merges -> BPE merges, best first.

    Every cut of a token into two pieces that are both tokens is a merge.  They are ranked by the
    token's score, highest first, then the longer left piece, then the longer right piece; what is
    still tied (cuts of different tokens) keeps the tokens' order in the file.  This is transformers'
    `generate_merges` (which also orders one token's cuts by their pieces' ids, an order the length
    key then overrides); the ranks decide the ids, so we rank exactly as it does."""
    known = set(tokens)
    ranked = []
    for token, score in dict(zip(tokens, scores)).items():  # a repeated token: first place, last score
        ranked += [(score, token[:k], token[k:]) for k in range(1, len(token))
                   if token[:k] in known and token[k:] in known]
    ranked.sort(key=lambda m: (m[0], len(m[1]), len(m[2])), reverse=True)  # stable: ties keep file order
    return [(left, right) for _, left, right in ranked]


def parsed_merges(fields: Mapping[str, Any], vocab: Mapping[str, int], where: str) -> list[tuple[str, str]]:
    """tokenizer.ggml.merges ['Ġ t', ...] -> [('Ġ', 't'), ...], each piece and their join in `vocab`."""
    lines = required(fields, "tokenizer.ggml.merges", list_of(str), where)
    merges = []
    for i, line in enumerate(lines):
        pair = tuple(line.split(" "))
        if len(pair) != 2 or not all(pair):
            raise InputError(f"{where}: tokenizer.ggml.merges[{i}] = {line!r} is not two tokens joined by one space")
        for piece in (*pair, pair[0] + pair[1]):
            if piece not in vocab:
                raise InputError(f"{where}: tokenizer.ggml.merges[{i}] = {line!r}: {piece!r} is not in "
                                 "tokenizer.ggml.tokens")
        merges.append(pair)
    return merges


def add_file_tokens(tokenizer: Tokenizer, tokens: list[str], token_types: list[int], named: list[str],
                    addable: Callable[[str], bool]) -> None:
    """Control tokens and the named bos/eos/unk/pad become special added tokens, user-defined ones
    plain added tokens: all are matched whole in the text before any splitting.  `addable(text)`
    says whether a token can be added under its own text (its id is then its vocabulary id)."""
    special = [t for t, kind in zip(tokens, token_types) if kind == CONTROL and addable(t)]
    tokenizer.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in special])
    plain = [t for t, kind in zip(tokens, token_types) if kind == USER_DEFINED and addable(t) and t not in special]
    tokenizer.add_tokens([AddedToken(t, normalized=False, special=False) for t in plain])
    already = set(special) | set(plain)
    rest = [t for t in dict.fromkeys(named) if t not in already and addable(t)]
    tokenizer.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in rest])


def named_special_tokens(fields: Mapping[str, Any], tokens: list[str], where: str) -> list[str]:
    """The texts of the tokens tokenizer.ggml.{bos,eos,unknown,padding}_token_id name."""
    return [tokens[i] for name in NAMED_SPECIAL_IDS
            if (i := token_id(fields, f"tokenizer.ggml.{name}", len(tokens), where)) is not None]


def bos_eos_template(fields: Mapping[str, Any], tokens: list[str], model: str,
                     where: str) -> processors.TemplateProcessing:
    """The post-processor: BOS before and EOS after each sequence, as the file's flags say."""
    added = {}
    for end, default in (("bos", model == "llama"), ("eos", False)):
        flag = f"tokenizer.ggml.add_{end}_token"
        if optional(fields, flag, bool, where, default):
            i = token_id(fields, f"tokenizer.ggml.{end}_token_id", len(tokens), where)
            if i is None:
                raise InputError(f"{where}: {flag} is true but tokenizer.ggml.{end}_token_id is missing")
            if ":" in tokens[i]:
                raise InputError(f"{where}: tokenizer.ggml.{end}_token_id = {i} is {tokens[i]!r}; a token with ':' "
                                 "cannot be placed by a tokenizers template")
            added[end] = (tokens[i], i)
    bos = [added["bos"][0]] if "bos" in added else []
    eos = [added["eos"][0]] if "eos" in added else []
    return processors.TemplateProcessing(
        single=[*bos, "$A", *eos],
        pair=[*bos, "$A", *eos, *(f"{t}:1" for t in bos), "$B:1", *(f"{t}:1" for t in eos)],
        special_tokens=list(added.values()))


@functools.cache
def byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> character map: the printable Latin-1 bytes stand for themselves; the other 68
    (controls, space, no-break space, soft hyphen) take U+0100 onwards in byte order, so a
    vocabulary token never holds a space or a control character ('Ġ' is the space)."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table = {b: chr(b) for b in printable}
    table.update({b: chr(0x100 + n) for n, b in enumerate(b for b in range(256) if b not in table)})
    return table


@functools.cache
def byte_characters() -> frozenset[str]:
    return frozenset(byte_alphabet().values())


def in_byte_alphabet(token: str) -> bool:
    """Whether a token is spelled in the byte alphabet, as every byte-level BPE token should be."""
    return set(token) <= byte_characters()


# --- reading fields, with errors that name the key and the value ---

def list_of(kind: type):
    """A field kind: a list whose items are all `kind`."""
    return (list, kind)


def required(fields: Mapping[str, Any], key: str, kind, where: str):
    """fields[key], checked to be of `kind` (a type, or list_of(type)); missing -> InputError."""
    if key not in fields:
        raise InputError(f"{where}: {key} is missing (expected {kind_name(kind)})")
    return checked(fields[key], key, kind, where)


def optional(fields: Mapping[str, Any], key: str, kind, where: str, default=None):
    """fields[key] checked as `required` does, or `default` when the key is absent."""
    return checked(fields[key], key, kind, where) if key in fields else default


def token_id(fields: Mapping[str, Any], key: str, n_tokens: int, where: str) -> int | None:
    """An optional token-id field, checked to be a position in tokenizer.ggml.tokens."""
    i = optional(fields, key, int, where)
    if i is not None and not 0 <= i < n_tokens:
        raise InputError(f"{where}: {key} = {i} is not a token id (tokenizer.ggml.tokens has {n_tokens}: "
                         f"0..{n_tokens - 1})")
    return i


def check_length(fields: Mapping[str, Any], key: str, length: int, n_tokens: int, where: str) -> None:
    if length != n_tokens:
        raise InputError(f"{where}: {key} has {length} entries but tokenizer.ggml.tokens has {n_tokens}; "
                         "there must be one per token")


def checked(value, key: str, kind, where: str):
    if isinstance(kind, tuple):
        item_kind = kind[1]
        if not isinstance(value, list):
            raise InputError(f"{where}: {key} = {shown(value)} is not {kind_name(kind)}")
        for i, item in enumerate(value):
            if not is_kind(item, item_kind):
                raise InputError(f"{where}: {key}[{i}] = {item!r} is not {kind_name(item_kind)} "
                                 f"({key} must be {kind_name(kind)})")
        return value
    if not is_kind(value, kind):
        raise InputError(f"{where}: {key} = {shown(value)} is not {kind_name(kind)}")
    return value


def is_kind(value, kind: type) -> bool:
    """isinstance, except that a bool is no number here, and an int is a float (GGUF scores)."""
    if kind is bool or isinstance(value, bool):
        return kind is bool and isinstance(value, bool)
    return isinstance(value, (int, float) if kind is float else kind)


def kind_name(kind) -> str:
    if isinstance(kind, tuple):
        return "a list of " + {str: "strings", int: "integers", float: "numbers", bool: "booleans"}[kind[1]]
    return {str: "a string", int: "an integer", float: "a number", bool: "a boolean"}[kind]


def shown(value) -> str:
    """A value as an error quotes it: a list by its first few items and its length."""
    if isinstance(value, list) and len(value) > SHOWN_ITEMS:
        return f"[{', '.join(map(repr, value[:SHOWN_ITEMS]))}, ...] ({len(value)} items)"
    return repr(value)
