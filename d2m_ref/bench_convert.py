"""`python -m d2m_ref.bench convert`: memory of calibrating, converting and exporting at deployment size.

Writes (streaming) a random bf16 dense checkpoint of a deployment shape (default Qwen2.5-3B-shaped,
as `bench memory` does), then in child processes: calibrates it on random token ids (spec/convert.md
§1; the statistics of random weights mean nothing, the memory is the point) and converts it with
`python -m d2m_ref.convert --method lfuc` from those statistics; with `--export-onnx`, also exports the
converted model to ONNX (float16, spec/onnx.md; the graph's size and the time it took).  Reports each child's peak RSS
against the checkpoint's size and the 1.5 GiB budget (spec/convert.md §2.7: tensor by tensor), and
its seconds.  Memory-mapped weights count in RSS once touched, hence "file size +".
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from . import cli
from .bench_memory import MEMORY_BUDGET, SHAPES, child_result, peak_rss_bytes, reusable, write_model
from .errors import D2MError, InputError
from .evaluate import cpu_name
from .files import atomic_write_bytes, check_output

GiB = 1 << 30


def child_calibrate(weights: str, out: str, tokens: int, window: int, dtype: str) -> dict:
    from .calibrate import calibrate
    from .weights import load_model
    model = load_model(weights)
    ids = np.random.default_rng(0).integers(0, model.config.vocab_size, tokens)
    t0 = time.perf_counter()
    doc = calibrate(model, ids, tokens=tokens, window=window, dtype=np.dtype(dtype))
    seconds = time.perf_counter() - t0
    Path(out).write_text(json.dumps(doc))
    model.close()
    return {"seconds": seconds, "peak_rss": peak_rss_bytes()}


def child_convert(weights: str, stats: str, out: str, remove: int) -> dict:
    from .convert import main
    t0 = time.perf_counter()
    status = main(["--weights", weights, "--method", "lfuc", "--stats", stats, "--remove-attention", str(remove),
                   "--out", out, "--quiet"])
    if status:
        raise D2MError(f"convert exited with {status}")
    return {"seconds": time.perf_counter() - t0, "peak_rss": peak_rss_bytes()}


def child_export(weights: str, out: str, dtype: str) -> dict:
    from .export_onnx import export_onnx
    from .weights import load_model
    model = load_model(weights)
    t0 = time.perf_counter()
    summary = export_onnx(model, out, dtype=dtype)
    seconds = time.perf_counter() - t0
    model.close()
    return {"seconds": seconds, "peak_rss": peak_rss_bytes(), "graph_bytes": Path(out).stat().st_size,
            "data_bytes": summary["data_bytes"], "nodes": summary["nodes"]}


def run_child(*args: str) -> dict:
    return child_result("d2m_ref.bench_convert", *args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m d2m_ref.bench convert", description=__doc__.split("\n\n")[0])
    p.add_argument("kind", choices=["convert"])
    p.add_argument("--shape", choices=sorted(SHAPES), default="qwen2.5-3b")
    p.add_argument("--tokens", type=int, default=256, help="calibration tokens (default 256, one window)")
    p.add_argument("--dtype", choices=("float64", "float32"), default="float32", help="calibration compute dtype")
    p.add_argument("--remove-attention", type=int, default=8, help="the LF-UC budget (default 8)")
    p.add_argument("--export-onnx", action="store_true", help="also export the converted model (float16 ONNX)")
    p.add_argument("--dir", type=Path, help="where to write the dense checkpoint (reused when it holds the same "
                   "config; default: a temporary folder, deleted afterwards)")
    p.add_argument("--json", type=Path)
    p.add_argument("--force", action="store_true", help="overwrite the --json file")
    return p


def bench_command(args: argparse.Namespace) -> int:
    check_output(args.json, args.force, "--json")
    if args.tokens < 2:
        raise InputError(f"--tokens {args.tokens}: at least 2")
    dense = SHAPES[args.shape]()
    if args.dir is not None:
        reusable(dense, args.dir / f"{args.shape}-dense")
    scratch = Path(tempfile.mkdtemp(prefix="d2m-bench-convert-"))
    try:
        weights = write_model(dense, (args.dir or scratch) / f"{args.shape}-dense", seed=0)
        size = weights.stat().st_size
        print(f"CPU: {cpu_name()}\nmodel: {args.shape} dense, bf16, {size / GiB:.2f} GiB; budget: file size + "
              f"{MEMORY_BUDGET / GiB:.1f} GiB")
        stats = scratch / "stats.json"
        cal = run_child("calibrate", str(weights), str(stats), str(args.tokens), str(args.tokens), args.dtype)
        conv = run_child("convert", str(weights), str(stats), str(scratch / "converted"), str(args.remove_attention))
        converted = scratch / "converted" / "model.safetensors"
        out_size = converted.stat().st_size
        steps = [("calibrate", cal, size), ("convert", conv, size)]
        if args.export_onnx:
            steps.append(("export", run_child("export", str(converted), str(scratch / "model.onnx"), "float16"),
                          out_size))
        rows = []
        for name, r, size in steps:
            over = r["peak_rss"] - size
            rows.append({"step": name, "peak_rss": r["peak_rss"], "file_size": size, "over_file": over,
                         "within_budget": over <= MEMORY_BUDGET, "seconds": r["seconds"]})
            print(f"{name:10s} peak RSS {r['peak_rss'] / GiB:6.2f} GiB = file + {over / GiB:5.2f} GiB "
                  f"({'within' if over <= MEMORY_BUDGET else 'OVER'} budget), {r['seconds']:.0f} s")
            if name == "export":
                rows[-1].update(graph_bytes=r["graph_bytes"], data_bytes=r["data_bytes"], nodes=r["nodes"])
                print(f"           model.onnx {r['graph_bytes'] / 2**20:.1f} MiB ({r['nodes']} nodes) + model.onnx.data "
                      f"{r['data_bytes'] / GiB:.2f} GiB, from the converted {out_size / GiB:.2f} GiB checkpoint")
        print(f"converted: {out_size / GiB:.2f} GiB ({args.remove_attention} attention blocks removed)")
    finally:
        import shutil
        shutil.rmtree(scratch, ignore_errors=True)
    if args.json is not None:
        doc = {"cpu": cpu_name(), "shape": args.shape, "tokens": args.tokens, "dtype": args.dtype, "rows": rows}
        atomic_write_bytes(args.json, json.dumps(doc, indent=1).encode(), force=args.force)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--child":
        kind, rest = argv[1], argv[2:]
        if kind == "calibrate":
            print(json.dumps(child_calibrate(rest[0], rest[1], int(rest[2]), int(rest[3]), rest[4])))
        elif kind == "export":
            print(json.dumps(child_export(rest[0], rest[1], rest[2])))
        else:
            print(json.dumps(child_convert(rest[0], rest[1], rest[2], int(rest[3]))))
        return 0
    return cli.main_with_status(build_parser(), bench_command, argv)


if __name__ == "__main__":
    sys.exit(main())
