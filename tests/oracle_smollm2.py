"""The oracle on a real model: d2m_ref.check against SmolLM2-135M-Instruct run by transformers.

    python -m tests.oracle_smollm2 [--prompts N] [--bug-prompts N] [--json out.json]

Honest runs (float32, float16, bfloat16; the whole trace and residual-only) must raise no alarm; each
bug of tests/peer/smollm2_runs.py, injected into one layer, must be caught in that layer, in every
precision and both modes.  The sweep prints the tables of spec/tolerances.md §6 and the README; the
slow tests of tests/test_oracle_smollm2.py run a subset of it in CI.

The reference is d2m_ref's float64 forward of the same GGUF (imported once to float32 safetensors:
the reader's block decode is slower than a plain F32 file); the candidates are traces recorded with
d2m_ref.adapters.torch.record_trace, as a user would.
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from d2m_ref import load_model
from d2m_ref.check import Report, check
from tests.peer import prompts as prompt_bank
from tests.peer.dumps import residual_only
from tests.peer import smollm2_runs as runs
from tests.real_models import smollm2_folder

PRECISIONS = ("float32", "float16", "bfloat16")
MODES = ("full", "residual-only")
BUG_LAYERS = (7, 20)
# (bug, precision) -> why that precision cannot see it: the bug's effect where it acts is below the
# precision's honest error there (measured by the sweep; spec/tolerances.md §7)
_BELOW_F16 = "its effect in layer 7 (~1e-3 of attn_out in float32) is below float16's honest error there (~3e-3)"
_BELOW_BF16 = "its effect in layer 7 is below bfloat16's honest error there (~2e-2 of attn_out)"
INVISIBLE: dict[tuple[str, str], str] = {
    ("rmsnorm_eps", "float16"): _BELOW_F16, ("rmsnorm_eps", "bfloat16"): _BELOW_BF16,
    ("rope_inv_freq_bf16", "float16"): _BELOW_F16, ("rope_inv_freq_bf16", "bfloat16"): _BELOW_BF16,
    ("proj_scaled", "float16"): "2 % of attn_out is ~4x float16's honest error at one element's worst: flagged in the "
                                "whole trace at ~1x its bound, not from the residual stream",
    ("proj_scaled", "bfloat16"): "2 % of attn_out is bfloat16's honest error there (2-2.5e-2)",
}


@functools.lru_cache(maxsize=1)
def reference_model():
    """d2m_ref's SmolLM2 (float32 safetensors imported from the GGUF, in a temporary folder)."""
    return load_model(smollm2_folder())


@functools.lru_cache(maxsize=1)
def prompts() -> list[tuple[str, np.ndarray]]:
    from d2m_ref.tokenizer import load_tokenizer
    return prompt_bank.prompt_ids(load_tokenizer(reference_model().checkpoint.path / "tokenizer.json"))


def spread(items: list, n: int) -> list:
    """n items spread over the list (sorted by length: short, long and between)."""
    if n >= len(items):
        return list(items)
    order = sorted(items, key=lambda p: len(p[1]))
    return [order[round(i * (len(order) - 1) / (n - 1))] for i in range(n)]


def worst_share(report: Report) -> tuple[float, str]:
    """The largest share of its bound any compared stage used (element or aggregate), and where."""
    best, where = 0.0, ""
    for r in report.stages:
        for name, c in (("drift", r.drift), ("local", r.local)):
            if c is not None and c.score > best:
                best, where = c.score, f"{r.stage.name} ({name})"
    if report.logits:
        kl = report.logits["kl_mean"] / report.logits["kl_budget"]
        if kl > best:
            best, where = kl, "logits (mean KL)"
    return best, where


def candidate(trace: dict, mode: str) -> dict:
    return trace if mode == "full" else residual_only(trace)


def honest(prompt_list, precisions=PRECISIONS, modes=MODES, attn_impl: str = "eager", log=print) -> list[dict]:
    """Every (prompt, precision, mode): verdict, worst share of its bound, where."""
    model, out = reference_model(), []
    for name, ids in prompt_list:
        for precision in precisions:
            trace = runs.run_trace(precision, ids, attn_impl=attn_impl)
            for mode in modes:
                t0 = time.perf_counter()
                report = check(model, candidate(trace, mode), precision)
                share, where = worst_share(report)
                row = {"prompt": name, "tokens": int(len(ids)), "precision": precision, "mode": mode,
                       "attn": attn_impl, "exit_code": report.exit_code, "verdict": report.verdict(),
                       "worst_share": share, "worst_at": where, "seconds": time.perf_counter() - t0,
                       "kl_mean": report.logits["kl_mean"] if report.logits else None,
                       "kl_budget": report.logits["kl_budget"] if report.logits else None}
                out.append(row)
                log(f"{name:28s} {len(ids):5d} {precision:9s} {mode:14s} {'ALARM' if report.exit_code else 'ok':5s} "
                    f"{share:.2f} at {where}  [{row['seconds']:.1f}s]")
    return out


def bugs(prompt_list, precisions=PRECISIONS, modes=MODES, layers=BUG_LAYERS, bug_names=None, log=print) -> list[dict]:
    """Every (bug, layer, prompt, precision, mode): where the first divergence is."""
    model, out = reference_model(), []
    for bug in bug_names or runs.BUGS:
        for layer in layers:
            for name, ids in prompt_list:
                for precision in precisions:
                    trace = runs.run_trace(precision, ids, bug=bug, layer=layer)
                    for mode in modes:
                        report = check(model, candidate(trace, mode), precision)
                        first = report.first_divergence
                        c = first.worst if first is not None else None
                        row = {"bug": bug, "layer": layer, "prompt": name, "tokens": int(len(ids)),
                               "precision": precision, "mode": mode,
                               "caught_at": first.stage.name if first is not None else None,
                               "caught_layer": first.stage.layer if first is not None else None,
                               "check": ("local" if c is first.local else "drift") if c is not None else
                               ("KL" if first is not None else None),
                               "ratio": c.score if c is not None else None}
                        out.append(row)
                        log(f"{bug:20s} L{layer:<3d} {name:24s} {precision:9s} {mode:14s} -> {row['caught_at']} "
                            f"({row['check']}, {row['ratio'] if row['ratio'] is None else round(row['ratio'], 1)})")
    return out


def honest_table(rows: list[dict]) -> str:
    lines = ["| precision | mode | runs | alarms | worst share of its bound | where |", "|---|---|---|---|---|---|"]
    groups = defaultdict(list)
    for r in rows:
        groups[(r["precision"], r["mode"], r.get("attn", "eager"))].append(r)
    for (precision, mode, attn), rs in groups.items():
        w = max(rs, key=lambda r: r["worst_share"])
        lines.append(f"| {precision}{'' if attn == 'eager' else ' (' + attn + ')'} | {mode} | {len(rs)} | "
                     f"{sum(r['exit_code'] != 0 for r in rs)} | {w['worst_share']:.2f} | {w['worst_at']}, "
                     f"{w['prompt']} ({w['tokens']} tokens) |")
    return "\n".join(lines)


def bug_table(rows: list[dict]) -> str:
    cols = [(p, m) for m in MODES for p in PRECISIONS]
    lines = ["| bug (layer) | " + " | ".join(f"{p} {m}" for p, m in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    groups = defaultdict(list)
    for r in rows:
        groups[(r["bug"], r["layer"], r["precision"], r["mode"])].append(r)
    for bug in dict.fromkeys(r["bug"] for r in rows):
        for layer in dict.fromkeys(r["layer"] for r in rows if r["bug"] == bug):
            cells = []
            for p, m in cols:
                rs = groups.get((bug, layer, p, m), [])
                right = sum(r["caught_layer"] == layer for r in rs)
                stages = sorted({r["caught_at"] for r in rs if r["caught_layer"] == layer})
                cell = f"{right}/{len(rs)}" + (f" {', '.join(stages)}" if stages else "")
                wrong = sorted({r["caught_at"] or "passed" for r in rs if r["caught_layer"] != layer})
                cells.append(cell + (f" (else {', '.join(wrong)})" if wrong else ""))
            lines.append(f"| {bug} ({layer}) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.oracle_smollm2", description=__doc__.split("\n\n")[0])
    p.add_argument("--prompts", type=int, default=1000, help="honest prompts (spread over lengths; default all)")
    p.add_argument("--residual-prompts", type=int, default=24, help="of those, how many also residual-only")
    p.add_argument("--bug-prompts", type=int, default=2, help="prompts per bug")
    p.add_argument("--sdpa-prompts", type=int, default=12, help="honest bfloat16/float16 sdpa runs")
    p.add_argument("--json", type=Path, help="write every row here")
    args = p.parse_args(argv)
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    print(f"# SmolLM2-135M-Instruct, {cpu}, {time.strftime('%Y-%m-%d')}")
    all_prompts = spread(prompts(), args.prompts)
    rows = honest(all_prompts, modes=("full",))
    rows += honest(spread(all_prompts, args.residual_prompts), modes=("residual-only",))
    rows += honest(spread(all_prompts, args.sdpa_prompts), precisions=("float16", "bfloat16"), modes=("full",),
                   attn_impl="sdpa")
    bug_prompts = [p for p in spread([p for p in prompts() if 60 <= len(p[1]) <= 400], args.bug_prompts)]
    bug_rows = bugs(bug_prompts)
    print(honest_table(rows))
    print()
    print(bug_table(bug_rows))
    if args.json:
        args.json.write_text(json.dumps({"cpu": cpu, "honest": rows, "bugs": bug_rows}, indent=1))
    return 0 if all(r["exit_code"] == 0 for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
