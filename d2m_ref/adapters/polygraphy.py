"""Read Polygraphy's RunResults JSON (`polygraphy run model.onnx --trt --save-outputs out.json`), and the
inputs it fed (`--save-inputs inputs.json`), without Polygraphy.

The format, as polygraphy 0.53 writes it (polygraphy/comparator/struct.py, json/serde.py):

    {"lst": [[runner_name, [iteration, ...]], ...], "polygraphy_class": "RunResults"}
    iteration = {"outputs": {name: array}, "runtime": ..., "runner_name": ..., "polygraphy_class": "IterationResult"}
    array     = {"values": ndarray, "polygraphy_class": "LazyArray"}   (older: the ndarray itself)
    ndarray   = {"array": base64 of numpy .npy bytes, "polygraphy_class": "ndarray"}

Older versions tag objects with "__polygraphy_encoded_<Class>" keys instead of "polygraphy_class";
both are accepted.  A torch.Tensor payload ("tensor": base64 of torch.save) is refused by name:
ask Polygraphy for numpy outputs.
"""

from __future__ import annotations

import base64
import binascii
import io
from pathlib import Path
from typing import Any

import numpy as np

from ..files import read_json
from .candidate import Candidate, CandidateError
from .npz import from_arrays


def _decode_array(obj: Any, where: str) -> np.ndarray:
    if isinstance(obj, dict) and "values" in obj:  # LazyArray
        return _decode_array(obj["values"], where)
    if isinstance(obj, dict) and "array" in obj:  # ndarray as base64 .npy (latin-1 in very old files)
        text = obj["array"]
        try:
            data = base64.b64decode(text.encode(), validate=True)
        except (binascii.Error, ValueError):
            data = text.encode("latin-1")
        try:
            arr = np.load(io.BytesIO(data), allow_pickle=False)
        except (ValueError, OSError) as exc:
            raise CandidateError(f"{where}: array payload is not a .npy: {exc}") from None
        if isinstance(arr, np.lib.npyio.NpzFile):  # an old variant stored a one-array .npz
            arr = next(iter(arr.values()))
        return arr
    if isinstance(obj, dict) and "tensor" in obj:
        raise CandidateError(f"{where}: stored as a torch.Tensor; save numpy outputs (the default of "
                             "`polygraphy run --save-outputs`) to check it")
    raise CandidateError(f"{where}: not an array in Polygraphy's JSON encoding")


def read_run_results(path: Path, runner: str | None = None, iteration: int = 0) -> Candidate:
    """One runner's outputs of one iteration -> Candidate.  With several runners, `runner` picks one."""
    doc = read_json(path, "Polygraphy results", CandidateError)
    if not isinstance(doc, dict) or not isinstance(doc.get("lst"), list):
        raise CandidateError(f"{path}: not a Polygraphy RunResults file (no 'lst' list); "
                             "expected the output of `polygraphy run ... --save-outputs FILE.json`")
    runs = {}
    for entry in doc["lst"]:
        if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[1], list)):
            raise CandidateError(f"{path}: malformed RunResults entry")
        runs[str(entry[0])] = entry[1]
    if not runs:
        raise CandidateError(f"{path}: RunResults holds no runner")
    if runner is None:
        if len(runs) > 1:
            raise CandidateError(f"{path}: holds runners {', '.join(runs)}; pick one with --runner")
        runner = next(iter(runs))
    if runner not in runs:
        raise CandidateError(f"{path}: no runner '{runner}'; it holds {', '.join(runs)}")
    iterations = runs[runner]
    if not 0 <= iteration < len(iterations):
        raise CandidateError(f"{path}: runner '{runner}' has {len(iterations)} iteration(s); "
                             f"--iteration {iteration} is out of range")
    it = iterations[iteration]
    outputs = it.get("outputs") if isinstance(it, dict) else None
    if not isinstance(outputs, dict):
        raise CandidateError(f"{path}: iteration {iteration} of '{runner}' has no outputs")
    arrays = {name: _decode_array(v, f"{path}: output '{name}'") for name, v in outputs.items()}
    cand = from_arrays(arrays, f"{path} (runner {runner}, iteration {iteration})")
    return cand


def read_inputs(path: Path, iteration: int = 0) -> dict[str, np.ndarray]:
    """The feed dict of one iteration of `polygraphy run ... --save-inputs FILE.json`: a JSON list of
    {input name: ndarray}, one per iteration."""
    doc = read_json(path, "Polygraphy inputs", CandidateError)
    if not isinstance(doc, list) or not all(isinstance(d, dict) for d in doc):
        raise CandidateError(f"{path}: not Polygraphy's saved inputs (a JSON list of feed dicts); expected the "
                             "file of `polygraphy run ... --save-inputs FILE.json`")
    if not 0 <= iteration < len(doc):
        raise CandidateError(f"{path}: holds {len(doc)} iteration(s); --iteration {iteration} is out of range")
    return {name: _decode_array(v, f"{path}: input '{name}'") for name, v in doc[iteration].items()}
