"""`python -m d2m_ref.bench gemv|decode`: the C kernels against this machine's memory bandwidth and
against NumPy doing the same job.  Ratios, measured in the same run; never used by tests.

    python -m d2m_ref.bench gemv   [--formats f32,f16,...] [--shapes 4864x896,...] [--threads 1,all]
                                   [--seconds S] [--offset B] [--path P] [--json PATH]
    python -m d2m_ref.bench decode [--formats ...] [--groups N] [--tokens N] [--threads 1,all]
                                   [--numpy-tokens N] [--dir D] [--path P] [--json PATH]

gemv: times each format's GEMV over a cold working set (distinct matrices filling as much memory
as the bandwidth measurement reads: 4× the last-level cache and at least 256 MiB, visited in
turn, so every call streams its weights from DRAM) at expert-sized shapes, on 1 and all threads.
Each matrix starts on a 64-byte boundary, as in a checkpoint d2m_ref writes (spec/format.md
§1.1); `--offset B` starts them B bytes past one instead, as a file written elsewhere may.
Prints GB/s of weight bytes read, % of bandwidth, and the ratio to NumPy's reference kernel
(NumpyKernels.linear: convert, then BLAS) on the same matrices.  A pass is timed in C
(d2m_gemv_pass: a full d2m_gemv call per matrix, checks and activation preparation included), so
the rate is the kernels'; the same passes with a Python call per GEMV, as the forward pass makes
them, are printed beside it (py GB/s: the binding costs 2-6 µs a call).  And the kernel's compute
rate on one core, its other roof: the same call on one thread over a matrix kept in that core's L2
cache (1-thr hot, HotGemv), a pass of it after each cold pass (so fewer pairs fit in --seconds).  A
format whose hot rate is not well above one thread's bandwidth is compute-bound on this CPU, and
its % of bandwidth says so.

decode: tokens/s of a Qwen2.5-0.5B-shaped Dense2MoE (random weights) on the C and NumPy paths,
float32 compute, beside its roofline bound: bandwidth / bytes of weights read per token.  Each
format's model is written to a checkpoint (`quantize` for the integer formats) and loaded
memory-mapped, as `python -m d2m_ref.run --weights` does.  "in kernels": the share of a step spent
inside the kernels' calls (TimedKernels; for C, the binding's checks included); the rest is Python
and NumPy around them.  Steps are timed through that wrapper (about 0.4 µs a call, 0.2 % of a step).

The machines here are shared and their memory bandwidth varies from moment to moment (on the
2-vCPU VM this was written on, two-thread reads switch between about 45-55 and 68-74 GB/s), so
every sample of the job is taken right after a bandwidth read and judged against it: a pass of
GEMVs over the whole cold set (the same bytes as a read), or one decode step.  Reported: the
medians of rates and reads, and the median of the per-pair ratios with its middle half.  The
bandwidth is this machine's read rate by the C streaming loop (`measure_bandwidth`), over memory
on 4 KiB pages as the weights are: memory-mapped checkpoints are not on huge pages, and the
benchmarks' matrices are kept off them too (`_aligned`); the same read on 2 MiB pages is printed
for comparison.  numpy's OpenBLAS honours OPENBLAS_CORETYPE, which may be set to an older kernel
on this workplace: for a fair comparison run with `env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE`
(the output says which kernel it ran).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import mmap
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
from .roofline import FORMAT_STORAGE, model_weight_bytes
from .synth import to_storage
from .weights import METADATA_CONFIG_KEY, Param

DEFAULT_SHAPES = ("4864x896", "896x4864", "8960x1536")
GB = 1e9


# ---------------------------------------------------------------------------------------------
# The machine


def caches() -> list[tuple[int | None, int]]:
    """(level, bytes) of the first CPU's data and unified caches, from sysfs; [] when unknown.  An
    entry without a type counts as unified (the kernel leaves the file out when firmware does not
    say), one without a level as None."""
    out = []
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            text = (index / "size").read_text().strip()
            size = int(text.rstrip("KMG")) * {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        except (OSError, ValueError):
            continue
        try:
            if (index / "type").read_text().strip() == "Instruction":
                continue
        except OSError:
            pass
        try:
            level = int((index / "level").read_text())
        except (OSError, ValueError):
            level = None
        out.append((level, size))
    return out


def last_level_cache_bytes() -> int:
    """Size of the largest CPU cache, 32 MiB when unknown."""
    return max((size for _, size in caches()), default=32 << 20)


L2_ASSUMED = 512 << 10


def l2_cache_bytes() -> int | None:
    """One core's L2 cache; None when sysfs does not say (then L2_ASSUMED is used, and said)."""
    return max((size for level, size in caches() if level == 2), default=None)


def all_threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _aligned(nbytes: int, offset: int = 0) -> np.ndarray:
    """uint8 [nbytes] starting `offset` bytes past a 64-byte boundary, in its own anonymous mapping
    on 4 KiB pages, as memory-mapped weights are: NumPy asks for 2 MiB pages for arrays of 4 MiB and
    more (fewer TLB misses: a 256 MiB read measured 3-10 % faster here), which would give the
    bandwidth read and the big matrices an advantage the checkpoint's weights do not have."""
    size = nbytes + offset + 64
    size += -size % mmap.PAGESIZE
    region = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_NOHUGEPAGE"):
        try:
            region.madvise(mmap.MADV_NOHUGEPAGE)
        except OSError:  # a kernel without transparent huge pages: small pages anyway
            pass
    return np.frombuffer(region, np.uint8)[offset:offset + nbytes]  # the array keeps the mapping alive


def cold_bytes() -> int:
    """Bytes a cold working set spans: 4× the last-level cache, at least 256 MiB, whole MiB (AMD's
    L3 keeps part of a cyclically read set 4× its size: 128 MiB of matrices measured up to 10 %
    faster than DRAM here)."""
    n = max(4 * last_level_cache_bytes(), 256 << 20)
    return n - n % (1 << 20)


class Bandwidth:
    """This machine's streaming read rate in GB/s (1e9 bytes/s) on `threads` threads: one full read
    of a cold_bytes() buffer by the C streaming loop of the best kernel path per `read()`.  Without
    the C extension: NumPy summing the buffer (a lower bound)."""

    def __init__(self, threads: int = 1, nbytes: int | None = None):
        self.nbytes = nbytes or cold_bytes()
        self.buf = _aligned(self.nbytes)
        self.buf[...] = 1  # touch every page before timing
        self.kernels = None
        if ckernels.available():
            self.kernels = ckernels.CKernels(threads=threads)
            self.kernels.tune(parallel_min_bytes=0, chunk_bytes=1 << 16)

    def read(self, buf: np.ndarray | None = None) -> float:
        """One read of self.buf (or of buf: 64-byte aligned, a multiple of 64 bytes)."""
        buf = self.buf if buf is None else buf
        t = time.perf_counter()
        if self.kernels is not None:
            self.kernels.stream_read(buf)
        else:
            buf.view(np.uint64).sum()
        return buf.nbytes / (time.perf_counter() - t) / GB


def page_note(bandwidth: dict[int, Bandwidth]) -> str:
    """One line: the bandwidth reads (small pages, like memory-mapped weights) beside the same read
    of an array NumPy allocated (it asks for 2 MiB pages at this size), the best of 3 each, so a
    reader sees what the page size is worth."""
    small = f"{mmap.PAGESIZE // 1024} KiB"
    if not ckernels.available():
        return f"bandwidth: NumPy summing the buffer (no C extension), {small} pages"
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    huge_pages = thp.exists() and "[never]" not in thp.read_text()
    nbytes = next(iter(bandwidth.values())).nbytes
    raw = np.empty(nbytes + 64, np.uint8)
    other = raw[-raw.ctypes.data % 64:][:nbytes]
    other[...] = 1
    parts = [f"{t} thread{'s' if t > 1 else ''}: {max(bw.read() for _ in range(3)):.1f} GB/s, "
             f"{max(bw.read(other) for _ in range(3)):.1f} on NumPy's array" for t, bw in bandwidth.items()]
    return (f"bandwidth reads: memory on {small} pages, as memory-mapped weights are; NumPy's own array "
            f"{'may be on 2 MiB pages' if huge_pages else 'is on small pages too (no transparent huge pages)'} "
            "(best of 3: " + "; ".join(parts) + ")")


def measure_bandwidth(threads: int = 1, nbytes: int | None = None, repeats: int = 5) -> float:
    """The best of `repeats` reads (Bandwidth) in GB/s."""
    bw = Bandwidth(threads, nbytes)
    return max(bw.read() for _ in range(repeats))


@dataclass
class Paired:
    """Samples of a job's rate (GB/s, or tokens/s) each taken right after a bandwidth read, so the
    two see the machine in the same state; ratio = the median of the per-pair ratios."""
    rates: list[float]
    reads: list[float]
    ratios: list[float]

    @property
    def rate(self) -> float:
        return float(np.median(self.rates))

    @property
    def bandwidth(self) -> float:
        return float(np.median(self.reads))

    @property
    def ratio(self) -> float:
        return float(np.median(self.ratios))

    @property
    def spread(self) -> tuple[float, float]:
        """The middle half of the per-pair ratios (quartiles)."""
        return float(np.percentile(self.ratios, 25)), float(np.percentile(self.ratios, 75))


def paired(sample, bandwidth: Bandwidth, per_byte: float, seconds: float, min_pairs: int = 5) -> Paired:
    """Alternate a bandwidth read and sample() (-> a rate) for `seconds` and at least `min_pairs`
    pairs; the pair's ratio is rate · per_byte / read (per_byte: bytes the job reads per unit of
    its rate, 1e9 for GB/s)."""
    out, start = Paired([], [], []), time.perf_counter()
    while len(out.rates) < min_pairs or time.perf_counter() - start < seconds:
        read = bandwidth.read()
        rate = sample()
        out.reads.append(read)
        out.rates.append(rate)
        out.ratios.append(rate * per_byte / (read * GB))
    return out


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
    out = _aligned(a.nbytes, offset).view(a.dtype).reshape(a.shape)
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
    python_gbps: float  # the same passes, a binding call per GEMV
    hot_gbps: float | None  # one thread, the matrix kept in its L2 cache (HotGemv); None: no row fits
    hot_rows: int
    path: str
    matrices: int
    working_set_bytes: int
    offset: int
    pairs: int
    ratio_quartiles: tuple[float, float]


def _pass_gbps(call, params: list[Param]) -> float:
    """GB/s of weights in one full pass of call(p) over params (the whole cold set: the same bytes
    as one bandwidth read)."""
    t = time.perf_counter()
    for p in params:
        call(p)
    return sum(p.nbytes for p in params) / (time.perf_counter() - t) / GB


HOT_PASS_BYTES = 64 << 20
HOT_PASS_CALLS = 4096  # at most: gemv_pass walks its list in Python


def hot_rows(row_bytes: int, rows: int, cols: int) -> int:
    """Rows of the hot matrix: as many of the shape's (`row_bytes` each, its scales included) as fill
    half of one core's L2 beside the activation (5 bytes a column: x and its int8 copy); 0 where one
    row does not fit (its rate would come from beyond the L2: no compute rate)."""
    return min(rows, max(0, (l2_cache_bytes() or L2_ASSUMED) // 2 - 5 * cols) // row_bytes)


class HotGemv:
    """One thread's GEMV on a matrix that stays in its core's L2 cache (`rows` of the shape's
    columns, hot_rows), called again and again (d2m_gemv_pass, per-call costs included).  Its rate
    is the kernel's compute rate on one core, the roof that memory is not: where it is not well
    above one thread's bandwidth, a cold GEMV cannot reach the bandwidth, however its loads are
    scheduled (t threads: t times it, where the cores do not share their compute)."""

    def __init__(self, fmt: str, rows: int, cols: int, path: str | None, offset: int):
        self.rows = rows
        w = random_matrices(fmt, rows, cols, 1, 3, offset)[0]
        self.ws, self.nbytes = [w] * min(HOT_PASS_CALLS, max(1, HOT_PASS_BYTES // w.nbytes)), w.nbytes
        self.x = np.random.default_rng(2).standard_normal((1, cols), dtype=np.float32)
        self.y = np.empty((1, rows), np.float32)
        self.kernels = ckernels.CKernels(path=path, threads=1)
        self.kernels.gemv_pass(self.y, self.ws, self.x)  # into the cache, and described once

    def rate(self) -> float:
        """GB/s of one pass."""
        return len(self.ws) * self.nbytes / self.kernels.gemv_pass(self.y, self.ws, self.x) / GB


def bench_gemv(fmt: str, rows: int, cols: int, threads: list[int], bandwidth: dict[int, Bandwidth], seconds: float,
               path: str | None, offset: int = 0) -> list[GemvRow]:
    """One format and shape on each thread count: for `seconds`, a bandwidth read then a pass of
    GEMVs over the cold set timed in C (CKernels.gemv_pass), alternately (Paired); then passes
    through the Python binding (a call each, as the forward pass makes them) and NumPy's passes
    over the same set.  After each cold pass, a pass of HotGemv: its median is the row's hot rate."""
    probe = random_matrices(fmt, rows, cols, 1, 0, offset)[0]
    count = max(2, math.ceil(cold_bytes() / probe.nbytes))
    params = [probe] + random_matrices(fmt, rows, cols, count - 1, 1, offset)
    total = sum(p.nbytes for p in params)
    x = np.random.default_rng(2).standard_normal((1, cols), dtype=np.float32)
    y = np.empty((1, rows), np.float32)
    n_hot = hot_rows(probe.nbytes // rows, rows, cols)  # every format's bytes are rows × a row's
    hot = HotGemv(fmt, n_hot, cols, path, offset) if n_hot else None
    out = []
    for t in threads:
        ck = ckernels.CKernels(path=path, threads=t)
        ck.gemv_pass(y, params, x)  # describe every matrix once, outside the timing
        hot_rates = []

        def cold_then_hot() -> float:
            rate = total / ck.gemv_pass(y, params, x) / GB
            if hot is not None:
                hot_rates.append(hot.rate())  # in the same seconds: this machine's compute rate varies too
            return rate

        c = paired(cold_then_hot, bandwidth[t], GB, seconds)
        py_gbps = _median_rate(lambda: _pass_gbps(lambda p: ck.gemv(y, p, x), params), seconds / 3)
        reference = NumpyKernels()
        with _blas_threads(t):
            np_gbps = _median_rate(lambda: _pass_gbps(lambda p: reference.linear(x, p), params), seconds / 3)
        out.append(GemvRow(fmt, f"{rows}x{cols}", t, c.rate, c.bandwidth, c.ratio, c.rate / np_gbps, np_gbps,
                           py_gbps, float(np.median(hot_rates)) if hot_rates else None, n_hot, ck.path, count,
                           total, offset, len(c.rates), c.spread))
    return out


def _median_rate(sample, seconds: float) -> float:
    """The median of sample() (a rate) taken for `seconds`, at least once."""
    start, rates = time.perf_counter(), []
    while not rates or time.perf_counter() - start < seconds:
        rates.append(sample())
    return float(np.median(rates))


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


def l2_note() -> str:
    l2 = l2_cache_bytes()
    return f"{l2 >> 10} KiB" if l2 else f"{L2_ASSUMED >> 10} KiB assumed: sysfs does not say"


def _fmt_gemv(r: GemvRow) -> str:
    q1, q3 = r.ratio_quartiles
    return (f"{r.format:10} {r.shape:>10} {r.threads:>3} {r.gbps:7.1f} {r.bandwidth_gbps:7.1f} "
            f"{100 * r.ratio_to_bandwidth:5.0f}% {f'{100 * q1:.0f}-{100 * q3:.0f}%':>9} {r.python_gbps:8.1f} "
            f"{r.numpy_gbps:10.2f} {r.ratio_to_numpy:8.1f} {'—' if r.hot_gbps is None else f'{r.hot_gbps:.1f}':>9}")


def main_gemv(args: argparse.Namespace) -> int:
    threads, shapes = _thread_counts(args.threads), _shapes(args.shapes)
    print(environment_note())
    bandwidth = {t: Bandwidth(t) for t in threads}
    print(page_note(bandwidth))
    print(f"cold working set: {cold_bytes() >> 20} MiB of distinct matrices per format and shape, each starting "
          f"{args.offset} bytes past a 64-byte boundary.  For {args.seconds:g} s per row, a bandwidth read and a pass "
          "of GEMVs over the set (timed in C, d2m_gemv_pass) in turn; medians, and % bw = the median of the per-pair "
          "ratios (its middle half beside it).  py GB/s: the same passes with a Python call per GEMV, as the forward "
          "pass makes them.  1-thr hot: one thread on a matrix kept in its core's L2 cache (the shape's columns, rows "
          f"filling up to half of the L2 beside x, {l2_note()}; — where one row does not fit), the kernel's compute "
          "rate on one core: a cold GEMV whose rate per thread is near it is compute-bound")
    print(f"\n{'format':10} {'shape':>10} {'thr':>3} {'GB/s':>7} {'bw GB/s':>7} {'% bw':>6} {'mid half':>9} "
          f"{'py GB/s':>8} {'numpy GB/s':>10} {'x numpy':>8} {'1-thr hot':>9}")
    rows_out: list[GemvRow] = []
    for fmt in args.formats.split(","):
        for rows, cols in shapes:
            for r in bench_gemv(fmt, rows, cols, threads, bandwidth, args.seconds, args.path, args.offset):
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


class TimedKernels:
    """Kernels that add up the seconds spent in their calls (linear, expert, experts_topk: every call
    the forward pass makes), so a decode step splits into the kernels and the Python around them.
    The wrapper's own cost (a call frame, two clock reads) counts as Python."""

    def __init__(self, kernels, clock=time.perf_counter):
        self.kernels, self.clock, self.seconds = kernels, clock, 0.0

    def _timed(self, fn, *args):
        t = self.clock()
        try:
            return fn(*args)
        finally:
            self.seconds += self.clock() - t

    def linear(self, x, w):
        return self._timed(self.kernels.linear, x, w)

    def expert(self, x, w):
        return self._timed(self.kernels.expert, x, w)

    def experts_topk(self, x, experts, topk_ids, topk_weights):
        return self._timed(self.kernels.experts_topk, x, experts, topk_ids, topk_weights)


def timed_decode(model, kernels, bandwidth: Bandwidth, per_token: int, steps: int) -> tuple[Paired, float]:
    """Paired decode steps (decode_steps, each after a bandwidth read) and the median share of a
    step spent inside the kernels' calls."""
    timed = TimedKernels(kernels)
    step, shares = decode_steps(model, timed), []

    def sample() -> float:
        before = timed.seconds
        rate = step()
        shares.append((timed.seconds - before) * rate)
        return rate

    return paired(sample, bandwidth, per_token, 0.0, steps), float(np.median(shares))


def decode_steps(model, kernels, prompt: int = 8):
    """A function running one more steady-state decode step (float32 compute) and returning its
    rate in tokens/s, after a `prompt`-token prefill and one untimed step."""
    from .model import forward
    ids = np.random.default_rng(0).integers(0, model.config.vocab_size, prompt)
    logits, cache = forward(model, ids, dtype=np.float32, kernels=kernels)
    state = [forward(model, [int(np.argmax(logits[-1]))], cache=cache, dtype=np.float32, kernels=kernels)]

    def step() -> float:
        logits, cache = state[0]
        token = int(np.argmax(logits[-1]))
        t = time.perf_counter()
        state[0] = forward(model, [token], cache=cache, dtype=np.float32, kernels=kernels)
        return 1.0 / (time.perf_counter() - t)

    return step


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
    print(page_note(bandwidth))
    print(f"model: Qwen2.5-0.5B shapes as a Dense2MoE, {args.groups} layers, {args.group_size} experts top-"
          f"{args.top_k}, vocab {args.vocab}, tied LM head (kept in the float storage by quantize); each format "
          f"written to a checkpoint and memory-mapped.  {args.tokens} decode steps on C ({args.numpy_tokens} on "
          "NumPy), each after a bandwidth read; medians, and % bound = the median of the per-step ratios of rate "
          "to bound (its middle half beside it); in kernels: the median share of a step inside the kernels' calls")
    print(f"\n{'format':10} {'kernels':>8} {'thr':>3} {'MB/token':>9} {'tok/s':>8} {'bw GB/s':>7} {'bound':>8} "
          f"{'% bound':>8} {'mid half':>9} {'in kernels':>10}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="d2m-bench-decode-", dir=args.dir) as work:
        for fmt, path in write_models(cfg_dict, formats, Path(work)):
            model = load_model(path)
            if model.config != cfg:
                raise InputError(f"{path}: the checkpoint's config is not the benchmark's")
            per_token = model_weight_bytes(model)
            for name, t in [("c", t) for t in threads] + [("numpy", max(threads))]:
                if name == "c":
                    d, share = timed_decode(model, ckernels.CKernels(path=args.path, threads=t), bandwidth[t],
                                            per_token, args.tokens)
                else:
                    with _blas_threads(t):
                        d, share = timed_decode(model, NumpyKernels(), bandwidth[t], per_token, args.numpy_tokens)
                bound = d.bandwidth * GB / per_token
                q1, q3 = d.spread
                rows.append({"format": fmt, "kernels": name, "threads": t, "bytes_per_token": per_token,
                             "tokens_per_s": d.rate, "bound_tokens_per_s": bound, "ratio_to_bound": d.ratio,
                             "ratio_quartiles": [q1, q3], "bandwidth_gbps": d.bandwidth, "steps": len(d.rates),
                             "kernel_share": share})
                print(f"{fmt:10} {name:>8} {t:>3} {per_token / 1e6:9.1f} {d.rate:8.2f} {d.bandwidth:7.1f} {bound:8.2f} "
                      f"{100 * d.ratio:7.0f}% {f'{100 * q1:.0f}-{100 * q3:.0f}%':>9} {100 * share:9.0f}%", flush=True)
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
    if kind == "gemv":
        parser.add_argument("--shapes", default=",".join(DEFAULT_SHAPES), help="comma-separated RxC")
        parser.add_argument("--seconds", type=float, default=3.0,
                            help="time of the paired bandwidth reads and GEMV passes per format, shape and thread "
                                 "count (default 3; at least 5 pairs)")
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
        parser.add_argument("--tokens", type=int, default=24, help="decode steps timed on C (default 24)")
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
