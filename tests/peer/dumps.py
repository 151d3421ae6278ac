"""What backends dump: subsets of a trace (spec/format.md §2) as users get them."""

from __future__ import annotations

import re

import numpy as np

_RESIDUAL = re.compile(r"(input_ids|logits|(hidden|router_logits|router_scores|topk_ids|topk_weights)\.\d+)")


def residual_only(trace: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The tensors a backend that exposes only its residual stream would give
    (`output_hidden_states=True`, TensorRT's marked residual adds): input_ids, hidden.{i}, the router
    tensors and logits — no embeddings, attn_out, ffn_out or final_norm."""
    return {name: t for name, t in trace.items() if _RESIDUAL.fullmatch(name)}
