"""What every candidate reader returns (d2m_ref.adapters), and the error it raises."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..errors import D2MError


class CandidateError(D2MError):
    """A candidate file or name map cannot be read, or names a tensor twice."""


@dataclass
class Candidate:
    """A backend's tensors: float arrays in their stored precision (bf16 widened to float32, exactly),
    integer arrays as int64; `dtype_hint` is the precision the file says it computed in, if it says."""

    tensors: dict[str, np.ndarray]
    source: str
    dtype_hint: str | None = None
    notes: list[str] = field(default_factory=list)
