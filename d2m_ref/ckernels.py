"""The C kernels (c_src/, bound with cffi in out-of-line API mode): `CKernels`, the kernel
interface of d2m_ref/kernels.py on the C GEMV, fused expert and top-k calls.  spec/kernels.md.

- float32 compute only.  For float64 compute (the oracle mode) every call goes to the NumPy
  reference kernels, so forward(..., dtype=float64, kernels=CKernels()) is exactly the oracle.
  F64 weights, more than `max_tokens` tokens in one call (prefill: BLAS is the better GEMM), and
  weights the C side cannot take (misaligned, not contiguous) also take the NumPy path.
- Weights stay in their storage format (f32, f16, bf16, Q8, Q4G), memory-mapped: the C side reads
  them in place; nothing is expanded to float32.
- Python checks shape, dtype, contiguity and alignment before every call (the weight's once, when
  its C description is made and cached; the activation's every call), and the C side checks its
  pointers and sizes again and returns a status, which is turned into CKernelsError here.
- Threads: the row split of each call runs on a pthreads pool of `threads` (default: the
  D2M_THREADS environment variable, else every CPU this process may use); results do not depend
  on it.  Path: `path` (default: D2M_KERNEL_PATH, else the best one this CPU supports).

A CKernels holds a thread pool and per-thread scratch memory; one instance may be shared by
Python threads (C serialises the pool's jobs).
"""

from __future__ import annotations

import os
import threading
import warnings
import weakref

import numpy as np

from .errors import D2MError
from .kernels import NumpyKernels, experts_topk_loop
from .ops import swiglu
from .quant import group_of, is_quantized, part_specs
from .safetensors_io import DTYPES
from .weights import MLPWeights, Param

try:
    from ._d2m_kernels import ffi, lib
    IMPORT_ERROR: ImportError | None = None
except ImportError as exc:  # not built (no compiler at install time), or built for another Python
    ffi = lib = None
    IMPORT_ERROR = exc

THREADS_ENV = "D2M_THREADS"
PATH_ENV = "D2M_KERNEL_PATH"
DEFAULT_MAX_TOKENS = 16


class CKernelsError(D2MError):
    """The C kernels cannot be used as asked (not built, unknown path, bad thread count), or a
    C call failed a check (a bug in the binding: Python validates first)."""


def available() -> bool:
    """Whether the C extension is built and importable."""
    return lib is not None


_warned: set[str] = set()


def warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def unavailable_reason() -> str:
    return (f"the C kernels are not built ({IMPORT_ERROR}); using the NumPy kernels. Reinstall with a C "
            "compiler present (pip install -e .) to build them")


def _text(ptr) -> str:
    return ffi.string(ptr).decode() if ptr != ffi.NULL else ""


def compiled_paths() -> list[str]:
    """Paths compiled into the extension, best first."""
    return [_text(lib.d2m_path_name(i)) for i in range(lib.d2m_path_count())] if available() else []


def supported_paths() -> list[str]:
    """Compiled paths this CPU can run, best first (the first is the default)."""
    return [_text(lib.d2m_path_name(i)) for i in range(lib.d2m_path_count()) if lib.d2m_path_supported(i)] \
        if available() else []


def build_info(kernels: "CKernels | None" = None) -> dict:
    """How the extension was built and which path runs: compiler, flags, target, compiled and
    supported paths, the path chosen (for `kernels`, or the default), threads."""
    if not available():
        return {"built": False, "reason": str(IMPORT_ERROR), "path": "numpy"}
    default = os.environ.get(PATH_ENV) or (supported_paths() or ["scalar"])[0]
    return {"built": True, "compiler": _text(lib.d2m_build_compiler()), "flags": _text(lib.d2m_build_flags()),
            "target": _text(lib.d2m_build_target()), "compiled_paths": compiled_paths(),
            "supported_paths": supported_paths(),
            "path": kernels.path if kernels is not None else default,
            "threads": kernels.threads if kernels is not None else default_threads()}


def default_threads() -> int:
    """D2M_THREADS, else the CPUs this process may run on."""
    text = os.environ.get(THREADS_ENV)
    if text:
        try:
            n = int(text)
        except ValueError:
            n = 0
        if n < 1:
            raise CKernelsError(f"{THREADS_ENV}={text!r}: give a thread count >= 1")
        return n
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _check(status: int, what: str) -> None:
    if status != lib.D2M_OK:
        raise CKernelsError(f"{what}: the C kernel returned status {status} "
                            f"({_text(lib.d2m_status_message(status))})")


# ---------------------------------------------------------------------------------------------
# Weight descriptions (checked once per Param, then cached)

_FLOAT_FORMATS = {"F32": ("D2M_F32", np.dtype("<f4")), "F16": ("D2M_F16", np.dtype("<f2")),
                  "BF16": ("D2M_BF16", np.dtype("<u2"))}


class _Matrix:
    """A d2m_matrix for one Param, with the arrays and buffers it points into kept alive."""

    __slots__ = ("ptr", "rows", "cols", "keep")

    def __init__(self, ptr, rows: int, cols: int, keep: tuple):
        self.ptr, self.rows, self.cols, self.keep = ptr, rows, cols, keep


def _unusable(w: Param, why: str) -> None:
    warn_once(f"{w.name}:{why}", f"{w.name}: {why}; this weight takes the NumPy kernels")
    return None


def _checked(w: Param, arr: np.ndarray, dtype: np.dtype, shape: tuple[int, ...], part: str):
    """arr is exactly what the C side will read, or the reason it is not."""
    if arr.dtype != dtype or arr.shape != shape:
        return f"{part} is {arr.dtype} {list(arr.shape)}, expected {dtype} {list(shape)}"
    if not arr.flags.c_contiguous:
        return f"{part} is not C-contiguous"
    if not arr.flags.aligned:
        return f"{part} is not aligned to its {arr.dtype.itemsize}-byte elements"
    return None


def describe(w: Param) -> _Matrix | None:
    """The C description of a weight matrix, or None (with one warning) when C cannot take it."""
    if len(w.shape) != 2:
        return None
    rows, cols = w.shape
    if not (1 <= rows <= lib.D2M_MAX_DIM and 1 <= cols <= lib.D2M_MAX_DIM):
        return _unusable(w, f"shape {list(w.shape)} is beyond the C kernels' limit {lib.D2M_MAX_DIM}")
    if w.storage in _FLOAT_FORMATS:
        macro, dtype = _FLOAT_FORMATS[w.storage]
        data, scales, group = w.raw(), None, 0
        why = _checked(w, data, dtype, (rows, cols), "data")
    elif is_quantized(w.storage):
        (qdt, qshape), (sdt, sshape) = part_specs(w.storage, (rows, cols))
        macro, group = ("D2M_Q8", 0) if w.storage == "Q8" else ("D2M_Q4G", group_of(w.storage))
        data, scales = w.raw(), w.scales()
        why = _checked(w, data, DTYPES[qdt], qshape, "values") or _checked(w, scales, DTYPES[sdt], sshape, "scales")
    else:
        return None  # F64: NumPy
    if why:
        return _unusable(w, why)
    data_buf = ffi.from_buffer(data)
    scales_buf = ffi.from_buffer(scales) if scales is not None else ffi.NULL
    ptr = ffi.new("d2m_matrix *", {"format": getattr(lib, macro), "rows": rows, "cols": cols, "group": group,
                                   "data": data_buf, "scales": scales_buf})
    return _Matrix(ptr, rows, cols, (data, scales, data_buf, scales_buf))


class _MLP:
    __slots__ = ("ptr", "hidden", "width", "keep")

    def __init__(self, ptr, hidden: int, width: int, keep: tuple):
        self.ptr, self.hidden, self.width, self.keep = ptr, hidden, width, keep


class _ExpertSet:
    """The E experts of one MoE layer as one d2m_mlp[E] array (None when C cannot take one of
    them); `refs` are weak references to those experts, `scratch` caches bytes per k."""

    __slots__ = ("refs", "array", "hidden", "keep", "scratch")

    def __init__(self, experts, array, hidden: int, keep: tuple):
        self.refs = tuple(weakref.ref(e) for e in experts)
        self.array, self.hidden, self.keep = array, hidden, keep
        self.scratch: dict[int, int] = {}

    def describes(self, experts) -> bool:
        return len(self.refs) == len(experts) and all(r() is e for r, e in zip(self.refs, experts))


# ---------------------------------------------------------------------------------------------


class CKernels:
    """Kernels on the C extension; the interface of NumpyKernels (linear, expert, experts_topk)."""

    name = "c"

    def __init__(self, path: str | None = None, threads: int | None = None, max_tokens: int = DEFAULT_MAX_TOKENS):
        if not available():
            raise CKernelsError(unavailable_reason())
        threads = default_threads() if threads is None else int(threads)
        if not 1 <= threads <= lib.D2M_MAX_THREADS:
            raise CKernelsError(f"threads={threads}: give 1 to {lib.D2M_MAX_THREADS}")
        out = ffi.new("d2m_ctx **")
        status = lib.d2m_ctx_create(out, path.encode() if path else ffi.NULL, threads)
        if status == lib.D2M_ERR_PATH:
            asked = path or os.environ.get(PATH_ENV)
            raise CKernelsError(f"kernel path {asked!r} ({'argument' if path else PATH_ENV}) is not available: "
                                f"compiled {compiled_paths()}, supported by this CPU {supported_paths()}")
        _check(status, "creating the kernel context")
        self._ctx = ffi.gc(out[0], lib.d2m_ctx_destroy)
        self.path: str = _text(lib.d2m_ctx_path(self._ctx))
        self.threads: int = threads
        self.max_tokens = max_tokens
        self._numpy = NumpyKernels()
        self._matrices: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._mlps: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._expert_sets: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # first expert -> set
        self._local = threading.local()

    def __repr__(self) -> str:
        return f"CKernels(path={self.path!r}, threads={self.threads})"

    # -- helpers --------------------------------------------------------------------------------

    def _matrix(self, w: Param) -> _Matrix | None:
        try:
            return self._matrices[w]
        except KeyError:
            m = self._matrices[w] = describe(w)
            return m

    def _mlp(self, w: MLPWeights) -> _MLP | None:
        try:
            return self._mlps[w]
        except KeyError:
            pass
        gate, up, down = self._matrix(w.gate), self._matrix(w.up), self._matrix(w.down)
        mlp = None
        if gate is not None and up is not None and down is not None:
            ptr = ffi.new("d2m_mlp *", {"gate": gate.ptr[0], "up": up.ptr[0], "down": down.ptr[0]})
            mlp = _MLP(ptr, gate.cols, gate.rows, (gate, up, down))
        self._mlps[w] = mlp
        return mlp

    def _expert_set(self, experts) -> _ExpertSet:
        """A layer's experts described once (a decode step asks for them every layer), held weakly
        through the first expert so a dropped model takes its entry with it."""
        found = self._expert_sets.get(experts[0])
        if found is not None and found.describes(experts):
            return found
        mlps = [self._mlp(e) for e in experts]
        array, hidden = None, 0
        if all(m is not None for m in mlps):
            array = ffi.new("d2m_mlp[]", len(mlps))
            for i, m in enumerate(mlps):
                array[i] = m.ptr[0]
            hidden = mlps[0].hidden
        found = self._expert_sets[experts[0]] = _ExpertSet(experts, array, hidden, tuple(mlps))
        return found

    def _scratch(self, nbytes: int):
        buf = getattr(self._local, "scratch", None)
        if buf is None or buf[0].nbytes < nbytes:
            arr = np.empty(max(nbytes, 1 << 16), dtype=np.uint8)
            buf = self._local.scratch = (arr, ffi.from_buffer(arr, require_writable=True))
        return buf[1]

    @staticmethod
    def _input(x: np.ndarray, cols: int, what: str) -> np.ndarray:
        """x as the C side must see it: float32 [T, cols], C-contiguous, aligned."""
        if x.ndim != 2 or x.shape[1] != cols:
            raise ValueError(f"{what}: input has shape {list(x.shape)}, expected [T, {cols}]")
        if not (x.flags.c_contiguous and x.flags.aligned):
            x = np.ascontiguousarray(x).copy()
        return x

    def _c_path(self, x: np.ndarray) -> bool:
        return x.dtype == np.float32 and 1 <= x.shape[0] <= self.max_tokens

    # -- the interface --------------------------------------------------------------------------

    def linear(self, x: np.ndarray, w: Param) -> np.ndarray:
        """[T, C], weight [R, C] -> [T, R]: x·Wᵀ."""
        m = self._matrix(w) if self._c_path(x) else None
        if m is None:
            return self._numpy.linear(x, w)
        x = self._input(x, m.cols, w.name)
        T = x.shape[0]
        y = np.empty((T, m.rows), dtype=np.float32)
        need = lib.d2m_gemv_scratch_bytes(m.ptr, T)
        _check(lib.d2m_gemv(ffi.from_buffer("float[]", y, require_writable=True), m.ptr,
                            ffi.from_buffer("float[]", x), T, 1.0, 0, self._scratch(need), need, self._ctx),
               f"gemv {w.name}")
        return y

    def expert(self, x: np.ndarray, w: MLPWeights) -> np.ndarray:
        """[T, H] -> [T, H]: down(silu(gate·x) ⊙ up·x), spec §4.1 (one fused C call)."""
        mlp = self._mlp(w) if self._c_path(x) else None
        if mlp is None:
            if x.dtype != np.float32:
                return self._numpy.expert(x, w)
            return self.linear(swiglu(self.linear(x, w.gate), self.linear(x, w.up)), w.down)
        x = self._input(x, mlp.hidden, w.gate.name)
        T = x.shape[0]
        y = np.empty((T, mlp.hidden), dtype=np.float32)
        need = lib.d2m_expert_scratch_bytes(mlp.ptr, T)
        _check(lib.d2m_expert(ffi.from_buffer("float[]", y, require_writable=True), mlp.ptr,
                              ffi.from_buffer("float[]", x), T, ffi.NULL, 0, self._scratch(need), need, self._ctx),
               f"expert {w.gate.name}")
        return y

    def experts_topk(self, x: np.ndarray, experts, topk_ids: np.ndarray, topk_weights: np.ndarray) -> np.ndarray:
        """[T, H], E experts, [T, K], [T, K] -> [T, H]: Σ_k topk_weights[t, k] · expert_{topk_ids[t, k]}(x[t]).

        One token: one C call for its K experts, added in increasing expert id (the reference's
        order), bit-identical to the reference loop over this class's `expert`.  More tokens:
        that loop."""
        if x.dtype != np.float32 or x.shape[0] != 1 or not experts:
            return experts_topk_loop(self if x.dtype == np.float32 else self._numpy, x, experts, topk_ids, topk_weights)
        topk_ids, topk_weights = np.asarray(topk_ids), np.asarray(topk_weights)
        if topk_ids.ndim != 2 or topk_ids.shape[0] != 1 or topk_weights.shape != topk_ids.shape:
            raise ValueError(f"experts_topk: one token's ids and weights must both be [1, K], found "
                             f"{list(topk_ids.shape)} and {list(topk_weights.shape)}")
        k = topk_ids.shape[1]
        group = self._expert_set(experts)
        if group.array is None or not 1 <= k <= lib.D2M_MAX_TOPK:
            return experts_topk_loop(self, x, experts, topk_ids, topk_weights)
        # increasing expert id, the reference loop's order; C refuses ids outside 0..E-1
        chosen = sorted(zip(topk_ids[0].tolist(), topk_weights[0].astype(np.float32).tolist()))
        ids = ffi.new("int32_t[]", [e for e, _ in chosen])
        weights = ffi.new("float[]", [w for _, w in chosen])
        need = group.scratch.get(k)
        if need is None:
            need = group.scratch[k] = lib.d2m_topk_scratch_bytes(group.array, len(experts), k)
        x = self._input(x, group.hidden, "experts_topk")
        y = np.empty((1, group.hidden), dtype=np.float32)
        _check(lib.d2m_experts_topk(ffi.from_buffer("float[]", y, require_writable=True), group.array, len(experts),
                                    ids, weights, k, ffi.from_buffer("float[]", x), self._scratch(need), need,
                                    self._ctx), "experts_topk")
        return y

    # -- for tests and benchmarks ---------------------------------------------------------------

    def tune(self, parallel_min_bytes: int, chunk_bytes: int) -> None:
        """How calls are split over threads (never what they compute): calls reading fewer weight
        bytes than parallel_min_bytes stay on the calling thread; chunks of about chunk_bytes (0: by
        matrix size, the default, spec/kernels.md §7)."""
        _check(lib.d2m_ctx_tune(self._ctx, int(parallel_min_bytes), int(chunk_bytes)), "tune")

    def gemv(self, y: np.ndarray, w: Param, x: np.ndarray, alpha: float = 1.0, accumulate: bool = False) -> None:
        """y [T, R] (=|+=) alpha · x·Wᵀ on the C path, whatever the size; raises if C cannot take w."""
        m = self._matrix(w)
        if m is None:
            raise CKernelsError(f"{w.name}: storage {w.storage} is not a C kernel format")
        if x.dtype != np.float32 or y.dtype != np.float32:
            raise ValueError("gemv: x and y must be float32")
        x = self._input(x, m.cols, w.name)
        T = x.shape[0]
        if y.shape != (T, m.rows) or not (y.flags.c_contiguous and y.flags.aligned and y.flags.writeable):
            raise ValueError(f"gemv: y must be a writable contiguous float32 [{T}, {m.rows}]")
        need = lib.d2m_gemv_scratch_bytes(m.ptr, T)
        _check(lib.d2m_gemv(ffi.from_buffer("float[]", y, require_writable=True), m.ptr, ffi.from_buffer("float[]", x),
                            T, float(alpha), int(accumulate), self._scratch(need), need, self._ctx), f"gemv {w.name}")

    def gemv_pass(self, y: np.ndarray, ws: list[Param], x: np.ndarray) -> float:
        """Seconds for y [1, R] = x [1, C]·Wᵀ over every W of ws (all [R, C]) in turn, timed in C
        (d2m_gemv_pass): each a full d2m_gemv call, without the binding's per-call cost."""
        ms = [self._matrix(w) for w in ws]
        if not ms:
            raise ValueError("gemv_pass: no matrices")
        for w, m in zip(ws, ms):
            if m is None:
                raise CKernelsError(f"{w.name}: storage {w.storage} is not a C kernel format")
            if (m.rows, m.cols) != (ms[0].rows, ms[0].cols):
                raise ValueError(f"gemv_pass: {w.name} is [{m.rows}, {m.cols}], {ws[0].name} "
                                 f"[{ms[0].rows}, {ms[0].cols}]: one shape per pass")
        if x.dtype != np.float32 or y.dtype != np.float32:
            raise ValueError("gemv_pass: x and y must be float32")
        x = self._input(x, ms[0].cols, "gemv_pass")
        if x.shape[0] != 1 or y.shape != (1, ms[0].rows) or not (y.flags.c_contiguous and y.flags.writeable):
            raise ValueError(f"gemv_pass: x must be [1, {ms[0].cols}] and y a writable contiguous [1, {ms[0].rows}]")
        structs = ffi.new("d2m_matrix[]", len(ms))
        for i, m in enumerate(ms):
            structs[i] = m.ptr[0]
        need = max(lib.d2m_gemv_scratch_bytes(m.ptr, 1) for m in ms)
        seconds = ffi.new("double *")
        _check(lib.d2m_gemv_pass(seconds, ffi.from_buffer("float[]", y, require_writable=True), structs, len(ms),
                                 ffi.from_buffer("float[]", x), self._scratch(need), need, self._ctx), "gemv_pass")
        return float(seconds[0])

    def stream_read(self, buf: np.ndarray) -> int:
        """Read every byte of buf (64-byte aligned, a multiple of 64 bytes) with this path's loads
        on this context's threads; returns a checksum."""
        out = ffi.new("uint64_t *")
        _check(lib.d2m_stream_read(out, ffi.from_buffer(buf), buf.nbytes, self._ctx), "stream_read")
        return int(out[0])


def quantize_activations_c(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The C activation quantisation of one row x float32 [C] (tests compare it with
    d2m_ref.quant.quantize_activations)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    cols = x.shape[0]
    nb = -(-cols // 32)
    xq = np.empty(nb * 32, dtype=np.int8)
    xd = np.empty(nb, dtype=np.float32)
    _check(lib.d2m_quantize_act(ffi.from_buffer("int8_t[]", xq, require_writable=True),
                                ffi.from_buffer("float[]", xd, require_writable=True),
                                ffi.from_buffer("float[]", x), cols), "quantize_act")
    return xq, xd
