"""Text <-> token ids through a Hugging Face `tokenizer.json`, with errors that name the culprit.

The tokenizer is an edge of the system: the forward pass only sees ids.  A tokenizer whose
vocabulary is larger than the model's `vocab_size` is accepted (padding tokens, added specials)
as long as no id it produces for *this* text reaches `vocab_size`; such an id is named.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer as HFTokenizer

from .errors import InputError

TOKENIZER_FILE = "tokenizer.json"
SHOWN_CHARS = 60  # an error quotes at most this much of a prompt


@dataclass(frozen=True, eq=False)
class Tokenizer:
    """A loaded tokenizer.json.  `vocab_size` counts added tokens too."""

    path: Path
    hf: HFTokenizer

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, model_vocab_size: int | None = None) -> np.ndarray:
        """text -> ids [T] int64 (the tokenizer's own special tokens added, as a model expects).

        With `model_vocab_size`, an id >= it is an InputError naming the id and the text piece."""
        if not text:
            raise InputError("the prompt is empty: give some text")
        check_utf8(text)
        encoding = self.hf.encode(text)
        ids = np.asarray(encoding.ids, dtype=np.int64)
        if ids.size == 0:
            raise InputError(f"{self.path}: the prompt {shown(text)} encodes to no tokens")
        if model_vocab_size is not None:
            bad = np.nonzero(ids >= model_vocab_size)[0]
            if bad.size:
                i = int(bad[0])
                raise InputError(f"{self.path}: the prompt's token {i} {encoding.tokens[i]!r} has id {int(ids[i])}, "
                                 f"but the model's vocab_size={model_vocab_size} (ids 0..{model_vocab_size - 1}); "
                                 "the tokenizer does not match the model")
        return ids

    def decode(self, ids) -> str:
        """ids -> text, special tokens included.  An id the tokenizer does not know is an
        InputError (HF `tokenizers` would silently drop it)."""
        ids = [int(i) for i in ids]
        for position, i in enumerate(ids):
            if i < 0 or self.hf.id_to_token(i) is None:
                raise InputError(f"{self.path}: token id {i} at position {position} is not in the tokenizer's "
                                 f"vocabulary (ids 0..{self.vocab_size - 1})")
        return self.hf.decode(ids, skip_special_tokens=False)

    def token_id(self, token: str) -> int | None:
        """The id of a token string (e.g. '<|endoftext|>'), or None."""
        return self.hf.token_to_id(token)


def shown(text: str) -> str:
    """A prompt as an error quotes it: a Python literal of its first SHOWN_CHARS characters, and
    its length when cut."""
    return repr(text[:SHOWN_CHARS]) + (f"... ({len(text)} characters)" if len(text) > SHOWN_CHARS else "")


def check_utf8(text: str) -> None:
    """InputError if `text` cannot be UTF-8: Python decodes argv bytes that are not UTF-8 to lone
    surrogates (PEP 383: byte 0xNN -> U+DCNN), which `tokenizers` rejects with a bare TypeError."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        code = ord(text[exc.start])
        detail = f"byte 0x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"lone surrogate U+{code:04X}"
        raise InputError(f"the prompt {shown(text)} is not valid UTF-8 ({detail} at position {exc.start}); "
                         "give UTF-8 text, or --tokens") from None


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Read a tokenizer.json; an unreadable or invalid file is an InputError naming it."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: tokenizer file not found" if not path.exists()
                         else f"{path}: not a file (expected a tokenizer.json)")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot read tokenizer ({getattr(exc, 'strerror', None) or exc})") from None
    try:
        hf = HFTokenizer.from_str(text)
    except Exception as exc:  # tokenizers raises a bare Exception with the serde message
        raise InputError(f"{path}: not a valid tokenizer.json ({exc})") from None
    return Tokenizer(path, hf)


def tokenizer_beside(weights: str | Path) -> Path | None:
    """The tokenizer.json in the weights' directory (or in the weights directory itself), if any."""
    weights = Path(weights)
    folder = weights if weights.is_dir() else weights.parent
    candidate = folder / TOKENIZER_FILE
    return candidate if candidate.is_file() else None


def parse_token_ids(text: str) -> np.ndarray:
    """'1,2, 3' -> [1, 2, 3] int64; a piece that is not a non-negative integer is named."""
    pieces = [p.strip() for p in text.split(",")]
    if pieces == [""]:
        raise InputError("--tokens is empty: give comma-separated token ids, e.g. --tokens 1,2,3")
    ids = []
    for position, piece in enumerate(pieces):
        if not (piece.isascii() and piece.isdigit()) or len(piece) > 18:  # no sign, no blank, fits int64
            raise InputError(f"--tokens: item {position} {piece!r} is not a token id (a non-negative integer)")
        ids.append(int(piece))
    return np.asarray(ids, dtype=np.int64)
