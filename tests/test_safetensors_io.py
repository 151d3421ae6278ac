"""Tests for d2m_ref.safetensors_io: our reader/writer against the `safetensors` package, torch,
and references computed from the bit layout of the float formats; every error names its culprit."""

from __future__ import annotations

import json
import re
import math
import os
import pathlib
import struct
import tempfile
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from d2m_ref import safetensors_io as sio
from d2m_ref.errors import D2MError, OutputExistsError, WeightsError

safetensors = pytest.importorskip("safetensors")
from safetensors import safe_open  # noqa: E402
from safetensors.numpy import save_file as np_save_file  # noqa: E402

NON_BF16 = [d for d in sio.DTYPES if d != "BF16"]


# --------------------------------------------------------------------------- helpers


def sample(dtype: str, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """Storage array of `dtype` with extreme values mixed in (BF16 via bf16_bits)."""
    rng = np.random.default_rng(seed)
    storage = sio.DTYPES[dtype]
    n = math.prod(shape)
    if dtype == "BF16":
        return sio.bf16_bits(rng.standard_normal(n).astype(np.float32)).reshape(shape)
    if storage.kind == "f":
        values = rng.standard_normal(n).astype(storage)
        extremes = np.array([np.finfo(storage).max, np.finfo(storage).tiny, -0.0, np.inf], storage)
    elif storage.kind == "b":
        return rng.integers(0, 2, n).astype(bool).reshape(shape)
    else:
        info = np.iinfo(storage)
        values = rng.integers(info.min, info.max, n, dtype=storage, endpoint=True)
        extremes = np.array([info.min, info.max, 0], storage)
    k = min(n, len(extremes))
    values[:k] = extremes[:k]
    return values.reshape(shape)


def f64(a: np.ndarray) -> np.ndarray:
    """Widen to float64 without the warning signalling NaNs raise (they stay NaN)."""
    with np.errstate(invalid="ignore"):
        return np.asarray(a).astype(np.float64)


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal dtype, shape and bytes (so NaN == NaN and -0.0 != 0.0)."""
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def write_raw(path: pathlib.Path, header, data: bytes = b"", header_len: int | None = None) -> pathlib.Path:
    """Hand-written file: header is a dict (dumped as JSON) or raw bytes."""
    hb = header if isinstance(header, bytes) else json.dumps(header).encode()
    n = len(hb) if header_len is None else header_len
    path.write_bytes(struct.pack("<Q", n) + hb + data)
    return path


def float_format_value(bits: np.ndarray, exp_bits: int, man_bits: int) -> np.ndarray:
    """IEEE-754 bit patterns (sign, exp_bits, man_bits) -> float64 values, from the definition."""
    bits = bits.astype(np.int64)
    sign = np.where(bits >> (exp_bits + man_bits) & 1, -1.0, 1.0)
    exp = (bits >> man_bits) & ((1 << exp_bits) - 1)
    man = (bits & ((1 << man_bits) - 1)).astype(np.float64)
    bias = (1 << (exp_bits - 1)) - 1
    normal = np.ldexp(1.0 + man / (1 << man_bits), exp - bias)
    subnormal = np.ldexp(man / (1 << man_bits), 1 - bias)
    special = np.where(man == 0, np.inf, np.nan)
    top = (1 << exp_bits) - 1
    return sign * np.where(exp == top, special, np.where(exp == 0, subnormal, normal))


ALL_16_BIT = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
BF16_VALUES = float_format_value(ALL_16_BIT, 8, 7)


def _bf16_candidates() -> tuple[np.ndarray, np.ndarray]:
    """Sorted finite bf16 values as float64 plus +-2**128 standing for +-inf, and their bits."""
    keep = np.isfinite(BF16_VALUES) & (ALL_16_BIT != 0x8000)  # one zero is enough
    values = np.concatenate([BF16_VALUES[keep], [2.0**128, -(2.0**128)]])
    bits = np.concatenate([ALL_16_BIT[keep], np.array([0x7F80, 0xFF80], np.uint16)])
    order = np.argsort(values)
    return values[order], bits[order]


BF16_SORTED, BF16_SORTED_BITS = _bf16_candidates()


def bf16_reference(x: float) -> int:
    """Round a finite float to bf16 bits, nearest with ties to even, in exact rational arithmetic.

    Overflow follows IEEE: 2**128 is the next value after the largest finite bf16, so anything
    at or past the midpoint rounds to inf.
    """
    if x == 0:
        return 0x8000 if math.copysign(1.0, x) < 0 else 0
    if abs(x) >= 2.0**128:  # inf, or past the stand-in for it
        return 0x7F80 if x > 0 else 0xFF80
    i = int(np.searchsorted(BF16_SORTED, x))
    if i < len(BF16_SORTED) and BF16_SORTED[i] == x:
        return int(BF16_SORTED_BITS[i])
    lo, hi = BF16_SORTED[i - 1], BF16_SORTED[i]
    d_lo, d_hi = Fraction(x) - Fraction(lo), Fraction(hi) - Fraction(x)
    lo_bits, hi_bits = int(BF16_SORTED_BITS[i - 1]), int(BF16_SORTED_BITS[i])
    if d_lo != d_hi:
        bits = lo_bits if d_lo < d_hi else hi_bits
    else:
        bits = lo_bits if lo_bits % 2 == 0 else hi_bits
    return 0x8000 if bits == 0 and x < 0 else bits  # underflow keeps the sign: -0


@pytest.fixture(scope="module")
def torch():
    return pytest.importorskip("torch")


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("dtype", list(sio.DTYPES))
def test_round_trip_every_dtype(tmp_path, dtype):
    """What save writes, SafetensorsFile reads back bit for bit, with its dtype and shape."""
    arrays = {"t": sample(dtype, (3, 5)), "scalar": sample(dtype, ()), "empty": sample(dtype, (0, 4))}
    declared = {name: dtype for name in arrays} if dtype == "BF16" else None
    path = tmp_path / "x.safetensors"
    sio.save(path, arrays, dtypes=declared, metadata={"k": "v"})
    with sio.SafetensorsFile(path) as f:
        assert f.metadata == {"k": "v"}
        assert sorted(f.names()) == sorted(arrays)
        for name, arr in arrays.items():
            assert f.dtype(name) == dtype
            assert f.shape(name) == arr.shape
            assert same_bits(f.raw(name), arr)


DTYPE_AND_SHAPE = st.tuples(
    st.sampled_from(list(sio.DTYPES)), hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=5)
)


@settings(max_examples=40, deadline=None)
@given(specs=st.dictionaries(st.text(min_size=1, max_size=8), DTYPE_AND_SHAPE, max_size=6), data=st.data())
def test_round_trip_property(specs, data):
    """save then read, by us and by the safetensors package, gives back the same bytes."""
    arrays = {
        name: data.draw(hnp.arrays(sio.DTYPES[dtype], shape)) for name, (dtype, shape) in specs.items()
    }
    declared = {name: dtype for name, (dtype, _) in specs.items()}
    with tempfile.TemporaryDirectory() as d:
        path = pathlib.Path(d) / "p.safetensors"
        sio.save(path, arrays, dtypes=declared)
        with sio.SafetensorsFile(path) as f:
            for name, arr in arrays.items():
                assert f.dtype(name) == declared[name]
                assert same_bits(f.raw(name), arr)
        with safe_open(path, framework="numpy") as g:
            assert set(g.keys()) == set(arrays)
            for name, arr in arrays.items():
                if declared[name] != "BF16":  # the numpy framework cannot return bf16
                    assert same_bits(g.get_tensor(name), arr)


def test_empty_checkpoint_and_metadata_only(tmp_path):
    """A file with no tensors (empty data section) opens, with and without metadata."""
    sio.save(tmp_path / "a.safetensors", {})
    sio.save(tmp_path / "b.safetensors", {}, metadata={"format": "np"})
    with sio.SafetensorsFile(tmp_path / "a.safetensors") as f:
        assert f.names() == [] and f.metadata == {}
    with sio.SafetensorsFile(tmp_path / "b.safetensors") as f:
        assert f.names() == [] and f.metadata == {"format": "np"}
    write_raw(tmp_path / "c.safetensors", {})  # 2-byte header, no padding, no data
    assert sio.SafetensorsFile(tmp_path / "c.safetensors").names() == []


def test_zero_size_tensors_are_legal(tmp_path):
    """Zero-size tensors may sit at any offset, even at the very end or inside another's bytes."""
    header = {
        "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        "z0": {"dtype": "F32", "shape": [0, 3], "data_offsets": [4, 4]},
        "z1": {"dtype": "BF16", "shape": [5, 0], "data_offsets": [8, 8]},
    }
    path = write_raw(tmp_path / "z.safetensors", header, np.float32([1, 2]).tobytes())
    with sio.SafetensorsFile(path) as f:
        assert f.raw("z0").shape == (0, 3) and f.raw("z1").shape == (5, 0)
        assert f.raw("a").tolist() == [1.0, 2.0]


def test_names_in_file_order(tmp_path):
    """names() follows data offsets, not the order of keys in the JSON header."""
    header = {
        "second": {"dtype": "U8", "shape": [1], "data_offsets": [1, 2]},
        "first": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]},
    }
    path = write_raw(tmp_path / "o.safetensors", header, b"\x01\x02")
    assert sio.SafetensorsFile(path).names() == ["first", "second"]


def test_save_layout_is_aligned_and_gapless(tmp_path):
    """Data starts at a multiple of 64; each tensor starts at a multiple of its itemsize, and on a
    64-byte boundary when its size is a multiple of 64 bytes; no gaps; the safetensors package
    reads it back."""
    arrays = {"h": sample("F16", (3,)), "b": sample("U8", (5,)), "d": sample("F64", (1,)), "f": sample("F32", (3,)),
              "line": sample("U8", (64,)), "lines": sample("F16", (2, 64)), "odd": sample("F32", (5,)),
              "q": sample("U8", (3, 128))}
    path = tmp_path / "a.safetensors"
    sio.save(path, arrays)
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    assert (8 + n) % 64 == 0
    header = json.loads(raw[8 : 8 + n])
    spans = sorted(tuple(e["data_offsets"]) for e in header.values())
    assert spans[0][0] == 0 and spans[-1][1] == len(raw) - 8 - n
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    for name, e in header.items():
        start = 8 + n + e["data_offsets"][0]
        assert start % arrays[name].dtype.itemsize == 0, name
        assert start % 64 == 0 or arrays[name].nbytes % 64 != 0, name
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    back = safetensors_numpy.load_file(str(path))
    assert all(back[k].tobytes() == v.tobytes() and back[k].shape == v.shape for k, v in arrays.items())


def test_save_big_endian_and_non_contiguous(tmp_path):
    """Arrays are stored little-endian in C order whatever their memory layout."""
    a = np.arange(12, dtype=">i4").reshape(3, 4)
    t = np.arange(12, dtype=np.float32).reshape(3, 4).T
    sio.save(tmp_path / "e.safetensors", {"a": a, "t": t})
    with sio.SafetensorsFile(tmp_path / "e.safetensors") as f:
        assert f.dtype("a") == "I32" and f.raw("a").tolist() == a.tolist()
        assert f.raw("t").tolist() == t.tolist()


# --------------------------------------------------------------------------- mapped views


def test_raw_is_a_read_only_zero_copy_view(tmp_path):
    sio.save(tmp_path / "v.safetensors", {"w": np.arange(6, dtype=np.float32).reshape(2, 3)})
    with sio.SafetensorsFile(tmp_path / "v.safetensors") as f:
        a, b = f.raw("w"), f.raw("w")
        assert not a.flags.writeable and not a.flags.owndata
        assert np.shares_memory(a, b)  # both look at the same mapped pages
        with pytest.raises(ValueError):
            a[0, 0] = 1


def test_close_keeps_live_views_valid(tmp_path):
    """close() with views alive neither fails nor invalidates them; later raw() is an error."""
    sio.save(tmp_path / "c.safetensors", {"w": np.arange(4, dtype=np.int64)})
    f = sio.SafetensorsFile(tmp_path / "c.safetensors")
    view = f.raw("w")[1:]
    f.close()
    f.close()
    assert view.tolist() == [1, 2, 3]
    with pytest.raises(WeightsError, match=r"c\.safetensors.*closed.*'w'"):
        f.raw("w")


def test_unknown_name_is_named(tmp_path):
    sio.save(tmp_path / "u.safetensors", {"model.norm.weight": np.ones(2)})
    f = sio.SafetensorsFile(tmp_path / "u.safetensors")
    with pytest.raises(WeightsError, match=r"u\.safetensors.*'model\.norm\.weigth'.*did you mean 'model\.norm\.weight'"):
        f.raw("model.norm.weigth")
    assert "model.norm.weight" in f and "x" not in f


# --------------------------------------------------------------------------- to_float


def test_to_float_bf16_all_patterns_match_the_definition():
    """Every bf16 bit pattern widens to the value its sign/exponent/mantissa define."""
    for out in (np.float32, np.float64):
        got = sio.to_float(ALL_16_BIT, "BF16", out)
        assert got.dtype == out
        np.testing.assert_array_equal(f64(got), BF16_VALUES)  # NaN positions too


def test_to_float_f16_all_patterns_match_the_definition():
    for out in (np.float32, np.float64):
        got = sio.to_float(ALL_16_BIT.view(np.float16), "F16", out)
        np.testing.assert_array_equal(f64(got), float_format_value(ALL_16_BIT, 5, 10))


def test_to_float_bf16_matches_torch_bit_for_bit(torch):
    expected = torch.from_numpy(ALL_16_BIT.view(np.int16)).view(torch.bfloat16).float().numpy()
    assert same_bits(sio.to_float(ALL_16_BIT, "BF16", np.float32), expected)
    expected64 = torch.from_numpy(ALL_16_BIT.view(np.int16)).view(torch.bfloat16).double().numpy()
    assert same_bits(sio.to_float(ALL_16_BIT, "BF16", np.float64), expected64)


@pytest.mark.filterwarnings("error")
def test_to_float_is_quiet_on_signalling_nans():
    """Signalling NaNs in a checkpoint widen to NaN without a warning per matrix."""
    snan16 = np.array([0x7F81, 0xFF81], np.uint16)
    assert np.isnan(sio.to_float(snan16, "BF16", np.float64)).all()
    assert np.isnan(sio.to_float(np.array([0x7C01], np.uint16).view(np.float16), "F16", np.float32)).all()


def test_to_float_returns_the_view_itself_when_no_conversion():
    f32 = np.arange(4, dtype=np.float32)
    f64 = np.arange(4, dtype=np.float64)
    assert sio.to_float(f32, "F32", np.float32) is f32
    assert sio.to_float(f64, "F64", np.float64) is f64
    assert sio.to_float(f32, "F32", np.float64).dtype == np.float64


@pytest.mark.parametrize("view", [
    lambda a: a, lambda a: a[1:3], lambda a: a[:, 2:5], lambda a: a[::2, ::3], lambda a: a[0], lambda a: a[:0],
    lambda a: a[0, 0, 0],
])
def test_to_float_bf16_blocked_float64_equals_float32_path(monkeypatch, view):
    """Widening bf16 to float64 block by block gives the float32 values, for any slice."""
    monkeypatch.setattr(sio, "_BF16_BLOCK_ELEMENTS", 7)  # many blocks, some rows bigger than a block
    bits = np.random.default_rng(1).integers(0, 1 << 16, (5, 6, 4)).astype(np.uint16)
    part = view(bits)
    got = sio.to_float(part, "BF16", np.float64)
    assert got.dtype == np.float64 and got.shape == np.shape(part)
    np.testing.assert_array_equal(got, f64(sio.to_float(part, "BF16", np.float32)))


def test_to_float_rejects_mismatched_arguments():
    with pytest.raises(ValueError, match="BF16.*float32"):
        sio.to_float(np.ones(2, np.float32), "BF16", np.float32)
    with pytest.raises(ValueError, match="float16"):
        sio.to_float(np.ones(2, np.float32), "F32", np.float16)


# --------------------------------------------------------------------------- bf16_bits


F32_SPECIALS = np.array(
    [0.0, -0.0, 1.0, -1.0, np.inf, -np.inf, np.nan, -np.nan,
     np.finfo(np.float32).max, -np.finfo(np.float32).max, np.finfo(np.float32).tiny,
     np.finfo(np.float32).smallest_subnormal, 3.3895314e38, 3.3961776e38],
    dtype=np.float32,
)


def f32_from_bits(bits) -> np.ndarray:
    return np.asarray(bits, dtype=np.uint32).view(np.float32)


def f32_test_values() -> np.ndarray:
    """Specials, exact ties (low half 0x8000) with even and odd kept bits, and random patterns."""
    rng = np.random.default_rng(2)
    high = rng.integers(0, 1 << 16, 4000).astype(np.uint32)
    ties = f32_from_bits(high << 16 | 0x8000)
    near_ties = f32_from_bits(np.concatenate([high << 16 | 0x7FFF, high << 16 | 0x8001]))
    randoms = f32_from_bits(rng.integers(0, 1 << 32, 100_000, dtype=np.uint64).astype(np.uint32))
    return np.concatenate([F32_SPECIALS, ties, near_ties, randoms])


def assert_same_bf16(got: np.ndarray, expected: np.ndarray) -> None:
    """Equal bits, except that any NaN pattern matches any NaN pattern."""
    got_nan = np.isnan(sio.to_float(got, "BF16", np.float32))
    exp_nan = np.isnan(sio.to_float(expected, "BF16", np.float32))
    np.testing.assert_array_equal(got_nan, exp_nan)
    np.testing.assert_array_equal(got[~got_nan], expected[~exp_nan])


def test_bf16_bits_matches_torch_for_float32(torch):
    x = f32_test_values()
    expected = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    got = sio.bf16_bits(x)
    assert got.dtype == np.uint16 and got.shape == x.shape
    assert_same_bf16(got, expected)


def test_bf16_bits_ties_go_to_even():
    # 1 + 2**-8 is halfway between 1 (0x3F80, even) and 1 + 2**-7 (0x3F81): stays at 1.
    # 1 + 3 * 2**-8 is halfway between 0x3F81 (odd) and 0x3F82 (even): goes up.
    x = np.array([1 + 2**-8, 1 + 3 * 2**-8, -(1 + 2**-8)])
    for dtype in (np.float32, np.float64):
        assert sio.bf16_bits(x.astype(dtype)).tolist() == [0x3F80, 0x3F82, 0xBF80]


def test_bf16_bits_specials():
    got = sio.bf16_bits(np.array([np.inf, -np.inf, np.nan, -0.0], np.float32))
    assert got[:2].tolist() == [0x7F80, 0xFF80]
    assert got[2] & 0x7F80 == 0x7F80 and got[2] & 0x007F  # NaN stays NaN, not inf
    assert got[3] == 0x8000
    big = sio.bf16_bits(np.array([1e39, -1e300, 5e-324, np.nan]))
    assert big[:3].tolist() == [0x7F80, 0xFF80, 0x0000]
    assert big[3] & 0x7F80 == 0x7F80 and big[3] & 0x007F


@settings(max_examples=300, deadline=None)
@given(st.floats(allow_nan=False, width=32))
@example(3.3961776e38)
@example(-1.1754944e-38)
@example(1.401298464324817e-45)
def test_bf16_bits_float32_matches_exact_rounding(x):
    """bf16_bits(float32) is the nearest bf16 (ties to even), computed in exact rationals."""
    assert int(sio.bf16_bits(np.float32(x))) == bf16_reference(x)


@settings(max_examples=500, deadline=None)
@given(st.floats(allow_nan=False))
@example(1 + 2**-8 + 2**-30)  # float32 rounding first would land on the tie and go down
@example(1.5 * 2.0**-133)  # tie between the two smallest bf16 subnormals: goes to even 2**-132
@example(2.0**128 - 2.0**119)  # midpoint between the largest finite bf16 and 2**128: inf
@example(2.0**128 - 2.0**119 - 2.0**80)  # just below it: largest finite
@example(3.4e38)
@example(-1e-50)
def test_bf16_bits_float64_matches_exact_rounding(x):
    """bf16_bits(float64) rounds once, directly from float64, to the nearest bf16 (ties to even)."""
    assert int(sio.bf16_bits(np.float64(x))) == bf16_reference(x)


def test_bf16_bits_float64_differs_from_torch_only_by_double_rounding(torch):
    """torch rounds float64 -> float32 -> bf16; we round once. Where torch's float32 step
    lands exactly on a bf16 tie the two differ; everywhere else they agree."""
    x = np.array([1 + 2**-8 + 2**-30])
    torch_bits = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    assert torch_bits.tolist() == [0x3F80] and sio.bf16_bits(x).tolist() == [0x3F81]
    y = np.random.default_rng(3).standard_normal(20_000) * 10.0 ** np.random.default_rng(4).integers(-30, 30, 20_000)
    expected = torch.from_numpy(y).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    assert_same_bf16(sio.bf16_bits(y), expected)


def test_bf16_bits_rejects_other_dtypes():
    with pytest.raises(ValueError, match="float16"):
        sio.bf16_bits(np.ones(2, np.float16))


# --------------------------------------------------------------------------- interop with safetensors


def test_reads_files_written_by_safetensors_numpy(tmp_path):
    arrays = {f"t_{d}": sample(d, (4, 3), seed=i) for i, d in enumerate(NON_BF16)}
    arrays["empty"] = np.zeros((0, 2), np.float32)
    path = tmp_path / "ref.safetensors"
    np_save_file(arrays, str(path), metadata={"format": "np", "x": "y"})
    with sio.SafetensorsFile(path) as f:
        assert f.metadata == {"format": "np", "x": "y"}
        assert set(f.names()) == set(arrays)
        for name, arr in arrays.items():
            assert same_bits(f.raw(name), arr), name


def test_reads_bf16_written_by_safetensors_torch(torch, tmp_path):
    from safetensors.torch import save_file

    t = torch.randn(5, 7, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    path = tmp_path / "bf16.safetensors"
    save_file({"w": t, "b": t[0].float()}, str(path), metadata={"format": "pt"})
    with sio.SafetensorsFile(path) as f:
        assert f.dtype("w") == "BF16" and f.metadata == {"format": "pt"}
        assert same_bits(f.raw("w"), t.view(torch.int16).numpy().view(np.uint16))
        assert same_bits(sio.to_float(f.raw("w"), "BF16", np.float32), t.float().numpy())
        assert same_bits(f.raw("b"), t[0].float().numpy())


def test_safetensors_reads_our_files(tmp_path):
    arrays = {f"t_{d}": sample(d, (3, 4), seed=i) for i, d in enumerate(NON_BF16)}
    path = tmp_path / "ours.safetensors"
    sio.save(path, arrays, metadata={"format": "np"})
    with safe_open(str(path), framework="numpy") as g:
        assert g.metadata() == {"format": "np"}
        assert set(g.keys()) == set(arrays)
        for name, arr in arrays.items():
            assert same_bits(g.get_tensor(name), arr), name


def test_safetensors_torch_reads_our_bf16(torch, tmp_path):
    x = np.random.default_rng(5).standard_normal((6, 3)).astype(np.float32)
    path = tmp_path / "ours_bf16.safetensors"
    sio.save(path, {"w": sio.bf16_bits(x), "h": x.astype(np.float16)}, dtypes={"w": "BF16"})
    with safe_open(str(path), framework="pt") as g:
        w = g.get_tensor("w")
        assert w.dtype == torch.bfloat16
        assert same_bits(w.view(torch.int16).numpy().view(np.uint16), sio.bf16_bits(x))
        assert same_bits(w.float().numpy(), sio.to_float(sio.bf16_bits(x), "BF16", np.float32))
        assert same_bits(g.get_tensor("h").numpy(), x.astype(np.float16))


# --------------------------------------------------------------------------- errors on open


def entry(dtype="F32", shape=(2,), offsets=(0, 8)):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


EIGHT = bytes(8)

# (id, header (dict or bytes), data, header_len override, regex the message must match
#  after the file name)
BROKEN = [
    ("header len > file", {}, b"", 1000, r"header length 1000 .* file has only"),
    ("absurd header len", {}, b"", 1 << 40, r"header length 1099511627776 exceeds"),
    ("not utf8", b'{"\xff": 1}', b"", None, r"not valid UTF-8"),
    ("not json", b'{"a": ', b"", None, r"not valid JSON"),
    ("not an object", b"[1, 2]", b"", None, r"JSON list, expected an object"),
    ("entry not object", {"w.bad": 3}, b"", None, r"'w\.bad'.*JSON int"),
    ("no dtype", {"w.bad": {"shape": [2], "data_offsets": [0, 8]}}, EIGHT, None, r"'w\.bad'.*no 'dtype'"),
    ("no shape", {"w.bad": {"dtype": "F32", "data_offsets": [0, 8]}}, EIGHT, None, r"'w\.bad'.*no 'shape'"),
    ("no offsets", {"w.bad": {"dtype": "F32", "shape": [2]}}, EIGHT, None, r"'w\.bad'.*no 'data_offsets'"),
    ("dtype not str", {"w.bad": entry(dtype=5)}, EIGHT, None, r"'w\.bad'.*unknown dtype 5"),
    ("unknown dtype", {"w.bad": entry(dtype="Q4")}, EIGHT, None, r"'w\.bad'.*unknown dtype 'Q4'"),
    ("shape not list", {"w.bad": {**entry(), "shape": "2"}}, EIGHT, None, r"'w\.bad'.*shape is '2'"),
    ("float dim", {"w.bad": {**entry(), "shape": [2.0]}}, EIGHT, None, r"'w\.bad'.*shape is \[2\.0\]"),
    ("bool dim", {"w.bad": {**entry(), "shape": [True]}}, EIGHT, None, r"'w\.bad'.*shape is \[True\]"),
    ("negative dim", {"w.bad": entry(shape=(-2,))}, EIGHT, None, r"'w\.bad'.*negative"),
    ("one offset", {"w.bad": {**entry(), "data_offsets": [0]}}, EIGHT, None, r"'w\.bad'.*data_offsets is \[0\]"),
    ("float offset", {"w.bad": {**entry(), "data_offsets": [0, 8.0]}}, EIGHT, None, r"'w\.bad'.*data_offsets"),
    ("begin > end", {"w.bad": entry(shape=(0,), offsets=(8, 4))}, EIGHT, None, r"'w\.bad'.*begin <= end"),
    ("size mismatch", {"w.bad": entry(shape=(2, 3), offsets=(0, 20))}, bytes(24), None,
     r"'w\.bad'.*span 20 bytes but shape \[2, 3\] of F32 needs 24"),
    ("truncated", {"w.bad": entry(shape=(6,), offsets=(0, 24))}, EIGHT, None,
     r"truncated: tensor 'w\.bad' needs bytes up to 24 but the data section has only 8"),
    ("overlap", {"a": entry(shape=(4,), offsets=(0, 16)), "w.bad": entry(shape=(4,), offsets=(8, 24))},
     bytes(24), None, r"'a'.*'w\.bad'.*overlap"),
    ("duplicate name", b'{"w.bad": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]},'
     b' "w.bad": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}', b"\x00", None, r"'w\.bad' twice"),
    ("metadata not object", {"__metadata__": ["a"]}, b"", None, r"__metadata__ is a JSON list"),
    ("metadata value", {"__metadata__": {"step": 3}}, b"", None, r"__metadata__\['step'\] is 3"),
]


@pytest.mark.parametrize("header, data, header_len, pattern", [b[1:] for b in BROKEN], ids=[b[0] for b in BROKEN])
def test_broken_file_is_named(tmp_path, header, data, header_len, pattern):
    """Every broken file raises WeightsError naming the file, the tensor, expected and found."""
    path = write_raw(tmp_path / "broken.safetensors", header, data, header_len)
    with pytest.raises(WeightsError, match=rf"broken\.safetensors: .*{pattern}"):
        sio.SafetensorsFile(path)


@pytest.mark.parametrize("content", [b"", b"\x01\x02\x03"])
def test_file_shorter_than_8_bytes(tmp_path, content):
    path = tmp_path / "short.safetensors"
    path.write_bytes(content)
    with pytest.raises(WeightsError, match=rf"short\.safetensors: file has {len(content)} bytes"):
        sio.SafetensorsFile(path)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(WeightsError, match=r"nope\.safetensors: cannot read"):
        sio.SafetensorsFile(tmp_path / "nope.safetensors")
    with pytest.raises(WeightsError, match=r"not a regular file \(a directory\)"):
        sio.SafetensorsFile(tmp_path)


# --------------------------------------------------------------------------- checkpoints


@pytest.fixture
def sharded(tmp_path) -> pathlib.Path:
    """Directory with two shards and an index; returns the directory."""
    s1 = {"embed": np.arange(6, dtype=np.float32).reshape(2, 3), "layer.0": np.ones(3, np.float32)}
    s2 = {"layer.1": np.full(3, 2, np.float32), "head": sio.bf16_bits(np.float32([1, 2]))}
    sio.save(tmp_path / "model-00001-of-00002.safetensors", s1, metadata={"format": "pt"})
    sio.save(tmp_path / "model-00002-of-00002.safetensors", s2, dtypes={"head": "BF16"})
    weight_map = {n: "model-00001-of-00002.safetensors" for n in s1}
    weight_map |= {n: "model-00002-of-00002.safetensors" for n in s2}
    write_index(tmp_path, weight_map)
    return tmp_path


def write_index(directory: pathlib.Path, weight_map: dict[str, str]) -> pathlib.Path:
    path = directory / sio.INDEX_NAME
    path.write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    return path


@pytest.mark.parametrize("via", ["directory", "index"])
def test_sharded_checkpoint_is_one_namespace(sharded, via):
    where = sharded if via == "directory" else sharded / sio.INDEX_NAME
    with sio.Checkpoint.open(where) as ck:
        assert ck.names() == ["embed", "layer.0", "layer.1", "head"]  # shard order, then file order
        assert ck.metadata == {"format": "pt"}
        assert ck.file_of("layer.1") == sharded / "model-00002-of-00002.safetensors"
        assert ck.dtype("head") == "BF16" and ck.shape("embed") == (2, 3)
        assert sio.to_float(ck.raw("head"), "BF16", np.float64).tolist() == [1.0, 2.0]
        assert ck.raw("embed").tolist() == [[0, 1, 2], [3, 4, 5]]
        assert "layer.0" in ck and "layer.2" not in ck
        with pytest.raises(WeightsError, match=r"index\.json: no tensor named 'layer\.2'"):
            ck.raw("layer.2")


def test_single_file_checkpoint(tmp_path):
    sio.save(tmp_path / "model.safetensors", {"w": np.ones(2)}, metadata={"a": "b"})
    for where in (tmp_path, tmp_path / "model.safetensors"):
        with sio.Checkpoint.open(where) as ck:
            assert ck.names() == ["w"] and ck.metadata == {"a": "b"}
            assert ck.file_of("w") == tmp_path / "model.safetensors"


def test_checkpoint_directory_without_weights(tmp_path):
    with pytest.raises(WeightsError, match=rf"{tmp_path.name}: directory has neither model\.safetensors"):
        sio.Checkpoint.open(tmp_path)


def test_index_naming_a_missing_shard(sharded):
    (sharded / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(WeightsError, match=r"index\.json: shard file 'model-00002-of-00002\.safetensors' is missing"):
        sio.Checkpoint.open(sharded)


def test_tensor_in_two_shards_names_both_files(sharded):
    sio.save(sharded / "model-00002-of-00002.safetensors", {"embed": np.ones(1), "layer.1": np.ones(1)}, force=True)
    with pytest.raises(
        WeightsError,
        match=r"'embed' is in two shards: .*model-00001-of-00002\.safetensors and .*model-00002-of-00002\.safetensors",
    ):
        sio.Checkpoint.open(sharded)


def test_index_naming_a_tensor_the_shard_lacks(sharded):
    weight_map = json.loads((sharded / sio.INDEX_NAME).read_text())["weight_map"]
    write_index(sharded, weight_map | {"ghost": "model-00001-of-00002.safetensors"})
    with pytest.raises(WeightsError, match=r"index\.json: weight_map puts tensor 'ghost' in 'model-00001-of-00002\.safetensors', which has no such tensor"):
        sio.Checkpoint.open(sharded)


def test_index_placing_a_tensor_in_the_wrong_shard(sharded):
    weight_map = json.loads((sharded / sio.INDEX_NAME).read_text())["weight_map"]
    write_index(sharded, weight_map | {"head": "model-00001-of-00002.safetensors"})
    with pytest.raises(WeightsError, match=r"'head' in 'model-00001-of-00002\.safetensors', but it is in .*00002"):
        sio.Checkpoint.open(sharded)


def test_shard_tensor_missing_from_index(sharded):
    weight_map = json.loads((sharded / sio.INDEX_NAME).read_text())["weight_map"]
    del weight_map["layer.1"]
    write_index(sharded, weight_map)
    with pytest.raises(WeightsError, match=r"index\.json: tensor 'layer\.1' of .*00002.* is not in the weight_map"):
        sio.Checkpoint.open(sharded)


@pytest.mark.parametrize("text, pattern", [
    ("{", r"not valid JSON"),
    ('{"weight_map": []}', r'no "weight_map" object'),
    ('[]', r'no "weight_map" object'),
    ('{"weight_map": {"w": "../x.safetensors"}}', r"weight_map\['w'\] is '\.\./x\.safetensors'"),
    ('{"weight_map": {"w": 3}}', r"weight_map\['w'\] is 3"),
])
def test_broken_index(tmp_path, text, pattern):
    (tmp_path / "idx.json").write_text(text)
    with pytest.raises(WeightsError, match=rf"idx\.json: .*{pattern}"):
        sio.Checkpoint.open(tmp_path / "idx.json")


def test_broken_shard_is_named(sharded):
    shard = sharded / "model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-3])
    with pytest.raises(WeightsError, match=r"model-00002-of-00002\.safetensors: truncated: tensor"):
        sio.Checkpoint.open(sharded)


# --------------------------------------------------------------------------- writing


def test_save_refuses_to_overwrite_without_force(tmp_path):
    path = tmp_path / "keep.safetensors"
    sio.save(path, {"a": np.ones(2)})
    before = path.read_bytes()
    with pytest.raises(OutputExistsError, match=r"keep\.safetensors: file exists.*force") as info:
        sio.save(path, {"a": np.zeros(3)})
    assert isinstance(info.value, FileExistsError) and isinstance(info.value, D2MError)
    assert path.read_bytes() == before
    sio.save(path, {"a": np.zeros(3)}, force=True)
    assert sio.SafetensorsFile(path).raw("a").tolist() == [0, 0, 0]
    assert os.listdir(tmp_path) == ["keep.safetensors"]


def test_refusal_comes_before_any_tensor_is_produced(tmp_path):
    """Overwrite refusal is checked up front, not after producing gigabytes."""
    path = tmp_path / "exists.safetensors"
    path.write_bytes(b"old")
    calls = []
    with pytest.raises(OutputExistsError, match=r"exists\.safetensors"):
        sio.save_streaming(path, [("a", "F32", (1,))], lambda name: calls.append(name) or np.ones(1, np.float32))
    assert calls == [] and path.read_bytes() == b"old"


def test_save_streaming_writes_what_produce_returns(tmp_path):
    """The file holds exactly the produced arrays; produce is called once per tensor."""
    specs = [("w1", "BF16", (4, 3)), ("norm", "F32", (3,)), ("ids", "I64", (2,)), ("mask", "BOOL", (0,))]
    made = {name: sample(dtype, shape, seed=i) for i, (name, dtype, shape) in enumerate(specs)}
    calls = []

    def produce(name):
        calls.append(name)
        return made[name]

    path = tmp_path / "s.safetensors"
    sio.save_streaming(path, specs, produce, metadata={"m": "1"})
    assert sorted(calls) == sorted(made)
    with sio.SafetensorsFile(path) as f:
        assert f.metadata == {"m": "1"}
        for name, dtype, shape in specs:
            assert f.dtype(name) == dtype and same_bits(f.raw(name), made[name])
    assert os.listdir(tmp_path) == ["s.safetensors"]


def test_exception_in_produce_leaves_no_file(tmp_path):
    """An exception inside produce() passes through and leaves neither the target nor a temporary."""
    def produce(name):
        if name == "b":
            raise RuntimeError("boom")
        return np.ones(2, np.float32)

    with pytest.raises(RuntimeError, match="boom"):
        sio.save_streaming(tmp_path / "x.safetensors", [("a", "F32", (2,)), ("b", "F32", (2,))], produce)
    assert os.listdir(tmp_path) == []


def test_failed_overwrite_keeps_the_old_file(tmp_path):
    path = tmp_path / "old.safetensors"
    sio.save(path, {"a": np.ones(2)})
    before = path.read_bytes()

    def produce(name):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        sio.save_streaming(path, [("a", "F64", (2,))], produce, force=True)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["old.safetensors"]


@pytest.mark.parametrize("bad, pattern", [
    (np.ones((2, 3), np.float32), r"expected BF16 \(uint16\) of shape \(2, 3\), produce returned float32 of shape \(2, 3\)"),
    (np.ones((3, 2), np.uint16), r"expected BF16 \(uint16\) of shape \(2, 3\), produce returned uint16 of shape \(3, 2\)"),
    ([[1, 2, 3]], r"produce returned a list"),
])
def test_save_streaming_checks_produced_arrays(tmp_path, bad, pattern):
    with pytest.raises(WeightsError, match=rf"w\.safetensors: tensor 'layer\.w': {pattern}"):
        sio.save_streaming(tmp_path / "w.safetensors", [("layer.w", "BF16", (2, 3))], lambda name: bad)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("call, pattern", [
    (lambda p: sio.save(p, {"c": np.ones(2, np.complex64)}), r"tensor 'c': dtype complex64 has no safetensors"),
    (lambda p: sio.save(p, {"w": np.ones(2, np.float32)}, dtypes={"w": "BF16"}), r"tensor 'w': declared BF16.*float32.*bf16_bits"),
    (lambda p: sio.save(p, {"w": np.ones(2, np.uint16)}, dtypes={"w": "F8"}), r"tensor 'w': unknown dtype 'F8'"),
    (lambda p: sio.save(p, {"w": np.ones(2)}, dtypes={"v": "BF16"}), r"dtypes names \['v'\]"),
    (lambda p: sio.save(p, [("w", np.ones(2)), ("w", np.ones(2))]), r"tensor 'w' is given twice"),
    (lambda p: sio.save(p, {"w": np.ones(2)}, metadata={"step": 3}), r"metadata 'step': 3"),
    (lambda p: sio.save_streaming(p, [("w", "F32", (-1,))], None), r"tensor 'w': shape \(-1,\)"),
    (lambda p: sio.save_streaming(p, [("w", "F4", (1,))], None), r"tensor 'w': unknown dtype 'F4'"),
])
def test_save_rejects_bad_arguments_by_name(tmp_path, call, pattern):
    with pytest.raises(WeightsError, match=rf"bad\.safetensors: {pattern}"):
        call(tmp_path / "bad.safetensors")
    assert os.listdir(tmp_path) == []


def test_save_into_missing_directory(tmp_path):
    with pytest.raises(WeightsError, match=r"no_dir.*cannot create"):
        sio.save(tmp_path / "no_dir" / "x.safetensors", {"a": np.ones(1)})


def test_save_accepts_pairs_and_keeps_order_within_an_itemsize(tmp_path):
    """Data order: widest itemsize first, then the caller's order (so file order is predictable)."""
    pairs = [("z", np.ones(1, np.float32)), ("a", np.ones(1, np.float16)), ("m", np.ones(1, np.float32)), ("d", np.ones(1))]
    sio.save(tmp_path / "o.safetensors", pairs)
    assert sio.SafetensorsFile(tmp_path / "o.safetensors").names() == ["d", "z", "m", "a"]


@pytest.mark.parametrize("offsets, size, where", [
    ([[8, 16], [16, 24]], 24, "before the first tensor"),
    ([[0, 8], [16, 24]], 24, "after tensor 'a'"),
    ([[0, 8], [8, 16]], 24, "after the last tensor"),
])
def test_unindexed_bytes_are_refused(tmp_path, offsets, size, where):
    """Bytes of the data section that no tensor names (a hole before, between or after the tensors):
    the format forbids them, and they were accepted (issue 22)."""
    header = {name: {"dtype": "F32", "shape": [2], "data_offsets": off} for name, off in zip("ab", offsets)}
    path = write_raw(tmp_path / "holes.safetensors", header, bytes(size))
    with pytest.raises(WeightsError, match=re.escape(where)):
        sio.SafetensorsFile(path)
