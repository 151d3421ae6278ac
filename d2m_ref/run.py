"""`python -m d2m_ref.run`: generate a continuation and report speed and expert usage.

    python -m d2m_ref.run [--weights W] [--config C] [--tokenizer T] (--prompt TEXT | --tokens 1,2,3)
                          [--max-new-tokens N] [--temperature T --top-p P --seed S]
                          [--dtype float32|float64] [--kernels c|numpy] [--quiet]

With no --weights it builds the demo model (d2m_ref.demo) in a temporary directory and runs that.
Exit status 0, or 2 for bad input (see d2m_ref.cli).
"""

from __future__ import annotations

import argparse
import sys
import tempfile

import numpy as np

from . import cli
from .config import ModelConfig
from .demo import build_demo
from .errors import InputError
from .files import printable
from .generate import Generation, check_sampling, generate
from .model import check_input_ids
from .progress import terminal_progress
from .tokenizer import Tokenizer

DEFAULT_PROMPT = "The capital of France is"
DEMO_NOTE = ("no --weights given: running the built-in demo model (a 6-layer Dense2MoE with random weights; "
             "python -m d2m_ref.demo --out DIR writes it)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m d2m_ref.run",
                                     description="Generate with the NumPy reference model and report "
                                                 "tokens/s and which experts were chosen.")
    cli.add_model_options(parser, weights_required=False)
    cli.add_input_options(parser, required=False)
    parser.add_argument("--max-new-tokens", type=int, default=32, metavar="N", help="default 32")
    parser.add_argument("--temperature", type=float, default=0.0, metavar="T",
                        help="0 (default): greedy; > 0: sample softmax(logits / T)")
    parser.add_argument("--top-p", type=float, default=1.0, metavar="P",
                        help="nucleus sampling: keep the fewest tokens whose probability reaches P (default 1)")
    parser.add_argument("--seed", type=int, default=0, metavar="S", help="sampling seed (default 0)")
    cli.add_run_options(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    return cli.main_with_status(build_parser(), run, argv)


def run(args: argparse.Namespace) -> int:
    check_sampling(args.max_new_tokens, args.temperature, args.top_p, args.seed)
    if args.weights is not None:
        return run_model(args)
    if args.config is not None:
        raise InputError(f"--config {args.config} given without --weights: the demo model has its own config")
    with tempfile.TemporaryDirectory(prefix="d2m_demo_") as tmp:
        args.weights = build_demo(tmp) / "model.safetensors"
        if args.prompt is None and args.tokens is None:
            args.prompt = DEFAULT_PROMPT
        return run_model(args, demo=True)


def run_model(args: argparse.Namespace, demo: bool = False) -> int:
    """Everything the user gave is checked before the first line is printed."""
    if args.prompt is None and args.tokens is None:
        raise InputError("give --prompt TEXT or --tokens 1,2,3 (only the demo model has a default prompt)")
    model = cli.load_model_checked(args)
    try:
        cfg = model.config
        tokenizer = cli.load_tokenizer_for(args, model, decode_output=True)
        ids = check_input_ids(cli.input_ids(args, model, tokenizer), cfg, 0)
        eos = eos_ids(cfg)
        kernels, kernels_text = cli.kernels_of(args)
        if demo:
            print(DEMO_NOTE)
        print(model_summary(cfg))
        if not demo:
            print(f"weights: {printable(args.weights)}")
        print(f"prompt: {ids.size} tokens" + (f" {args.prompt!r}" if args.prompt is not None else ""))
        result = generate(model, ids, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                          top_p=args.top_p, seed=args.seed, eos_ids=eos,
                          dtype=cli.DTYPES[args.dtype], progress=terminal_progress(args.quiet), kernels=kernels)
        print(report(result, cfg, tokenizer, args))
        print(f"kernels: {kernels_text}")
    finally:
        model.close()
    return 0


# ---------------------------------------------------------------------------------------------
# What is printed


def model_summary(cfg: ModelConfig) -> str:
    """'model: dense2moe (base llama), 6 layers, 4 with attention, 3 MoE (layers 1, 2, 3), vocab 257, hidden 64'"""
    base = cfg.source.get("base_model_type")
    family = f"{cfg.family} (base {base})" if cfg.family == "dense2moe" and base else cfg.family
    attention = sum(spec.attention for spec in cfg.layers)
    moe = [str(i) for i, spec in enumerate(cfg.layers) if spec.moe is not None]
    moe_text = f"{len(moe)} MoE (layer{'s' if len(moe) > 1 else ''} {', '.join(moe)})" if moe else "no MoE"
    return (f"model: {family}, {cfg.num_hidden_layers} layers, {attention} with attention, {moe_text}, "
            f"vocab {cfg.vocab_size}, hidden {cfg.hidden_size}")


def eos_ids(cfg: ModelConfig) -> tuple[int, ...]:
    """eos_token_id of config.json: an int, a list of ints, or absent."""
    eos = cfg.source.get("eos_token_id")
    if eos is None:
        return ()
    items = eos if isinstance(eos, list) else [eos]
    if any(isinstance(e, bool) or not isinstance(e, int) for e in items):
        raise InputError(f"config: eos_token_id={eos!r} must be an integer or a list of integers")
    return tuple(items)


def report(result: Generation, cfg: ModelConfig, tokenizer: Tokenizer | None, args: argparse.Namespace) -> str:
    lines = []
    if tokenizer is not None:
        lines.append(f"continuation: {continuation_text(result.new_ids, tokenizer)}")
    lines.append(f"continuation ids: {result.new_ids.tolist()}")
    lines.append(stop_line(result, cfg, args))
    lines.append(f"sampling: {sampling_text(args)}, dtype {args.dtype}")
    lines.append(speed_line("prefill", result.prompt_ids.size, result.prefill_seconds))
    lines.append(speed_line("decode", result.decode_steps, result.decode_seconds))
    if result.expert_counts:
        lines.append(f"experts chosen (over {result.tokens_processed} tokens, prefill and decode):")
        lines += [f"  {expert_line(i, counts, cfg)}" for i, counts in result.expert_counts.items()]
    return "\n".join(lines)


def continuation_text(ids: np.ndarray, tokenizer: Tokenizer) -> str:
    """The decoded text as a Python literal (control bytes of a random model stay visible)."""
    try:
        return repr(tokenizer.decode(ids))
    except InputError as exc:  # a model vocabulary padded past the tokenizer's: show ids only
        return f"(not decodable: {exc})"


def stop_line(result: Generation, cfg: ModelConfig, args: argparse.Namespace) -> str:
    n = result.new_ids.size
    if result.stop_reason == "eos":
        return f"stopped: end-of-sequence token {int(result.new_ids[-1])} after {n} new tokens"
    if result.stop_reason == "max_position_embeddings":
        return (f"stopped: the sequence reached max_position_embeddings={cfg.max_position_embeddings} "
                f"after {n} new tokens (asked for {args.max_new_tokens})")
    return f"stopped: {n} new tokens (--max-new-tokens {args.max_new_tokens})"


def sampling_text(args: argparse.Namespace) -> str:
    if not args.temperature:
        return "greedy"
    return f"temperature {args.temperature}, top_p {args.top_p}, seed {args.seed}"


def speed_line(phase: str, tokens: int, seconds: float) -> str:
    if tokens == 0:
        return f"{phase}: no tokens"
    rate = tokens / seconds if seconds > 0 else float("inf")
    return f"{phase}: {tokens} tokens in {seconds:.3f} s, {rate:.1f} tokens/s"


def expert_line(i: int, counts: np.ndarray, cfg: ModelConfig) -> str:
    """'layer 2 (top-2 of 3): e0 20 (33.3%)  e1 ...'"""
    spec = cfg.layers[i].moe
    total = int(counts.sum())
    parts = [f"e{e} {int(c)} ({100.0 * c / total if total else 0.0:.1f}%)" for e, c in enumerate(counts)]
    return f"layer {i} (top-{spec.top_k} of {spec.num_experts}): " + "  ".join(parts)


if __name__ == "__main__":
    sys.exit(main())
