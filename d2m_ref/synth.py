"""Synthetic models: deterministic random weights for any config, in memory or written to disk.

Used by the demo model, the tests and the benchmarks (no weights are ever downloaded).  Each
tensor's values depend only on (seed, tensor name), so a tensor can be produced on its own — a
multi-GB checkpoint is written one tensor at a time without holding the model in memory.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np

from .config import ModelConfig
from .safetensors_io import bf16_bits, save_streaming
from .weights import Model, Param, expected_tensors, map_params, weights_from_arrays

def random_tensor(name: str, shape: tuple[int, ...], seed: int) -> np.ndarray:
    """-> float32 array of `shape`, a pure function of (seed, name).

    Norm weights scatter around 1, biases around 0, matrices have std 1/sqrt(fan_in) so the
    residual stream stays O(1) through many layers; routers twice that so routing is decisive.
    """
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    if name.endswith("norm.weight"):
        return (1.0 + 0.2 * rng.standard_normal(shape)).astype(np.float32)
    if len(shape) == 1:  # biases, selection bias
        return (0.1 * rng.standard_normal(shape)).astype(np.float32)
    fan_in = shape[-1]
    std = 1.0 if "embed_tokens" in name else 1.0 / np.sqrt(fan_in)
    if name.endswith("mlp.gate.weight") or name.endswith("shared_expert_gate.weight"):
        std *= 2.0
    return (std * rng.standard_normal(shape)).astype(np.float32)


def to_storage(x: np.ndarray, storage: str) -> np.ndarray:
    """float array -> storage array (BF16 as uint16 bits, round to nearest even)."""
    if storage == "BF16":
        return bf16_bits(x)
    return x.astype({"F64": np.float64, "F32": np.float32, "F16": np.float16}[storage])


def random_arrays(cfg: ModelConfig, seed: int = 0, storage: str = "F32") -> dict[str, np.ndarray]:
    """Every tensor of `cfg` (canonical names) as a storage array."""
    return {n: to_storage(random_tensor(n, s, seed), storage) for n, s in expected_tensors(cfg)}


def random_model(cfg: ModelConfig, seed: int = 0, storage: str = "F32") -> Model:
    """An in-memory model with random weights stored as `storage`."""
    arrays = random_arrays(cfg, seed, storage)
    return Model(cfg, weights_from_arrays(cfg, arrays, {n: storage for n in arrays}))


def model_from_arrays(cfg: ModelConfig, arrays: dict[str, np.ndarray], storage: str = "F32") -> Model:
    """An in-memory model from named storage arrays (e.g. edited random_arrays)."""
    return Model(cfg, weights_from_arrays(cfg, arrays, {n: storage for n in arrays}))


def write_checkpoint(cfg: ModelConfig, path: str | Path, seed: int = 0, storage: str = "BF16",
                     metadata: dict[str, str] | None = None, force: bool = False) -> Path:
    """Write a random checkpoint tensor by tensor (streaming: memory stays one tensor)."""
    shapes = dict(expected_tensors(cfg))
    specs = [(n, storage, s) for n, s in shapes.items()]
    save_streaming(path, specs, lambda n: to_storage(random_tensor(n, shapes[n], seed), storage),
                   metadata=metadata, force=force)
    return Path(path)


def materialize(model: Model, dtype=np.float64) -> Model:
    """A copy of `model` whose weights are already converted to `dtype` (the non-streaming path)."""
    return Model(model.config, map_params(model.weights, lambda p: Param.of(p.name, p.load(np.dtype(dtype)).copy())))
