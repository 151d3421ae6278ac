"""Read and write safetensors files: lazy, zero-copy, memory-mapped, with named errors.

Format (https://github.com/huggingface/safetensors, "Format"): an 8-byte little-endian u64
header length N, then N bytes of UTF-8 JSON

    {name: {"dtype": "F32", "shape": [2, 3], "data_offsets": [begin, end]}, ...,
     "__metadata__": {str: str}}

then the data buffer; offsets are relative to its start.

We parse the format ourselves instead of using the `safetensors` package because we need
memory-mapped views of bfloat16 tensors (NumPy has no bf16: we hand out the raw uint16 bits
and convert with `to_float`) and errors that name the file and tensor at fault.

Reading: `SafetensorsFile` (one file) and `Checkpoint` (one file or a sharded set with a
`model.safetensors.index.json`). `raw(name)` returns a read-only view of the mapped bytes; pages
are read from disk only when touched.

Writing: `save` (arrays in memory) and `save_streaming` (tensors produced one at a time). Both
write a temporary file beside the target and rename it into place.
"""

from __future__ import annotations

import difflib
import json
import math
import mmap
import os
import pathlib
import struct
from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np

from d2m_ref.errors import WeightsError
from d2m_ref.files import atomic_write, require_regular

DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),  # raw bfloat16 bits: NumPy has no bfloat16
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"),
    "U32": np.dtype("<u4"),
    "U16": np.dtype("<u2"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}

# NumPy dtype -> safetensors string when writing without an explicit dtype; uint16 means U16
# (bf16 bits must be declared "BF16" in `dtypes=`).
_DTYPE_NAMES: dict[np.dtype, str] = {dt: name for name, dt in DTYPES.items() if name != "BF16"}

MAX_HEADER_BYTES = 100_000_000  # the reference implementation's own limit; real headers are < 10 MB
DATA_ALIGN = 64  # what save / save_streaming align the data section and whole-line tensors to
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"

# Elements per block when widening bf16 to float64, so the uint32 temporary stays small (16 MiB)
# however large the matrix.
_BF16_BLOCK_ELEMENTS = 1 << 22


# --------------------------------------------------------------------------- reading: header


def _no_duplicate_keys(path: pathlib.Path) -> Callable[[list[tuple[str, object]]], dict]:
    """object_pairs_hook for json.loads that rejects repeated keys (json would keep the last)."""

    def hook(pairs: list[tuple[str, object]]) -> dict:
        result: dict = {}
        for key, value in pairs:
            if key in result:
                raise WeightsError(f"{path}: header names {key!r} twice")
            result[key] = value
        return result

    return hook


def _read_header(path: pathlib.Path, f, file_size: int) -> tuple[dict, int]:
    """Read and parse the JSON header of an open file -> (header dict, data section start)."""
    if file_size < 8:
        raise WeightsError(
            f"{path}: file has {file_size} bytes, but a safetensors file starts with an "
            f"8-byte header length"
        )
    (header_len,) = struct.unpack("<Q", f.read(8))
    # Both checks come before reading, so a corrupt length cannot make us allocate gigabytes.
    if header_len > MAX_HEADER_BYTES:
        raise WeightsError(
            f"{path}: header length {header_len} exceeds the {MAX_HEADER_BYTES}-byte limit "
            f"(corrupt file or not safetensors)"
        )
    if 8 + header_len > file_size:
        raise WeightsError(
            f"{path}: header length {header_len} needs {8 + header_len} bytes but the file has "
            f"only {file_size} (truncated or not safetensors)"
        )
    raw_header = f.read(header_len)
    try:
        text = raw_header.decode("utf-8")
    except UnicodeDecodeError as e:
        raise WeightsError(f"{path}: header is not valid UTF-8 ({e})") from None
    try:
        header = json.loads(text, object_pairs_hook=_no_duplicate_keys(path))
    except (ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError
        raise WeightsError(f"{path}: header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise WeightsError(f"{path}: header is a JSON {type(header).__name__}, expected an object")
    return header, 8 + header_len


def _is_int(x: object) -> bool:
    """An integer size (bool is an int subclass in Python, but `true` is not a size)."""
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _unknown_dtype(path: pathlib.Path, name: str, dtype: object) -> str:
    return f"{path}: tensor {name!r}: unknown dtype {dtype!r}, expected one of {sorted(DTYPES)}"


def _parse_metadata(path: pathlib.Path, meta: object) -> dict[str, str]:
    """The __metadata__ value -> dict[str, str]."""
    if not isinstance(meta, dict):
        raise WeightsError(
            f"{path}: __metadata__ is a JSON {type(meta).__name__}, expected an object of strings"
        )
    for key, value in meta.items():
        if not isinstance(value, str):
            raise WeightsError(
                f"{path}: __metadata__[{key!r}] is {value!r}, expected a string"
            )
    return dict(meta)


def _parse_entry(
    path: pathlib.Path, name: str, entry: object
) -> tuple[str, tuple[int, ...], int, int]:
    """One header entry -> (dtype string, shape, begin, end), checked for types and size."""
    where = f"{path}: tensor {name!r}"
    if not isinstance(entry, dict):
        raise WeightsError(f"{where}: entry is a JSON {type(entry).__name__}, expected an object")
    for key in ("dtype", "shape", "data_offsets"):
        if key not in entry:
            raise WeightsError(f"{where}: entry has no {key!r} (keys: {sorted(entry)})")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise WeightsError(_unknown_dtype(path, name, dtype))
    if not isinstance(shape, list) or not all(_is_int(d) for d in shape):
        raise WeightsError(f"{where}: shape is {shape!r}, expected a list of integers")
    if any(d < 0 for d in shape):
        raise WeightsError(f"{where}: shape {shape} has a negative dimension")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)):
        raise WeightsError(f"{where}: data_offsets is {offsets!r}, expected [begin, end] integers")
    begin, end = offsets
    if not 0 <= begin <= end:
        raise WeightsError(f"{where}: data_offsets {offsets} are not 0 <= begin <= end")
    needed = math.prod(shape) * DTYPES[dtype].itemsize
    if end - begin != needed:
        raise WeightsError(
            f"{where}: data_offsets {offsets} span {end - begin} bytes but shape {shape} of "
            f"{dtype} needs {needed}"
        )
    return dtype, tuple(shape), begin, end


class _Entry:
    """Where one tensor lives in a file."""

    __slots__ = ("dtype", "shape", "begin", "end")

    def __init__(self, dtype: str, shape: tuple[int, ...], begin: int, end: int):
        self.dtype, self.shape, self.begin, self.end = dtype, shape, begin, end


def _parse_entries(path: pathlib.Path, header: dict, data_size: int) -> dict[str, _Entry]:
    """Header object -> {name: _Entry} sorted by offset, checked against data_size bytes of data."""
    entries: dict[str, _Entry] = {}
    for name, value in header.items():
        if name == "__metadata__":
            continue
        dtype, shape, begin, end = _parse_entry(path, name, value)
        if end > data_size:
            raise WeightsError(
                f"{path}: truncated: tensor {name!r} needs bytes up to {end} but the data section "
                f"has only {data_size}"
            )
        entries[name] = _Entry(dtype, shape, begin, end)
    ordered = sorted(entries.items(), key=lambda item: (item[1].begin, item[1].end))
    _check_layout(path, ordered, data_size)
    return dict(ordered)


def _check_layout(path: pathlib.Path, ordered: list[tuple[str, _Entry]], data_size: int) -> None:
    """Tensors sorted by offset must tile the data section: no two share bytes, and no byte belongs to
    none (the format forbids holes: a hole before, between or after the tensors is data no tensor
    names, which a truncated or spliced file leaves).  Zero-size tensors own no bytes."""
    prev_name, prev_end = None, 0
    for name, e in ordered:
        if e.begin == e.end:
            continue
        if e.begin < prev_end:
            raise WeightsError(
                f"{path}: tensors {prev_name!r} (ends at {prev_end}) and {name!r} (starts at "
                f"{e.begin}) overlap"
            )
        if e.begin > prev_end:
            where = f"after tensor {prev_name!r}" if prev_name is not None else "before the first tensor"
            raise WeightsError(f"{path}: bytes {prev_end}..{e.begin} of the data section, {where}, belong to no "
                               "tensor (the safetensors format allows no holes)")
        prev_name, prev_end = name, e.end
    if prev_end != data_size:
        raise WeightsError(f"{path}: the data section has {data_size - prev_end} byte(s) after the last tensor "
                           f"({prev_name!r}, ends at {prev_end}) that belong to no tensor (the safetensors format "
                           "allows no holes)")


# --------------------------------------------------------------------------- reading: files


class SafetensorsFile:
    """One .safetensors file opened read-only with a memory map, validated on open."""

    def __init__(self, path: str | os.PathLike):
        self.path = pathlib.Path(path)
        require_regular(self.path, "weights", WeightsError)  # a FIFO would block open() forever
        try:
            # The descriptor stays open: raw() re-checks the file size before handing out a view,
            # because touching mapped pages of a file truncated since opening kills the process
            # with SIGBUS instead of raising.
            self._file = open(self.path, "rb")
        except OSError as e:
            raise WeightsError(f"{self.path}: cannot read ({e.strerror or e})") from None
        try:
            f = self._file
            file_size = os.fstat(f.fileno()).st_size
            header, data_start = _read_header(self.path, f, file_size)
            self.metadata = _parse_metadata(self.path, header.get("__metadata__", {}))
            self._entries = _parse_entries(self.path, header, file_size - data_start)
            # The map covers the whole file (>= 8 bytes, so never the illegal empty map).
            try:
                self._mmap: mmap.mmap | None = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            except OSError as e:
                raise WeightsError(
                    f"{self.path}: cannot memory-map its {file_size / 2**30:.2f} GiB ({e.strerror or e}): "
                    "the process's address space (ulimit -v) or the system's memory map limit is too "
                    "small for this checkpoint") from None
        except OSError as e:
            self._file.close()
            raise WeightsError(f"{self.path}: cannot read ({e.strerror or e})") from None
        except BaseException:
            self._file.close()
            raise
        self._data_start = data_start

    def names(self) -> list[str]:
        """Tensor names in file order (by data offset)."""
        return list(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def _entry(self, name: str) -> _Entry:
        try:
            return self._entries[name]
        except KeyError:
            raise WeightsError(_unknown_name_message(self.path, name, self._entries)) from None

    def dtype(self, name: str) -> str:
        """Safetensors dtype string of `name`, e.g. "BF16"."""
        return self._entry(name).dtype

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entry(name).shape

    def raw(self, name: str) -> np.ndarray:
        """Read-only zero-copy view of `name`: its shape, storage dtype (BF16 -> uint16 bits)."""
        e = self._entry(name)
        if self._mmap is None:
            raise WeightsError(f"{self.path}: file is closed (reading tensor {name!r})")
        now = os.fstat(self._file.fileno()).st_size
        if now < self._data_start + e.end:
            raise WeightsError(f"{self.path}: truncated while in use: tensor {name!r} needs bytes up to "
                               f"{self._data_start + e.end} but the file now has {now}")
        dtype = DTYPES[e.dtype]
        # frombuffer, not np.ndarray(buffer=...): it holds a buffer export on the mmap, so
        # mmap.close() cannot unmap pages a live array still points to.
        flat = np.frombuffer(
            self._mmap, dtype=dtype, count=math.prod(e.shape), offset=self._data_start + e.begin
        )
        return flat.reshape(e.shape)

    def close(self) -> None:
        """Drop the map. Arrays from raw() stay valid: pages are unmapped when the last one dies."""
        if self._mmap is None:
            return
        self._file.close()
        try:
            self._mmap.close()
        except BufferError:
            pass  # views still alive hold the map; it closes itself when they are freed
        self._mmap = None

    def __enter__(self) -> SafetensorsFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"SafetensorsFile({str(self.path)!r}, {len(self._entries)} tensors)"


def _unknown_name_message(where: pathlib.Path, name: object, known: Mapping[str, object]) -> str:
    """Error text for a missing tensor, with near names: a typo is the usual cause."""
    close = difflib.get_close_matches(str(name), list(known), n=3)
    hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
    return f"{where}: no tensor named {name!r} ({len(known)} tensors){hint}"


# --------------------------------------------------------------------------- reading: checkpoints


class Checkpoint:
    """Tensors of one file or of a sharded set (index .json with "weight_map"), one namespace."""

    def __init__(self, path: pathlib.Path, files: list[SafetensorsFile]):
        """Use Checkpoint.open. Raises WeightsError if a name is in two files."""
        self.path = path
        self._files = files
        self._file_by_name: dict[str, SafetensorsFile] = {}
        for f in files:
            for name in f.names():
                other = self._file_by_name.get(name)
                if other is not None:
                    raise WeightsError(
                        f"{path}: tensor {name!r} is in two shards: {other.path} and {f.path}"
                    )
                self._file_by_name[name] = f
        self.metadata: dict[str, str] = files[0].metadata if files else {}

    @classmethod
    def open(cls, path: str | os.PathLike) -> Checkpoint:
        """A .safetensors file, an index .json, or a directory holding model.safetensors or
        model.safetensors.index.json (the single file wins if both exist, as in transformers)."""
        path = pathlib.Path(path)
        if path.is_dir():
            if (path / SINGLE_NAME).is_file():
                return cls._open_files(path, [path / SINGLE_NAME])
            if (path / INDEX_NAME).is_file():
                return cls._open_index(path / INDEX_NAME)
            raise WeightsError(f"{path}: directory has neither {SINGLE_NAME} nor {INDEX_NAME}")
        if path.suffix == ".json":
            return cls._open_index(path)
        return cls._open_files(path, [path])

    @classmethod
    def _open_files(cls, path: pathlib.Path, shard_paths: list[pathlib.Path]) -> Checkpoint:
        """Open every shard; close those already open if one fails."""
        files: list[SafetensorsFile] = []
        try:
            for p in shard_paths:
                files.append(SafetensorsFile(p))
            return cls(path, files)
        except BaseException:
            for f in files:
                f.close()
            raise

    @classmethod
    def _open_index(cls, index_path: pathlib.Path) -> Checkpoint:
        """Open the shards an index names and check that they hold exactly its weight_map."""
        weight_map = _read_weight_map(index_path)
        shard_names = sorted(set(weight_map.values()))
        missing = [s for s in shard_names if not (index_path.parent / s).is_file()]
        if missing:
            raise WeightsError(
                f"{index_path}: shard file {missing[0]!r} is missing from {index_path.parent}"
                + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
            )
        ckpt = cls._open_files(index_path, [index_path.parent / s for s in shard_names])
        try:
            _check_weight_map(index_path, weight_map, ckpt._file_by_name)
        except WeightsError:
            ckpt.close()
            raise
        return ckpt

    def names(self) -> list[str]:
        """All tensor names: shards in order, each in file order."""
        return list(self._file_by_name)

    def __contains__(self, name: object) -> bool:
        return name in self._file_by_name

    def __len__(self) -> int:
        return len(self._file_by_name)

    def file_of(self, name: str) -> pathlib.Path:
        """Path of the file holding `name`."""
        return self._file(name).path

    def _file(self, name: str) -> SafetensorsFile:
        try:
            return self._file_by_name[name]
        except KeyError:
            raise WeightsError(_unknown_name_message(self.path, name, self._file_by_name)) from None

    def dtype(self, name: str) -> str:
        return self._file(name).dtype(name)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._file(name).shape(name)

    def raw(self, name: str) -> np.ndarray:
        """See SafetensorsFile.raw."""
        return self._file(name).raw(name)

    def close(self) -> None:
        for f in self._files:
            f.close()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.path)!r}, {len(self._files)} files, {len(self)} tensors)"


def _read_weight_map(index_path: pathlib.Path) -> dict[str, str]:
    """Index json -> its weight_map {tensor name: shard file name}."""
    try:
        text = index_path.read_text(encoding="utf-8")
    except OSError as e:
        raise WeightsError(f"{index_path}: cannot read index ({e.strerror or e})") from None
    except UnicodeDecodeError as e:
        raise WeightsError(f"{index_path}: index is not valid UTF-8 ({e})") from None
    try:
        index = json.loads(text, object_pairs_hook=_no_duplicate_keys(index_path))
    except (ValueError, RecursionError) as e:
        raise WeightsError(f"{index_path}: index is not valid JSON ({e})") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict):
        raise WeightsError(f'{index_path}: index has no "weight_map" object')
    for name, shard in weight_map.items():
        # A shard must be a plain file name beside the index: the HF layout, and no path escapes.
        if not isinstance(shard, str) or not shard or pathlib.PurePath(shard).name != shard:
            raise WeightsError(
                f"{index_path}: weight_map[{name!r}] is {shard!r}, expected a file name in the "
                f"index's directory"
            )
    return weight_map


def _check_weight_map(
    index_path: pathlib.Path, weight_map: dict[str, str], found: dict[str, SafetensorsFile]
) -> None:
    """Every indexed tensor is in its shard, and every shard tensor is indexed."""
    for name, shard in weight_map.items():
        f = found.get(name)
        if f is None:
            raise WeightsError(
                f"{index_path}: weight_map puts tensor {name!r} in {shard!r}, "
                f"which has no such tensor"
            )
        if f.path.name != shard:
            raise WeightsError(
                f"{index_path}: weight_map puts tensor {name!r} in {shard!r}, but it is in {f.path}"
            )
    for name, f in found.items():
        if name not in weight_map:
            raise WeightsError(
                f"{index_path}: tensor {name!r} of {f.path} is not in the weight_map"
            )


# --------------------------------------------------------------------------- conversion


def to_float(raw: np.ndarray, dtype: str, out: np.dtype | type) -> np.ndarray:
    """Storage array (as from raw(); BF16 as uint16 bits) of `dtype` -> float array of `out`.

    out: np.float32 or np.float64. Exact for F16/BF16/F32 -> f32/f64 (F64 -> f32 rounds; big
    integers round). Returns `raw` itself when no conversion is needed (F32 -> f32, F64 -> f64).
    """
    out = np.dtype(out)
    if out not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise ValueError(f"to_float: out must be float32 or float64, got {out}")
    if dtype not in DTYPES:
        raise ValueError(f"to_float: unknown dtype {dtype!r}, expected one of {sorted(DTYPES)}")
    if raw.dtype != DTYPES[dtype]:
        raise ValueError(
            f"to_float: dtype {dtype} is stored as {DTYPES[dtype]}, got a {raw.dtype} array"
        )
    if raw.dtype == out:
        return raw
    # Signalling-NaN patterns set the "invalid" flag when widened; the value stays NaN, and a
    # warning per GB-sized matrix would only be noise.
    with np.errstate(invalid="ignore"):
        if dtype == "BF16":
            return _bf16_to_float(raw, out)
        return raw.astype(out)


def _bf16_widen(bits: np.ndarray) -> np.ndarray:
    """[...] uint16 bf16 bits -> [...] float32, exact: bf16 is the top half of a float32."""
    # dtype=uint32 makes the ufunc shift in 32 bits; a plain `bits << 16` shifts in uint16 -> 0.
    return np.left_shift(bits, 16, dtype=np.uint32).view(np.float32)


def _bf16_to_float(bits: np.ndarray, out: np.dtype) -> np.ndarray:
    """[...] uint16 bf16 bits -> [...] float32/float64 with at most one small temporary."""
    if out == np.float32 or bits.ndim == 0:
        return _bf16_widen(bits).astype(out, copy=False)
    result = np.empty(bits.shape, dtype=out)
    # Widen a block of leading-axis rows at a time: a full-size uint32 temporary would add
    # half the result's size again on GB-sized matrices.
    row_elements = max(1, bits[0:1].size)
    rows_per_block = max(1, _BF16_BLOCK_ELEMENTS // row_elements)
    for start in range(0, bits.shape[0], rows_per_block):
        block = slice(start, start + rows_per_block)
        result[block] = _bf16_widen(bits[block])
    return result


def bf16_bits(x: np.ndarray) -> np.ndarray:
    """[...] float32/float64 -> [...] uint16 bfloat16 bits, round to nearest even; NaN -> 0x7FC0.

    float64 is rounded once, directly (not via float32 first, which can round twice; torch's
    double -> bfloat16 does that, so it differs from us on rare ties-after-rounding).
    """
    x = np.asarray(x)
    if x.dtype == np.float64:
        f32 = _f64_to_f32_round_to_odd(x)
    elif x.dtype == np.float32:
        f32 = x
    else:
        raise ValueError(f"bf16_bits: expected a float32 or float64 array, got {x.dtype}")
    bits = f32.astype("<f4", copy=True).view(np.uint32)
    # Round to nearest even on the low 16 bits: add 0x7FFF plus the bit that will be the LSB.
    lsb = (bits >> 16) & 1
    bits += lsb
    bits += 0x7FFF
    bits >>= 16
    result = bits.astype(np.uint16)
    result[np.isnan(f32)] = 0x7FC0  # the rounding above could turn a NaN payload into inf
    return result


def _f64_to_f32_round_to_odd(x: np.ndarray) -> np.ndarray:
    """[...] float64 -> [...] float32 rounded to odd (truncate, then set the LSB if inexact).

    Rounding to odd into a format with >= 2 more bits than bf16 and then to nearest even gives
    the same result as rounding to nearest even once (Boldo & Melquiond, "When double rounding
    is odd", 2005). float32 keeps 16 more bits than bf16, subnormals included.
    """
    with np.errstate(over="ignore", invalid="ignore"):
        f32 = x.astype(np.float32)
        away = np.abs(f32.astype(np.float64)) > np.abs(x)  # RNE went past x: step back toward 0
        f32 = np.where(away, np.nextafter(f32, np.float32(0)), f32)
        inexact = f32.astype(np.float64) != x  # True for NaN too; NaN is fixed up by the caller
    bits = f32.view(np.uint32)
    bits |= inexact.astype(np.uint32)
    return bits.view(np.float32)


# --------------------------------------------------------------------------- writing


def save(
    path: str | os.PathLike,
    tensors: Mapping[str, np.ndarray] | Iterable[tuple[str, np.ndarray]],
    *,
    dtypes: Mapping[str, str] | None = None,
    metadata: Mapping[str, str] | None = None,
    force: bool = False,
) -> None:
    """Write a safetensors file; arrays keep their own dtype, names in `dtypes` take that one.

    A tensor declared "BF16" in `dtypes` must be given as uint16 bits (see bf16_bits). Refuses to
    overwrite an existing file unless force=True (OutputExistsError). Atomic: written to a
    temporary file beside `path` and renamed into place.
    """
    path = pathlib.Path(path)
    items = list(tensors.items() if isinstance(tensors, Mapping) else tensors)
    dtypes = dict(dtypes or {})
    unknown = sorted(set(dtypes) - {name for name, _ in items})
    if unknown:
        raise WeightsError(f"{path}: dtypes names {unknown}, which are not among the tensors")
    arrays: dict[str, np.ndarray] = {}
    specs = []
    for name, arr in items:
        dtype, arr = _storage_array(path, name, np.asarray(arr), dtypes.get(name))
        if name in arrays:
            raise WeightsError(f"{path}: tensor {name!r} is given twice")
        arrays[name] = arr
        specs.append((name, dtype, arr.shape))
    save_streaming(path, specs, arrays.__getitem__, metadata=metadata, force=force)


def save_streaming(
    path: str | os.PathLike,
    specs: Sequence[tuple[str, str, tuple[int, ...]]],
    produce: Callable[[str], np.ndarray],
    *,
    metadata: Mapping[str, str] | None = None,
    force: bool = False,
) -> None:
    """Write a file from (name, dtype string, shape) specs, calling produce(name) once per tensor.

    produce(name) returns the tensor in its storage dtype (BF16 as uint16 bits); it is called in
    data order (_layout: whole 64-byte multiples first, then widest itemsize first; spec order
    within a width) and its result is dropped right after writing, so a multi-GB checkpoint never
    sits in memory. A result of the wrong dtype or shape raises WeightsError naming the tensor.
    Same overwrite and atomic rules as `save`.
    """
    path = pathlib.Path(path)
    placed = _layout(_check_specs(path, specs))
    header = _header_bytes(placed, _check_metadata(path, metadata))

    def write(f) -> None:
        _write_bytes(path, f, header)
        for name, dtype, shape, _, _ in placed:
            arr = produce(name)
            _check_produced(path, name, dtype, shape, arr)
            _write_bytes(path, f, _as_bytes(arr))

    _write_atomic(path, force, write)


def _storage_array(
    path: pathlib.Path, name: str, arr: np.ndarray, declared: str | None
) -> tuple[str, np.ndarray]:
    """Array to save (+ its dtype from `dtypes`, if any) -> (dtype string, little-endian array)."""
    if declared is not None:
        if declared not in DTYPES:
            raise WeightsError(_unknown_dtype(path, name, declared))
        if arr.dtype != DTYPES[declared]:
            bf16 = declared == "BF16"
            hint = " (bf16 tensors are given as uint16 bits: see bf16_bits)" if bf16 else ""
            raise WeightsError(
                f"{path}: tensor {name!r}: declared {declared}, stored as {DTYPES[declared]}, "
                f"but the array is {arr.dtype}{hint}"
            )
        return declared, arr
    little = arr.dtype.newbyteorder("<") if arr.dtype.byteorder == ">" else arr.dtype
    dtype = _DTYPE_NAMES.get(little)
    if dtype is None:
        raise WeightsError(
            f"{path}: tensor {name!r}: dtype {arr.dtype} has no safetensors equivalent "
            f"(supported: {', '.join(sorted(str(d) for d in _DTYPE_NAMES))})"
        )
    return dtype, arr.astype(little, copy=False)


def _check_specs(
    path: pathlib.Path, specs: Sequence[tuple[str, str, tuple[int, ...]]]
) -> list[tuple[str, str, tuple[int, ...]]]:
    """Validate (name, dtype, shape) triples: unique string names, known dtypes, dims >= 0."""
    checked: dict[str, tuple[str, str, tuple[int, ...]]] = {}
    for name, dtype, shape in specs:
        if not isinstance(name, str) or name == "__metadata__":
            raise WeightsError(f"{path}: tensor name {name!r} is not a string or is reserved")
        if name in checked:
            raise WeightsError(f"{path}: tensor {name!r} is given twice")
        if dtype not in DTYPES:
            raise WeightsError(_unknown_dtype(path, name, dtype))
        shape = tuple(shape)
        if not all(_is_int(d) and d >= 0 for d in shape):
            raise WeightsError(
                f"{path}: tensor {name!r}: shape {shape} must be non-negative integers"
            )
        checked[name] = (name, dtype, tuple(int(d) for d in shape))
    return list(checked.values())


def _check_metadata(
    path: pathlib.Path, metadata: Mapping[str, str] | None
) -> dict[str, str] | None:
    if metadata is None:
        return None
    for key, value in metadata.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise WeightsError(
                f"{path}: metadata {key!r}: {value!r}: keys and values must be strings"
            )
    return dict(metadata)


def _layout(
    specs: Sequence[tuple[str, str, tuple[int, ...]]],
) -> list[tuple[str, str, tuple[int, ...], int, int]]:
    """(name, dtype, shape) specs -> (name, dtype, shape, begin, end) in data order.

    With the data section starting at a multiple of DATA_ALIGN (64, a cache line), tensors whose
    size is a multiple of 64 bytes come first and so all start on a cache line (the C kernels read
    a weight row per 64-byte load: a row split over two lines measured 10-20 % slower); the others
    follow, widest itemsize first, so every tensor starts at a multiple of its own itemsize.  Both
    groups keep the caller's order within one itemsize.  Aligning *every* tensor would need gaps,
    and the reference implementation rejects gaps between tensors.
    """
    def key(spec: tuple[str, str, tuple[int, ...]]) -> tuple[bool, int]:
        itemsize = DTYPES[spec[1]].itemsize
        return (math.prod(spec[2]) * itemsize) % DATA_ALIGN != 0, -itemsize

    placed, offset = [], 0
    for name, dtype, shape in sorted(specs, key=key):
        size = math.prod(shape) * DTYPES[dtype].itemsize
        placed.append((name, dtype, shape, offset, offset + size))
        offset += size
    return placed


def _header_bytes(placed, metadata: dict[str, str] | None) -> bytes:
    """Length prefix + JSON header, padded with spaces so the data starts at a multiple of
    DATA_ALIGN."""
    header: dict[str, object] = {
        name: {"dtype": dtype, "shape": list(shape), "data_offsets": [begin, end]}
        for name, dtype, shape, begin, end in placed
    }
    if metadata is not None:
        header["__metadata__"] = metadata
    text = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    data = text.encode("utf-8")
    data += b" " * (-(8 + len(data)) % DATA_ALIGN)
    return struct.pack("<Q", len(data)) + data


def _check_produced(
    path: pathlib.Path, name: str, dtype: str, shape: tuple[int, ...], arr: object
) -> None:
    """produce(name) must return an ndarray of exactly the promised storage dtype and shape."""
    if not isinstance(arr, np.ndarray):
        raise WeightsError(
            f"{path}: tensor {name!r}: produce returned a {type(arr).__name__}, expected an ndarray"
        )
    if arr.dtype != DTYPES[dtype] or arr.shape != shape:
        raise WeightsError(
            f"{path}: tensor {name!r}: expected {dtype} ({DTYPES[dtype]}) of shape {shape}, "
            f"produce returned {arr.dtype} of shape {arr.shape}"
        )


def _as_bytes(arr: np.ndarray) -> memoryview:
    """The bytes of `arr` in C order, without a copy when it is already contiguous."""
    return memoryview(np.ascontiguousarray(arr).reshape(-1)).cast("B")


def _write_bytes(path: pathlib.Path, f, data: bytes | memoryview) -> None:
    try:
        f.write(data)
    except OSError as e:
        raise WeightsError(f"{path}: cannot write ({e.strerror or e})") from e


def _write_atomic(path: pathlib.Path, force: bool, write: Callable[[object], None]) -> None:
    """write(f) into `path` atomically (d2m_ref.files.atomic_write); file errors are WeightsErrors."""
    atomic_write(path, write, force=force, error=WeightsError)
