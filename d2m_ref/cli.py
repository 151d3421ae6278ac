"""Plumbing shared by the command-line entry points (run, trace): options, loading, exit status.

Exit status: 0 done, 2 bad input (any D2MError, or an argparse error), 130 interrupted.  Bad
input is reported as one `error: ...` line on stderr that names the culprit, never a traceback;
a traceback means a bug in d2m_ref.  This module imports library modules only and has no entry
point of its own; nothing but the entry points imports it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable

import numpy as np

from .errors import D2MError, InputError
from .tokenizer import Tokenizer, load_tokenizer, parse_token_ids, tokenizer_beside
from .weights import Model, load_model

DTYPES = {"float64": np.float64, "float32": np.float32}
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130


def main_with_status(parser: argparse.ArgumentParser, body: Callable[[argparse.Namespace], int],
                     argv: list[str] | None) -> int:
    """Parse argv and run body(args) -> exit status; D2MError -> message on stderr, status 2."""
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2, message already printed)
        return exc.code if isinstance(exc.code, int) else EXIT_BAD_INPUT
    try:
        return body(args)
    except D2MError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def add_model_options(parser: argparse.ArgumentParser, weights_required: bool) -> None:
    parser.add_argument("--weights", type=Path, required=weights_required, metavar="PATH",
                        help="model.safetensors, a model.safetensors.index.json, or a directory holding one")
    parser.add_argument("--config", type=Path, metavar="config.json",
                        help="the model's config (default: config.json beside the weights, or the one "
                             "stored in the safetensors metadata)")
    parser.add_argument("--tokenizer", type=Path, metavar="tokenizer.json",
                        help="HF tokenizer.json (default: tokenizer.json beside the weights, if any)")


def add_input_options(parser: argparse.ArgumentParser, required: bool) -> None:
    group = parser.add_mutually_exclusive_group(required=required)
    group.add_argument("--prompt", metavar="TEXT", help="text to encode with the tokenizer")
    group.add_argument("--tokens", metavar="IDS", help="comma-separated token ids, e.g. 1,2,3")


def add_run_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="float64",
                        help="compute dtype (default float64, the oracle's)")
    parser.add_argument("--quiet", action="store_true", help="no progress on stderr")


def load_model_and_tokenizer(args: argparse.Namespace) -> tuple[Model, Tokenizer | None]:
    """The model of --weights/--config and the tokenizer of --tokenizer (or the one beside the weights)."""
    tokenizer_path = args.tokenizer or tokenizer_beside(args.weights)
    tokenizer = load_tokenizer(tokenizer_path) if tokenizer_path is not None else None
    return load_model(args.weights, args.config), tokenizer


def input_ids(args: argparse.Namespace, model: Model, tokenizer: Tokenizer | None) -> np.ndarray:
    """--tokens or --prompt -> ids [T] int64 (range and length are checked by forward)."""
    if args.tokens is not None:
        return parse_token_ids(args.tokens)
    if tokenizer is None:
        raise InputError("--prompt needs a tokenizer: give --tokenizer, put tokenizer.json beside "
                         f"the weights ({args.weights}), or give --tokens instead")
    return tokenizer.encode(args.prompt, model.config.vocab_size)
