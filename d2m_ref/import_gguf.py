"""`python -m d2m_ref.import_gguf`: a GGUF file as a Hugging Face checkpoint (spec/format.md §3).

    python -m d2m_ref.import_gguf model.gguf --out DIR [--force] [--strict-config]

writes DIR/config.json (from the GGUF metadata), DIR/model.safetensors (tensors under Hugging
Face names: F32/F16/BF16 as stored, block-quantised types dequantised to float32 by the `gguf`
package, llama's q/k rows put back in Hugging Face order) and DIR/tokenizer.json (the GGUF's own
vocabulary and merges).  d2m_ref and transformers' `from_pretrained` both load the result.
Tensors are written one at a time: memory holds one dequantised tensor, not the model.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import numpy as np

from .errors import InputError
from .files import atomic_write_bytes, refuse_existing, same_file
from .gguf_io import gguf_config, gguf_tokenizer
from .safetensors_io import save_streaming
from .weights import Model, canonical_params, load_model

PROG = "python -m d2m_ref.import_gguf"
OUTPUTS = ("config.json", "model.safetensors", "tokenizer.json")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Write a GGUF file as config.json + model.safetensors "
                                                            "+ tokenizer.json that d2m_ref and transformers load.")
    parser.add_argument("gguf", type=Path, metavar="model.gguf", help="the GGUF file")
    parser.add_argument("--out", type=Path, required=True, metavar="DIR", help="folder to write (created if needed)")
    parser.add_argument("--force", action="store_true", help="overwrite existing output files in DIR")
    parser.add_argument("--strict-config", action="store_true",
                        help="refuse config keys d2m_ref does not know (see spec/config.md)")
    return parser


def import_gguf(path: Path, out: Path, *, force: bool = False, strict_config: bool = False,
                command: str = PROG) -> dict:
    """Write the three files; returns a summary {tensors, dequantized, bytes}."""
    targets = [out / name for name in OUTPUTS]
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out}: exists and is not a folder")
    for target in targets:
        if same_file(target, path):
            raise InputError(f"--out {out}: {target.name} there is the GGUF being read; choose another folder")
        refuse_existing(target, force)  # all three checked before any is written
    model = load_model(path, strict_config=strict_config)
    try:
        tokenizer = gguf_tokenizer(model.checkpoint)
        out.mkdir(parents=True, exist_ok=True)
        config = {**gguf_config(model.checkpoint), "torch_dtype": "float32"}
        summary = _write_weights(model, out / "model.safetensors", force, command, path)
        atomic_write_bytes(out / "tokenizer.json", tokenizer.hf.to_str().encode("utf-8"), force=force)
        atomic_write_bytes(out / "config.json", (json.dumps(config, indent=2) + "\n").encode("utf-8"), force=force)
    finally:
        model.close()
    return summary


def _write_weights(model: Model, target: Path, force: bool, command: str, source: Path) -> dict:
    """Every tensor under its canonical name: float storage kept, GGUF block types as float32."""
    specs, producers = [], {}
    summary = {"tensors": 0, "dequantized": 0, "bytes": 0}
    for name, p in canonical_params(model):
        if p.storage in ("F32", "F16", "BF16"):
            specs.append((name, p.storage, p.shape))
            producers[name] = p.raw
            summary["bytes"] += p.nbytes
        else:
            specs.append((name, "F32", p.shape))
            producers[name] = (lambda p=p: np.ascontiguousarray(p.load(np.float32)))
            summary["dequantized"] += 1
            summary["bytes"] += 4 * int(np.prod(p.shape))
        summary["tensors"] += 1
    # "format": "pt" is what transformers' safetensors loader asks of a checkpoint's metadata
    metadata = {"format": "pt", "source": f"{command}", "gguf_file": source.name}
    save_streaming(target, specs, lambda n: np.ascontiguousarray(producers[n]()), metadata=metadata, force=force)
    return summary


def run(args: argparse.Namespace, argv: list[str]) -> int:
    from . import cli
    cli.check_input_files(argparse.Namespace(weights=args.gguf, config=None, tokenizer=None))
    if not args.gguf.is_file():
        raise InputError(f"{args.gguf}: no such file")
    summary = import_gguf(args.gguf, args.out, force=args.force, strict_config=args.strict_config,
                          command=f"{PROG} {shlex.join(argv)}")
    print(f"wrote {args.out}: config.json, model.safetensors ({summary['tensors']} tensors, "
          f"{summary['dequantized']} dequantised to float32, {summary['bytes'] / 1e6:.1f} MB), tokenizer.json")
    return 0


def main(argv: list[str] | None = None) -> int:
    from . import cli  # the command-line plumbing only for the command
    argv = sys.argv[1:] if argv is None else list(argv)
    return cli.main_with_status(build_parser(), lambda args: run(args, argv), argv)


if __name__ == "__main__":
    sys.exit(main())
