"""Quantised weights, spec/quant.md: the Q8 and Q4G formats, how a float matrix is quantised, and
the NumPy dequantisation that is the reference every kernel is checked against.

    Q8       int8 q [R, C], one float32 scale per output row s [R]:       w[r, c] = q[r, c] · s[r]
    Q4G{G}   4-bit, symmetric, one float16 scale per group of G = 32, 64 or 128 columns of a row;
             packed uint8 [R, 16·⌈C/32⌉], scales float16 [R, ⌈C/G⌉]:     w[r, c] = (n[r, c] − 8) · s[r, c // G]

Also the activation quantisation of the C integer kernels (spec/kernels.md §3) as a NumPy twin
of c_src/quant_act.c, bit for bit, and the exact arithmetic of a quantised GEMV, for the tests.
Storage names (Param.storage): "Q8", "Q4G32", "Q4G64", "Q4G128".
"""

from __future__ import annotations

import json
from collections.abc import Mapping

import numpy as np

from .errors import WeightsError

QBLOCK = 32  # Q4 packing block and activation quantisation block
Q4_GROUPS = (32, 64, 128)
FORMATS = {"int8": "Q8", "int4-g32": "Q4G32", "int4-g64": "Q4G64", "int4-g128": "Q4G128"}  # CLI name -> storage
STORAGE = tuple(FORMATS.values())
Q8_MAX, Q4_MAX = 127, 7  # symmetric ranges the quantiser writes: [-127, 127] and [-7, 7]

METADATA_KEY = "quantization"  # safetensors __metadata__ key of a quantised checkpoint (spec/quant.md §4)
QUANT_VERSION = "1"


def is_quantized(storage: str) -> bool:
    return storage in STORAGE


def group_of(storage: str) -> int:
    """Q4G{G} -> G; Q8 -> 0."""
    if storage == "Q8":
        return 0
    if storage in STORAGE:
        return int(storage[3:])
    raise ValueError(f"{storage!r} is not a quantised storage ({', '.join(STORAGE)})")


def blocks(cols: int) -> int:
    """⌈cols / 32⌉."""
    return -(-cols // QBLOCK)


def n_groups(cols: int, group: int) -> int:
    return -(-cols // group)


def part_names(name: str, storage: str) -> tuple[str, str]:
    """Checkpoint names of a quantised weight's two tensors: 'X.weight' -> ('X.weight.q4g128', 'X.weight.q4g128.scale')."""
    q = f"{name}.{storage.lower()}"
    return q, f"{q}.scale"


def part_specs(storage: str, shape: tuple[int, int]) -> tuple[tuple[str, tuple[int, ...]], tuple[str, tuple[int, ...]]]:
    """(safetensors dtype, shape) of the quantised tensor and of its scales, for a [R, C] weight."""
    rows, cols = shape
    if storage == "Q8":
        return ("I8", (rows, cols)), ("F32", (rows,))
    group = group_of(storage)
    return ("U8", (rows, 16 * blocks(cols))), ("F16", (rows, n_groups(cols, group)))


def storage_nbytes(storage: str, shape: tuple[int, ...]) -> int:
    (_, qshape), (sdt, sshape) = part_specs(storage, tuple(shape))
    return int(np.prod(qshape)) + int(np.prod(sshape)) * (4 if sdt == "F32" else 2)


# ---------------------------------------------------------------------------------------------
# Quantising (spec/quant.md §2–§3)


def _finite_matrix(w: np.ndarray, what: str) -> np.ndarray:
    w = np.asarray(w, dtype=np.float64)
    if w.ndim != 2:
        raise WeightsError(f"{what}: only matrices are quantised, found shape {list(w.shape)}")
    bad = np.argwhere(~np.isfinite(w))
    if bad.size:
        r, c = bad[0]
        raise WeightsError(f"{what}: element [{r}, {c}] is {w[r, c]}: a non-finite weight cannot be quantised")
    return w


def quantize_q8(w: np.ndarray, what: str = "weight") -> tuple[np.ndarray, np.ndarray]:
    """[R, C] float -> q int8 [R, C], s float32 [R].  s = fl32(max|w_r| / 127); q = clamp(rint(w / s), ±127);
    a row whose scale is 0 is all zeros.  Arithmetic in float64 (rint: round half to even)."""
    w = _finite_matrix(w, what)
    scale = (np.max(np.abs(w), axis=1) / Q8_MAX).astype(np.float32)
    return _round(w, scale.astype(np.float64)[:, None], Q8_MAX).astype(np.int8), scale


def quantize_q4(w: np.ndarray, group: int, what: str = "weight") -> tuple[np.ndarray, np.ndarray]:
    """[R, C] float -> packed uint8 [R, 16·⌈C/32⌉], scales float16 [R, ⌈C/G⌉].
    Per group: s = fl16(max|w| / 7); q = clamp(rint(w / s), ±7); then packed (pack_q4)."""
    if group not in Q4_GROUPS:
        raise ValueError(f"group {group}: Q4G allows {Q4_GROUPS}")
    w = _finite_matrix(w, what)
    rows, cols = w.shape
    ng = n_groups(cols, group)
    padded = np.zeros((rows, ng * group))
    padded[:, :cols] = w
    grouped = padded.reshape(rows, ng, group)
    with np.errstate(over="ignore"):
        scale = (np.max(np.abs(grouped), axis=2) / Q4_MAX).astype(np.float16)
    if not np.all(np.isfinite(scale)):
        r, g = np.argwhere(~np.isfinite(scale))[0]
        raise WeightsError(f"{what}: row {r}, group {g} has max |w| = {np.max(np.abs(grouped[r, g]))}, "
                           f"beyond 7 · 65504: its float16 scale would overflow")
    q = _round(grouped, scale.astype(np.float64)[:, :, None], Q4_MAX).reshape(rows, ng * group)[:, :cols]
    return pack_q4(q.astype(np.int8)), scale


def _round(w: np.ndarray, scale: np.ndarray, limit: int) -> np.ndarray:
    """clamp(rint(w / scale), ±limit), 0 where scale == 0."""
    safe = np.where(scale > 0, scale, 1.0)
    return np.where(scale > 0, np.clip(np.rint(w / safe), -limit, limit), 0.0)


def quantize(w: np.ndarray, storage: str, what: str = "weight") -> tuple[np.ndarray, np.ndarray]:
    """float [R, C] -> (quantised tensor, scales) of `storage`, as written to a checkpoint."""
    if storage == "Q8":
        return quantize_q8(w, what)
    return quantize_q4(w, group_of(storage), what)


def pack_q4(values: np.ndarray) -> np.ndarray:
    """int [R, C] in [-8, 7] -> uint8 [R, 16·⌈C/32⌉].  Per block of 32 columns, 16 bytes: byte j holds
    column 32b+j in its low nibble and column 32b+j+16 in its high nibble; nibble = value + 8;
    columns past C are value 0 (nibble 8)."""
    values = np.asarray(values)
    rows, cols = values.shape
    if values.size and (values.min() < -8 or values.max() > 7):
        raise ValueError("pack_q4: values must lie in [-8, 7]")
    nb = blocks(cols)
    nibbles = np.full((rows, nb * QBLOCK), 8, dtype=np.uint8)
    nibbles[:, :cols] = (values + 8).astype(np.uint8)
    nibbles = nibbles.reshape(rows, nb, QBLOCK)
    return (nibbles[:, :, :16] | (nibbles[:, :, 16:] << 4)).reshape(rows, nb * 16)


def unpack_q4(packed: np.ndarray, cols: int) -> np.ndarray:
    """uint8 [..., 16·⌈C/32⌉] -> int8 [..., C] in [-8, 7] (the inverse of pack_q4)."""
    packed = np.asarray(packed)
    lead, nb = packed.shape[:-1], blocks(cols)
    if packed.shape[-1] != 16 * nb:
        raise ValueError(f"unpack_q4: {packed.shape[-1]} bytes per row, {cols} columns need {16 * nb}")
    p = packed.reshape(*lead, nb, 16)
    nibbles = np.concatenate([p & 0x0F, p >> 4], axis=-1).reshape(*lead, nb * QBLOCK)[..., :cols]
    return nibbles.astype(np.int8) - np.int8(8)


# ---------------------------------------------------------------------------------------------
# Dequantising: the reference (spec/quant.md §2–§3)


def dequantize(storage: str, q: np.ndarray, scales: np.ndarray, cols: int, dtype) -> np.ndarray:
    """Quantised rows [..., *] and their scales -> [..., C] in dtype (float32 or float64).

    The value is the exact product q · s rounded once to dtype: exact in float64 for both formats
    and in float32 for Q4G (4-bit × 11-bit significands); Q8 in float32 is the correctly rounded
    float32 product."""
    dtype = np.dtype(dtype)
    if dtype not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise ValueError(f"dequantize: dtype must be float32 or float64, got {dtype}")
    if storage == "Q8":
        return q.astype(dtype) * scales.astype(dtype)[..., None]
    group = group_of(storage)
    values = unpack_q4(q, cols).astype(dtype)
    per_column = np.repeat(scales.astype(dtype), group, axis=-1)[..., :cols]
    return values * per_column


# ---------------------------------------------------------------------------------------------
# The C integer kernels' arithmetic (spec/kernels.md §3), for tests and the spec


def quantize_activations(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """x float32 [T, C] -> xq int8 [T, 32·⌈C/32⌉] (zero padded), d float32 [T, ⌈C/32⌉].

    Per block of 32: amax = max |x|; a non-finite element makes d = NaN, q = 0; amax = 0 or
    127/amax overflowing float32 makes d = 0, q = 0; else q = clamp(rint(x · (127/amax)), ±127) and
    d = amax / 127, in float32.  The twin of c_src/quant_act.c, bit for bit."""
    x = np.asarray(x, dtype=np.float32)
    T, C = x.shape
    nb = blocks(C)
    padded = np.zeros((T, nb * QBLOCK), dtype=np.float32)
    padded[:, :C] = x
    blk = padded.reshape(T, nb, QBLOCK)
    finite = np.all(np.isfinite(blk), axis=-1)
    with np.errstate(all="ignore"):
        amax = np.max(np.where(np.isfinite(blk), np.abs(blk), np.float32(0)), axis=-1)
        inv = np.float32(127) / amax
        ok = finite & np.isfinite(inv)
        d = np.where(ok, amax / np.float32(127), np.where(finite, np.float32(0), np.float32(np.nan)))
        q = np.where(ok[..., None], np.clip(np.rint(blk * inv[..., None]), -127, 127), 0)
    return q.astype(np.int8).reshape(T, nb * QBLOCK), d.astype(np.float32)


def integer_gemv(storage: str, q: np.ndarray, scales: np.ndarray, cols: int, x: np.ndarray) -> np.ndarray:
    """What the C integer kernels compute, in exact integer and float64 arithmetic: x [T, C] -> [T, R]

        y[t, r] = Σ_b scale(r, b) · d[t, b] · isum[t, r, b],  isum = Σ_{c ∈ b} w_int[r, c] · xq[t, c]

    with scale(r, b) = s[r] for Q8, s[r, b·32 // G] for Q4G.  The C paths differ from this only by
    rounding the float sum (spec/kernels.md §4)."""
    xq, d = quantize_activations(x)
    rows = q.shape[0]
    nb = blocks(cols)
    w_int = np.zeros((rows, nb * QBLOCK), dtype=np.int64)
    w_int[:, :cols] = q if storage == "Q8" else unpack_q4(q, cols)
    isum = np.einsum("rbk,tbk->trb", w_int.reshape(rows, nb, QBLOCK), xq.astype(np.int64).reshape(-1, nb, QBLOCK))
    if storage == "Q8":
        scale = np.repeat(scales.astype(np.float64)[:, None], nb, axis=1)
    else:
        per_block = np.arange(nb) * QBLOCK // group_of(storage)
        scale = scales.astype(np.float64)[:, per_block]
    return np.einsum("trb,rb,tb->tr", isum.astype(np.float64), scale, d.astype(np.float64))


# ---------------------------------------------------------------------------------------------
# Quantising a model (spec/quant.md §5)

QUANTIZED_SUFFIXES = ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
                      "self_attn.o_proj.weight", "gate_proj.weight", "up_proj.weight", "down_proj.weight")


def should_quantize(name: str) -> bool:
    """Whether `python -m d2m_ref.quantize` quantises a tensor of this canonical name (spec/quant.md §5)."""
    return name.endswith(QUANTIZED_SUFFIXES)


def quantize_param(name: str, p, storage: str) -> tuple[np.ndarray, np.ndarray]:
    """A float Param -> (values, scales) of `storage`; an error for a Param already quantised."""
    if is_quantized(p.storage):
        raise WeightsError(f"{name} is already quantised ({p.storage}): quantise from the float checkpoint")
    return quantize(p.load(np.float64), storage, what=name)


# ---------------------------------------------------------------------------------------------
# Checkpoint metadata (spec/quant.md §4)


def metadata_value(storage: str, fmt: str, command: str) -> str:
    return json.dumps({"quant_version": QUANT_VERSION, "format": fmt, "storage": storage,
                       "spec": "spec/quant.md", "command": command}, sort_keys=True)


def check_metadata(metadata: Mapping[str, str], where: str) -> str | None:
    """The storage a quantised checkpoint says it holds (None for a float checkpoint); an error for a
    quant_version this d2m_ref does not read."""
    text = metadata.get(METADATA_KEY)
    if text is None:
        return None
    try:
        info = json.loads(text)
        version = str(info["quant_version"])
        storage = info["storage"]
    except (ValueError, KeyError, TypeError):
        raise WeightsError(f"{where}: __metadata__['{METADATA_KEY}'] is not the JSON object "
                           f"python -m d2m_ref.quantize writes: {text[:200]!r}") from None
    if version != QUANT_VERSION:
        raise WeightsError(f"{where}: quantised with quant_version {version}; this d2m_ref reads version "
                           f"{QUANT_VERSION}: re-run python -m d2m_ref.quantize on the float checkpoint")
    if storage not in STORAGE:
        raise WeightsError(f"{where}: __metadata__['{METADATA_KEY}'] names storage {storage!r}, "
                           f"not one of {', '.join(STORAGE)}")
    return storage
