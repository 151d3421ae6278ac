"""d2m_ref's GGUF reader (d2m_ref/gguf_io.py, spec/format.md §3) against the models the files were
written from.  The files come from tests/peer/gguf_write.py, which follows llama.cpp's converter and
is itself checked against transformers' GGUF import (tests/test_gguf_write.py): so what is shown
here is that d2m_ref reads llama.cpp's names, metadata, q/k permutation, stacked experts and block
types as the source model meant them.  Metric: max |a - b| / max |b| over [T, V] float64 logits;
the source model runs in transformers made float64 (tests/peer/hf.py)."""

from __future__ import annotations

import dataclasses
import re
import struct

import numpy as np
import pytest

import d2m_ref
from d2m_ref.errors import ConfigError, D2MError, WeightsError

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

from tests.peer import gguf_write as gw  # noqa: E402
from tests.peer import hf  # noqa: E402
from tests.test_gguf_write import CASES, FALLBACK_CASE, INPUT_IDS, QUANT_CASES, intended_model  # noqa: E402

READABLE = [c for c in CASES if c.name != "llama_llama3rope_tied_gqa7"]  # llama3 rope: rope_freqs, refused


def _relative(a, b) -> float:
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def _ours(path) -> np.ndarray:
    model = d2m_ref.load_model(path)
    try:
        return d2m_ref.forward(model, INPUT_IDS)[0]
    finally:
        model.close()


def _reference(model) -> np.ndarray:
    """The source transformers model in float64, its float32 islands made float64."""
    with hf.float64_transformers():
        return hf.logits(model.to(torch.float64), INPUT_IDS)


@pytest.mark.parametrize("hf_case", READABLE, ids=[c.name for c in READABLE])
def test_f32_gguf_reads_as_the_source_model(hf_case, tmp_path):
    """Every architecture (llama with its q/k permutation, tied or not, attention bias, linear
    rope; qwen2 biases; qwen3 q/k norms and head_dim; qwen2moe shared expert and its gate; qwen3moe
    renormalised top-k): float64 logits within 1e-9 of the source model's."""
    model = hf.build(hf_case, torch.float32)  # float64 draws rounded to float32, as the file stores them
    path = gw.write_gguf(model, tmp_path / "model.gguf")
    error = _relative(_ours(path), _reference(model))
    assert error <= 1e-9, f"{hf_case.name}: {error:.3e}"


@pytest.mark.parametrize("qtype", [t for t in gw.TENSOR_TYPES if t != "F32"])
@pytest.mark.parametrize("hf_case", QUANT_CASES, ids=[c.name for c in QUANT_CASES])
def test_every_tensor_type_reads_as_its_dequantised_weights(hf_case, qtype, tmp_path):
    """F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K, Q5_K, Q6_K: d2m_ref computes with exactly the values the
    gguf package dequantises the blocks to (1e-9 against the source model holding those values)."""
    model = hf.build(hf_case, torch.float32)
    path = gw.write_gguf(model, tmp_path / "model.gguf", tensor_type=qtype)
    error = _relative(_ours(path), _reference(intended_model(model, qtype)))
    assert error <= 1e-9, f"{hf_case.name} {qtype}: {error:.3e}"


def test_fallback_block_types_q5_0_and_q5_1(tmp_path):
    """K-quant rows of 64 columns fall back to Q5_0 / Q5_1 (as llama-quantize does); read as such."""
    from tests.test_gguf_write import dequantised
    for qtype, fallback in (("Q4_K", "Q5_0"), ("Q5_K", "Q5_1")):
        model = hf.build(FALLBACK_CASE, torch.float32)
        path = gw.write_gguf(model, tmp_path / f"{qtype}.gguf", tensor_type=qtype)
        assert gw.tensor_types(path)["blk.0.attn_q.weight"] == fallback
        reference = model
        with torch.no_grad():
            for _, param in reference.named_parameters():
                if param.ndim == 2:
                    stored = fallback if param.shape[1] == 64 else "F16"
                    param.copy_(torch.from_numpy(dequantised(param.detach().numpy(), stored)))
        assert _relative(_ours(path), _reference(reference)) <= 1e-9


def test_decode_one_row_block_at_a_time(tmp_path):
    """A quantised Param decodes only the rows asked for (rows, take), and they equal the whole."""
    model = hf.build(QUANT_CASES[0], torch.float32)
    path = gw.write_gguf(model, tmp_path / "model.gguf", tensor_type="Q4_K")
    m = d2m_ref.load_model(path)
    try:
        q = m.weights.layers[0].attention.q
        assert q.storage == "GGUF_Q4_K"
        whole = q.load(np.float64)
        decoded: list[int] = []

        def spy(rows):
            decoded.append(rows.shape[0])
            return q._decode(rows)

        counted = dataclasses.replace(q, _decode=spy)
        assert np.array_equal(counted.rows(64, 128, np.float64), whole[64:128])
        assert np.array_equal(counted.take(np.array([255, 3, 3]), np.float64), whole[[255, 3, 3]])
        assert decoded == [64, 3]  # only the rows asked for were decoded
        assert q.nbytes == 256 * 256 * 144 // 256
        assert q.raw() is q.raw()  # llama's q rows are put in HF order once, not per read
    finally:
        m.close()


# ---------------------------------------------------------------------------------------------
# Bad input: a named error (exit status 2 from the tools), never a traceback


def _small(tmp_path, **kwargs):
    return gw.write_gguf(hf.build(READABLE[0], torch.float32), tmp_path / "model.gguf", **kwargs)


def _writer(path, arch: str):
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    return w


def _finish(w) -> None:
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_truncated_gguf_is_named(tmp_path):
    path = _small(tmp_path)
    data = path.read_bytes()
    for cut in (10, len(data) // 3, len(data) - 7):
        bad = tmp_path / f"cut{cut}.gguf"
        bad.write_bytes(data[:cut])
        with pytest.raises(WeightsError, match=rf"cut{cut}\.gguf: (truncated|not a readable GGUF)"):
            d2m_ref.load_model(bad)


def test_corrupt_gguf_is_named(tmp_path):
    path = _small(tmp_path)
    data = bytearray(path.read_bytes())
    data[8:16] = struct.pack("<Q", 1 << 60)  # tensor count: absurd
    bad = tmp_path / "corrupt.gguf"
    bad.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match=r"corrupt\.gguf: (truncated|not a readable GGUF)"):
        d2m_ref.load_model(bad)


def test_unknown_architecture_is_named(tmp_path):
    w = _writer(tmp_path / "gemma.gguf", "gemma2")
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    _finish(w)
    with pytest.raises(ConfigError, match="GGUF architecture 'gemma2' is not supported"):
        d2m_ref.load_model(tmp_path / "gemma.gguf")


def _copy(src, dst, *, set_fields: dict | None = None, drop: tuple = (), tensor=None):
    """A copy of GGUF `src` at `dst` with metadata set ({key: (value, GGUFValueType)}) or dropped,
    and `tensor(name, ReaderTensor) -> (array, raw_dtype) | None` replacing tensors."""
    reader = gguf.GGUFReader(src)
    w = gguf.GGUFWriter(str(dst), reader.fields["general.architecture"].contents())
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture" or field.name in drop \
                or field.name in (set_fields or {}):
            continue
        value, kind = field.contents(), field.types[0]
        if kind == gguf.GGUFValueType.ARRAY:
            w.add_array(field.name, value)
        else:
            w.add_key_value(field.name, value, kind)
    for key, (value, kind) in (set_fields or {}).items():
        w.add_key_value(key, value, kind)
    for t in reader.tensors:
        replaced = tensor(t.name, t) if tensor else None
        if replaced is None:
            w.add_tensor(t.name, np.array(t.data), raw_shape=t.data.shape, raw_dtype=t.tensor_type)
        else:
            array, raw_dtype = replaced
            w.add_tensor(t.name, array, raw_shape=array.shape, raw_dtype=raw_dtype)
    _finish(w)
    return dst


def test_unsupported_tensor_type_is_named(tmp_path):
    """A Q3_K tensor (a real llama.cpp type d2m_ref does not read): its name and type are named."""
    q3k = gguf.GGMLQuantizationType.Q3_K

    def swap(name, t):
        if name == "blk.0.ffn_up.weight":
            return np.zeros((int(t.shape[1]), gguf.GGML_QUANT_SIZES[q3k][1]), np.uint8), q3k
        return None

    path = _copy(_small(tmp_path), tmp_path / "q3k.gguf", tensor=swap)
    with pytest.raises(WeightsError, match=r"tensor 'blk\.0\.ffn_up\.weight' has GGUF type Q3_K; d2m_ref reads"):
        d2m_ref.load_model(path)


F32, STR, U32 = gguf.GGUFValueType.FLOAT32, gguf.GGUFValueType.STRING, gguf.GGUFValueType.UINT32


@pytest.mark.parametrize("fields, drop, culprit", [
    ({"llama.attention.layer_norm_rms_epsilon": ("abc", STR)}, (),
     "'llama.attention.layer_norm_rms_epsilon' must be a finite number, found 'abc'"),
    ({"llama.rope.freq_base": ("1e4", STR)}, (), "'llama.rope.freq_base' must be a finite number"),
    ({"llama.block_count": (2.5, F32)}, (), "'llama.block_count' must be an integer"),
    ({"llama.expert_count": (4, U32)}, (), "llama.cpp's Mixtral layout"),
    ({"llama.rope.dimension_count": (4, U32)}, (), "rope.dimension_count=4 rotates part of each head of 10"),
])
def test_metadata_defects_are_named(fields, drop, culprit, tmp_path):
    path = _copy(_small(tmp_path), tmp_path / "edited.gguf", set_fields=fields, drop=drop)
    with pytest.raises(ConfigError, match=re.escape(culprit)):
        d2m_ref.load_model(path)


@pytest.mark.parametrize("fields, drop", [
    ({"llama.rope.scaling.factor": (2.0, F32)}, ("llama.rope.scaling.type",)),  # type absent: linear
    ({"llama.rope.scale_linear": (2.0, F32)}, ("llama.rope.scaling.type", "llama.rope.scaling.factor")),
    ({"llama.rope.scaling.type": ("linear", STR), "llama.rope.scaling.factor": (2.0, F32)}, ()),
], ids=["factor-without-type", "old-scale_linear", "linear"])
def test_linear_rope_factor_is_read_as_llama_cpp_reads_it(fields, drop, tmp_path):
    """Every spelling of a linear RoPE factor llama.cpp honours is read (none silently dropped)."""
    path = _copy(_small(tmp_path), tmp_path / "scaled.gguf", set_fields=fields, drop=drop)
    model = d2m_ref.load_model(path)
    try:
        assert (model.config.rope.rope_type, model.config.rope.factor) == ("linear", 2.0)
    finally:
        model.close()


def test_qwen3_head_dim_comes_from_the_file_not_the_family_default(tmp_path):
    """Without attention.key_length a GGUF's head size is hidden / heads (llama.cpp), not Qwen3's
    config default of 128."""
    case = next(c for c in CASES if c.config["model_type"] == "qwen3")
    model = hf.build(hf.HFCase("q3", {**case.config, "head_dim": 8}), torch.float32)  # 32 / 4 heads
    path = _copy(gw.write_gguf(model, tmp_path / "q3.gguf"), tmp_path / "nokey.gguf",
                 drop=("qwen3.attention.key_length", "qwen3.attention.value_length"))
    assert _relative(_ours(path), _reference(model)) <= 1e-9


def test_llama3_rope_factors_are_refused_by_name(tmp_path):
    case = next(c for c in CASES if c.name == "llama_llama3rope_tied_gqa7")
    path = gw.write_gguf(hf.build(case, torch.float32), tmp_path / "llama3.gguf")
    with pytest.raises(ConfigError, match=r"rope_freqs\.weight"):
        d2m_ref.load_model(path)


@pytest.mark.parametrize("what", ["truncated", "architecture"])
def test_the_tools_exit_2_naming_the_file(what, tmp_path, capsys):
    from d2m_ref import check, import_gguf, run, trace
    if what == "truncated":
        path = _small(tmp_path)
        path.write_bytes(path.read_bytes()[:500])
        culprit = "model.gguf: "
    else:
        path = tmp_path / "gemma.gguf"
        w = _writer(path, "gemma2")
        _finish(w)
        culprit = "GGUF architecture 'gemma2'"
    candidate = tmp_path / "candidate.npz"
    np.savez(candidate, input_ids=np.array([1, 2], np.int64), logits=np.zeros((2, 97)))
    for main, argv in ((run.main, ["--weights", str(path), "--tokens", "1"]),
                       (trace.main, ["--weights", str(path), "--tokens", "1", "--out", str(tmp_path / "t.st")]),
                       (check.main, ["--weights", str(path), "--candidate", str(candidate), "--candidate-dtype", "float32"]),
                       (import_gguf.main, [str(path), "--out", str(tmp_path / "out")])):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert culprit in err and "Traceback" not in err, err


def test_missing_gguf_package_is_a_named_error(tmp_path, monkeypatch):
    import importlib
    path = _small(tmp_path)
    real = importlib.import_module

    def no_gguf(name, *args):
        if name == "gguf":
            raise ImportError("No module named 'gguf'")
        return real(name, *args)

    monkeypatch.setattr(importlib, "import_module", no_gguf)
    with pytest.raises(D2MError, match=r'pip install "d2m_ref\[gguf\]"'):
        d2m_ref.load_model(path)
