"""Weight streaming (spec/architecture.md §6): no full-precision copy of the model ever exists."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import tracemalloc

import numpy as np
import pytest

import d2m_ref
from d2m_ref.kernels import NumpyKernels
from d2m_ref.synth import materialize, write_checkpoint

from .models import dense2moe_config

# Many layers, small matrices: the whole model in float64 is ~25x its largest matrix.
PLAN = [{"attention": i % 3 != 2, "ffn": "moe" if i % 2 else "dense", **({"num_experts": 2} if i % 2 else {})}
        for i in range(24)]
CFG = dense2moe_config(PLAN, hidden=128, heads=4, kv_heads=2, head_dim=32, vocab=300, width=256, top_k=1)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("stream")
    cfg = d2m_ref.parse_config(CFG)
    (folder / "config.json").write_text(json.dumps(CFG))
    write_checkpoint(cfg, folder / "model.safetensors", seed=5, storage="BF16")
    return folder


IDS = np.arange(12) * 37 % 300


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("block_bytes", [128 * 2**20, 64 * 1024])
def test_streaming_is_bit_identical_to_preconverted(checkpoint, dtype, block_bytes):
    """Logits from weights converted on use equal, bit for bit, those from weights converted up front
    (also with row blocks small enough that the LM head and MLPs are split)."""
    model = d2m_ref.load_model(checkpoint)
    kernels = NumpyKernels(block_bytes=block_bytes)
    streamed, _ = d2m_ref.forward(model, IDS, dtype=dtype, kernels=kernels)
    preconverted, _ = d2m_ref.forward(materialize(model, dtype), IDS, dtype=dtype, kernels=kernels)
    assert np.array_equal(streamed, preconverted)
    model.close()


def _largest_matrix_bytes(model, itemsize=8):
    return max(int(np.prod(p.shape)) for p in d2m_ref.weights.iter_params(model.weights)) * itemsize


def _traced_peak(fn) -> int:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_no_full_upcast_copy_is_alive(checkpoint):
    """Peak traced memory of load + float64 forward stays below a bound set by the largest matrix and the
    activations, not by the model size; upcasting the whole model first breaks the bound."""
    model = d2m_ref.load_model(checkpoint)
    cfg = model.config
    largest = _largest_matrix_bytes(model)
    full = sum(int(np.prod(p.shape)) * 8 for p in d2m_ref.weights.iter_params(model.weights))
    T = IDS.size
    activations = 8 * T * (cfg.vocab_size + 16 * cfg.hidden_size + 4 * 256) + 8 * cfg.num_attention_heads * T * T * 4
    # converting one bf16 matrix to float64 holds the uint32 widening (4 B/elem) and the result (8 B/elem)
    bound = 2 * largest + activations + 2**20
    assert full > 8 * bound, "the test model must be much larger than the bound to mean anything"

    def streamed():
        m = d2m_ref.load_model(checkpoint)
        d2m_ref.forward(m, IDS, dtype=np.float64)
        m.close()

    def upcast_first():
        m = materialize(d2m_ref.load_model(checkpoint), np.float64)
        d2m_ref.forward(m, IDS, dtype=np.float64)

    peak = _traced_peak(streamed)
    print(f"traced peak {peak} B, bound {bound} B, largest matrix {largest} B, float64 model {full} B")
    assert peak < bound, f"peak {peak} B >= bound {bound} B (largest matrix {largest} B, model {full} B)"
    assert _traced_peak(upcast_first) > bound  # the test can fail: a full upcast is caught
    model.close()


def test_file_truncated_mid_run_is_a_named_error(checkpoint, tmp_path):
    """A checkpoint truncated after it was opened gives a named error, not a SIGBUS crash."""
    folder = tmp_path / "ckpt"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        (folder / name).write_bytes((checkpoint / name).read_bytes())
    script = textwrap.dedent(f"""
        import os, numpy as np, d2m_ref
        m = d2m_ref.load_model({str(folder)!r})
        os.truncate({str(folder / 'model.safetensors')!r}, os.path.getsize({str(folder / 'model.safetensors')!r}) // 2)
        try:
            d2m_ref.forward(m, [1, 2, 3])
        except d2m_ref.D2MError as e:
            print("ERROR:", e)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                         cwd=os.path.dirname(os.path.dirname(__file__)))
    assert out.returncode == 0, out.stderr
    assert "ERROR:" in out.stdout and "model.safetensors" in out.stdout and "truncated" in out.stdout


def test_checkpoint_larger_than_the_address_space_is_a_named_error(tmp_path):
    """A checkpoint that does not fit the memory map (here: a 4 GiB sparse tensor under an address-space
    limit) is a named error, not a crash."""
    from d2m_ref.safetensors_io import save
    path = tmp_path / "big.safetensors"
    save(path, {"w": np.zeros(1, np.float32)})
    header = json.dumps({"w": {"dtype": "F32", "shape": [2**30], "data_offsets": [0, 2**32]}}).encode()
    header += b" " * (-len(header) % 8)
    with open(path, "wb") as f:
        f.write(len(header).to_bytes(8, "little") + header)
        f.truncate(8 + len(header) + 2**32)  # sparse: no disk used
    script = textwrap.dedent(f"""
        import resource, d2m_ref
        from d2m_ref.safetensors_io import SafetensorsFile
        size = next(int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith('VmSize:'))
        limit = size + 2**30
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        try:
            SafetensorsFile({str(path)!r})
        except d2m_ref.D2MError as e:
            print("ERROR:", e)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                         cwd=os.path.dirname(os.path.dirname(__file__)))
    assert out.returncode == 0, out.stderr
    assert "ERROR:" in out.stdout and "big.safetensors: cannot memory-map its 4.00 GiB" in out.stdout, out.stdout
