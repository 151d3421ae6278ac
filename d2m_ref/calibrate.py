"""`python -m d2m_ref.calibrate`: per-layer redundancy of a dense model on calibration text.

    python -m d2m_ref.calibrate --weights DENSE --text FILE [--tokens N] [--window W]
                                [--dtype float64|float32] --out stats.json [--force] [--quiet]

spec/convert.md §1, one equation to one function below.  The text is tokenized with the model's own
tokenizer; its first N tokens are run in windows of W (each window a fresh sequence from position 0),
and every statistic is read from the residual stream h_l *before* the final norm while the forward
goes (a capture sink that reduces each tensor as it is recorded and keeps only the last five residuals),
so memory stays that of one window's forward without its LM head (spec/architecture.md §6).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np

from .errors import InputError
from .files import atomic_write, check_output, read_json
from .model import residual_stream
from .ops import rms_norm
from .weights import Model

FORMAT = "d2m_ref.calibration/1"
MAX_SPAN = 4  # angular distances for spans n = 1 .. MAX_SPAN (spec/convert.md §1.3)
DEFAULT_TOKENS, DEFAULT_WINDOW = 8192, 1024


# ---------------------------------------------------------------------------------------------
# spec/convert.md §1: the statistics, per token; the sink averages them over tokens


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """[T, H], [T, H] -> [T]: a·b / (|a||b|); 1 where both are zero, 0 where one is."""
    num = np.einsum("th,th->t", a, b)
    den = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
    return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.where(num == 0, 1.0, 0.0))


def block_influence(h_in: np.ndarray, h_out: np.ndarray) -> np.ndarray:
    """§1.1 [T]: 1 − cos(h_{l−1}, h_l), how much layer l turns the residual (ShortGPT's BI)."""
    return 1.0 - cosine(h_in, h_out)


def attention_drop(h_in: np.ndarray, attn_out: np.ndarray) -> np.ndarray:
    """§1.2 [T]: cos(X, X + Attn(norm(X))), X = h_{l−1}: near 1 where the attention changes little."""
    return cosine(h_in, h_in + attn_out)


def angular_distance(h_from: np.ndarray, h_to: np.ndarray) -> np.ndarray:
    """§1.3 [T]: arccos(cos(h_{l−1}, h_{l+n−1})) / π, in [0, 1] (Gromov et al.)."""
    return np.arccos(np.clip(cosine(h_from, h_to), -1.0, 1.0)) / np.pi


def ffn_input(h_mid: np.ndarray, eps: float) -> np.ndarray:
    """§1.4 [T, H]: the FFN input of layer l with a unit norm weight, rms_norm(h_{l−1} + attn_l, 1) —
    the space the fused layer's router reads (its norm weight is ones, spec/convert.md §2.3)."""
    return rms_norm(h_mid, np.ones(h_mid.shape[-1], h_mid.dtype), eps)


class _Sink(dict):
    """A capture dict for residual_stream that reduces each recorded tensor at once (sums over tokens)
    and keeps only the last MAX_SPAN + 1 residuals."""

    def __init__(self, stats: "Redundancy"):
        super().__init__()
        self.stats, self.ring = stats, []

    def __setitem__(self, name: str, value: np.ndarray) -> None:
        s = self.stats
        if name == "embeddings":
            self.ring = [value]
        elif name.startswith("attn_out."):
            i, h_in = int(name.split(".")[1]), self.ring[-1]
            s.attention_drop[i] += attention_drop(h_in, value).sum()
            s.centroid[i] += ffn_input(h_in + value, s.eps).sum(axis=0)
        elif name.startswith("hidden."):
            i, h_in = int(name.split(".")[1]), self.ring[-1]
            s.block_influence[i] += block_influence(h_in, value).sum()
            for n in range(1, min(MAX_SPAN, len(self.ring)) + 1):  # spans ending at layer i
                s.angular[i - n + 1, n - 1] += angular_distance(self.ring[-n], value).sum()
            self.ring = (self.ring + [value])[-(MAX_SPAN + 1):]
        # input_ids, router tensors and ffn_out are not needed: dropped


class Redundancy:
    """Sums over tokens of §1.1–1.4 per layer; `layers()` and `centroids()` give the means."""

    def __init__(self, model: Model):
        cfg = model.config
        L, H = cfg.num_hidden_layers, cfg.hidden_size
        self.eps = cfg.rms_norm_eps
        self.tokens = 0
        self.block_influence = np.zeros(L)
        self.attention_drop = np.zeros(L)
        self.angular = np.zeros((L, MAX_SPAN))
        self.centroid = np.zeros((L, H))

    def add_window(self, model: Model, ids: np.ndarray, dtype) -> None:
        residual_stream(model, ids, dtype=dtype, capture=_Sink(self))
        self.tokens += int(ids.size)

    def layers(self) -> list[dict]:
        L = len(self.block_influence)
        out = []
        for i in range(L):
            n_spans = min(MAX_SPAN, L - i)
            out.append({"layer": i, "block_influence": self.block_influence[i] / self.tokens,
                        "attention_drop": self.attention_drop[i] / self.tokens,
                        "angular_distance": [self.angular[i, n] / self.tokens for n in range(n_spans)]})
        return out

    def centroids(self) -> np.ndarray:
        """[L, H]: §1.4 averaged over tokens."""
        return self.centroid / self.tokens


# ---------------------------------------------------------------------------------------------
# Text, windows, the stats file


def model_digest(model: Model) -> str:
    """sha256 of the model's config as read (keys sorted): a stats file names the model it describes."""
    return hashlib.sha256(json.dumps(model.config.source, sort_keys=True).encode()).hexdigest()


def windows(ids: np.ndarray, tokens: int, window: int) -> list[np.ndarray]:
    """The first `tokens` ids in windows of `window` (the last one shorter); InputError if the text is
    shorter than one window or than `tokens` asks."""
    if window < 2:
        raise InputError(f"--window {window}: a window needs at least 2 tokens")
    if ids.size < min(tokens, window):
        raise InputError(f"the text has {ids.size} tokens: fewer than one window of {min(tokens, window)}")
    if ids.size < tokens:
        raise InputError(f"the text has {ids.size} tokens, --tokens asks for {tokens}: give more text or "
                         "fewer tokens")
    ids = ids[:tokens]
    return [ids[lo:lo + window] for lo in range(0, ids.size, window)]


def text_ids(path: Path, tokenizer, vocab_size: int) -> np.ndarray:
    """The token ids of a UTF-8 text file, with the model's tokenizer."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"--text {path}: file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"--text {path}: cannot read it as UTF-8 text ({getattr(exc, 'strerror', None) or exc})") \
            from None
    if not text.strip():
        raise InputError(f"--text {path}: the file is empty")
    return tokenizer.encode(text, model_vocab_size=vocab_size)


def calibrate(model: Model, ids: np.ndarray, *, tokens: int = DEFAULT_TOKENS, window: int = DEFAULT_WINDOW,
              dtype=np.float64, log=None) -> dict:
    """Run the windows and return the stats document (spec/convert.md §1.5)."""
    if any(not s.attention or s.moe is not None for s in model.config.layers):
        raise InputError("calibration reads a dense model (attention and a dense MLP in every layer); "
                         f"this one is {model.config.model_type} with a layer plan")
    window = min(window, model.config.max_position_embeddings)
    parts = windows(ids, tokens, window)
    stats = Redundancy(model)
    t0 = time.perf_counter()
    for k, part in enumerate(parts):
        stats.add_window(model, part, dtype)
        if log is not None:
            log(f"calibrate: window {k + 1}/{len(parts)} ({stats.tokens} tokens, {time.perf_counter() - t0:.0f} s)")
    return {"format": FORMAT, "model_digest": model_digest(model),
            "num_hidden_layers": model.config.num_hidden_layers, "hidden_size": model.config.hidden_size,
            "tokens": stats.tokens, "window": window, "dtype": np.dtype(dtype).name,
            "layers": stats.layers(), "ffn_input_centroids": stats.centroids().tolist()}


def read_stats(path: Path, model: Model) -> dict:
    """A stats file written by `calibrate` for this model, or InputError saying what does not fit."""
    doc = read_json(path, "--stats")
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise InputError(f"--stats {path}: not a d2m_ref calibration file (format {FORMAT!r})")
    if doc.get("model_digest") != model_digest(model):
        raise InputError(f"--stats {path}: computed for another model (its config differs from --weights')")
    L, H = model.config.num_hidden_layers, model.config.hidden_size
    if len(doc.get("layers", [])) != L or np.shape(doc.get("ffn_input_centroids")) != (L, H):
        raise InputError(f"--stats {path}: expected {L} layers and [{L}, {H}] centroids")
    return doc


# ---------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    from .cli import add_model_options
    parser = argparse.ArgumentParser(prog="python -m d2m_ref.calibrate",
                                     description="Per-layer redundancy of a dense model (spec/convert.md §1).")
    add_model_options(parser, weights_required=True)
    add_text_options(parser)
    parser.add_argument("--out", type=Path, required=True, metavar="stats.json")
    parser.add_argument("--force", action="store_true", help="overwrite an existing --out")
    parser.add_argument("--quiet", action="store_true", help="no progress on stderr")
    return parser


def add_text_options(parser: argparse.ArgumentParser, required: bool = True) -> None:
    parser.add_argument("--text", type=Path, required=required, metavar="FILE",
                        help="calibration text, UTF-8 (python -m d2m_ref.corpus kjv --split calibration writes one)")
    parser.add_argument("--tokens", type=int, default=DEFAULT_TOKENS, metavar="N",
                        help=f"tokens of the text to read (default {DEFAULT_TOKENS})")
    parser.add_argument("--window", type=int, default=DEFAULT_WINDOW, metavar="W",
                        help=f"tokens per forward (default {DEFAULT_WINDOW}, at most max_position_embeddings)")
    parser.add_argument("--dtype", choices=("float64", "float32"), default="float64",
                        help="compute dtype of the calibration forward (default float64)")


def stats_from_text(args: argparse.Namespace, model: Model) -> dict:
    """The calibration the --text options ask for, progress on stderr unless --quiet."""
    from .cli import load_tokenizer_for
    if args.tokens < 1:
        raise InputError(f"--tokens {args.tokens}: give a positive number")
    tokenizer = load_tokenizer_for(args, model, decode_output=False, need=True)
    if tokenizer is None:
        raise InputError("no tokenizer for the text: pass --tokenizer tokenizer.json (none beside the weights)")
    ids = text_ids(args.text, tokenizer, model.config.vocab_size)
    log = None if args.quiet else (lambda m: print(m, file=sys.stderr, flush=True))
    doc = calibrate(model, ids, tokens=args.tokens, window=args.window, dtype=np.dtype(args.dtype), log=log)
    doc["text"] = {"file": str(args.text), "sha256": hashlib.sha256(args.text.read_bytes()).hexdigest()}
    return doc


def run(args: argparse.Namespace) -> int:
    from .cli import load_model_checked, model_files
    check_output(args.out, args.force, "--out", [("the text", args.text)])
    model = load_model_checked(args)
    try:
        check_output(args.out, args.force, "--out", model_files(args, model))
        doc = stats_from_text(args, model)
    finally:
        model.close()
    data = (json.dumps(doc, indent=1) + "\n").encode()
    atomic_write(args.out, lambda f: f.write(data), force=args.force)
    print(f"wrote {args.out}: {doc['num_hidden_layers']} layers, {doc['tokens']} tokens")
    return 0


def main(argv: list[str] | None = None) -> int:
    from . import cli
    return cli.main_with_status(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
