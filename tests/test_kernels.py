"""The C kernels against the scalar path and the NumPy reference (spec/kernels.md).

Two kinds of check, over shapes (1, odd, not a multiple of the vector width or the group), every
weight format, token counts, thread counts and every path this CPU runs:
- exact inputs (small integers times powers of two, so every float sum is exact): every path,
  every thread count, equals the scalar path and the exact reference bit for bit — which pins the
  integer accumulations of the Q8/Q4G kernels exactly;
- random inputs: within the documented bound of the exact dot product (spec/kernels.md §4), and
  bit-identical across thread counts.

Under emulation (the aarch64 CI lane) D2M_TEST_EXAMPLES makes the hypothesis runs smaller, and
D2M_EXPECT_PATH names the path dispatch must pick on that CPU model.
"""

from __future__ import annotations

import os
import shutil
import sysconfig
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import d2m_ref
from d2m_ref import ckernels, quant
from d2m_ref.kernel_choice import kernels_for
from d2m_ref.kernels import NumpyKernels, experts_topk_loop
from d2m_ref.ops import silu
from d2m_ref.synth import random_model, to_storage
from d2m_ref.weights import MLPWeights, Param

from .models import dense2moe_config

pytestmark = pytest.mark.skipif(not ckernels.available(), reason="C kernels not built")

EXAMPLES = int(os.environ.get("D2M_TEST_EXAMPLES", "150"))
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
FORMATS = ("F32", "F16", "BF16", "Q8", "Q4G32", "Q4G64", "Q4G128")
U = 2.0 ** -24  # float32 unit roundoff
PATHS = ckernels.supported_paths()

_KERNELS: dict[tuple[str, int], ckernels.CKernels] = {}


def kernels(path: str, threads: int) -> ckernels.CKernels:
    """One context per (path, threads), split as finely as possible so that even tiny matrices
    are spread over every thread (one row per chunk, no minimum size)."""
    key = (path, threads)
    if key not in _KERNELS:
        k = ckernels.CKernels(path=path, threads=threads)
        k.tune(parallel_min_bytes=0, chunk_bytes=1)
        _KERNELS[key] = k
    return _KERNELS[key]


def gamma(n: int) -> float:
    return n * U / (1 - n * U)


cols_st = st.one_of(st.sampled_from([1, 2, 7, 8, 9, 15, 16, 31, 32, 33, 63, 64, 65, 96, 127, 128, 129, 160, 257]),
                    st.integers(1, 300))


# ---------------------------------------------------------------------------------------------
# Building weights and inputs


def make_weight(storage: str, rows: int, cols: int, rng, exact: bool = False) -> Param:
    """A random [rows, cols] weight in `storage`.  exact: values whose float products and sums are
    exact in float32 (small integers times powers of two)."""
    if quant.is_quantized(storage):
        qmax = 127 if storage == "Q8" else 7
        if exact:  # small integers and power-of-two scales: every term s·d·isum is exact
            qmax = 64 if storage == "Q8" else 7
        ints = rng.integers(-qmax - (0 if storage == "Q8" and exact else 1), qmax + 1, (rows, cols))
        if storage == "Q8":
            scales = (2.0 ** rng.integers(-1, 1, rows) if exact else rng.uniform(0.001, 0.05, rows)).astype(np.float32)
            return Param.quantized("w", storage, (rows, cols), ints.astype(np.int8), scales)
        ng = quant.n_groups(cols, quant.group_of(storage))
        scales = (2.0 ** rng.integers(-1, 1, (rows, ng)) if exact else rng.uniform(0.001, 0.05, (rows, ng)))
        return Param.quantized("w", storage, (rows, cols), quant.pack_q4(ints), scales.astype(np.float16))
    if exact:
        values = rng.integers(-8, 9, (rows, cols)) * 2.0 ** rng.integers(-2, 1)
    else:
        values = rng.standard_normal((rows, cols)) / np.sqrt(cols)
    return Param.of("w", to_storage(values.astype(np.float32), storage), storage)


def make_input(storage: str, T: int, cols: int, rng, exact: bool = False) -> np.ndarray:
    """x [T, cols] float32.  exact + quantised weights: every 32-block holds ±127·2^j and multiples
    of 2^j, so its activation quantisation is exact (d = 2^j, q = x / 2^j)."""
    if not exact:
        return rng.standard_normal((T, cols)).astype(np.float32)
    if quant.is_quantized(storage):
        x = rng.integers(-127, 128, (T, cols)).astype(np.float64)
        x[:, ::32] = 127 * rng.choice([-1, 1], (T, len(range(0, cols, 32))))
        return (x * 2.0 ** rng.integers(0, 2)).astype(np.float32)
    return (rng.integers(-16, 17, (T, cols)) * 2.0 ** rng.integers(-1, 2)).astype(np.float32)


def exact_reference(w: Param, x: np.ndarray) -> np.ndarray:
    """x·Wᵀ in float64 with the kernels' activation (quantised for Q8/Q4G): the exact dot products."""
    return effective_input(w, x) @ w.load(np.float64).T


def effective_input(w: Param, x: np.ndarray) -> np.ndarray:
    """x̂: x itself for float weights; d·xq (quant.quantize_activations) for quantised ones."""
    if not quant.is_quantized(w.storage):
        return x.astype(np.float64)
    xq, d = quant.quantize_activations(x)
    xhat = (xq.astype(np.float64).reshape(x.shape[0], -1, 32) * d.astype(np.float64)[:, :, None])
    return xhat.reshape(x.shape[0], -1)[:, :x.shape[1]]


def gemv_bound(w: Param, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(rounding bound, activation quantisation error bound) of spec/kernels.md §4, [T, R] each:
    |y − Σ ŵ·x̂| ≤ γ(C+4)·Σ|ŵ|·|x̂|  and  |Σ ŵ·x̂ − Σ ŵ·x| ≤ Σ|ŵ|·|x − x̂|."""
    wd = np.abs(w.load(np.float64))
    xhat = effective_input(w, x)
    rounding = gamma(w.shape[1] + 4) * (np.abs(xhat) @ wd.T)
    activation = np.abs(x.astype(np.float64) - xhat) @ wd.T
    return rounding, activation


def run(path: str, threads: int, w: Param, x: np.ndarray, alpha: float = 1.0, y0: np.ndarray | None = None):
    y = np.zeros((x.shape[0], w.shape[0]), np.float32) if y0 is None else y0.copy()
    kernels(path, threads).gemv(y, w, x, alpha=alpha, accumulate=y0 is not None)
    return y


# ---------------------------------------------------------------------------------------------
# The build and the dispatch


def test_extension_built_when_a_compiler_exists():
    """With a C compiler and Python headers present, `pip install` must have built the extension."""
    cc = (sysconfig.get_config_var("CC") or "cc").split()[0]
    headers = Path(sysconfig.get_paths()["include"]) / "Python.h"
    if shutil.which(cc) is None or not headers.exists():
        pytest.skip("no compiler or headers here")
    assert ckernels.available(), ckernels.IMPORT_ERROR


def test_dispatch_picks_the_best_supported_path():
    """The default path is the first compiled path this CPU supports (or the one D2M_EXPECT_PATH names)."""
    info = ckernels.build_info()
    assert info["supported_paths"] and info["supported_paths"][-1] == "scalar"
    expected = os.environ.get("D2M_EXPECT_PATH")
    chosen = ckernels.CKernels(threads=1).path
    assert chosen == (expected or info["supported_paths"][0]), info
    if os.environ.get(ckernels.PATH_ENV) is None:
        assert chosen == info["supported_paths"][0]


def test_unsupported_or_unknown_paths_are_refused_by_name():
    """A path this CPU lacks (or that does not exist) is an error naming the paths there are —
    never a SIGILL later."""
    for name in [p for p in ckernels.compiled_paths() if p not in PATHS] + ["no-such-path"]:
        with pytest.raises(ckernels.CKernelsError, match=name):
            ckernels.CKernels(path=name, threads=1)


def test_environment_forces_the_path(monkeypatch):
    """D2M_KERNEL_PATH picks the path when the caller names none."""
    monkeypatch.setenv(ckernels.PATH_ENV, "scalar")
    assert ckernels.CKernels(threads=1).path == "scalar"
    monkeypatch.setenv(ckernels.PATH_ENV, "no-such-path")
    with pytest.raises(ckernels.CKernelsError, match=ckernels.PATH_ENV):
        ckernels.CKernels(threads=1)


def test_thread_count_from_environment(monkeypatch):
    monkeypatch.setenv(ckernels.THREADS_ENV, "3")
    assert ckernels.CKernels().threads == 3
    monkeypatch.setenv(ckernels.THREADS_ENV, "zero")
    with pytest.raises(ckernels.CKernelsError, match=ckernels.THREADS_ENV):
        ckernels.CKernels()


def test_build_info_names_compiler_flags_and_paths():
    info = ckernels.build_info(kernels("scalar", 1))
    assert info["built"] and info["path"] == "scalar" and info["threads"] == 1
    assert "-ffp-contract=off" in info["flags"] and "-ffast-math" not in info["flags"].replace("-fno-fast-math", "")
    assert info["compiler"] and info["target"]
    assert set(info["supported_paths"]) <= set(info["compiled_paths"])


# ---------------------------------------------------------------------------------------------
# The activation quantisation


@SETTINGS
@given(cols=cols_st, seed=st.integers(0, 2**32 - 1), scale=st.sampled_from([1.0, 1e-3, 1e30, 1e-38, 0.0]),
       special=st.sampled_from([None, np.inf, -np.inf, np.nan]))
def test_activation_quantisation_is_the_numpy_twin(cols, seed, scale, special):
    """C's activation quantisation equals d2m_ref.quant.quantize_activations bit for bit,
    including zero, subnormal-scale and non-finite blocks."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(cols) * scale).astype(np.float32)
    if special is not None:
        x[rng.integers(0, cols)] = special
    q_c, d_c = ckernels.quantize_activations_c(x)
    q_np, d_np = quant.quantize_activations(x[None, :])
    np.testing.assert_array_equal(q_c, q_np[0])
    np.testing.assert_array_equal(d_c.view(np.uint32), d_np[0].view(np.uint32))


# ---------------------------------------------------------------------------------------------
# GEMV


@SETTINGS
@given(storage=st.sampled_from(FORMATS), rows=st.integers(1, 40), cols=cols_st, T=st.integers(1, 3),
       threads=st.sampled_from([1, 2, 3, 4]), seed=st.integers(0, 2**32 - 1))
def test_exact_inputs_give_identical_results_on_every_path(storage, rows, cols, T, threads, seed):
    """On exactly representable inputs every path and thread count equals the scalar path and the
    exact reference bit for bit (so the integer accumulations agree exactly)."""
    rng = np.random.default_rng(seed)
    w = make_weight(storage, rows, cols, rng, exact=True)
    x = make_input(storage, T, cols, rng, exact=True)
    ref = exact_reference(w, x)
    assert np.array_equal(ref.astype(np.float32), ref)  # the inputs really are exact
    scalar = run("scalar", 1, w, x)
    np.testing.assert_array_equal(scalar, ref)
    for path in PATHS:
        np.testing.assert_array_equal(run(path, threads, w, x), scalar, err_msg=f"path {path}")


@SETTINGS
@given(storage=st.sampled_from(FORMATS), rows=st.integers(1, 40), cols=cols_st, T=st.integers(1, 3),
       threads=st.sampled_from([2, 3, 4]), seed=st.integers(0, 2**32 - 1))
def test_every_path_is_within_the_bound_and_thread_independent(storage, rows, cols, T, threads, seed):
    """Random inputs: each path is within γ(C+4)·Σ|ŵ||x̂| of the exact dot product (spec/kernels.md §4),
    within that plus the activation quantisation error of the NumPy reference, and the same bits
    whatever the thread count."""
    rng = np.random.default_rng(seed)
    w = make_weight(storage, rows, cols, rng)
    x = make_input(storage, T, cols, rng)
    exact = exact_reference(w, x)
    rounding, activation = gemv_bound(w, x)
    reference = NumpyKernels().linear(x.astype(np.float64), w)  # the dequantising NumPy reference
    for path in PATHS:
        one = run(path, 1, w, x)
        assert np.all(np.abs(one - exact) <= rounding), (path, np.max(np.abs(one - exact) - rounding))
        assert np.all(np.abs(one - reference) <= rounding + activation * (1 + 1e-9) + 1e-300), path
        np.testing.assert_array_equal(run(path, threads, w, x), one, err_msg=f"{path}, {threads} threads")


@SETTINGS
@given(storage=st.sampled_from(FORMATS), rows=st.integers(1, 20), cols=cols_st, T=st.integers(1, 4),
       alpha=st.sampled_from([1.0, -0.5, 0.3]), seed=st.integers(0, 2**32 - 1))
def test_tokens_alpha_and_accumulate(storage, rows, cols, T, alpha, seed):
    """T tokens in one call equal T one-token calls; y += α·W·x is y + α·(W·x) with two float32
    roundings, as NumPy computes it."""
    rng = np.random.default_rng(seed)
    w = make_weight(storage, rows, cols, rng)
    x = make_input(storage, T, cols, rng)
    y0 = rng.standard_normal((T, rows)).astype(np.float32)
    for path in PATHS:
        plain = run(path, 2, w, x)
        for t in range(T):
            np.testing.assert_array_equal(run(path, 1, w, x[t:t + 1]), plain[t:t + 1])
        np.testing.assert_array_equal(run(path, 2, w, x, alpha=alpha, y0=y0), y0 + np.float32(alpha) * plain)


def test_large_matrix_default_split():
    """A matrix above the parallel threshold, split the default way, equals the one-thread result."""
    rng = np.random.default_rng(7)
    for storage in FORMATS:
        w = make_weight(storage, 1100, 1000, rng)
        x = make_input(storage, 1, 1000, rng)
        for path in PATHS:
            many = ckernels.CKernels(path=path, threads=3)
            y = np.zeros((1, 1100), np.float32)
            many.gemv(y, w, x)
            np.testing.assert_array_equal(y, run(path, 1, w, x))


# ---------------------------------------------------------------------------------------------
# The fused expert and the top-k call


def make_mlp(storage: str, hidden: int, width: int, rng) -> MLPWeights:
    return MLPWeights(gate=make_weight(storage, width, hidden, rng), up=make_weight(storage, width, hidden, rng),
                      down=make_weight(storage, hidden, width, rng))


def expert_bound(w: MLPWeights, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(reference, bound) for down(silu(gate x) ⊙ up x): the float64 reference on the dequantised
    weights and the exact x, and the propagated bound of spec/kernels.md §5."""
    g, u = x.astype(np.float64) @ w.gate.load(np.float64).T, x.astype(np.float64) @ w.up.load(np.float64).T
    eg, eu = (sum(gemv_bound(m, x)) for m in (w.gate, w.up))
    sg = silu(g)
    a = sg * u
    ea = 1.1 * eg * (np.abs(u) + eu) + (np.abs(sg) + 1.1 * eg) * eu + 8 * U * (np.abs(sg) + 1.1 * eg) * (np.abs(u) + eu)
    amag = np.abs(a) + ea  # |â| ≤ amag
    wd = np.abs(w.down.load(np.float64))
    bound = ea @ wd.T + gamma(w.down.shape[1] + 4) * ((1.01 * amag) @ wd.T)
    if quant.is_quantized(w.down.storage):  # the intermediate is quantised per block of 32
        T, F = a.shape
        pad = np.zeros((T, quant.blocks(F) * 32))
        pad[:, :F] = amag
        block_max = np.repeat(pad.reshape(T, -1, 32).max(axis=2), 32, axis=1)[:, :F]
        bound += (0.5 * (1 + 1e-4) * block_max / 127 * (1 + 1e-4)) @ wd.T
    y = a @ w.down.load(np.float64).T
    return y, bound + 4 * U * np.abs(y) + 1e-30


@SETTINGS
@given(storage=st.sampled_from(FORMATS), hidden=cols_st, width=st.integers(1, 80), T=st.integers(1, 3),
       threads=st.sampled_from([1, 2, 3]), seed=st.integers(0, 2**32 - 1))
def test_expert_within_bound_and_thread_independent(storage, hidden, width, T, threads, seed):
    """The fused C expert is within the propagated bound of the float64 reference, equals the
    composition of C GEMVs with a float32 SwiGLU to rounding, and is thread-count independent."""
    rng = np.random.default_rng(seed)
    w = make_mlp(storage, hidden, width, rng)
    x = make_input(storage, T, hidden, rng)
    ref, bound = expert_bound(w, x)
    for path in PATHS:
        one = kernels(path, 1).expert(x, w)
        assert np.all(np.abs(one - ref) <= bound), (path, np.max(np.abs(one - ref) - bound))
        np.testing.assert_array_equal(kernels(path, threads).expert(x, w), one)


@SETTINGS
@given(storage=st.sampled_from(FORMATS), hidden=cols_st, width=st.integers(1, 64), E=st.integers(1, 6),
       data=st.data(), seed=st.integers(0, 2**32 - 1))
def test_topk_equals_the_reference_loop_over_c_experts(storage, hidden, width, E, data, seed):
    """One token's top-k call equals the reference order (experts in increasing id, y += w·expert(x))
    over the C expert bit for bit, on every path and thread count; and the float64 NumPy reference
    within the experts' bounds."""
    rng = np.random.default_rng(seed)
    experts = tuple(make_mlp(storage, hidden, width, rng) for _ in range(E))
    k = data.draw(st.integers(1, E))
    ids = rng.permutation(E)[:k][None, :]
    weights = rng.uniform(0.05, 1.0, (1, k)).astype(np.float32)
    x = make_input(storage, 1, hidden, rng)
    total = sum(float(weights[0, j]) * expert_bound(experts[ids[0, j]], x)[1] for j in range(k))
    ref = experts_topk_loop(NumpyKernels(), x.astype(np.float64), experts, ids, weights.astype(np.float64))
    for path in PATHS:
        loop = experts_topk_loop(kernels(path, 1), x, experts, ids, weights)
        for threads in (1, 3):
            np.testing.assert_array_equal(kernels(path, threads).experts_topk(x, experts, ids, weights), loop)
        assert np.all(np.abs(loop - ref) <= total * 1.01 + 8 * U * np.abs(ref)), path


def test_topk_layer_descriptions_are_per_experts_and_refuse_bad_ids():
    """The top-k call describes a layer's experts once; another set sharing its first expert (a
    new list that may even reuse the first one's id) gets its own answer, an expert id outside
    0..E-1 is refused (not wrapped like a Python index), and a dropped model takes its entry."""
    import gc
    rng = np.random.default_rng(9)
    experts = [make_mlp("Q4G32", 40, 24, rng) for _ in range(4)]
    x = make_input("Q4G32", 1, 40, rng)
    ids, weights = np.array([[2, 0, 1]]), np.array([[0.5, 0.3, 0.2]], np.float32)  # 3 terms: order shows
    c = ckernels.CKernels(threads=1)
    for members in ([0, 1, 2], [0, 3, 2], [0, 2, 1]):  # same first expert, other second and third
        chosen = [experts[m] for m in members]
        np.testing.assert_array_equal(c.experts_topk(x, chosen, ids, weights),
                                      experts_topk_loop(c, x, chosen, ids, weights))
    described = c._expert_sets[experts[0]]
    c.experts_topk(x, chosen, ids, weights)
    assert c._expert_sets[experts[0]] is described  # not described again
    for bad in ([[3, 0, 1]], [[-1, 0, 1]]):
        with pytest.raises(ckernels.CKernelsError, match="experts_topk"):
            c.experts_topk(x, experts[:3], np.array(bad), weights)
        with pytest.raises(d2m_ref.InputError, match="expert ids must be in 0..2"):
            experts_topk_loop(c, x, experts[:3], np.array(bad), weights)
    with pytest.raises(ValueError, match=r"\[1, 3\] and \[1, 2\]"):
        c.experts_topk(x, experts[:3], ids, weights[:, :2])
    assert len(c._expert_sets) == 1
    del experts, chosen
    gc.collect()
    assert len(c._expert_sets) == 0


@pytest.mark.parametrize("storage, rows, cols", [("Q4G32", 2200, 2048), ("F16", 1, 1 << 20), ("Q8", 3, 400_000)])
def test_default_chunks_do_not_change_results(storage, rows, cols):
    """With the automatic chunk size (matrices over the 1 MiB parallel threshold, cut into each
    thread's equal chunks) every thread count gives the same bits, a one-row matrix included."""
    w = make_weight(storage, rows, cols, np.random.default_rng(11))
    assert w.nbytes > 1 << 20
    x = np.random.default_rng(12).standard_normal((1, cols)).astype(np.float32)
    one = ckernels.CKernels(threads=1).linear(x, w)
    for threads in (2, 3):
        np.testing.assert_array_equal(ckernels.CKernels(threads=threads).linear(x, w), one)


# ---------------------------------------------------------------------------------------------
# CKernels in the forward pass


PLAN = [{"attention": True, "ffn": "moe", "num_experts": 3, "num_experts_per_tok": 2,
         "shared_expert_intermediate_size": 16, "shared_expert_gate": True},
        {"attention": False, "ffn": "moe", "num_experts": 2, "scoring_func": "sigmoid"},
        {"attention": True, "ffn": "dense"}]


@pytest.mark.parametrize("storage", ["F32", "BF16", "Q8", "Q4G32"])
def test_forward_float32_close_to_numpy_and_float64_is_the_oracle(storage):
    """A small Dense2MoE decodes on CKernels in float32 close to NumPy's float32 run of the same
    weights; in float64, CKernels hands every call to NumPy, so the oracle's logits are unchanged."""
    cfg = d2m_ref.parse_config(dense2moe_config(PLAN, base="qwen2", hidden=64, width=96))
    model = random_model(cfg, seed=5, storage="BF16" if quant.is_quantized(storage) else storage)
    if quant.is_quantized(storage):
        from d2m_ref.quantize import quantize_model
        model = quantize_model(model, storage)
    ids = np.arange(6) * 11 % cfg.vocab_size
    c = kernels(PATHS[0], 2)
    ref64, _ = d2m_ref.forward(model, ids, dtype=np.float64)
    np.testing.assert_array_equal(d2m_ref.forward(model, ids, dtype=np.float64, kernels=c)[0], ref64)
    # decode token by token on C (T = 1 everywhere) against the float64 reference
    cache, rows = None, []
    for t in range(ids.size):
        logits, cache = d2m_ref.forward(model, ids[t:t + 1], cache=cache, dtype=np.float32, kernels=c)
        rows.append(logits[0])
    err = np.max(np.abs(np.array(rows) - ref64)) / np.max(np.abs(ref64))
    limit = 1e-4 if not quant.is_quantized(storage) else 3e-2  # int8 activations (spec/kernels.md §3)
    assert err < limit, err


def test_kernels_for_names():
    assert isinstance(kernels_for("numpy"), NumpyKernels)
    assert isinstance(kernels_for("c", threads=1), ckernels.CKernels)
    with pytest.raises(d2m_ref.InputError, match="numpy"):
        kernels_for("gpu")


# ---------------------------------------------------------------------------------------------
# What the binding refuses, and what C refuses


def test_python_checks_inputs_and_falls_back_on_unusable_weights():
    """A misaligned weight takes the NumPy path (one warning naming it); a wrongly shaped input is an
    error naming the weight; float64 inputs take the NumPy path."""
    rng = np.random.default_rng(1)
    values = rng.standard_normal((5, 9)).astype(np.float16)
    buf = np.zeros(values.nbytes + 1, np.uint8)
    misaligned = np.frombuffer(buf.data, dtype=np.float16, count=values.size, offset=1).reshape(5, 9)
    misaligned[...] = values  # a writable view of buf
    w = Param("odd.weight", "F16", (5, 9), lambda: misaligned)
    c = ckernels.CKernels(threads=1)
    x = rng.standard_normal((1, 9)).astype(np.float32)
    with pytest.warns(RuntimeWarning, match="odd.weight.*aligned"):
        y = c.linear(x, w)
    np.testing.assert_allclose(y, x @ values.astype(np.float32).T, rtol=1e-5)
    good = Param.of("good.weight", values)
    with pytest.raises(ValueError, match="good.weight"):
        c.linear(rng.standard_normal((1, 8)).astype(np.float32), good)
    x64 = x.astype(np.float64)
    np.testing.assert_array_equal(c.linear(x64, good), NumpyKernels().linear(x64, good))


def test_c_checks_its_arguments():
    """Every entry point returns a status for NULL pointers, bad sizes, formats, groups, short
    scratch and out-of-range expert ids — it never trusts the binding."""
    from d2m_ref._d2m_kernels import ffi, lib
    c = ckernels.CKernels(threads=2)
    ctx = c._ctx
    w = np.ones((4, 8), np.float32)
    x = np.ones(8, np.float32)
    y = np.zeros(4, np.float32)
    wbuf, xbuf, ybuf = ffi.from_buffer(w), ffi.from_buffer("float[]", x), ffi.from_buffer("float[]", y)

    def matrix(**fields):
        base = {"format": lib.D2M_F32, "rows": 4, "cols": 8, "group": 0, "data": wbuf, "scales": ffi.NULL}
        base.update(fields)
        return ffi.new("d2m_matrix *", base)

    def gemv(m, *, y=ybuf, x=xbuf, n_tok=1, scratch=ffi.NULL, nbytes=0, context=ctx):
        return lib.d2m_gemv(y, m, x, n_tok, 1.0, 0, scratch, nbytes, context)

    assert gemv(matrix()) == lib.D2M_OK
    assert gemv(ffi.NULL) == lib.D2M_ERR_NULL
    assert gemv(matrix(), y=ffi.NULL) == lib.D2M_ERR_NULL
    assert gemv(matrix(), context=ffi.NULL) == lib.D2M_ERR_NULL
    assert gemv(matrix(data=ffi.NULL)) == lib.D2M_ERR_NULL
    assert gemv(matrix(rows=0)) == lib.D2M_ERR_SIZE
    assert gemv(matrix(cols=-3)) == lib.D2M_ERR_SIZE
    assert gemv(matrix(rows=lib.D2M_MAX_DIM + 1)) == lib.D2M_ERR_SIZE
    assert gemv(matrix(), n_tok=0) == lib.D2M_ERR_SIZE
    assert gemv(matrix(format=9)) == lib.D2M_ERR_FORMAT
    assert gemv(matrix(group=32)) == lib.D2M_ERR_FORMAT
    assert gemv(matrix(format=lib.D2M_Q8)) == lib.D2M_ERR_NULL  # Q8 without scales
    scales = np.ones(4, np.float32)
    q8 = matrix(format=lib.D2M_Q8, scales=ffi.from_buffer(scales))
    need = lib.d2m_gemv_scratch_bytes(q8, 1)
    assert need > 0 and gemv(q8) == lib.D2M_ERR_NULL  # scratch needed
    scratch = np.zeros(need, np.uint8)
    assert gemv(q8, scratch=ffi.from_buffer(scratch), nbytes=need - 1) == lib.D2M_ERR_SCRATCH
    assert gemv(q8, scratch=ffi.from_buffer(scratch), nbytes=need) == lib.D2M_OK
    assert gemv(matrix(format=lib.D2M_Q4G, group=48, scales=ffi.from_buffer(scales))) == lib.D2M_ERR_FORMAT
    # experts
    m = matrix()
    mlp = ffi.new("d2m_mlp[]", 1)
    mlp[0] = {"gate": m[0], "up": m[0], "down": m[0]}  # 4x8 down for a width-4 expert: sizes disagree
    ids = ffi.new("int32_t[]", [0])
    wts = ffi.new("float[]", [1.0])
    big = np.zeros(1 << 16, np.uint8)
    assert lib.d2m_expert(ybuf, mlp, xbuf, 1, ffi.NULL, 0, ffi.from_buffer(big), big.nbytes, ctx) == lib.D2M_ERR_SIZE
    down = matrix(rows=8, cols=4)
    mlp[0] = {"gate": m[0], "up": m[0], "down": down[0]}
    y8 = np.zeros(8, np.float32)
    assert lib.d2m_expert(ffi.from_buffer("float[]", y8), mlp, xbuf, 1, ffi.NULL, 0, ffi.from_buffer(big), 8, ctx) \
        == lib.D2M_ERR_SCRATCH
    assert lib.d2m_expert(ffi.from_buffer("float[]", y8), mlp, xbuf, 1, ffi.NULL, 0, ffi.from_buffer(big),
                          big.nbytes, ctx) == lib.D2M_OK
    np.testing.assert_allclose(y8, 32 * 8 / (1 + np.exp(-8)), rtol=1e-6)  # down(silu(8)·8), all-one weights
    topk = lambda ids_, k, n=1: lib.d2m_experts_topk(ffi.from_buffer("float[]", y8), mlp, n, ids_, wts, k, xbuf,  # noqa: E731
                                                     ffi.from_buffer(big), big.nbytes, ctx)
    assert topk(ids, 1) == lib.D2M_OK
    assert topk(ffi.new("int32_t[]", [1]), 1) == lib.D2M_ERR_SIZE
    assert topk(ffi.new("int32_t[]", [-1]), 1) == lib.D2M_ERR_SIZE
    assert topk(ids, 0) == lib.D2M_ERR_SIZE
    assert topk(ids, lib.D2M_MAX_TOPK + 1) == lib.D2M_ERR_SIZE
    assert topk(ids, 1, n=0) == lib.D2M_ERR_SIZE
    # contexts and streaming reads
    out = ffi.new("d2m_ctx **")
    assert lib.d2m_ctx_create(out, ffi.NULL, 0) == lib.D2M_ERR_THREADS
    assert lib.d2m_ctx_create(out, ffi.NULL, lib.D2M_MAX_THREADS + 1) == lib.D2M_ERR_THREADS
    assert lib.d2m_ctx_create(ffi.NULL, ffi.NULL, 1) == lib.D2M_ERR_NULL
    assert lib.d2m_ctx_tune(ffi.NULL, 0, 0) == lib.D2M_ERR_NULL
    buf = np.zeros(4096 + 64, np.uint8)
    off = (-buf.ctypes.data) % 64
    aligned = buf[off:off + 4096]
    checksum = ffi.new("uint64_t *")
    assert lib.d2m_stream_read(checksum, ffi.from_buffer(aligned), 4096, ctx) == lib.D2M_OK
    assert lib.d2m_stream_read(checksum, ffi.from_buffer(aligned), 4000, ctx) == lib.D2M_ERR_SIZE
    assert lib.d2m_stream_read(checksum, ffi.from_buffer(buf[off + 8:]), 4096, ctx) == lib.D2M_ERR_SIZE
    assert lib.d2m_stream_read(ffi.NULL, ffi.from_buffer(aligned), 4096, ctx) == lib.D2M_ERR_NULL
    seconds = ffi.new("double *")
    pair = ffi.new("d2m_matrix[]", [matrix()[0], matrix(format=9)[0]])
    assert lib.d2m_gemv_pass(seconds, ybuf, pair, 1, xbuf, ffi.NULL, 0, ctx) == lib.D2M_OK and seconds[0] >= 0
    assert lib.d2m_gemv_pass(seconds, ybuf, pair, 2, xbuf, ffi.NULL, 0, ctx) == lib.D2M_ERR_FORMAT  # the 2nd's
    assert lib.d2m_gemv_pass(seconds, ybuf, pair, 0, xbuf, ffi.NULL, 0, ctx) == lib.D2M_ERR_SIZE
    assert lib.d2m_gemv_pass(ffi.NULL, ybuf, pair, 1, xbuf, ffi.NULL, 0, ctx) == lib.D2M_ERR_NULL
    assert lib.d2m_gemv_pass(seconds, ybuf, ffi.NULL, 1, xbuf, ffi.NULL, 0, ctx) == lib.D2M_ERR_NULL
    assert lib.d2m_gemv_pass(seconds, ybuf, pair, 1, xbuf, ffi.NULL, 0, ffi.NULL) == lib.D2M_ERR_NULL
    assert lib.d2m_quantize_act(ffi.NULL, ffi.NULL, ffi.NULL, 3) == lib.D2M_ERR_NULL


def test_gemv_pass_is_the_gemvs_it_times():
    """The benchmark's C-timed pass runs d2m_gemv on each matrix in turn: y is the last one's
    product, bit for bit; shapes that differ, an empty list or a wrong y are refused by name."""
    rng = np.random.default_rng(4)
    ws = [Param.quantized(f"pass.{i}", "Q4G32", (33, 70), *quant.quantize(rng.standard_normal((33, 70)), "Q4G32"))
          for i in range(3)]
    c = ckernels.CKernels(threads=2)
    x = rng.standard_normal((1, 70)).astype(np.float32)
    y, alone = np.empty((1, 33), np.float32), np.empty((1, 33), np.float32)
    assert c.gemv_pass(y, ws, x) > 0
    c.gemv(alone, ws[-1], x)
    np.testing.assert_array_equal(y, alone)
    other = Param.of("pass.other", rng.standard_normal((33, 71)).astype(np.float32))
    with pytest.raises(ValueError, match="pass.other.*one shape"):
        c.gemv_pass(y, ws + [other], x)
    with pytest.raises(ValueError, match="no matrices"):
        c.gemv_pass(y, [], x)
    with pytest.raises(ValueError, match=r"y a writable contiguous \[1, 33\]"):
        c.gemv_pass(np.empty((1, 32), np.float32), ws, x)


def test_stream_read_checksum_is_path_and_thread_independent():
    """The bandwidth loop reads every word: its checksum is the sum of the words on every path and thread count."""
    n = 5 << 20
    buf = np.empty(n + 64, np.uint8)
    off = (-buf.ctypes.data) % 64
    data = buf[off:off + n]
    data[...] = np.random.default_rng(3).integers(0, 256, n, dtype=np.uint8)
    expected = int(data.view(np.uint64).sum(dtype=np.uint64))
    for p in PATHS:
        for t in (1, 3):
            assert kernels(p, t).stream_read(data) == expected, (p, t)
