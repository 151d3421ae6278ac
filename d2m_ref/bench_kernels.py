"""`python -m d2m_ref.bench gemv|decode`: the C kernels against this machine's memory bandwidth and
against NumPy doing the same job.  Ratios, measured in the same run; never used by tests.

    python -m d2m_ref.bench gemv   [--formats f32,f16,...] [--shapes 4864x896,...] [--threads 1,all]
                                   [--seconds S] [--rounds N] [--offset B] [--path P] [--json PATH]
    python -m d2m_ref.bench decode [--formats ...] [--groups N] [--tokens N] [--threads 1,all]
                                   [--rounds N] [--numpy-tokens N] [--dir D] [--path P] [--json PATH]

gemv: times each format's GEMV over a cold working set (distinct matrices filling as much memory
as the bandwidth measurement reads: 4× the last-level cache and at least 256 MiB, visited in
turn, so every call streams its weights from DRAM) at expert-sized shapes, on 1 and all threads.
Each matrix starts on a 64-byte boundary, as in a checkpoint d2m_ref writes (spec/format.md
§1.1); `--offset B` starts them B bytes past one instead, as a file written elsewhere may.
Prints GB/s of weight bytes read, % of bandwidth, and the ratio to NumPy's reference kernel
(NumpyKernels.linear: convert, then BLAS) on the same matrices.

decode: tokens/s of a Qwen2.5-0.5B-shaped Dense2MoE (random weights) on the C and NumPy paths,
float32 compute, beside its roofline bound: bandwidth / bytes of weights read per token.  Each
format's model is written to a checkpoint (`quantize` for the integer formats) and loaded
memory-mapped, as `python -m d2m_ref.run --weights` does.

The machines here are shared and their memory bandwidth varies from moment to moment, so
bandwidth and kernel are measured in alternation, `--rounds` times, with the same statistic: the
fastest read of the bandwidth buffer against the fastest full pass of GEMVs over the cold set
(the same bytes, a few milliseconds each, each side sampled for the same time), and for decode
the fastest step (the mean is shown too).  A quiet moment helps both alike.  The bandwidth is this
machine's read rate by the C streaming loop (`measure_bandwidth`).  numpy's OpenBLAS honours
OPENBLAS_CORETYPE, which may be set to an older kernel on this workplace: for a fair comparison
run with `env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE` (the output says which kernel it ran).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from . import ckernels, cli, quant
from .config import parse_config
from .errors import InputError
from .files import atomic_write_bytes, check_output
from .kernels import NumpyKernels
from .synth import to_storage
from .weights import METADATA_CONFIG_KEY, Param

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


def cold_bytes() -> int:
    """Bytes a cold working set spans: 4× the last-level cache, at least 256 MiB, whole MiB (AMD's
    L3 keeps part of a cyclically read set 4× its size: 128 MiB of matrices measured up to 10 %
    faster than DRAM here)."""
    n = max(4 * last_level_cache_bytes(), 256 << 20)
    return n - n % (1 << 20)


class Bandwidth:
    """This machine's streaming read rate in GB/s (1e9 bytes/s) on `threads` threads: full reads of
    a cold_bytes() buffer by the C streaming loop of the best kernel path; `best` keeps the fastest
    read since it was last set to 0.  Without the C extension: NumPy summing the buffer (a lower
    bound)."""

    def __init__(self, threads: int = 1, nbytes: int | None = None):
        self.nbytes = nbytes or cold_bytes()
        self.buf = _aligned(self.nbytes)
        self.buf[...] = 1  # touch every page before timing
        self.kernels = None
        if ckernels.available():
            self.kernels = ckernels.CKernels(threads=threads)
            self.kernels.tune(parallel_min_bytes=0, chunk_bytes=1 << 16)
        self.best = 0.0

    def measure(self, repeats: int = 2, seconds: float = 0.0) -> float:
        """Read the buffer `repeats` times, and on until `seconds` have passed; -> best."""
        start, n = time.perf_counter(), 0
        while n < repeats or time.perf_counter() - start < seconds:
            t = time.perf_counter()
            if self.kernels is not None:
                self.kernels.stream_read(self.buf)
            else:
                self.buf.view(np.uint64).sum()
            self.best = max(self.best, self.nbytes / (time.perf_counter() - t) / GB)
            n += 1
        return self.best


def measure_bandwidth(threads: int = 1, nbytes: int | None = None, repeats: int = 5) -> float:
    """The best of `repeats` reads (Bandwidth) in GB/s."""
    return Bandwidth(threads, nbytes).measure(repeats)


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


def placed(a: np.ndarray, offset: int = 0) -> np.ndarray:
    """A copy of `a` whose data starts `offset` bytes past a 64-byte boundary."""
    raw = np.empty(a.nbytes + 64 + offset, dtype=np.uint8)
    start = (-raw.ctypes.data) % 64 + offset
    out = raw[start:start + a.nbytes].view(a.dtype).reshape(a.shape)
    out[...] = a
    return out


def random_matrices(fmt: str, rows: int, cols: int, count: int, seed: int, offset: int = 0) -> list[Param]:
    """`count` distinct [rows, cols] weights of a format, in separate memory (a cold working set),
    each array starting `offset` bytes past a 64-byte boundary."""
    storage = FORMAT_STORAGE[fmt]
    rng = np.random.default_rng(seed)
    params = []
    for i in range(count):
        name = f"bench.{fmt}.{i}"
        if storage == "Q8":
            params.append(Param.quantized(name, storage, (rows, cols),
                                          placed(rng.integers(-127, 128, (rows, cols), np.int8), offset),
                                          placed(rng.uniform(1e-3, 1e-2, rows).astype(np.float32), offset)))
        elif quant.is_quantized(storage):
            (_, qshape), (_, sshape) = quant.part_specs(storage, (rows, cols))
            params.append(Param.quantized(name, storage, (rows, cols),
                                          placed(rng.integers(0, 256, qshape, np.uint8), offset),
                                          placed(rng.uniform(1e-3, 1e-2, sshape).astype(np.float16), offset)))
        else:
            w = rng.standard_normal((rows, cols), dtype=np.float32) / np.float32(math.sqrt(cols))
            params.append(Param.of(name, placed(to_storage(w, storage), offset), storage))
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
    offset: int
    rounds: int


def _best_pass(call, params: list[Param], seconds: float) -> float:
    """Seconds per call in the fastest full pass of call(p) over params (the whole cold set: the
    same bytes, and about the same few milliseconds, as one bandwidth read), passes repeated for
    `seconds` (at least one)."""
    best, start = math.inf, time.perf_counter()
    while True:
        t = time.perf_counter()
        for p in params:
            call(p)
        now = time.perf_counter()
        best = min(best, (now - t) / len(params))
        if now - start >= seconds:
            return best


def bench_gemv(fmt: str, rows: int, cols: int, threads: list[int], bandwidth: dict[int, Bandwidth], seconds: float,
               rounds: int, path: str | None, offset: int = 0) -> list[GemvRow]:
    """One format and shape on each thread count: `rounds` alternations of bandwidth reads and
    seconds/rounds of GEMV passes over the cold set, the best read and the best pass; then NumPy's
    best pass over the same set."""
    probe = random_matrices(fmt, rows, cols, 1, 0, offset)[0]
    count = max(2, math.ceil(cold_bytes() / probe.nbytes))
    params = [probe] + random_matrices(fmt, rows, cols, count - 1, 1, offset)
    x = np.random.default_rng(2).standard_normal((1, cols), dtype=np.float32)
    y = np.empty((1, rows), np.float32)
    out = []
    for t in threads:
        ck = ckernels.CKernels(path=path, threads=t)
        for p in params:  # describe every matrix once, outside the timing
            ck.gemv(y, p, x)
        best = math.inf
        bandwidth[t].best = 0.0  # this row's own rounds: a quiet spell elsewhere in the run is no reference here
        for _ in range(rounds):  # as long reading as computing: neither gets more chances at a quiet spell
            bandwidth[t].measure(1, seconds / rounds)
            best = min(best, _best_pass(lambda p: ck.gemv(y, p, x), params, seconds / rounds))
        reference = NumpyKernels()
        with _blas_threads(t):
            np_time = _best_pass(lambda p: reference.linear(x, p), params, seconds / 2)
        gbps, np_gbps, bw = probe.nbytes / best / GB, probe.nbytes / np_time / GB, bandwidth[t].best
        out.append(GemvRow(fmt, f"{rows}x{cols}", t, gbps, bw, gbps / bw, gbps / np_gbps, np_gbps, ck.path, count,
                           count * probe.nbytes, offset, rounds))
    return out


def _thread_counts(text: str) -> list[int]:
    out = []
    for part in text.split(","):
        part = part.strip()
        try:
            n = all_threads() if part == "all" else int(part)
        except ValueError:
            raise InputError(f"--threads: {part!r} is not a number or 'all'") from None
        if n < 1:
            raise InputError(f"--threads: {n} must be at least 1")
        if n not in out:
            out.append(n)
    return out


def _shapes(text: str) -> list[tuple[int, int]]:
    out = []
    for part in text.split(","):
        try:
            rows, cols = (int(v) for v in part.lower().split("x"))
        except ValueError:
            raise InputError(f"--shapes: {part!r} is not ROWSxCOLS") from None
        if rows < 1 or cols < 1:
            raise InputError(f"--shapes: {part!r} must be positive")
        out.append((rows, cols))
    return out


def _write_json(path: Path | None, kind: str, rows: list[dict], force: bool) -> None:
    if path is not None:
        text = json.dumps({"kind": kind, "environment": environment_note(), "rows": rows}, indent=1)
        atomic_write_bytes(path, text.encode("utf-8"), force=force)
        print(f"wrote {path}")


def _fmt_gemv(r: GemvRow) -> str:
    return (f"{r.format:10} {r.shape:>10} {r.threads:>3} {r.gbps:7.1f} {r.bandwidth_gbps:7.1f} "
            f"{100 * r.ratio_to_bandwidth:5.0f}% {r.numpy_gbps:10.2f} {r.ratio_to_numpy:8.1f}")


def main_gemv(args: argparse.Namespace) -> int:
    threads, shapes = _thread_counts(args.threads), _shapes(args.shapes)
    print(environment_note())
    bandwidth = {t: Bandwidth(t) for t in threads}
    print(f"cold working set: {cold_bytes() >> 20} MiB of distinct matrices per format and shape, each starting "
          f"{args.offset} bytes past a 64-byte boundary; {args.rounds} rounds of (bandwidth reads, GEMV passes over the "
          "set); GB/s of the fastest pass against the fastest read")
    print(f"\n{'format':10} {'shape':>10} {'thr':>3} {'GB/s':>7} {'bw GB/s':>7} {'% bw':>6} {'numpy GB/s':>10} "
          f"{'x numpy':>8}")
    rows_out: list[GemvRow] = []
    for fmt in args.formats.split(","):
        for rows, cols in shapes:
            for r in bench_gemv(fmt, rows, cols, threads, bandwidth, args.seconds, args.rounds, args.path,
                                args.offset):
                rows_out.append(r)
                print(_fmt_gemv(r), flush=True)
    _write_json(args.json, "gemv", [asdict(r) for r in rows_out], args.force)
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


def time_decode(model, kernels, tokens: int, prompt: int = 8) -> tuple[float, float]:
    """(mean, best) tokens/s of `tokens` steady-state decode steps (float32 compute) after a
    `prompt`-token prefill and one untimed step; best = the fastest single step (a sample of a few
    to tens of milliseconds, like one bandwidth read)."""
    from .model import forward
    ids = np.random.default_rng(0).integers(0, model.config.vocab_size, prompt)
    logits, cache = forward(model, ids, dtype=np.float32, kernels=kernels)
    token = int(np.argmax(logits[-1]))
    logits, cache = forward(model, [token], cache=cache, dtype=np.float32, kernels=kernels)  # warm up
    steps = []
    for _ in range(tokens):
        token = int(np.argmax(logits[-1]))
        t = time.perf_counter()
        logits, cache = forward(model, [token], cache=cache, dtype=np.float32, kernels=kernels)
        steps.append(time.perf_counter() - t)
    return len(steps) / sum(steps), 1.0 / min(steps)


def write_models(cfg_dict: dict, formats: list[str], folder: Path, seed: int = 0):
    """(format, checkpoint path) in turn, each written into `folder` as a user would make it: the
    float formats by synth.write_checkpoint, the integer ones by `quantize` from one bf16
    checkpoint.  Each checkpoint is deleted once the next one is asked for."""
    from .quantize import write_quantized
    from .synth import write_checkpoint
    from .weights import load_model
    meta = {METADATA_CONFIG_KEY: json.dumps(cfg_dict)}
    cfg = parse_config(cfg_dict)
    bf16 = None
    for fmt in formats:
        storage = FORMAT_STORAGE[fmt]
        path = folder / f"{fmt}.safetensors"
        if quant.is_quantized(storage):
            if bf16 is None:
                bf16 = write_checkpoint(cfg, folder / "bf16-source.safetensors", seed, "BF16", meta)
            write_quantized(load_model(bf16), storage, fmt, path, False, "bench decode")
        else:
            write_checkpoint(cfg, path, seed, storage, meta)
        yield fmt, path
        path.unlink()
    if bf16 is not None:
        bf16.unlink()


def main_decode(args: argparse.Namespace) -> int:
    from .weights import load_model
    threads = _thread_counts(args.threads)
    formats = args.formats.split(",")
    cfg_dict = qwen05b_dense2moe_config(args.groups, args.group_size, args.top_k, args.vocab)
    cfg = parse_config(cfg_dict)
    print(environment_note())
    bandwidth = {t: Bandwidth(t) for t in threads}
    print(f"model: Qwen2.5-0.5B shapes as a Dense2MoE, {args.groups} layers, {args.group_size} experts top-"
          f"{args.top_k}, vocab {args.vocab}, tied LM head (kept in the float storage by quantize); each format "
          f"written to a checkpoint and memory-mapped; {args.rounds} rounds of (bandwidth reads, {args.tokens} C "
          f"decode steps); % bound = fastest step / bound (fastest read), mean % = mean rate / bound")
    print(f"\n{'format':10} {'kernels':>8} {'thr':>3} {'MB/token':>9} {'tok/s':>8} {'best':>8} {'bw GB/s':>7} "
          f"{'bound':>8} {'% bound':>8} {'mean %':>7}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="d2m-bench-decode-", dir=args.dir) as work:
        for fmt, path in write_models(cfg_dict, formats, Path(work)):
            model = load_model(path)
            if model.config != cfg:
                raise InputError(f"{path}: the checkpoint's config is not the benchmark's")
            per_token = bytes_per_token(model)
            for name, t in [("c", t) for t in threads] + [("numpy", max(threads))]:
                bandwidth[t].best = 0.0  # this row's own rounds
                if name == "c":
                    kernels = ckernels.CKernels(path=args.path, threads=t)
                    rounds = [None] * args.rounds
                    for i in range(args.rounds):
                        start = time.perf_counter()
                        rounds[i] = time_decode(model, kernels, args.tokens)
                        bandwidth[t].measure(1, time.perf_counter() - start)  # as long as the decode took
                    mean = sum(r[0] for r in rounds) / len(rounds)
                    best = max(r[1] for r in rounds)
                else:
                    with _blas_threads(t):
                        mean, best = time_decode(model, NumpyKernels(), args.numpy_tokens)
                    bandwidth[t].measure()
                bw = bandwidth[t].best
                bound = bw * GB / per_token
                rows.append({"format": fmt, "kernels": name, "threads": t, "bytes_per_token": per_token,
                             "tokens_per_s": mean, "best_step_tokens_per_s": best, "bound_tokens_per_s": bound,
                             "ratio_to_bound": best / bound, "mean_ratio_to_bound": mean / bound,
                             "bandwidth_gbps": bw, "rounds": args.rounds if name == "c" else 1})
                print(f"{fmt:10} {name:>8} {t:>3} {per_token / 1e6:9.1f} {mean:8.2f} {best:8.2f} {bw:7.1f} {bound:8.2f} "
                      f"{100 * best / bound:7.0f}% {100 * mean / bound:7.0f}%", flush=True)
            del model
    _write_json(args.json, "decode", rows, args.force)
    return 0


# ---------------------------------------------------------------------------------------------


def build_parser(kind: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"python -m d2m_ref.bench {kind}",
                                     description=__doc__.split("\n\n")[0])
    parser.set_defaults(kind=kind)
    parser.add_argument("--formats", default="f32,f16,bf16,int8,int4-g32,int4-g64,int4-g128",
                        help=f"comma-separated, of {', '.join(FORMAT_STORAGE)}")
    parser.add_argument("--threads", default="1,all", help="comma-separated thread counts; 'all' = every CPU")
    parser.add_argument("--path", default=None, help="force a C kernel path (default: the best this CPU runs)")
    parser.add_argument("--json", metavar="PATH", type=Path, help="also write the rows as JSON")
    parser.add_argument("--force", action="store_true", help="overwrite the --json file if it exists")
    parser.add_argument("--rounds", type=int, default=3,
                        help="alternations of bandwidth read and kernel timing; the best of each is kept (default 3)")
    if kind == "gemv":
        parser.add_argument("--shapes", default=",".join(DEFAULT_SHAPES), help="comma-separated RxC")
        parser.add_argument("--seconds", type=float, default=1.5,
                            help="C timing budget per format, shape and thread count (default 1.5)")
        parser.add_argument("--offset", type=int, default=0,
                            help="start every matrix this many bytes past a 64-byte boundary (default 0)")
    else:
        parser.add_argument("--dir", type=Path, default=None,
                            help="where the checkpoints are written (a temporary folder inside it, removed "
                                 "afterwards; default: the system's temporary folder)")
        parser.add_argument("--groups", type=int, default=6, help="MoE layers (default 6: 24 dense layers / 4)")
        parser.add_argument("--group-size", type=int, default=4, help="experts per MoE layer (default 4)")
        parser.add_argument("--top-k", type=int, default=2, help="experts per token (default 2)")
        parser.add_argument("--vocab", type=int, default=151936, help="vocabulary (default Qwen2.5's 151936)")
        parser.add_argument("--tokens", type=int, default=16, help="decode steps timed on C (default 16)")
        parser.add_argument("--numpy-tokens", type=int, default=3, help="decode steps timed on NumPy (default 3)")
    return parser


def main(argv: list[str]) -> int:
    """argv: the kind (gemv or decode), then its options."""
    if not argv or argv[0] not in ("gemv", "decode"):
        print("usage: python -m d2m_ref.bench {gemv,decode} [options]", file=sys.stderr)
        return cli.EXIT_BAD_INPUT
    return cli.main_with_status(build_parser(argv[0]), _run, argv[1:])


def _run(args: argparse.Namespace) -> int:
    """Every argument is checked before any work starts (no buffer, matrix or checkpoint yet)."""
    bad = [f for f in args.formats.split(",") if f not in FORMAT_STORAGE]
    if bad:
        raise InputError(f"--formats: unknown format(s) {', '.join(bad)}; choose from {', '.join(FORMAT_STORAGE)}")
    if args.rounds < 1:
        raise InputError(f"--rounds {args.rounds}: must be at least 1")
    threads = _thread_counts(args.threads)
    if args.kind == "gemv":
        _shapes(args.shapes)
        if not (math.isfinite(args.seconds) and args.seconds > 0):
            raise InputError(f"--seconds {args.seconds}: must be a positive number")
        if not 0 <= args.offset < 4096 or args.offset % 4:
            raise InputError(f"--offset {args.offset}: must be a multiple of 4 (every format's element size) "
                             "in [0, 4096)")
    else:
        for option, n in (("--tokens", args.tokens), ("--numpy-tokens", args.numpy_tokens),
                          ("--groups", args.groups), ("--group-size", args.group_size), ("--top-k", args.top_k),
                          ("--vocab", args.vocab)):
            if n < 1:
                raise InputError(f"{option} {n}: must be at least 1")
        if args.dir is not None and not args.dir.is_dir():
            raise InputError(f"--dir {args.dir}: is not an existing folder")
    check_output(args.json, args.force, "--json")
    if not ckernels.available():
        raise InputError(ckernels.unavailable_reason())
    ckernels.CKernels(path=args.path, threads=max(threads))  # an unknown path or thread count: refused now
    return main_gemv(args) if args.kind == "gemv" else main_decode(args)


if __name__ == "__main__":  # the same as python -m d2m_ref.bench gemv|decode
    sys.exit(main(sys.argv[1:]))
