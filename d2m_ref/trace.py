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
from .files import printable, refuse_existing, refuse_input
from .generate import check_finite
from .progress import terminal_progress
from .tracefile import PROG, capture_trace, trace_metadata, write_trace

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
        refuse_input(args.out, "--out", cli.model_files(args, model))
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


if __name__ == "__main__":
    sys.exit(main())
