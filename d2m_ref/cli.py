"""Plumbing shared by the command-line entry points (run, trace, demo, bench): options, loading, exit status.

Exit status: 0 done, 2 bad input (any D2MError, or an argparse error), 130 interrupted.  Bad
input is reported as one `error: ...` line on stderr that names the culprit, never a traceback;
a traceback means a bug in d2m_ref.  This module imports library modules only and has no entry
point of its own; nothing but the entry points imports it.
"""

from __future__ import annotations

import argparse
import os
import sys
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np

from .errors import D2MError, InputError
from .files import require_regular
from .gguf_io import GGUFFile, gguf_tokenizer
from .kernel_choice import KERNEL_NAMES, c_kernels_available, kernels_for
from .tokenizer import Tokenizer, load_tokenizer, parse_token_ids, tokenizer_beside
from .weights import Model, load_model

DTYPES = {"float64": np.float64, "float32": np.float32}
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, what a shell reports for a writer whose reader went away


def main_with_status(parser: argparse.ArgumentParser, body: Callable[[argparse.Namespace], int],
                     argv: list[str] | None) -> int:
    """Parse argv and run body(args) -> exit status; D2MError -> message on stderr, status 2."""
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2, message already printed)
        return exc.code if isinstance(exc.code, int) else EXIT_BAD_INPUT
    return status_of(lambda: body(args))


def status_of(body: Callable[[], int]) -> int:
    """body() -> its exit status; D2MError -> `error: message` on stderr, status 2; Ctrl-C -> 130."""
    try:
        return body()
    except D2MError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except BrokenPipeError:  # `... | head` closed stdout: stop quietly, as a Unix tool does
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so the interpreter's final flush does not raise again
        return EXIT_BROKEN_PIPE
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def warn(message: str) -> None:
    """One `warning: ...` line on stderr: something was skipped, the run goes on."""
    print(f"warning: {message}", file=sys.stderr)


def add_model_options(parser: argparse.ArgumentParser, weights_required: bool) -> None:
    parser.add_argument("--weights", type=Path, required=weights_required, metavar="PATH",
                        help="model.safetensors, a model.safetensors.index.json, a directory holding one, "
                             "or a GGUF file")
    parser.add_argument("--config", type=Path, metavar="config.json",
                        help="the model's config (default: config.json beside the weights, or the one "
                             "stored in the safetensors metadata)")
    parser.add_argument("--tokenizer", type=Path, metavar="tokenizer.json",
                        help="HF tokenizer.json (default: tokenizer.json beside the weights, if any)")
    add_strict_config_option(parser)


def add_strict_config_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--strict-config", action="store_true",
                        help="refuse config keys d2m_ref does not know (default: accept them with a warning, "
                             "and record them in traces and reports)")


def warn_unverified(model: Model) -> None:
    """The one warning line for config keys accepted without being verified (spec/config.md)."""
    keys = model.config.unverified_keys
    if keys:
        warn(f"config key(s) {', '.join(map(repr, keys))} not verified: d2m_ref does not know whether they "
             "change the forward pass (recorded in traces and check reports; --strict-config refuses them)")


def add_input_options(parser: argparse.ArgumentParser, required: bool) -> None:
    group = parser.add_mutually_exclusive_group(required=required)
    group.add_argument("--prompt", metavar="TEXT", help="text to encode with the tokenizer")
    group.add_argument("--tokens", metavar="IDS", help="comma-separated token ids, e.g. 1,2,3")


def add_run_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="float64",
                        help="compute dtype (default float64, the oracle's)")
    parser.add_argument("--quiet", action="store_true", help="no progress on stderr")
    parser.add_argument("--kernels", choices=KERNEL_NAMES, default=None,
                        help="c (default when the C extension is built) or numpy; the C kernels compute "
                             "float32 only, float64 always runs on NumPy")


def kernels_of(args: argparse.Namespace):
    """The kernel set --kernels names (default: c when built), and a one-line description of it."""
    name = args.kernels or ("c" if c_kernels_available() else "numpy")
    kernels = kernels_for(name)
    if kernels.name == "numpy":
        return kernels, "numpy"
    c = f"c ({kernels.path}, {kernels.threads} threads)"
    if DTYPES[args.dtype] != np.float32:
        return kernels, f"numpy ({c} computes float32 only: add --dtype float32 to use it)"
    return kernels, c


def check_input_files(args: argparse.Namespace) -> None:
    """InputError if --weights (unless a directory), --config or --tokenizer exists but is not a
    regular file.  A missing one is left to its loader, which names it."""
    for option, path in (("--weights", args.weights), ("--config", args.config), ("--tokenizer", args.tokenizer)):
        if path is None or (option == "--weights" and os.path.isdir(path)):
            continue
        require_regular(path, option)


def load_model_checked(args: argparse.Namespace) -> Model:
    """The model of --weights/--config, after check_input_files; warns of unverified config keys."""
    check_input_files(args)
    model = load_model(args.weights, args.config, strict_config=args.strict_config)
    warn_unverified(model)
    return model


def model_files(args: argparse.Namespace, model: Model) -> list[tuple[str, Path | None]]:
    """(what, path) of every file --weights/--config/--tokenizer brought in: the weights, their index
    and shards, config.json beside them, --config, the tokenizer (for files.refuse_input)."""
    inputs: list[tuple[str, Path | None]] = [("the weights", args.weights)]
    if model.checkpoint is not None:
        inputs.append(("the weights", model.checkpoint.path))
        if hasattr(model.checkpoint, "file_of"):
            shards = dict.fromkeys(model.checkpoint.file_of(name) for name in model.checkpoint.names())
            inputs += [("a shard of the weights", shard) for shard in shards]
    folder = args.weights if args.weights.is_dir() else args.weights.parent
    inputs += [("the config", getattr(args, "config", None)), ("the config", folder / "config.json"),
               ("the tokenizer", getattr(args, "tokenizer", None)), ("the tokenizer", tokenizer_beside(args.weights))]
    return inputs


def load_tokenizer_for(args: argparse.Namespace, model: Model, *, decode_output: bool,
                       need: bool = False) -> Tokenizer | None:
    """The tokenizer, loaded only when something needs it (`need`: text to encode other than --prompt).

    --tokenizer given: always loaded, a bad file is an error.  Else a GGUF model's own vocabulary,
    or the tokenizer.json beside the weights, if any: loaded for --prompt (a bad file is an error)
    or, when `decode_output`, to show the output as text (a bad file is one warning line: the output
    is shown as ids)."""
    if args.tokenizer is not None:
        return load_tokenizer(args.tokenizer)
    if isinstance(model.checkpoint, GGUFFile):
        load = partial(gguf_tokenizer, model.checkpoint)
    else:
        path = tokenizer_beside(args.weights)
        if path is None:
            return None
        load = partial(load_tokenizer, path)
    if need or getattr(args, "prompt", None) is not None:
        return load()
    if not decode_output:
        return None
    try:
        return load()
    except InputError as exc:
        warn(f"{exc}; showing token ids only")
        return None


def input_ids(args: argparse.Namespace, model: Model, tokenizer: Tokenizer | None) -> np.ndarray:
    """--tokens or --prompt -> ids [T] int64 (range and length are checked by forward)."""
    if args.tokens is not None:
        return parse_token_ids(args.tokens)
    if tokenizer is None:
        raise InputError("--prompt needs a tokenizer: give --tokenizer, put tokenizer.json beside "
                         f"the weights ({args.weights}), or give --tokens instead")
    return tokenizer.encode(args.prompt, model.config.vocab_size)
