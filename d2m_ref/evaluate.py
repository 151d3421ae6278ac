"""`python -m d2m_ref.evaluate`: held-out perplexity beside the modelled decode time on each device.

    python -m d2m_ref.evaluate --weights M [M ...] --text FILE [--tokens N] [--window W]
        [--dtype float32|float64] [--formats bf16,int4-g64] [--context C] [--measure-decode]
        [--decode-steps N] [--threads T] [--json out.json] [--png out.png] [--force] [--quiet]

Per model: perplexity (spec/convert.md §5) on the first N tokens of the text in windows of W, the
decode bytes per token and the modelled ms/token on every device of spec/roofline.md §3 for each
weight format, at a context of C tokens (KV cache in float16).  --measure-decode also times this
machine's decode with the C kernels (float32 compute, weights as stored; each step right after a read
of this machine's bandwidth) and sets it beside the roofline of the same bytes at the bandwidth read
in the same seconds: `here ratio` = measured ms / modelled ms (spec/roofline.md §4).
The PNG (matplotlib, `pip install -e ".[convert]"`) plots perplexity against modelled ms/token.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import numpy as np

from . import roofline
from .calibrate import text_ids, windows
from .errors import InputError
from .files import atomic_write, check_output
from .perplexity import perplexity
from .weights import Model, load_model

DEFAULT_FORMATS = "bf16,int4-g64"
DEFAULT_CONTEXT = 1024


def cpu_name() -> str:
    """The CPU as the kernel reports it: model name with x86 family and model (what tells Zen 3 from
    Zen 5 in a VM that calls both "AMD EPYC"), or ARM's CPU part; else platform's guess."""
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    if "model name" in fields:
        extra = f" (family {fields['cpu family']} model {fields['model']})" if "cpu family" in fields else ""
        return fields["model name"] + extra
    if "CPU part" in fields:
        return f"ARM CPU part {fields['CPU part']} (implementer {fields.get('CPU implementer', '?')})"
    return platform.processor() or platform.machine()


def describe(model: Model) -> dict:
    """Layer counts and parameters of a model (what the table's first columns show)."""
    cfg = model.config
    moe = [s.moe for s in cfg.layers if s.moe is not None]
    return {"layers": cfg.num_hidden_layers, "attention_layers": sum(1 for s in cfg.layers if s.attention),
            "moe_layers": len(moe), "experts": sorted({(m.num_experts, m.top_k) for m in moe}),
            "active_parameters": roofline.active_parameters(cfg),
            "conversion": cfg.source.get("conversion", {}).get("method", "dense")}


def modelled(model: Model, formats: list[str], context: int) -> dict:
    """{format: {"bytes_per_token", device: ms}} (spec/roofline.md §1–3)."""
    out = {}
    for fmt in formats:
        nbytes = roofline.bytes_per_token(model.config, fmt, context)
        out[fmt] = {"bytes_per_token": nbytes,
                    **{d.name: roofline.ms_per_token(nbytes, d.bandwidth_gbps) for d in roofline.DEVICES}}
    return out


def skeleton(model: Model) -> Model:
    """The same layer plan with negligible weights (spec/roofline.md §4): hidden 8 per head, MLP and
    expert width 64, vocabulary 256, random F32 in memory.  Its decode step is the fixed cost of the
    plan's operations on this machine (Python, NumPy, the C binding), whatever the bytes."""
    from .config import parse_config
    from .synth import random_model
    src, cfg = model.config.source, model.config
    small = {"hidden_size": 8 * cfg.num_attention_heads, "head_dim": 8, "intermediate_size": 64,
             "vocab_size": 256, "tie_word_embeddings": False}
    d = {**src, **small}
    if "moe_intermediate_size" in src:
        d["moe_intermediate_size"] = 64
    if "layer_plan" in src:
        d["layer_plan"] = [{**e, **{k: 64 for k in ("intermediate_size", "moe_intermediate_size") if k in e}}
                           for e in src["layer_plan"]]
    return random_model(parse_config(d, "the skeleton config"), storage="F32")


def measure_decode(model: Model, steps: int, threads: int) -> dict:
    """This machine's decode with the C kernels against its roofline (spec/roofline.md §4): the
    bandwidth bound of the step's bytes at the bandwidth read beside each step, plus the fixed cost
    of the same layer plan measured on its skeleton."""
    from . import ckernels
    from .bench_kernels import Bandwidth, decode_steps, paired
    if not ckernels.available():
        raise InputError(f"--measure-decode needs the C kernels: {ckernels.IMPORT_ERROR}")
    prompt = 8
    context = prompt + 1 + (steps + 1) // 2  # the cache length at the median step
    nbytes = roofline.model_weight_bytes(model) + roofline.kv_bytes(model.config, context, 4)
    kernels = ckernels.CKernels(threads=threads)
    bandwidth = Bandwidth(threads)
    fixed_step = decode_steps(skeleton(model), kernels, prompt)
    fixed_ms = float(np.median([1e3 / fixed_step() for _ in range(max(steps, 16))]))
    d = paired(decode_steps(model, kernels, prompt), bandwidth, nbytes, 0.0, steps)
    measured = [1e3 / r for r in d.rates]
    modelled = [roofline.ms_per_token(nbytes, bw) + fixed_ms for bw in d.reads]
    ratios = np.array(measured) / np.array(modelled)
    return {"cpu": cpu_name(), "threads": threads, "bytes_per_token": nbytes, "tokens_per_s": d.rate,
            "bandwidth_gbps": d.bandwidth, "ms_per_token": float(np.median(measured)), "fixed_ms": fixed_ms,
            "bandwidth_ms": roofline.ms_per_token(nbytes, d.bandwidth),
            "modelled_ms_per_token": float(np.median(modelled)), "ratio": float(np.median(ratios)),
            "ratio_quartiles": [float(q) for q in np.percentile(ratios, [25, 75])],
            "bandwidth_only_ratio": 1.0 / d.ratio, "steps": len(d.rates)}


def evaluate(paths: list[Path], ids: np.ndarray, args: argparse.Namespace, log=None) -> list[dict]:
    rows = []
    formats = [f.strip() for f in args.formats.split(",")]
    bad = [f for f in formats if f not in roofline.FORMAT_STORAGE]
    if bad:
        raise InputError(f"--formats: unknown {', '.join(bad)}; choose from {', '.join(roofline.FORMAT_STORAGE)}")
    for path in paths:
        model = load_model(path, strict_config=args.strict_config)
        try:
            window = min(args.window, model.config.max_position_embeddings)
            parts = windows(ids, args.tokens, window)
            row = {"model": path.name or str(path), "path": str(path), **describe(model)}
            row.update(perplexity(model, parts, np.dtype(args.dtype), log))
            row["modelled"] = modelled(model, formats, args.context)
            if args.measure_decode:
                row["here"] = measure_decode(model, args.decode_steps, args.threads)
        finally:
            model.close()
        rows.append(row)
        if log is not None:
            log(f"evaluate: {row['model']}: ppl {row['perplexity']:.3f}")
    return rows


def table(rows: list[dict], context: int) -> str:
    formats = list(rows[0]["modelled"])
    devices = [d.name for d in roofline.DEVICES]
    head = ["model", "method", "layers", "attn", "active params", "ppl"]
    head += [f"{d} {f} ms" for f in formats for d in devices]
    if any("here" in r for r in rows):
        head += ["here tok/s", "here ms", "bandwidth ms", "fixed ms", "here ratio"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["model"], r["conversion"], str(r["layers"]), str(r["attention_layers"]),
                 f"{r['active_parameters'] / 1e6:.1f} M", f"{r['perplexity']:.3f}"]
        cells += [f"{r['modelled'][f][d]:.2f}" for f in formats for d in devices]
        if "here" in r:
            h = r["here"]
            cells += [f"{h['tokens_per_s']:.1f}", f"{h['ms_per_token']:.1f}", f"{h['bandwidth_ms']:.1f}",
                      f"{h['fixed_ms']:.1f}", f"{h['ratio']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    note = f"modelled: weights in the format + KV cache of {context} tokens in float16"
    here = next((r["here"] for r in rows if "here" in r), None)
    if here is not None:
        note += (f"; here: {here['cpu']}, {here['threads']} thread(s), C kernels, float32 compute, weights as "
                 "stored; here ratio = measured / (bandwidth ms at the read beside each step + the plan's fixed ms, "
                 "measured on its skeleton), median over steps")
    return "\n".join(lines) + f"\n\n{note}\n"


def plot(rows: list[dict], path: Path, fmt: str, device: str, force: bool) -> None:
    """Perplexity against modelled ms/token on one device and format, one point per model."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise InputError("--png needs matplotlib: pip install -e \".[convert]\"") from None
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    methods: dict[str, list[dict]] = {}
    for r in rows:
        methods.setdefault(r["conversion"], []).append(r)
    markers = {"dense": "*", "prune": "s", "lfuc": "o", "upcycle": "^"}
    for method, rs in methods.items():
        rs = sorted(rs, key=lambda r: r["modelled"][fmt][device])
        xs, ys = [r["modelled"][fmt][device] for r in rs], [r["perplexity"] for r in rs]
        ax.plot(xs, ys, marker=markers.get(method, "o"), markersize=9 if method == "dense" else 6,
                linestyle="-" if len(rs) > 1 else "none", label=method)
        for r, x, y in zip(rs, xs, ys):  # where points share an x, the higher one's label above, the others' below
            near = [q["perplexity"] for q in rows if abs(q["modelled"][fmt][device] - x) <= 0.01 * x]
            ax.annotate(r["model"], (x, y), textcoords="offset points", fontsize=7,
                        xytext=(6, 6 if y >= max(near) else -12))
    ax.legend(fontsize=8)
    ax.set_title("untrained conversions (before any continual pre-training)", fontsize=9)
    ax.set_xlabel(f"modelled decode ms/token ({device}, {fmt})")
    ax.set_ylabel("held-out perplexity")
    ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    import io
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    plt.close(fig)
    atomic_write(path, lambda f: f.write(buf.getvalue()), force=force)


def build_parser() -> argparse.ArgumentParser:
    from .calibrate import DEFAULT_TOKENS, DEFAULT_WINDOW
    from .cli import add_strict_config_option
    parser = argparse.ArgumentParser(prog="python -m d2m_ref.evaluate",
                                     description="Perplexity and modelled decode time (spec/roofline.md).")
    parser.add_argument("--weights", type=Path, nargs="+", required=True, metavar="M")
    parser.add_argument("--tokenizer", type=Path, metavar="tokenizer.json",
                        help="default: beside the first model's weights (all models must share it)")
    parser.add_argument("--text", type=Path, required=True, metavar="FILE",
                        help="held-out text (python -m d2m_ref.corpus kjv --split heldout)")
    parser.add_argument("--tokens", type=int, default=DEFAULT_TOKENS, metavar="N")
    parser.add_argument("--window", type=int, default=DEFAULT_WINDOW, metavar="W")
    parser.add_argument("--dtype", choices=("float64", "float32"), default="float32",
                        help="compute dtype of the perplexity forward (default float32)")
    parser.add_argument("--formats", default=DEFAULT_FORMATS, help=f"weight formats to model (default {DEFAULT_FORMATS})")
    parser.add_argument("--context", type=int, default=DEFAULT_CONTEXT, metavar="C",
                        help=f"context of the modelled decode step (default {DEFAULT_CONTEXT})")
    parser.add_argument("--measure-decode", action="store_true", help="time this machine's decode (C kernels)")
    parser.add_argument("--decode-steps", type=int, default=24, metavar="N")
    parser.add_argument("--threads", type=int, default=1, metavar="T", help="C kernel threads (default 1)")
    parser.add_argument("--json", type=Path, metavar="PATH")
    parser.add_argument("--png", type=Path, metavar="PATH")
    parser.add_argument("--png-device", default="orin-agx-64", choices=[d.name for d in roofline.DEVICES])
    parser.add_argument("--force", action="store_true", help="overwrite --json / --png")
    parser.add_argument("--quiet", action="store_true")
    add_strict_config_option(parser)
    return parser


def run(args: argparse.Namespace) -> int:
    from .tokenizer import load_tokenizer, tokenizer_beside
    for option, path in (("--json", args.json), ("--png", args.png)):
        check_output(path, args.force, option, [("the text", args.text), ("the tokenizer", args.tokenizer)]
                     + [("the weights", w) for w in args.weights]
                     + [("the weights", w / n) for w in args.weights if w.is_dir() for n in ("model.safetensors", "config.json")])
    if args.tokens < 2 or args.context < 1 or args.decode_steps < 1 or args.threads < 1:
        raise InputError("--tokens, --context, --decode-steps and --threads take positive numbers (--tokens >= 2)")
    tok_path = args.tokenizer or tokenizer_beside(args.weights[0])
    if tok_path is None:
        raise InputError(f"no tokenizer.json beside {args.weights[0]}: pass --tokenizer")
    first = load_model(args.weights[0], strict_config=args.strict_config)
    vocab = first.config.vocab_size
    first.close()
    ids = text_ids(args.text, load_tokenizer(tok_path), vocab)
    log = None if args.quiet else (lambda m: print(m, file=sys.stderr, flush=True))
    rows = evaluate(args.weights, ids, args, log)
    print(table(rows, args.context))
    if args.json is not None:
        doc = {"cpu": cpu_name(), "context": args.context, "text": str(args.text), "tokens": args.tokens,
               "window": args.window, "dtype": args.dtype, "rows": rows}
        data = (json.dumps(doc, indent=1) + "\n").encode()
        atomic_write(args.json, lambda f: f.write(data), force=args.force)
    if args.png is not None:
        plot(rows, args.png, next(iter(rows[0]["modelled"])), args.png_device, args.force)
    return 0


def main(argv: list[str] | None = None) -> int:
    from . import cli
    return cli.main_with_status(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
