"""`python -m d2m_ref.trace`: write every intermediate tensor of one forward pass to a trace file
(the format and its reader: d2m_ref/tracefile.py, spec/format.md §2).

    python -m d2m_ref.trace --weights W [--config C] (--tokens 1,2,3 | --prompt TEXT [--tokenizer T])
                            --out trace.safetensors [--dtype float64|float32] [--kernels c|numpy]
                            [--force] [--quiet]
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from . import cli
from .errors import InputError
from .files import printable, refuse_existing, same_file
from .generate import check_finite
from .progress import terminal_progress
from .tokenizer import tokenizer_beside
from .tracefile import PROG, capture_trace, trace_metadata, write_trace
from .weights import Model

# ---------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Write every intermediate tensor of one forward "
                                                            "pass to a safetensors trace file.")
    cli.add_model_options(parser, weights_required=True)
    cli.add_input_options(parser, required=True)
    parser.add_argument("--out", type=Path, required=True, metavar="trace.safetensors", help="the trace file")
    parser.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    cli.add_run_options(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    return cli.main_with_status(build_parser(), lambda args: trace_command(args, argv), argv)


def trace_command(args: argparse.Namespace, argv: list[str]) -> int:
    refuse_existing(args.out, args.force)  # before the forward pass, not after it
    model = cli.load_model_checked(args)
    try:
        refuse_own_input(args, model)
        ids = cli.input_ids(args, model, cli.load_tokenizer_for(args, model, decode_output=False))
        dtype = cli.DTYPES[args.dtype]
        kernels, kernels_text = cli.kernels_of(args)
        progress = terminal_progress(args.quiet)
        try:
            tensors = capture_trace(model, ids, dtype, progress.stage("forward", "layers") if progress else None,
                                    kernels)
        finally:
            if progress:
                progress.close()
        check_finite(tensors["logits"], tensors, "in the prefill")  # a trace of NaNs checks nothing
        metadata = trace_metadata(model, args.weights, dtype, f"{PROG} {shlex.join(argv)}")
        metadata["kernels"] = kernels_text  # which code computed it: a mismatch can be traced to a build
        write_trace(args.out, tensors, metadata, force=args.force)
    finally:
        model.close()
    if not args.quiet:
        print(f"wrote {printable(args.out)}: {len(tensors)} tensors of {ids.size} tokens, {args.dtype}, "
              f"kernels {kernels_text}")
    return 0


def refuse_own_input(args: argparse.Namespace, model: Model) -> None:
    """InputError if --out is (the same file as) one of the files the model came from — the weights,
    their index and shards, config.json beside them, --config, the tokenizer: --force allows
    overwriting an old output, never the checkpoint being read."""
    inputs = [("the weights", args.weights)]
    if model.checkpoint is not None:
        inputs.append(("the weights", model.checkpoint.path))
        shards = dict.fromkeys(model.checkpoint.file_of(name) for name in model.checkpoint.names())
        inputs += [("a shard of the weights", shard) for shard in shards]
    folder = args.weights if args.weights.is_dir() else args.weights.parent
    inputs += [("the config", args.config), ("the config", folder / "config.json"),
               ("the tokenizer", args.tokenizer), ("the tokenizer", tokenizer_beside(args.weights))]
    for what, path in inputs:
        if path is not None and same_file(args.out, path):
            raise InputError(f"--out {args.out} is the same file as {what} ({path}): a trace never "
                             "overwrites its input, even with --force")


if __name__ == "__main__":
    sys.exit(main())
