"""`python -m d2m_ref.bench memory`: the oracle at deployment sizes.

Writes (streaming, one tensor at a time) a random bf16 checkpoint of a deployment shape — by
default Qwen2.5-3B-shaped, and its Dense2MoE layout with layers fused in pairs — then, for each
compute dtype, in a child process: prefills T prompt tokens with a full trace capture and decodes
N tokens, and reports peak RSS against the file size, seconds per prefill and per decoded token,
and the decode time against its roofline bound (bytes read per token / measured bandwidth).
It also runs `python -m d2m_ref.trace` under `/usr/bin/time -v` (when present) for an outside
view of the same peak.  Timings are ratios against the bandwidth measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from . import cli
from .config import parse_config
from .errors import D2MError, InputError
from .files import atomic_write_bytes, check_output
from .roofline import bytes_per_token
from .safetensors_io import SafetensorsFile
from .weights import METADATA_CONFIG_KEY

GiB = 2**30
MEMORY_BUDGET = 1.5 * GiB  # issue target: peak RSS <= file size + 1.5 GiB


def qwen25_3b_dense() -> dict:
    """Qwen2.5-3B's shape: 36 layers, hidden 2048, MLP 11008, 16/2 heads, head_dim 128, vocab 151936, tied."""
    return {"model_type": "qwen2", "vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 11008,
            "num_hidden_layers": 36, "num_attention_heads": 16, "num_key_value_heads": 2, "head_dim": 128,
            "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "max_position_embeddings": 32768,
            "tie_word_embeddings": True}


def fused_in_pairs(dense: dict) -> dict:
    """The Dense2MoE layout of `dense` with layers fused in pairs: each pair keeps the first layer's
    attention and turns both MLPs into a top-1 MoE of 2 experts (our layout, not the paper's)."""
    n = dense["num_hidden_layers"]
    plan = [{"attention": True, "ffn": "moe", "num_experts": 2, "source_layers": [i, i + 1], "attention_source": i}
            for i in range(0, n - 1, 2)]
    if n % 2:
        plan.append({"attention": True, "ffn": "dense", "source_layers": [n - 1], "attention_source": n - 1})
    d = {k: v for k, v in dense.items() if k != "num_hidden_layers"}
    d.update(model_type="dense2moe", base_model_type=dense["model_type"], layer_plan=plan,
             moe_intermediate_size=dense["intermediate_size"], num_experts_per_tok=1, scoring_func="softmax",
             norm_topk_prob=False)
    return d


def qwen25_05b_dense() -> dict:
    """Qwen2.5-0.5B's shape: 24 layers, hidden 896, MLP 4864, 14/2 heads, head_dim 64, vocab 151936, tied."""
    return dict(qwen25_3b_dense(), hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                num_attention_heads=14, head_dim=64)


def tiny_dense() -> dict:
    """A few-MB model to smoke-test the benchmark itself."""
    return dict(qwen25_3b_dense(), vocab_size=2000, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                num_attention_heads=4, head_dim=16)


SHAPES = {"qwen2.5-3b": qwen25_3b_dense, "qwen2.5-0.5b": qwen25_05b_dense, "tiny": tiny_dense}


def measure_bandwidth_gbps() -> float:
    """Streaming read bandwidth of this machine (GB/s), the C loop of the kernels benchmark when
    built, else NumPy reading a 1 GiB array (a lower bound)."""
    try:
        from .bench_kernels import measure_bandwidth  # the kernels issue's own streaming loop
        return float(measure_bandwidth())
    except Exception:  # noqa: BLE001 - any failure: fall back to the NumPy loop
        a = np.ones(GiB // 8)
        best = 0.0
        for _ in range(5):
            t = time.perf_counter()
            a.sum()
            best = max(best, a.nbytes / (time.perf_counter() - t) / 1e9)
        return best


# ---------------------------------------------------------------------------------------------
# The child: one model, one dtype


def child(weights: str, dtype: str, prompt_tokens: int, decode_tokens: int) -> dict:
    """Prefill with a full trace capture, then greedy decode; report times and this process's peak RSS."""
    from .model import forward
    from .weights import load_model
    model = load_model(weights)
    ids = np.random.default_rng(0).integers(0, model.config.vocab_size, prompt_tokens)
    t0 = time.perf_counter()
    capture: dict = {}
    logits, cache = forward(model, ids, dtype=np.dtype(dtype), capture=capture)
    prefill = time.perf_counter() - t0
    captured = sum(a.nbytes for a in capture.values())
    del capture
    steps = []
    token = int(np.argmax(logits[-1]))
    for _ in range(decode_tokens):
        t = time.perf_counter()
        logits, cache = forward(model, [token], cache=cache, dtype=np.dtype(dtype))
        token = int(np.argmax(logits[-1]))
        steps.append(time.perf_counter() - t)
    model.close()
    return {"prefill_s": prefill, "decode_s": steps, "captured_bytes": captured, "peak_rss": peak_rss_bytes()}


def peak_rss_bytes() -> int:
    """This process's peak RSS.  VmHWM belongs to the current address space; getrusage's ru_maxrss
    would also count the parent's peak, which a forked child inherits across exec."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def child_result(module: str, *args: str) -> dict:
    """`python -m module --child ARGS` in a fresh process (its own peak RSS) -> the JSON object it
    prints last; D2MError with its stderr's tail if it fails."""
    cmd = [sys.executable, "-m", module, "--child", *args]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        raise D2MError(f"child {' '.join(cmd)} failed ({out.returncode}): {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_child(weights: Path, dtype: str, prompt_tokens: int, decode_tokens: int) -> dict:
    return child_result("d2m_ref.bench_memory", str(weights), dtype, str(prompt_tokens), str(decode_tokens))


def time_v_trace(weights: Path, dtype: str, prompt_tokens: int, work: Path) -> int | None:
    """Peak RSS (bytes) of `python -m d2m_ref.trace` as /usr/bin/time -v reports it, or None.  The
    trace goes to a fresh temporary folder inside `work`, so no file already there is touched."""
    if not Path("/usr/bin/time").exists():
        return None
    ids = ",".join(map(str, np.random.default_rng(0).integers(0, 1000, prompt_tokens)))
    with tempfile.TemporaryDirectory(prefix=".d2m-bench-trace-", dir=work) as tmp:
        cmd = ["/usr/bin/time", "-v", sys.executable, "-m", "d2m_ref.trace", "--weights", str(weights),
               "--tokens", ids, "--out", str(Path(tmp) / f"trace-{dtype}.safetensors"), "--dtype", dtype, "--quiet"]
        res = subprocess.run(cmd, capture_output=True, text=True)
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", res.stderr)
    if res.returncode or not m:
        raise D2MError(f"{' '.join(cmd)} failed ({res.returncode}): {res.stderr[-2000:]}")
    return int(m.group(1)) * 1024


def write_model(cfg_dict: dict, folder: Path, seed: int) -> Path:
    """config.json + model.safetensors (bf16, written tensor by tensor, the config also stored in its
    __metadata__) in `folder` -> the weights' path.

    Files already in `folder` may be the user's (--dir): config.json is written only when absent and
    must otherwise hold this config; model.safetensors is reused only when the config stored in it
    is this one.  Anything else is an InputError naming the file; nothing is overwritten."""
    from .synth import write_checkpoint
    config_path, path = folder / "config.json", folder / "model.safetensors"
    if not reusable(cfg_dict, folder):
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise InputError(f"{folder}: cannot create directory ({exc.strerror or exc})") from None
        metadata = {METADATA_CONFIG_KEY: json.dumps(cfg_dict, separators=(",", ":"))}
        write_checkpoint(parse_config(cfg_dict), path, seed=seed, storage="BF16", metadata=metadata)
    if not config_path.exists():
        atomic_write_bytes(config_path, json.dumps(cfg_dict, indent=1).encode("utf-8"), force=False)
    return path


def reusable(cfg_dict: dict, folder: Path) -> bool:
    """True if folder/model.safetensors holds `cfg_dict` (stored in its __metadata__), False if it is
    absent; InputError if it or folder/config.json holds another config (write_model's rules)."""
    config_path, path = folder / "config.json", folder / "model.safetensors"
    wanted = json.loads(json.dumps(cfg_dict))  # the config as it reads back from JSON
    if config_path.exists() and _json_of(config_path.read_bytes) != wanted:
        raise InputError(f"{config_path}: exists and differs from the benchmark's config for this shape; "
                         "give another --dir (or remove the file)")
    if not path.exists():
        return False
    if _json_of(lambda: _stored_config(path)) != wanted:
        raise InputError(f"{path}: exists but holds another config than the benchmark's for this shape "
                         f"(__metadata__['{METADATA_CONFIG_KEY}']); give another --dir (or remove the file)")
    return True


def _stored_config(path: Path) -> str | None:
    with SafetensorsFile(path) as f:
        return f.metadata.get(METADATA_CONFIG_KEY)


def _json_of(read) -> object:
    """The JSON value read() returns (text or bytes), or None if there is none or it is not JSON."""
    try:
        text = read()
        return None if text is None else json.loads(text)
    except (OSError, ValueError):
        return None


LAYOUTS = ("dense", "dense2moe-pairs")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m d2m_ref.bench memory", description=__doc__.split("\n\n")[0])
    p.add_argument("kind", choices=["memory"])
    p.add_argument("--shape", choices=sorted(SHAPES), default="qwen2.5-3b")
    p.add_argument("--layouts", default=",".join(LAYOUTS), help=f"comma list of {', '.join(LAYOUTS)} (default both)")
    p.add_argument("--dtypes", default="float64,float32", help="comma list of float64, float32 (default both)")
    p.add_argument("--prompt-tokens", type=int, default=32, help="tokens of the prefill (default 32)")
    p.add_argument("--decode-tokens", type=int, default=8, help="tokens decoded after it (default 8)")
    p.add_argument("--dir", type=Path, help="where to write the checkpoints (default: a temporary folder, "
                   "deleted afterwards); a checkpoint there is reused when it holds the same config, and "
                   "no file there is overwritten")
    p.add_argument("--json", type=Path, help="write the rows as JSON")
    p.add_argument("--force", action="store_true", help="overwrite the --json file if it exists")
    return p


def main(argv: list[str] | None = None) -> int:
    return cli.main_with_status(build_parser(), bench_command, sys.argv[1:] if argv is None else argv)


def layout_config(dense: dict, layout: str) -> dict:
    return dense if layout == "dense" else fused_in_pairs(dense)


def check_arguments(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """-> (layouts, dtypes), or InputError naming the bad argument or a file in --dir that is in
    the way (before any work starts)."""
    layouts, dtypes = args.layouts.split(","), args.dtypes.split(",")
    for option, items, allowed in (("--layouts", layouts, LAYOUTS), ("--dtypes", dtypes, tuple(cli.DTYPES))):
        bad = [item for item in items if item not in allowed]
        if bad:
            raise InputError(f"{option}: {bad[0]!r} is not one of {', '.join(allowed)}")
    for option, n in (("--prompt-tokens", args.prompt_tokens), ("--decode-tokens", args.decode_tokens)):
        if n < 1:
            raise InputError(f"{option} {n}: must be at least 1")
    limit = SHAPES[args.shape]()["max_position_embeddings"]
    if args.prompt_tokens + args.decode_tokens > limit:
        raise InputError(f"--prompt-tokens {args.prompt_tokens} + --decode-tokens {args.decode_tokens} is longer than "
                         f"the {args.shape} shape allows: max_position_embeddings={limit}")
    check_output(args.json, args.force, "--json")
    if args.dir is not None:
        for layout in layouts:
            reusable(layout_config(SHAPES[args.shape](), layout), args.dir / f"{args.shape}-{layout}")
    return layouts, dtypes


def bench_command(args: argparse.Namespace) -> int:
    layouts, dtypes = check_arguments(args)
    work = args.dir or Path(tempfile.mkdtemp(prefix="d2m-bench-memory-"))
    try:
        bandwidth = measure_bandwidth_gbps()
        print(f"read bandwidth (this machine, this run): {bandwidth:.1f} GB/s")
        rows = []
        dense = SHAPES[args.shape]()
        for layout in layouts:
            cfg_dict = layout_config(dense, layout)
            t = time.perf_counter()
            weights = write_model(cfg_dict, work / f"{args.shape}-{layout}", seed=0)
            size = weights.stat().st_size
            print(f"{args.shape} {layout}: {size / GiB:.2f} GiB bf16 checkpoint ready ({time.perf_counter() - t:.0f} s)")
            cfg = parse_config(cfg_dict)
            bound = bytes_per_token(cfg, "bf16", args.prompt_tokens + args.decode_tokens) / (bandwidth * 1e9)
            for dtype in dtypes:
                r = run_child(weights, dtype, args.prompt_tokens, args.decode_tokens)
                tv = time_v_trace(weights, dtype, args.prompt_tokens, work)
                decode = float(np.median(r["decode_s"]))
                rows.append({"model": f"{args.shape} {layout}", "dtype": dtype, "file_bytes": size,
                             "peak_rss_bytes": r["peak_rss"], "trace_time_v_peak_rss_bytes": tv,
                             "over_file_bytes": r["peak_rss"] - size,
                             "within_target": r["peak_rss"] <= size + MEMORY_BUDGET and (tv is None or tv <= size + MEMORY_BUDGET),
                             "prefill_tokens": args.prompt_tokens, "prefill_s": r["prefill_s"],
                             "decode_s_per_token": decode, "roofline_s_per_token": bound,
                             "decode_ratio_to_roofline": bound / decode, "bandwidth_gbps": bandwidth})
                print(_row_text(rows[-1]), flush=True)
        print()
        print(table(rows))
        if args.json:
            atomic_write_bytes(args.json, json.dumps(rows, indent=1).encode("utf-8"), force=args.force)
        return 0 if all(r["within_target"] for r in rows) else 1
    finally:
        if args.dir is None:
            shutil.rmtree(work, ignore_errors=True)


def _row_text(r: dict) -> str:
    tv = "-" if r["trace_time_v_peak_rss_bytes"] is None else f"{r['trace_time_v_peak_rss_bytes'] / GiB:.2f}"
    return (f"{r['model']:<28} {r['dtype']:<8} file {r['file_bytes'] / GiB:5.2f} GiB  peak RSS {r['peak_rss_bytes'] / GiB:5.2f} GiB "
            f"(+{r['over_file_bytes'] / GiB:.2f}; trace under time -v {tv})  prefill {r['prefill_s']:.1f} s  "
            f"decode {r['decode_s_per_token']:.2f} s/token  roofline {r['roofline_s_per_token'] * 1e3:.0f} ms "
            f"({r['decode_ratio_to_roofline']:.1%})  {'OK' if r['within_target'] else 'NOT OK'}")


def table(rows: list[dict]) -> str:
    """The README's Markdown table."""
    lines = ["| model | dtype | file GiB | peak RSS GiB (child / `time -v` trace) | RSS − file GiB | "
             f"prefill {rows[0]['prefill_tokens'] if rows else ''} tok s | decode s/token | roofline ms/token | decode / roofline | ≤ file + 1.5 GiB |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        tv = "-" if r["trace_time_v_peak_rss_bytes"] is None else f"{r['trace_time_v_peak_rss_bytes'] / GiB:.2f}"
        lines.append(f"| {r['model']} | {r['dtype']} | {r['file_bytes'] / GiB:.2f} | {r['peak_rss_bytes'] / GiB:.2f} / {tv} | "
                     f"{r['over_file_bytes'] / GiB:+.2f} | {r['prefill_s']:.1f} | {r['decode_s_per_token']:.2f} | "
                     f"{r['roofline_s_per_token'] * 1e3:.0f} | {r['decode_ratio_to_roofline']:.1%} | "
                     f"{'yes' if r['within_target'] else 'NO'} |")
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "--child":
        print(json.dumps(child(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))))
        sys.exit(0)
    sys.exit(main(sys.argv[1:]))
