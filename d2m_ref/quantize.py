"""`python -m d2m_ref.quantize`: write a quantised checkpoint (spec/quant.md) that load_model reads.

    python -m d2m_ref.quantize --weights W [--config C] --format int8|int4-g32|int4-g64|int4-g128
                               --out Q [--force]

What is quantised (spec/quant.md §5): the matrices every decode step streams in full — the attention
projections (q, k, v, o) and every MLP, expert and shared-expert projection (gate, up, down).
Everything else keeps its source storage: embeddings and the LM head (often tied, and the
embedding is gathered, not multiplied), norms, biases, the router (a quantised router flips routes)
and the shared-expert gate.

--out: a file ending in .safetensors, or a directory that receives model.safetensors (and a copy
of the tokenizer.json lying beside the source weights, if any).  The config travels in the file's
__metadata__["config"], the format in __metadata__["quantization"].  The file is written tensor by
tensor to a temporary name and renamed (atomic); an existing file is kept unless --force.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
from pathlib import Path

import numpy as np

from . import quant
from .errors import WeightsError
from .files import refuse_existing, refuse_input
from .safetensors_io import save_streaming
from .quant import quantize_param, should_quantize
from .weights import METADATA_CONFIG_KEY, Model, Param, canonical_params, load_model, map_params

CACHE_BYTES = 1 << 30  # quantised tensors kept between writing their scales and their values


def write_quantized(model: Model, storage: str, fmt: str, out: Path, force: bool, command: str) -> dict:
    """Write the quantised checkpoint tensor by tensor (memory: one tensor, plus quantised values
    waiting between their scales and themselves, up to CACHE_BYTES).  Returns a summary."""
    specs, producers = [], {}
    cache: dict[str, np.ndarray] = {}
    summary = {"tensors": 0, "quantized": 0, "source_bytes": 0, "bytes": 0}

    def values_of(name: str, p: Param, part: int) -> np.ndarray:
        key = f"{name}:{part}"
        if key in cache:
            return cache.pop(key)
        q, s = quantize_param(name, p, storage)
        other = f"{name}:{1 - part}"
        if sum(a.nbytes for a in cache.values()) + (q, s)[1 - part].nbytes <= CACHE_BYTES:
            cache[other] = (q, s)[1 - part]
        return (q, s)[part]

    for name, p in canonical_params(model):
        summary["source_bytes"] += p.nbytes
        if should_quantize(name):
            (qdt, qshape), (sdt, sshape) = quant.part_specs(storage, p.shape)
            qname, sname = quant.part_names(name, storage)
            specs += [(qname, qdt, qshape), (sname, sdt, sshape)]
            producers[qname] = (lambda n=name, p=p: values_of(n, p, 0))
            producers[sname] = (lambda n=name, p=p: values_of(n, p, 1))
            summary["quantized"] += 1
            summary["bytes"] += quant.storage_nbytes(storage, p.shape)
        else:
            if quant.is_quantized(p.storage):
                raise WeightsError(f"{name} is already quantised ({p.storage}): quantise from the float checkpoint")
            specs.append((name, p.storage, p.shape))
            producers[name] = p.raw
            summary["bytes"] += p.nbytes
        summary["tensors"] += 1
    metadata = {METADATA_CONFIG_KEY: json.dumps(model.config.source),
                quant.METADATA_KEY: quant.metadata_value(storage, fmt, command)}
    save_streaming(out, specs, lambda n: producers[n](), metadata=metadata, force=force)
    return summary


def quantize_model(model: Model, storage: str) -> Model:
    """An in-memory copy of `model` with the tensors of spec/quant.md §5 quantised to `storage`."""
    if not quant.is_quantized(storage):
        raise ValueError(f"{storage!r} is not a quantised storage ({', '.join(quant.STORAGE)})")
    names = {id(p): name for name, p in canonical_params(model)}

    def quantized(p: Param) -> Param:
        name = names[id(p)]
        if not should_quantize(name):
            return p
        q, s = quantize_param(name, p, storage)
        return Param.quantized(name, storage, p.shape, q, s)

    return Model(model.config, map_params(model.weights, quantized), model.checkpoint)


# ---------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m d2m_ref.quantize",
                                     description="Write a quantised copy of a checkpoint (spec/quant.md).")
    parser.add_argument("--weights", type=Path, required=True, metavar="PATH",
                        help="model.safetensors, a model.safetensors.index.json, or a directory holding one")
    parser.add_argument("--config", type=Path, metavar="config.json",
                        help="the model's config (default: beside the weights or in the file's metadata)")
    parser.add_argument("--format", required=True, choices=tuple(quant.FORMATS),
                        help="int8: per-row scale; int4-gG: symmetric 4-bit, one scale per G columns")
    parser.add_argument("--out", type=Path, required=True, metavar="PATH",
                        help="output .safetensors file, or a directory to hold model.safetensors")
    parser.add_argument("--force", action="store_true", help="overwrite an existing output file")
    from .cli import add_strict_config_option  # the command-line plumbing only for the command
    add_strict_config_option(parser)
    return parser


def output_file(out: Path) -> Path:
    return out if out.suffix == ".safetensors" else out / "model.safetensors"


def run(args: argparse.Namespace) -> int:
    storage = quant.FORMATS[args.format]
    target = output_file(args.out)
    model = load_model(args.weights, args.config, strict_config=args.strict_config)  # lazy: headers only
    from .cli import model_files, warn_unverified
    try:
        refuse_input(target, "--out", model_files(args, model))  # even with --force: never the file being read
        refuse_existing(target, args.force)  # before the long work; save_streaming checks again
    except BaseException:
        model.close()
        raise
    warn_unverified(model)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        command = "python -m d2m_ref.quantize " + " ".join(shlex.quote(a) for a in sys.argv[1:])
        summary = write_quantized(model, storage, args.format, target, args.force, command)
    finally:
        model.close()
    source_dir = args.weights if args.weights.is_dir() else args.weights.parent
    if target.name == "model.safetensors" and (source_dir / "tokenizer.json").is_file() \
            and not (target.parent / "tokenizer.json").exists():
        shutil.copyfile(source_dir / "tokenizer.json", target.parent / "tokenizer.json")
    print(f"wrote {target}: {summary['tensors']} tensors, {summary['quantized']} quantised to {args.format} "
          f"({storage}); {summary['source_bytes'] / 1e6:.1f} MB -> {summary['bytes'] / 1e6:.1f} MB")
    return 0


def main(argv: list[str] | None = None) -> int:
    from . import cli  # the command-line plumbing (and its tokenizer import) only for the command
    return cli.main_with_status(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
