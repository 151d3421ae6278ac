"""Adapters: getting a backend's intermediate tensors into trace names, whatever wrote them.

Readers (no third-party dependency; each returns {name: array} plus what the file says about itself):
    .safetensors   a d2m_ref trace (spec/format.md §2), e.g. from d2m_ref.adapters.torch, or any
                   safetensors file of tensors (F64/F32/F16/BF16, integer ids)
    .npz           numpy.savez of named arrays
    .json          Polygraphy RunResults (`polygraphy run ... --save-outputs out.json`), read here
                   without Polygraphy (d2m_ref.adapters.polygraphy)

`apply_map` renames a backend's own names to trace names (`--map names.json`).

Writer: d2m_ref.adapters.torch.record_trace (imports torch; nothing else here does).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from ..errors import WeightsError
from ..files import read_json, require_regular
from ..safetensors_io import SafetensorsFile, to_float
from .candidate import Candidate, CandidateError

__all__ = ["Candidate", "CandidateError", "load_candidate", "name_map", "apply_map"]


_STORED_PRECISION = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64"}


def load_candidate(path: str | Path, runner: str | None = None, iteration: int = 0) -> Candidate:
    """Read a candidate dump by its extension (.safetensors, .npz, .json)."""
    path = Path(path)
    require_regular(path, "candidate", CandidateError)
    if not path.is_file():
        raise CandidateError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        return _read_safetensors(path)
    if suffix == ".npz":
        from .npz import read_npz
        return read_npz(path)
    if suffix == ".json":
        from .polygraphy import read_run_results
        return read_run_results(path, runner=runner, iteration=iteration)
    raise CandidateError(f"{path}: unknown candidate format '{suffix}': give a .safetensors trace or dump, "
                         "a .npz, or a Polygraphy RunResults .json")


def _read_safetensors(path: Path) -> Candidate:
    try:
        f = SafetensorsFile(path)
    except WeightsError as exc:
        raise CandidateError(str(exc)) from None
    with f:
        meta = f.metadata
        if meta.get("format") == "d2m_ref.trace":
            from ..tracefile import check_trace_metadata  # version check; says how to regenerate
            check_trace_metadata(path, meta)
        tensors, stored = {}, set()
        for name in f.names():
            dt = f.dtype(name)
            raw = f.raw(name)
            if dt in ("F64", "F32", "F16", "BF16"):
                tensors[name] = to_float(raw, dt, np.float32).copy() if dt in ("F16", "BF16") else raw.copy()
                stored.add(dt)
            elif dt == "BOOL":
                raise CandidateError(f"{path}: tensor '{name}' is BOOL; the trace has no boolean tensors")
            else:
                tensors[name] = raw.astype(np.int64)
    hint = meta.get("candidate_dtype")
    notes = []
    if hint is None and len(stored) == 1:
        hint = _STORED_PRECISION[stored.pop()]
        notes.append(f"candidate precision {hint} inferred from how its tensors are stored "
                     "(--candidate-dtype says otherwise)")
    return Candidate(tensors, str(path), hint, notes)


def name_map(path: str | Path) -> dict[str, str]:
    """Read --map: a JSON object {backend name: trace name}.  A key may hold `{i}` (digits) and its
    value `{i}` too: {"/model/layers.{i}/Add_1_output_0": "hidden.{i}"} maps every layer."""
    path = Path(path)
    d = read_json(path, "name map", CandidateError)
    if not isinstance(d, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in d.items()):
        raise CandidateError(f"{path}: a name map is a JSON object of strings {{backend name: trace name}}")
    return d


def apply_map(tensors: dict[str, np.ndarray], mapping: dict[str, str]) -> tuple[dict[str, np.ndarray], list[str]]:
    """-> (tensors under trace names, notes).  Unmapped names are kept as they are; two backend names
    landing on one trace name is an error naming both."""
    patterns = []
    for key, value in mapping.items():
        if "{i}" in key:
            rx = re.compile("^" + re.escape(key).replace(re.escape("{i}"), r"(?P<i>\d+)") + "$")
            patterns.append((rx, value))
    out: dict[str, np.ndarray] = {}
    origin: dict[str, str] = {}
    used = set()
    for name, array in tensors.items():
        target = mapping.get(name)
        if target is None:
            for rx, value in patterns:
                m = rx.match(name)
                if m:
                    target = value.replace("{i}", str(int(m.group("i"))))
                    break
        if target is not None:
            used.add(name)
        target = target or name
        if target in out:
            raise CandidateError(f"name map: both '{origin[target]}' and '{name}' become '{target}'")
        out[target], origin[target] = array, name
    notes = [f"--map renamed {len(used)} of {len(tensors)} candidate tensors"] if mapping else []
    unused = [k for k in mapping if "{i}" not in k and k not in tensors]
    if unused:
        notes.append(f"--map names {len(unused)} tensors the candidate does not have: {', '.join(unused[:5])}"
                     + (" ..." if len(unused) > 5 else ""))
    return out, notes
