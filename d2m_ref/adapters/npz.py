"""Read a `.npz` (numpy.savez / savez_compressed) of named arrays as a candidate."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from .candidate import Candidate, CandidateError

_PRECISION = {np.dtype(np.float16): "float16", np.dtype(np.float32): "float32", np.dtype(np.float64): "float64"}


def read_npz(path: Path) -> Candidate:
    """{name: array}; pickled object arrays are refused (allow_pickle=False)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            raw = {name: z[name] for name in z.files}
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise CandidateError(f"{path}: cannot read as .npz: {exc}") from None
    return from_arrays(raw, str(path))


def from_arrays(raw: dict[str, np.ndarray], source: str) -> Candidate:
    """Arrays of a backend -> Candidate: floats kept, integers as int64, anything else refused."""
    tensors, stored = {}, set()
    for name, a in raw.items():
        a = np.asarray(a)
        if a.dtype.kind == "f":
            tensors[name] = a
            stored.add(_PRECISION.get(a.dtype, str(a.dtype)))
        elif a.dtype.kind in "iu":
            tensors[name] = a.astype(np.int64)
        else:
            raise CandidateError(f"{source}: tensor '{name}' has dtype {a.dtype}; expected floats or integers")
    hint = stored.pop() if len(stored) == 1 else None
    notes = [f"candidate precision {hint} inferred from how its tensors are stored"] if hint else []
    return Candidate(tensors, source, hint, notes)
