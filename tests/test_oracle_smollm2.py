"""The oracle on a real model, in CI: SmolLM2-135M-Instruct run by transformers in float32, float16
and bfloat16 (tests/peer/smollm2_runs.py), checked by d2m_ref.check against its float64 forward.

Honest runs raise no alarm (the whole trace and residual-only, prompts of 4 to 1,020 tokens, the
long ones being where the old fitted tolerances cried wolf); each injected bug is caught in the
layer it is in.  `python -m tests.oracle_smollm2` runs the full sweep (spec/tolerances.md §6).
"""

from __future__ import annotations

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("gguf")

from tests import oracle_smollm2 as sweep  # noqa: E402
from tests.peer import smollm2_runs as runs  # noqa: E402

pytestmark = pytest.mark.slow

PRECISIONS = ("float32", "float16", "bfloat16")
HONEST = ("short_sum", "chat_code", "code_html", "long_rep_sentence")  # 4, 39, 123 and 1,020 tokens
BUG_PROMPT = "code_html"
BUG_LAYER = 7


def _prompt(name: str):
    found = dict(sweep.prompts())
    assert name in found, f"{name} not in tests/peer/prompts.py"
    return name, found[name]


@pytest.mark.parametrize("precision", PRECISIONS)
def test_honest_transformers_runs_raise_no_alarm(precision):
    prompts = [_prompt(n) for n in HONEST]
    rows = sweep.honest(prompts, precisions=(precision,), log=lambda *_: None)
    alarms = [f"{r['prompt']} ({r['tokens']} tokens, {r['mode']}): {r['verdict']}" for r in rows if r["exit_code"]]
    assert not alarms, "\n".join(alarms)
    assert {r["tokens"] for r in rows} >= {4, 1020}


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("bug", sorted(runs.BUGS))
def test_injected_bug_is_caught_in_its_layer(bug, precision):
    """Caught in the layer it is in, whole trace and residual-only.  A bug below the precision's
    honest error there (sweep.INVISIBLE) may pass, but is never blamed on another layer."""
    rows = sweep.bugs([_prompt(BUG_PROMPT)], precisions=(precision,), layers=(BUG_LAYER,), bug_names=[bug],
                      log=lambda *_: None)
    invisible = (bug, precision) in sweep.INVISIBLE
    for r in rows:
        ok = r["caught_layer"] == BUG_LAYER or (invisible and r["caught_at"] is None)
        assert ok, f"{bug} in layer {BUG_LAYER}, {precision} {r['mode']}: first divergence {r['caught_at']}"


@pytest.mark.parametrize("precision", PRECISIONS)
def test_rmsnorm_eps_is_caught_where_eps_matters(precision):
    """Layer 0, whose input (the embeddings) has a mean square near eps: eps 1e-2 for 1e-5 is caught
    there in every precision and both modes (in layer 7 it is below half precision's honest error)."""
    rows = sweep.bugs([_prompt(BUG_PROMPT)], precisions=(precision,), layers=(0,), bug_names=["rmsnorm_eps"],
                      log=lambda *_: None)
    assert [r["caught_layer"] for r in rows] == [0, 0], rows
