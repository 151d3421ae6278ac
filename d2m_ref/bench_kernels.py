"""`python -m d2m_ref.bench gemv|decode`: the C kernels against this machine's memory bandwidth and
against NumPy doing the same job.  Ratios, measured in the same run; never used by tests.

    python -m d2m_ref.bench gemv   [--formats f32,f16,...] [--shapes 4864x896,...] [--threads 1,all]
                                   [--seconds S] [--path P] [--json PATH]
    python -m d2m_ref.bench decode [--formats ...] [--groups N] [--tokens N] [--threads 1,all]
                                   [--numpy-tokens N] [--path P] [--json PATH]

gemv: reads this machine's bandwidth with the C streaming loop (`measure_bandwidth`), then times
each format's GEMV over a cold working set (distinct matrices filling at least 4× the last-level
cache, visited in turn, so every call streams its weights from DRAM) at expert-sized shapes, on
1 and all threads.  Prints GB/s of weight bytes read, % of bandwidth, and the ratio to NumPy's
reference kernel (NumpyKernels.linear: convert, then BLAS) on the same matrices.

decode: tokens/s of a Qwen2.5-0.5B-shaped Dense2MoE (random weights) on the C and NumPy paths,
float32 compute, beside its roofline bound: measured bandwidth / bytes of weights read per token.

Timings on a shared machine are noisy; numpy's OpenBLAS honours OPENBLAS_CORETYPE, which may be
set to an older kernel on this workplace: for a fair comparison run the command with
`env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE` (the output says which kernel it ran).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from . import ckernels, quant
from .kernels import NumpyKernels
from .synth import to_storage
from .weights import Param

FORMAT_STORAGE = {"f32": "F32", "f16": "F16", "bf16": "BF16", **quant.FORMATS}
DEFAULT_SHAPES = ("4864x896", "896x4864", "8960x1536")
GB = 1e9


# ---------------------------------------------------------------------------------------------
# The machine


def last_level_cache_bytes() -> int:
    """Size of the largest CPU cache (sysfs), 32 MiB when unknown."""
    best = 0
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            text = (index / "size").read_text().strip()
        except OSError:
            continue
        unit = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        try:
            best = max(best, int(text.rstrip("KMG")) * unit)
        except ValueError:
            continue
    return best or 32 << 20


def all_threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _aligned(nbytes: int) -> np.ndarray:
    raw = np.empty(nbytes + 64, dtype=np.uint8)
    off = (-raw.ctypes.data) % 64
    return raw[off:off + nbytes]


def measure_bandwidth(threads: int = 1, nbytes: int | None = None, repeats: int = 5) -> float:
    """Streaming read bandwidth in GB/s (1e9 bytes/s): the best of `repeats` full reads of a buffer
    of `nbytes` (default: 4× the last-level cache, at least 256 MiB) by the C streaming loop of
    the best kernel path on `threads` threads.  Without the C extension: NumPy summing the buffer
    (a lower bound: its loop does more than read)."""
    nbytes = nbytes or max(4 * last_level_cache_bytes(), 256 << 20)
    nbytes -= nbytes % (1 << 20) or 0
    buf = _aligned(nbytes)
    buf[...] = 1  # touch every page before timing
    best = 0.0
    if ckernels.available():
        k = ckernels.CKernels(threads=threads)
        k.tune(parallel_min_bytes=0, chunk_bytes=1 << 16)
        for _ in range(repeats):
            t = time.perf_counter()
            k.stream_read(buf)
            best = max(best, nbytes / (time.perf_counter() - t) / GB)
        return best
    words = buf.view(np.uint64)
    for _ in range(repeats):
        t = time.perf_counter()
        words.sum()
        best = max(best, nbytes / (time.perf_counter() - t) / GB)
    return best


def numpy_blas() -> str:
    """Which BLAS kernel NumPy runs (threadpoolctl, when installed)."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return "unknown (pip install threadpoolctl to see)"
    infos = [i for i in threadpool_info() if i.get("user_api") == "blas"]
    return ", ".join(f"{i.get('internal_api')} {i.get('version')} {i.get('architecture')} "
                     f"({i.get('num_threads')} threads)" for i in infos) or "none found"


def _blas_threads(n: int):
    """A context limiting NumPy's BLAS to n threads where threadpoolctl is installed (else a no-op:
    BLAS keeps its own default, which the output's 'numpy BLAS' line shows)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(n, user_api="blas")


def environment_note() -> str:
    lines = [f"CPU threads available: {all_threads()}; last-level cache {last_level_cache_bytes() >> 20} MiB",
             f"numpy BLAS: {numpy_blas()}"]
    core = os.environ.get("OPENBLAS_CORETYPE")
    if core:
        lines.append(f"note: OPENBLAS_CORETYPE={core} is set: numpy may run an older kernel; for a fair "
                     "comparison run with `env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE`")
    if ckernels.available():
        info = ckernels.build_info()
        lines.append(f"C kernels: path {info['path']} (supported {', '.join(info['supported_paths'])}), "
                     f"{info['compiler']}")
    else:
        lines.append(f"C kernels: not built ({ckernels.IMPORT_ERROR})")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# gemv


def random_matrices(fmt: str, rows: int, cols: int, count: int, seed: int) -> list[Param]:
    """`count` distinct [rows, cols] weights of a format, in separate memory (a cold working set)."""
    storage = FORMAT_STORAGE[fmt]
    rng = np.random.default_rng(seed)
    params = []
    for i in range(count):
        name = f"bench.{fmt}.{i}"
        if storage == "Q8":
            params.append(Param.quantized(name, storage, (rows, cols), rng.integers(-127, 128, (rows, cols), np.int8),
                                          rng.uniform(1e-3, 1e-2, rows).astype(np.float32)))
        elif quant.is_quantized(storage):
            (_, qshape), (_, sshape) = quant.part_specs(storage, (rows, cols))
            params.append(Param.quantized(name, storage, (rows, cols), rng.integers(0, 256, qshape, np.uint8),
                                          rng.uniform(1e-3, 1e-2, sshape).astype(np.float16)))
        else:
            w = rng.standard_normal((rows, cols), dtype=np.float32) / np.float32(math.sqrt(cols))
            params.append(Param.of(name, to_storage(w, storage), storage))
    return params


@dataclass
class GemvRow:
    format: str
    shape: str
    threads: int
    gbps: float
    bandwidth_gbps: float
    ratio_to_bandwidth: float
    ratio_to_numpy: float
    numpy_gbps: float
    path: str
    matrices: int
    working_set_bytes: int


def _time_calls(call, params: list[Param], seconds: float, min_rounds: int = 2) -> float:
    """Seconds per call of call(p), visiting params in turn until `seconds` and `min_rounds` passes."""
    calls, start = 0, time.perf_counter()
    while True:
        for p in params:
            call(p)
        calls += len(params)
        elapsed = time.perf_counter() - start
        if elapsed >= seconds and calls >= min_rounds * len(params):
            return elapsed / calls


def bench_gemv(fmt: str, rows: int, cols: int, threads: int, bandwidth: float, seconds: float, path: str | None,
               llc: int, factor: float = 4.0) -> GemvRow:
    probe = random_matrices(fmt, rows, cols, 1, 0)[0]
    count = max(2, math.ceil(factor * llc / probe.nbytes))
    params = [probe] + random_matrices(fmt, rows, cols, count - 1, 1)
    x = np.random.default_rng(2).standard_normal((1, cols), dtype=np.float32)
    ck = ckernels.CKernels(path=path, threads=threads)
    y = np.empty((1, rows), np.float32)
    ck.gemv(y, params[0], x)  # describe every matrix once, outside the timing
    for p in params:
        ck.gemv(y, p, x)
    c_time = _time_calls(lambda p: ck.gemv(y, p, x), params, seconds)
    reference = NumpyKernels()
    with _blas_threads(threads):
        np_time = _time_calls(lambda p: reference.linear(x, p), params, seconds / 2, min_rounds=1)
    nbytes = probe.nbytes
    gbps = nbytes / c_time / GB
    np_gbps = nbytes / np_time / GB
    return GemvRow(fmt, f"{rows}x{cols}", threads, gbps, bandwidth, gbps / bandwidth, gbps / np_gbps, np_gbps,
                   ck.path, count, count * nbytes)


def _thread_counts(text: str) -> list[int]:
    out = []
    for part in text.split(","):
        part = part.strip()
        n = all_threads() if part == "all" else int(part)
        if n not in out:
            out.append(n)
    return out


def main_gemv(args: argparse.Namespace) -> int:
    print(environment_note())
    llc = last_level_cache_bytes()
    rows_out: list[GemvRow] = []
    threads = _thread_counts(args.threads)
    bandwidth = {t: measure_bandwidth(t) for t in threads}
    for t in threads:
        print(f"read bandwidth, {t} thread{'s' if t > 1 else ''}: {bandwidth[t]:.1f} GB/s")
    print(f"\n{'format':10} {'shape':>10} {'thr':>3} {'GB/s':>7} {'% bw':>6} {'numpy GB/s':>10} {'x numpy':>8}")
    for fmt in args.formats.split(","):
        for shape in args.shapes.split(","):
            rows, cols = (int(v) for v in shape.lower().split("x"))
            for t in threads:
                r = bench_gemv(fmt, rows, cols, t, bandwidth[t], args.seconds, args.path, llc)
                rows_out.append(r)
                print(f"{r.format:10} {r.shape:>10} {r.threads:>3} {r.gbps:7.1f} {100 * r.ratio_to_bandwidth:5.0f}% "
                      f"{r.numpy_gbps:10.2f} {r.ratio_to_numpy:8.1f}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"kind": "gemv", "environment": environment_note(),
                                               "rows": [asdict(r) for r in rows_out]}, indent=1))
        print(f"wrote {args.json}")
    return 0


# ---------------------------------------------------------------------------------------------
# decode


def qwen05b_dense2moe_config(groups: int = 6, group_size: int = 4, top_k: int = 2, vocab: int = 151936) -> dict:
    """Qwen2.5-0.5B's shapes (hidden 896, 14 heads / 2 kv heads of 64, MLP 4864, vocab 151936, tied)
    as a Dense2MoE: its 24 layers in `groups` groups of `group_size`, each group one layer with the
    group's first attention and an MoE of the group's MLPs (top-`top_k`)."""
    plan = [{"attention": True, "ffn": "moe", "num_experts": group_size, "num_experts_per_tok": top_k,
             "norm_topk_prob": True, "source_layers": list(range(g * group_size, (g + 1) * group_size)),
             "attention_source": g * group_size} for g in range(groups)]
    return {"model_type": "dense2moe", "base_model_type": "qwen2", "vocab_size": vocab, "hidden_size": 896,
            "num_attention_heads": 14, "num_key_value_heads": 2, "head_dim": 64, "intermediate_size": 4864,
            "moe_intermediate_size": 4864, "num_hidden_layers": groups, "rms_norm_eps": 1e-6,
            "rope_theta": 1000000.0, "max_position_embeddings": 4096, "tie_word_embeddings": True,
            "num_experts_per_tok": top_k, "layer_plan": plan}


def bytes_per_token(model) -> int:
    """Weight bytes one decode step reads: every attention and norm weight, the router, K experts of
    each MoE layer (+ shared), dense MLPs, the final norm, the whole LM head and one embedding row."""
    from .weights import iter_params
    cfg, w = model.config, model.weights
    total = w.embed.nbytes // cfg.vocab_size + w.norm.nbytes + w.lm_head.nbytes
    for lw, spec in zip(w.layers, cfg.layers):
        total += sum(p.nbytes for p in iter_params(lw.attention)) if lw.attention is not None else 0
        total += lw.ffn_norm.nbytes
        if spec.moe is None:
            total += sum(p.nbytes for p in iter_params(lw.ffn))
        else:
            ffn = lw.ffn
            total += ffn.router.nbytes + spec.moe.top_k * sum(p.nbytes for p in iter_params(ffn.experts[0]))
            for extra in (ffn.shared, ffn.shared_gate, ffn.selection_bias):
                total += sum(p.nbytes for p in iter_params(extra)) if extra is not None else 0
    return int(total)


def time_decode(model, kernels, tokens: int, prompt: int = 8) -> float:
    """Steady-state decode tokens/s (float32 compute), after a `prompt`-token prefill."""
    from .model import forward
    ids = np.random.default_rng(0).integers(0, model.config.vocab_size, prompt)
    logits, cache = forward(model, ids, dtype=np.float32, kernels=kernels)
    token = int(np.argmax(logits[-1]))
    logits, cache = forward(model, [token], cache=cache, dtype=np.float32, kernels=kernels)  # warm up
    start = time.perf_counter()
    for _ in range(tokens):
        token = int(np.argmax(logits[-1]))
        logits, cache = forward(model, [token], cache=cache, dtype=np.float32, kernels=kernels)
    return tokens / (time.perf_counter() - start)


def build_models(cfg, formats: list[str], seed: int = 0):
    """(format, model) in turn; the quantised ones from one float32 model, built once."""
    from .quant import quantize_model
    from .synth import random_model
    base = None
    for fmt in formats:
        storage = FORMAT_STORAGE[fmt]
        if quant.is_quantized(storage):
            if base is None:
                base = random_model(cfg, seed, "BF16")
            yield fmt, quantize_model(base, storage)
        else:
            yield fmt, random_model(cfg, seed, storage)


def main_decode(args: argparse.Namespace) -> int:
    from .config import parse_config
    print(environment_note())
    cfg = parse_config(qwen05b_dense2moe_config(args.groups, args.group_size, args.top_k, args.vocab))
    threads = _thread_counts(args.threads)
    bandwidth = {t: measure_bandwidth(t) for t in threads}
    for t in threads:
        print(f"read bandwidth, {t} thread{'s' if t > 1 else ''}: {bandwidth[t]:.1f} GB/s")
    print(f"model: Qwen2.5-0.5B shapes as a Dense2MoE, {args.groups} layers, {args.group_size} experts top-"
          f"{args.top_k}, vocab {args.vocab}, tied LM head (kept in the float storage by quantize)")
    print(f"\n{'format':10} {'kernels':>8} {'thr':>3} {'MB/token':>9} {'tok/s':>8} {'bound':>8} {'% bound':>8}")
    rows = []
    for fmt, model in build_models(cfg, args.formats.split(",")):
        per_token = bytes_per_token(model)
        runs = [("c", t) for t in threads] + [("numpy", max(threads))]
        for name, t in runs:
            if name == "c":
                kernels = ckernels.CKernels(path=args.path, threads=t)
                rate = time_decode(model, kernels, args.tokens)
            else:
                kernels = NumpyKernels()
                with _blas_threads(t):
                    rate = time_decode(model, kernels, args.numpy_tokens)
            bound = bandwidth[t] * GB / per_token
            row = {"format": fmt, "kernels": name, "threads": t, "bytes_per_token": per_token,
                   "tokens_per_s": rate, "bound_tokens_per_s": bound, "ratio_to_bound": rate / bound,
                   "bandwidth_gbps": bandwidth[t]}
            rows.append(row)
            print(f"{fmt:10} {name:>8} {t:>3} {per_token / 1e6:9.1f} {rate:8.2f} {bound:8.2f} "
                  f"{100 * rate / bound:7.0f}%", flush=True)
        del model
    if args.json:
        Path(args.json).write_text(json.dumps({"kind": "decode", "environment": environment_note(), "rows": rows},
                                              indent=1))
        print(f"wrote {args.json}")
    return 0


# ---------------------------------------------------------------------------------------------


def build_parser(kind: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"python -m d2m_ref.bench {kind}",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--formats", default="f32,f16,bf16,int8,int4-g32,int4-g64,int4-g128",
                        help=f"comma-separated, of {', '.join(FORMAT_STORAGE)}")
    parser.add_argument("--threads", default="1,all", help="comma-separated thread counts; 'all' = every CPU")
    parser.add_argument("--path", default=None, help="force a C kernel path (default: the best this CPU runs)")
    parser.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    if kind == "gemv":
        parser.add_argument("--shapes", default=",".join(DEFAULT_SHAPES), help="comma-separated RxC")
        parser.add_argument("--seconds", type=float, default=1.0, help="timing budget per measurement (default 1)")
    else:
        parser.add_argument("--groups", type=int, default=6, help="MoE layers (default 6: 24 dense layers / 4)")
        parser.add_argument("--group-size", type=int, default=4, help="experts per MoE layer (default 4)")
        parser.add_argument("--top-k", type=int, default=2, help="experts per token (default 2)")
        parser.add_argument("--vocab", type=int, default=151936, help="vocabulary (default Qwen2.5's 151936)")
        parser.add_argument("--tokens", type=int, default=16, help="decode steps timed on C (default 16)")
        parser.add_argument("--numpy-tokens", type=int, default=3, help="decode steps timed on NumPy (default 3)")
    return parser


def main(argv: list[str]) -> int:
    kind = argv[0]
    args = build_parser(kind).parse_args(argv[1:])
    bad = [f for f in args.formats.split(",") if f not in FORMAT_STORAGE]
    if bad:
        print(f"error: unknown format(s) {', '.join(bad)}; choose from {', '.join(FORMAT_STORAGE)}", file=sys.stderr)
        return 2
    if not ckernels.available():
        print(f"error: {ckernels.unavailable_reason()}", file=sys.stderr)
        return 2
    return main_gemv(args) if kind == "gemv" else main_decode(args)
