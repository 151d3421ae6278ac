"""The trace file format (spec/format.md §2): every intermediate tensor of one forward pass in a
safetensors file, its metadata, and the reader every consumer uses (check, golden, adapters).

    tensors       the capture dict: float tensors in the compute dtype (F64 or F32), ids as I64
                  (input_ids, embeddings, attn_out.{i}, ffn_out.{i}, hidden.{i}, router_logits.{i},
                  router_scores.{i}, topk_ids.{i}, topk_weights.{i}, final_norm, logits)
    __metadata__  format = "d2m_ref.trace", trace_version, spec_version, dtype, command (the
                  command line that made it), config (the config JSON), weights (the path),
                  unverified_config_keys (JSON list: config keys accepted without being known)

A trace is made by the very `forward` that `run` uses, with `capture={}`: there is no second copy
of the model to drift.  The command line is d2m_ref/trace.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from . import SPEC_VERSION
from .errors import TraceError
from .files import printable
from .model import COMPUTE_DTYPES, forward
from .progress import Update
from .safetensors_io import SafetensorsFile, save
from .weights import Model

TRACE_FORMAT = "d2m_ref.trace"
TRACE_VERSION = "1"
METADATA_KEYS = ("format", "trace_version", "spec_version", "dtype", "command", "config", "weights")
PROG = "python -m d2m_ref.trace"  # the command that makes traces, for regeneration hints


# ---------------------------------------------------------------------------------------------
# Making and writing


def capture_trace(model: Model, input_ids, dtype=np.float64, progress: Update | None = None,
                  kernels=None) -> dict[str, np.ndarray]:
    """input ids [T] -> {name: tensor} of one `forward` (the capture dict, in forward order)."""
    capture: dict[str, np.ndarray] = {}
    forward(model, input_ids, dtype=dtype, capture=capture, progress=progress, kernels=kernels)
    return capture


def trace_metadata(model: Model, weights: str | Path, dtype, command: str) -> dict[str, str]:
    """The __metadata__ of a trace of `model` (all values strings, as safetensors requires; bytes of
    a path or command that are not UTF-8 are kept as \\xNN escapes)."""
    return {"format": TRACE_FORMAT, "trace_version": TRACE_VERSION, "spec_version": SPEC_VERSION,
            "dtype": np.dtype(dtype).name, "command": printable(command),
            "config": json.dumps(model.config.source, separators=(",", ":")), "weights": printable(weights),
            "unverified_config_keys": json.dumps(list(model.config.unverified_keys))}


def write_trace(path: str | Path, tensors: dict[str, np.ndarray], metadata: dict[str, str],
                force: bool = False) -> None:
    """Write a trace: float tensors must already be in metadata['dtype'], integer ones become int64."""
    dtype = np.dtype(metadata["dtype"])
    stored = {}
    for name, t in tensors.items():
        t = np.asarray(t)
        if np.issubdtype(t.dtype, np.integer):
            t = t.astype(np.int64)
        elif t.dtype != dtype:  # a float of another dtype would silently change the trace's precision
            raise TraceError(f"{path}: tensor '{name}' is {t.dtype}, the trace is {dtype}")
        stored[name] = t
    save(path, stored, metadata=metadata, force=force)


# ---------------------------------------------------------------------------------------------
# Reading


def read_trace(path: str | Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """A trace file -> ({name: tensor}, metadata), or TraceError naming what is wrong."""
    path = Path(path)
    with SafetensorsFile(path) as f:
        metadata = f.metadata
        check_trace_metadata(path, metadata)
        dtype = np.dtype(metadata["dtype"])
        tensors = {}
        for name in f.names():
            t = f.raw(name)
            if t.dtype.kind == "f" and t.dtype != dtype:
                raise TraceError(f"{path}: tensor '{name}' is {t.dtype} but the trace's dtype is {dtype}")
            tensors[name] = t.copy()  # own memory: the file is closed on return
    return tensors, metadata


def check_trace_metadata(path: Path, metadata: dict[str, str]) -> None:
    fmt = metadata.get("format")
    if fmt != TRACE_FORMAT:
        raise TraceError(f"{path}: not a d2m_ref trace (__metadata__ format={fmt!r}, expected {TRACE_FORMAT!r})")
    version = metadata.get("trace_version")
    if version != TRACE_VERSION:
        command = metadata.get("command") or f"{PROG} --weights ... --tokens ... --out {path}"
        if "--force" not in command.split():
            command += " --force"
        raise TraceError(f"{path}: trace_version={version!r}, but this d2m_ref reads trace_version "
                         f"{TRACE_VERSION!r}; regenerate it with: {command}")
    missing = [k for k in METADATA_KEYS if k not in metadata]
    if missing:
        raise TraceError(f"{path}: __metadata__ lacks {', '.join(map(repr, missing))}")
    dtypes = [d.name for d in COMPUTE_DTYPES]
    if metadata["dtype"] not in dtypes:
        raise TraceError(f"{path}: __metadata__ dtype={metadata['dtype']!r}, expected one of {', '.join(dtypes)}")
