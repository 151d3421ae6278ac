"""Quantised weights (spec/quant.md): the formats, the NumPy dequantisation reference, the loader,
and `python -m d2m_ref.quantize`.  None of this needs the C extension."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import d2m_ref
from d2m_ref import quant
from d2m_ref.errors import OutputExistsError, WeightsError
from d2m_ref.quant import should_quantize
from d2m_ref.quantize import quantize_model
from d2m_ref.weights import canonical_params
from d2m_ref.quantize import main as quantize_main
from d2m_ref.safetensors_io import SafetensorsFile, save
from d2m_ref.synth import random_model, write_checkpoint
from d2m_ref.weights import Param, expected_tensors

from .models import dense2moe_config

SETTINGS = settings(max_examples=60, deadline=None)
PLAN = [{"attention": True, "ffn": "moe", "num_experts": 3, "num_experts_per_tok": 2,
         "shared_expert_intermediate_size": 16, "shared_expert_gate": True},
        {"attention": False, "ffn": "moe", "num_experts": 2, "scoring_func": "sigmoid"},
        {"attention": True, "ffn": "dense"}]
CFG = dense2moe_config(PLAN, base="qwen2", hidden=40, width=72)


# ---------------------------------------------------------------------------------------------
# The formats


def test_q4_packing_example_of_the_spec():
    """spec/quant.md §3's worked example: columns 0..39 with values (c % 16) − 8."""
    values = (np.arange(40) % 16 - 8).astype(np.int8)[None, :]
    packed = quant.pack_q4(values)
    assert packed.shape == (1, 32)
    # block 0: byte j = column j (low) | column j+16 (high); nibble = value + 8 = c % 16
    assert packed[0, 0] == 0x00 and packed[0, 1] == 0x11 and packed[0, 15] == 0xFF
    # block 1 holds columns 32..39 then padding (value 0 = nibble 8): byte 0 = col 32 (0) | pad (8)
    assert packed[0, 16] == 0x80 and packed[0, 23] == 0x87 and packed[0, 24] == 0x88
    np.testing.assert_array_equal(quant.unpack_q4(packed, 40), values)


@SETTINGS
@given(rows=st.integers(1, 5), cols=st.integers(1, 200), seed=st.integers(0, 2**32 - 1))
def test_q4_pack_unpack_round_trip(rows, cols, seed):
    """unpack_q4(pack_q4(v)) == v for every int4 value and any column count."""
    v = np.random.default_rng(seed).integers(-8, 8, (rows, cols)).astype(np.int8)
    packed = quant.pack_q4(v)
    assert packed.shape == (rows, 16 * quant.blocks(cols)) and packed.dtype == np.uint8
    np.testing.assert_array_equal(quant.unpack_q4(packed, cols), v)


@SETTINGS
@given(storage=st.sampled_from(quant.STORAGE), rows=st.integers(1, 6), cols=st.integers(1, 300),
       scale=st.sampled_from([1.0, 1e-3, 50.0]), seed=st.integers(0, 2**32 - 1))
def test_quantisation_error_is_half_a_step(storage, rows, cols, scale, seed):
    """Dequantised weights are within half a quantisation step of the source (plus the scale's own
    rounding), use the full symmetric range, and float32 dequantisation is the rounded float64 one."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((rows, cols)) * scale
    w[0, 0] = 0.0
    q, s = quant.quantize(w, storage)
    (qdt, qshape), (sdt, sshape) = quant.part_specs(storage, (rows, cols))
    assert q.shape == qshape and s.shape == sshape
    d64 = quant.dequantize(storage, q, s, cols, np.float64)
    d32 = quant.dequantize(storage, q, s, cols, np.float32)
    np.testing.assert_array_equal(d32, d64.astype(np.float32))
    if storage == "Q8":
        step, top = np.repeat(s.astype(np.float64)[:, None], cols, 1), 127
        ints = q
    else:
        g = quant.group_of(storage)
        step, top = np.repeat(s.astype(np.float64), g, 1)[:, :cols], 7
        ints = quant.unpack_q4(q, cols)
        np.testing.assert_array_equal(d32.astype(np.float64), d64)  # exact in float32
    assert np.all(np.abs(d64 - w) <= 0.5 * step + np.abs(w) * 2.0 ** -10)
    assert ints.min() >= -top and (np.abs(ints).max() == top or not np.any(w))


def test_quantising_refuses_non_finite_and_overflowing_weights():
    w = np.ones((2, 40))
    w[1, 3] = np.nan
    with pytest.raises(WeightsError, match=r"\[1, 3\]"):
        quant.quantize(w, "Q8", what="layer.w")
    with pytest.raises(WeightsError, match="float16 scale would overflow"):
        quant.quantize(np.full((1, 32), 1e6), "Q4G32")


@SETTINGS
@given(storage=st.sampled_from(quant.STORAGE), cols=st.integers(1, 150), T=st.integers(1, 3),
       seed=st.integers(0, 2**32 - 1))
def test_integer_gemv_model_is_the_dequantised_product_of_quantised_activations(storage, cols, T, seed):
    """The integer arithmetic of the kernels equals x̂·Ŵᵀ, with Ŵ the dequantised weights and
    x̂ = d·xq the quantised activation."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((7, cols))
    q, s = quant.quantize(w, storage)
    x = rng.standard_normal((T, cols)).astype(np.float32)
    xq, d = quant.quantize_activations(x)
    xhat = (xq.reshape(T, -1, 32) * d[:, :, None].astype(np.float64)).reshape(T, -1)[:, :cols]
    expected = xhat @ quant.dequantize(storage, q, s, cols, np.float64).T
    np.testing.assert_allclose(quant.integer_gemv(storage, q, s, cols, x), expected, rtol=1e-12, atol=1e-12)
    assert np.all(np.abs(x - xhat) <= 0.5 * np.repeat(d, 32, 1)[:, :cols] * (1 + 1e-4))


# ---------------------------------------------------------------------------------------------
# Params and the loader


def quantized_checkpoint(tmp_path, storage="Q4G32", seed=1):
    cfg = d2m_ref.parse_config(CFG)
    src = tmp_path / "src"
    src.mkdir()
    write_checkpoint(cfg, src / "model.safetensors", seed=seed, storage="BF16",
                     metadata={"config": json.dumps(CFG)})
    fmt = {v: k for k, v in quant.FORMATS.items()}[storage]
    out = tmp_path / "q"
    assert quantize_main(["--weights", str(src), "--format", fmt, "--out", str(out)]) == 0
    return cfg, src, out


@pytest.mark.parametrize("storage", quant.STORAGE)
def test_quantize_command_writes_what_the_loader_reads(tmp_path, storage, capsys):
    """`quantize` writes the chosen tensors as Q8/Q4G parts; load_model binds them as quantised Params
    equal to the in-memory quantisation, and the model runs close to its float source."""
    cfg, src, out = quantized_checkpoint(tmp_path, storage)
    assert "quantised to" in capsys.readouterr().out
    f = SafetensorsFile(out / "model.safetensors")
    info = json.loads(f.metadata[quant.METADATA_KEY])
    assert info["storage"] == storage and info["quant_version"] == quant.QUANT_VERSION
    model = d2m_ref.load_model(out)
    source = d2m_ref.load_model(src)
    in_memory = quantize_model(source, storage)
    n_quantized = 0
    for (name, p), (_, ref) in zip(canonical_params(model), canonical_params(in_memory)):
        assert p.storage == ref.storage
        if should_quantize(name):
            n_quantized += 1
            assert p.storage == storage and f"{name}.{storage.lower()}" in f.names()
            np.testing.assert_array_equal(p.raw(), ref.raw())
            np.testing.assert_array_equal(p.scales(), ref.scales())
            np.testing.assert_array_equal(p.rows(1, 3, np.float32), p.load(np.float32)[1:3])
            assert p.nbytes == quant.storage_nbytes(storage, p.shape) < ref.shape[0] * ref.shape[1] * 2
        else:
            assert p.storage == "BF16"
    assert n_quantized == sum(should_quantize(n) for n, _ in expected_tensors(cfg))
    ids = np.arange(5) * 3 % cfg.vocab_size
    q_logits = d2m_ref.forward(model, ids)[0]
    np.testing.assert_array_equal(q_logits, d2m_ref.forward(in_memory, ids)[0])
    capture: dict = {}
    f_logits = d2m_ref.forward(source, ids, capture=capture)[0]
    routes = {i: capture[f"topk_ids.{i}"] for i, spec in enumerate(cfg.layers) if spec.moe is not None}
    q_routed = d2m_ref.forward(model, ids, forced_routes=routes)[0]  # the float model's routes: no flips
    err = np.max(np.abs(q_routed - f_logits)) / np.max(np.abs(f_logits))
    # weight quantisation noise only: int4 on Gaussian weights is ~10 % RMS per weight (step max/7)
    assert err < (0.01 if storage == "Q8" else 0.3), err


def test_quantize_refuses_to_overwrite_without_force(tmp_path):
    cfg, src, out = quantized_checkpoint(tmp_path, "Q8")
    before = (out / "model.safetensors").read_bytes()
    assert quantize_main(["--weights", str(src), "--format", "int4-g64", "--out", str(out)]) == 2
    assert (out / "model.safetensors").read_bytes() == before
    assert quantize_main(["--weights", str(src), "--format", "int4-g64", "--out", str(out), "--force"]) == 0
    assert d2m_ref.load_model(out).weights.layers[0].attention.q.storage == "Q4G64"
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporaries left
    with pytest.raises(OutputExistsError):
        from d2m_ref.quantize import write_quantized
        write_quantized(d2m_ref.load_model(src), "Q8", "int8", out / "model.safetensors", False, "test")


def test_quantize_refuses_a_quantised_source(tmp_path, capsys):
    _, _, out = quantized_checkpoint(tmp_path, "Q8")
    assert quantize_main(["--weights", str(out), "--format", "int8", "--out", str(tmp_path / "again")]) == 2
    assert "already quantised" in capsys.readouterr().err


def _arrays_of(path):
    f = SafetensorsFile(path)
    return {n: np.array(f.raw(n)) for n in f.names()}, dict(f.metadata), {n: f.dtype(n) for n in f.names()}


@pytest.mark.parametrize("defect, message", [
    ("drop_scale", r"missing tensor '.*q_proj\.weight\.q8\.scale'"),
    ("bad_shape", r"'.*q_proj\.weight\.q8' is I8 \[.*\]; a Q8 weight of shape"),
    ("both", r"both '.*q_proj\.weight\.q8' and '.*q_proj\.weight\.q4g32'"),
    ("version", "quant_version 9"),
])
def test_loader_names_the_defect(tmp_path, defect, message):
    """A broken quantised checkpoint is an error naming the tensor (or the version) at fault."""
    _, _, out = quantized_checkpoint(tmp_path, "Q8")
    arrays, meta, dtypes = _arrays_of(out / "model.safetensors")
    name = "model.layers.0.self_attn.q_proj.weight"
    if defect == "drop_scale":
        del arrays[f"{name}.q8.scale"]
    elif defect == "bad_shape":
        arrays[f"{name}.q8"] = arrays[f"{name}.q8"][:, :-1].copy()
    elif defect == "both":
        q, s = quant.quantize(np.ones((40, 40)), "Q4G32")
        arrays[f"{name}.q4g32"], arrays[f"{name}.q4g32.scale"] = q, s
    else:
        meta[quant.METADATA_KEY] = json.dumps(dict(json.loads(meta[quant.METADATA_KEY]), quant_version="9"))
    bad = tmp_path / "bad"
    bad.mkdir()
    save(bad / "model.safetensors", arrays, metadata=meta,
         dtypes={n: d for n, d in dtypes.items() if n in arrays and d == "BF16"})
    with pytest.raises(WeightsError, match=message):
        d2m_ref.load_model(bad)


def test_in_memory_quantised_param_checks_its_parts():
    q, s = quant.quantize(np.ones((3, 40)), "Q4G32")
    p = Param.quantized("w", "Q4G32", (3, 40), q, s)
    assert p.load(np.float64).shape == (3, 40) and p.take(np.array([2, 0]), np.float32).shape == (2, 40)
    with pytest.raises(WeightsError, match="scales must be F16"):
        Param.quantized("w", "Q4G32", (3, 40), q, s.astype(np.float32))
    with pytest.raises(WeightsError, match="not a quantised storage"):
        Param.quantized("w", "BF16", (3, 40), q, s)


def test_quantize_model_keeps_the_float_tensors():
    """Norms, biases, router, shared-expert gate, embeddings and LM head keep their storage."""
    model = quantize_model(random_model(d2m_ref.parse_config(CFG), seed=2, storage="F16"), "Q8")
    kept = {name: p.storage for name, p in canonical_params(model) if not should_quantize(name)}
    assert set(kept.values()) == {"F16"}
    assert "model.layers.0.mlp.gate.weight" in kept and "model.embed_tokens.weight" in kept
    assert "model.layers.0.mlp.shared_expert_gate.weight" in kept


def test_quantize_never_rewrites_the_file_it_reads(tmp_path, capsys):
    """--out naming the --weights file itself is refused, --force or not (it used to rewrite the file
    it was still reading: issue 22, "Data lost")."""
    cfg, src, _ = quantized_checkpoint(tmp_path, "Q8")
    weights = src / "model.safetensors"
    before = weights.read_bytes()
    capsys.readouterr()
    for out in (src, weights):  # the folder (-> its model.safetensors) and the file itself
        for force in ([], ["--force"]):
            assert quantize_main(["--weights", str(src), "--format", "int8", "--out", str(out), *force]) == 2
            assert "is the same file as" in capsys.readouterr().err
            assert weights.read_bytes() == before
