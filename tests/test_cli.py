"""The command-line tools run and trace: output, trace contents, and bad input (exit 2, named, no traceback)."""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from d2m_ref import forward, load_model
from d2m_ref.demo import build_demo
from d2m_ref.generate import generate
from d2m_ref.safetensors_io import save
from d2m_ref.trace import TRACE_FORMAT, TraceError, read_trace
from d2m_ref import run, trace

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    """A directory with the demo's config.json, model.safetensors, tokenizer.json."""
    return build_demo(tmp_path_factory.mktemp("demo"))


@pytest.fixture(scope="module")
def bare(tmp_path_factory, demo) -> Path:
    """The demo weights alone (config in its metadata), with no tokenizer beside them."""
    path = tmp_path_factory.mktemp("bare") / "weights.safetensors"
    shutil.copy(demo / "model.safetensors", path)
    return path


def call(main, argv, capsys) -> tuple[int, str, str]:
    status = main(argv)
    out, err = capsys.readouterr()
    return status, out, err


def python_m(module: str, *argv: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", module, *argv], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=60)


# ---------------------------------------------------------------------------------------------
# run


def test_run_with_no_arguments_runs_the_demo(capsys):
    """`python -m d2m_ref.run` alone: says it runs the demo, then summary, prompt, text, ids, speeds, experts."""
    status, out, err = call(run.main, ["--max-new-tokens", "8"], capsys)
    assert status == 0, err
    lines = out.splitlines()
    assert "demo model" in lines[0]
    assert lines[1] == ("model: dense2moe (base llama), 6 layers, 4 with attention, 3 MoE (layers 1, 2, 3), "
                        "vocab 257, hidden 64")
    assert lines[2] == f"prompt: 24 tokens {run.DEFAULT_PROMPT!r}"
    assert lines[3].startswith("continuation: '")
    assert re.fullmatch(r"continuation ids: \[(\d+, ){7}\d+\]", lines[4])
    assert re.search(r"^prefill: 24 tokens in [\d.]+ s, [\d.]+ tokens/s$", out, re.M)
    assert re.search(r"^decode: 7 tokens in [\d.]+ s, [\d.]+ tokens/s$", out, re.M)
    assert re.search(r"^  layer 2 \(top-2 of 3\): e0 \d+ \([\d.]+%\)  e1 \d+ \([\d.]+%\)  e2 \d+ \([\d.]+%\)$",
                     out, re.M)
    assert err == ""  # stderr is not a terminal here: no progress


def test_run_output_matches_generate(demo, capsys):
    """The ids and expert counts printed are those of generate() on the same model and prompt."""
    status, out, _ = call(run.main, ["--weights", str(demo), "--prompt", "Hello", "--max-new-tokens", "5"], capsys)
    assert status == 0
    model = load_model(demo)
    result = generate(model, list(b"Hello"), max_new_tokens=5, eos_ids=[256])
    model.close()
    assert f"continuation ids: {result.new_ids.tolist()}" in out
    for i, counts in result.expert_counts.items():
        shown = re.search(rf"^  layer {i} .*$", out, re.M).group(0)
        assert [int(c) for c in re.findall(r"e\d+ (\d+) ", shown)] == counts.tolist()
        assert sum(counts) == result.tokens_processed * model.config.layers[i].moe.top_k


def test_run_tokens_without_tokenizer_prints_ids_only(bare, capsys):
    status, out, _ = call(run.main, ["--weights", str(bare), "--tokens", "72,105", "--max-new-tokens", "3",
                                     "--dtype", "float32", "--temperature", "0.7", "--top-p", "0.9"], capsys)
    assert status == 0
    assert "prompt: 2 tokens" in out and "continuation ids: [" in out
    assert "continuation: " not in out
    assert "sampling: temperature 0.7, top_p 0.9, seed 0, dtype float32" in out


def test_run_uses_the_tokenizer_beside_the_weights(demo, capsys):
    status, out, _ = call(run.main, ["--weights", str(demo / "model.safetensors"), "--tokens", "72,105",
                                     "--max-new-tokens", "2"], capsys)
    assert status == 0 and "continuation: '" in out


def test_run_as_a_subprocess(tmp_path):
    """`python -m d2m_ref.run` with no arguments exits 0 and prints the demo report."""
    done = python_m("d2m_ref.run", "--max-new-tokens", "4", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "demo model" in done.stdout.splitlines()[0] and "experts chosen" in done.stdout


# ---------------------------------------------------------------------------------------------
# trace


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_trace_equals_a_direct_forward(demo, tmp_path, capsys, dtype):
    """Every tensor in the trace file is bit-for-bit the capture of forward() on the same model and ids."""
    out = tmp_path / "trace.safetensors"
    argv = ["--weights", str(demo), "--prompt", "Hi there", "--out", str(out), "--dtype", dtype]
    status, stdout, err = call(trace.main, argv, capsys)
    assert status == 0, err
    assert f"wrote {out}" in stdout
    tensors, metadata = read_trace(out)
    model = load_model(demo)
    capture = {}
    forward(model, list(b"Hi there"), dtype=np.dtype(dtype), capture=capture)
    model.close()
    assert sorted(tensors) == sorted(capture)
    for name, expected in capture.items():
        assert tensors[name].dtype == (np.int64 if expected.dtype.kind == "i" else np.dtype(dtype)), name
        assert tensors[name].tobytes() == np.ascontiguousarray(expected).tobytes(), name
    assert metadata["format"] == TRACE_FORMAT and metadata["trace_version"] == "1"
    assert metadata["dtype"] == dtype and metadata["weights"] == str(demo)
    assert metadata["command"] == "python -m d2m_ref.trace " + " ".join(argv).replace("Hi there", "'Hi there'")
    assert json.loads(metadata["config"]) == json.loads((demo / "config.json").read_text())


def test_trace_refuses_to_overwrite_without_force(bare, tmp_path, capsys):
    out = tmp_path / "t.safetensors"
    out.write_bytes(b"precious")
    argv = ["--weights", str(bare), "--tokens", "1,2", "--out", str(out)]
    status, _, err = call(trace.main, argv, capsys)
    assert status == 2 and f"{out}: exists; pass --force" in err and "Traceback" not in err
    assert out.read_bytes() == b"precious"
    status, _, err = call(trace.main, [*argv, "--force", "--quiet"], capsys)
    assert status == 0, err
    assert read_trace(out)[0]["input_ids"].tolist() == [1, 2]


def test_read_trace_names_another_version_and_the_command(bare, tmp_path, capsys):
    """A trace of another trace_version is refused with the command that regenerates it."""
    out = tmp_path / "t.safetensors"
    assert call(trace.main, ["--weights", str(bare), "--tokens", "5", "--out", str(out)], capsys)[0] == 0
    tensors, metadata = read_trace(out)
    old = tmp_path / "old.safetensors"
    save(old, tensors, metadata={**metadata, "trace_version": "0"})
    with pytest.raises(TraceError, match=r"trace_version='0'.*regenerate it with: python -m d2m_ref.trace "
                                         r"--weights .* --out .*t.safetensors --force"):
        read_trace(old)


def test_read_trace_refuses_a_file_that_is_not_a_trace(demo):
    with pytest.raises(TraceError, match="not a d2m_ref trace"):
        read_trace(demo / "model.safetensors")


def test_trace_as_a_subprocess(demo, tmp_path):
    done = python_m("d2m_ref.trace", "--weights", str(demo), "--tokens", "1,2,3", "--out", "t.safetensors",
                    cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert read_trace(tmp_path / "t.safetensors")[0]["logits"].shape == (3, 257)


# ---------------------------------------------------------------------------------------------
# bad input: exit 2, stderr names the culprit, no traceback


@pytest.fixture(scope="module")
def broken(tmp_path_factory, demo) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("broken")
    data = (demo / "model.safetensors").read_bytes()
    (d / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    config = json.loads((demo / "config.json").read_text())
    (d / "unknown_key.json").write_text(json.dumps({**config, "frobnicate": 1}))
    (d / "bad_tokenizer.json").write_text("{\"model\": 3}")
    return {"truncated": d / "truncated.safetensors", "unknown_key": d / "unknown_key.json",
            "bad_tokenizer": d / "bad_tokenizer.json", "missing": d / "nope.safetensors"}


BAD_INPUT = [
    ("out-of-range token", ["--tokens", "1,999"], "token id 999 at position 1 is out of range"),
    ("too long", ["--tokens", ",".join(["7"] * 513)], "max_position_embeddings=512"),
    ("missing weights", ["--weights", "{missing}", "--tokens", "1"], "nope.safetensors"),
    ("truncated weights", ["--weights", "{truncated}", "--tokens", "1"], "truncated.safetensors: truncated"),
    ("unknown config key", ["--config", "{unknown_key}", "--tokens", "1"], "unknown config key(s) 'frobnicate'"),
    ("bad --tokens", ["--tokens", "1,x"], "item 1 'x'"),
    ("prompt without tokenizer", ["--prompt", "hi"], "--prompt needs a tokenizer"),
    ("invalid tokenizer", ["--tokenizer", "{bad_tokenizer}", "--prompt", "hi"], "bad_tokenizer.json: not a valid"),
    ("unknown option", ["--tokens", "1", "--frobnicate"], "unrecognized arguments: --frobnicate"),
]


def _argv(argv: list[str], bare: Path, broken: dict[str, Path]) -> list[str]:
    argv = [a.format(**broken) for a in argv]
    return argv if "--weights" in argv else ["--weights", str(bare), *argv]


@pytest.mark.parametrize("what, argv, culprit", BAD_INPUT, ids=[b[0] for b in BAD_INPUT])
def test_run_bad_input(what, argv, culprit, bare, broken, capsys):
    status, out, err = call(run.main, _argv(argv, bare, broken), capsys)
    assert status == 2
    assert culprit in err
    assert "Traceback" not in err + out


@pytest.mark.parametrize("what, argv, culprit", BAD_INPUT, ids=[b[0] for b in BAD_INPUT])
def test_trace_bad_input(what, argv, culprit, bare, broken, tmp_path, capsys):
    out_file = tmp_path / "t.safetensors"
    status, out, err = call(trace.main, [*_argv(argv, bare, broken), "--out", str(out_file)], capsys)
    assert status == 2
    assert culprit in err
    assert "Traceback" not in err + out
    assert not out_file.exists()


def test_run_demo_refuses_config_without_weights(capsys):
    status, _, err = call(run.main, ["--config", "x.json"], capsys)
    assert status == 2 and "--config x.json given without --weights" in err


def test_run_needs_a_prompt_for_a_real_model(bare, capsys):
    status, _, err = call(run.main, ["--weights", str(bare)], capsys)
    assert status == 2 and "give --prompt TEXT or --tokens" in err


@pytest.mark.parametrize("module, argv, culprit", [
    ("d2m_ref.run", ["--tokens", "1,999"], "token id 999"),
    ("d2m_ref.trace", ["--tokens", "1", "--out", "t.safetensors", "--config", "{unknown_key}"], "'frobnicate'"),
])
def test_bad_input_in_a_subprocess(module, argv, culprit, bare, broken, tmp_path):
    """The real process: status 2, one error line naming the culprit, no traceback."""
    done = python_m(module, "--weights", str(bare), *[a.format(**broken) for a in argv], cwd=tmp_path)
    assert done.returncode == 2
    assert culprit in done.stderr and done.stderr.startswith("error: ")
    assert "Traceback" not in done.stderr


def test_arrows_point_down():
    """No module of the package imports an entry point (run) or the entry points' plumbing (cli),
    except the entry points themselves (run, trace)."""
    entry_points = {"run", "trace"}
    for path in sorted((REPO / "d2m_ref").glob("*.py")):
        if path.stem in entry_points | {"cli"}:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                names = [f"{node.module or ''}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            for name in names:
                parts = set(name.replace("d2m_ref", "").strip(".").split("."))
                assert not parts & {"run", "cli"}, f"{path.name} imports {name}"
