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
from d2m_ref.errors import TraceError
from d2m_ref.tracefile import TRACE_FORMAT, read_trace
from d2m_ref.kernel_choice import c_kernels_available, kernels_for
from d2m_ref import check, run, trace

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


@pytest.mark.parametrize("dtype, kernels", [("float64", "numpy"), ("float32", "numpy"), ("float32", "c")])
def test_trace_equals_a_direct_forward(demo, tmp_path, capsys, dtype, kernels):
    """Every tensor in the trace file is bit-for-bit the capture of forward() on the same model, ids
    and kernels."""
    if kernels == "c" and not c_kernels_available():
        pytest.skip("the C extension is not built")
    out = tmp_path / "trace.safetensors"
    argv = ["--weights", str(demo), "--prompt", "Hi there", "--out", str(out), "--dtype", dtype, "--kernels", kernels]
    status, stdout, err = call(trace.main, argv, capsys)
    assert status == 0, err
    assert f"wrote {out}" in stdout
    tensors, metadata = read_trace(out)
    model = load_model(demo)
    capture = {}
    forward(model, list(b"Hi there"), dtype=np.dtype(dtype), capture=capture, kernels=kernels_for(kernels))
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
    assert status == 2 and err == f"error: {out}: file exists; pass --force to overwrite it\n"
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
    (d / "softcap.json").write_text(json.dumps({**config, "final_logit_softcapping": 30.0}))
    (d / "bad_tokenizer.json").write_text("{\"model\": 3}")
    return {"truncated": d / "truncated.safetensors", "unknown_key": d / "unknown_key.json",
            "softcap": d / "softcap.json",
            "bad_tokenizer": d / "bad_tokenizer.json", "missing": d / "nope.safetensors"}


BAD_INPUT = [
    ("out-of-range token", ["--tokens", "1,999"], "token id 999 at position 1 is out of range"),
    ("too long", ["--tokens", ",".join(["7"] * 513)], "max_position_embeddings=512"),
    ("missing weights", ["--weights", "{missing}", "--tokens", "1"], "nope.safetensors"),
    ("truncated weights", ["--weights", "{truncated}", "--tokens", "1"], "truncated.safetensors: truncated"),
    ("unknown config key, strict", ["--config", "{unknown_key}", "--tokens", "1", "--strict-config"],
     "unverified config key(s) 'frobnicate'"),
    ("config key that changes the math", ["--config", "{softcap}", "--tokens", "1"],
     "final_logit_softcapping=30.0 soft-caps the logits"),
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
    """Named, status 2, and checked before anything is printed (no summary above an error)."""
    status, out, err = call(run.main, _argv(argv, bare, broken), capsys)
    assert status == 2
    assert culprit in err
    assert "Traceback" not in err + out
    assert out == ""


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


def test_unknown_config_key_is_accepted_with_one_warning_and_recorded(bare, broken, tmp_path, capsys):
    """An unknown key: one warning line naming it, the run goes on, and the trace's metadata and
    check's JSON report list it; --strict-config (above) refuses it."""
    status, out, err = call(run.main, ["--weights", str(bare), "--config", str(broken["unknown_key"]),
                                       "--tokens", "1,2", "--max-new-tokens", "1"], capsys)
    assert status == 0 and "continuation ids" in out
    warnings = [line for line in err.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1 and "'frobnicate'" in warnings[0] and "--strict-config" in warnings[0]
    out_file = tmp_path / "t.safetensors"
    status, _, err = call(trace.main, ["--weights", str(bare), "--config", str(broken["unknown_key"]),
                                       "--tokens", "1,2", "--out", str(out_file), "--quiet"], capsys)
    assert status == 0 and "'frobnicate'" in err
    from d2m_ref.tracefile import read_trace
    _, metadata = read_trace(out_file)
    assert json.loads(metadata["unverified_config_keys"]) == ["frobnicate"]
    report = tmp_path / "report.json"
    status, out, err = call(check.main, ["--weights", str(bare), "--config", str(broken["unknown_key"]),
                                         "--candidate", str(out_file), "--candidate-dtype", "float64",
                                         "--json", str(report)], capsys)
    assert status == 0 and "'frobnicate'" in err and "frobnicate" in out
    assert json.loads(report.read_text())["unverified_config_keys"] == ["frobnicate"]
    status, _, err = call(check.main, ["--weights", str(bare), "--config", str(broken["unknown_key"]),
                                       "--candidate", str(out_file), "--candidate-dtype", "float64",
                                       "--strict-config"], capsys)
    assert status == 2 and "unverified config key(s) 'frobnicate'" in err


# One non-neutral value for every key spec/config.md refuses, and the words the error must say.
MATH_CHANGING = [
    ({"hidden_act": "gelu"}, "hidden_act='gelu' changes the MLP's activation"),
    ({"mlp_bias": True}, "mlp_bias=True adds biases to the MLP"),
    ({"layer_types": ["sliding_attention"] * 6}, "layer_types contains ['sliding_attention']"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_type='yarn' is not supported"),
    ({"rope_scaling": {"rope_type": "linear", "factor": 2.0, "beta_fast": 32}}, "'beta_fast'"),
    ({"quantization_config": {"quant_method": "awq", "bits": 4}}, "quantization_config={quant_method: 'awq'"),
    ({"final_logit_softcapping": 30.0}, "final_logit_softcapping=30.0 soft-caps the logits"),
    ({"attn_logit_softcapping": 50.0}, "attn_logit_softcapping=50.0 soft-caps the attention scores"),
    ({"rope_interleaved": True}, "rope_interleaved=True rotates interleaved pairs"),
    ({"use_mrope": True}, "use_mrope=True uses multimodal RoPE"),
    ({"partial_rotary_factor": 0.5}, "partial_rotary_factor=0.5 rotates only part of each head"),
    ({"use_qk_norm": True}, "use_qk_norm=True RMS-normalises queries and keys"),
    ({"qk_layernorm": True}, "qk_layernorm=True normalises queries and keys"),
    ({"logits_scaling": 8.0}, "logits_scaling=8.0 divides the logits"),
    ({"embedding_multiplier": 12.0}, "embedding_multiplier=12.0 scales the embeddings"),
    ({"residual_multiplier": 0.22}, "residual_multiplier=0.22 scales each residual branch"),
    ({"attention_multiplier": 0.015}, "attention_multiplier=0.015 replaces the 1/sqrt(head_dim)"),
    ({"no_rope_layers": [1, 0, 1, 1, 1, 1]}, "no_rope_layers=[1, 0, 1, 1, 1, 1] skips RoPE"),
    ({"no_rope_layer_interval": 4}, "no_rope_layer_interval=4 skips RoPE"),
]


@pytest.mark.parametrize("change, culprit", MATH_CHANGING, ids=[next(iter(c)) for c, _ in MATH_CHANGING])
def test_config_keys_that_change_the_math_are_named(change, culprit, demo, tmp_path, capsys):
    """Each key d2m_ref knows changes the forward pass in a way it does not implement: run and trace
    exit 2 naming the key and what it changes (before anything is printed or written)."""
    config = tmp_path / "config.json"
    config.write_text(json.dumps({**json.loads((demo / "config.json").read_text()), **change}))
    weights = str(demo / "model.safetensors")
    status, out, err = call(run.main, ["--weights", weights, "--config", str(config), "--tokens", "1"], capsys)
    assert status == 2 and culprit in err and out == "", err
    status, _, err = call(trace.main, ["--weights", weights, "--config", str(config), "--tokens", "1",
                                       "--out", str(tmp_path / "t.safetensors")], capsys)
    assert status == 2 and culprit in err and not (tmp_path / "t.safetensors").exists()


def test_run_needs_a_prompt_for_a_real_model(bare, capsys):
    status, _, err = call(run.main, ["--weights", str(bare)], capsys)
    assert status == 2 and "give --prompt TEXT or --tokens" in err


@pytest.mark.parametrize("module, argv, culprit", [
    ("d2m_ref.run", ["--tokens", "1,999"], "token id 999"),
    ("d2m_ref.trace", ["--tokens", "1", "--out", "t.safetensors", "--config", "{unknown_key}", "--strict-config"],
     "'frobnicate'"),
])
def test_bad_input_in_a_subprocess(module, argv, culprit, bare, broken, tmp_path):
    """The real process: status 2, one error line naming the culprit, no traceback."""
    done = python_m(module, "--weights", str(bare), *[a.format(**broken) for a in argv], cwd=tmp_path)
    assert done.returncode == 2
    assert culprit in done.stderr and done.stderr.startswith("error: ")
    assert "Traceback" not in done.stderr


def entry_points() -> set[str]:
    """The modules of d2m_ref/*.py that can be run (`if __name__ == "__main__":` at top level): found, not listed."""
    found = set()
    for path in (REPO / "d2m_ref").glob("*.py"):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.If) and ast.unparse(node.test).replace("'", '"') == '__name__ == "__main__"':
                found.add(path.stem)
    return found


def imported_modules(path: Path) -> set[str]:
    """Absolute dotted names a module imports (relative imports resolved; `from . import x` gives pkg.x)."""
    package = path.relative_to(REPO).parent.as_posix().split("/")  # ['d2m_ref'] or ['d2m_ref', 'adapters']
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            names |= {module} | {f"{module}.{a.name}" for a in node.names}
    return names


def test_arrows_point_down():
    """No module of the package imports an entry point (any d2m_ref/*.py with a __main__ block) or
    the entry points' plumbing (cli); only entry points import them."""
    entry = entry_points()
    assert {"run", "trace", "demo", "bench", "bench_memory"} <= entry, entry
    upward = {f"d2m_ref.{name}" for name in entry | {"cli"}}
    found = set()
    for path in sorted((REPO / "d2m_ref").rglob("*.py")):
        module = ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
        if module in upward:
            continue
        for name in imported_modules(path):
            target = ".".join(name.split(".")[:2])  # d2m_ref.trace.write_trace -> d2m_ref.trace
            if target in upward and target != module:
                found.add((module, target))
    assert found == set(), f"upward imports: {sorted(found)}"


def import_graph(root: Path = REPO) -> dict[str, set[str]]:
    """module -> the package modules it imports, anywhere in its text (function-level imports count:
    a circle hidden in a function is still a circle)."""
    modules = {".".join(p.relative_to(root).with_suffix("").parts).removesuffix(".__init__"): p
               for p in sorted((root / "d2m_ref").rglob("*.py"))}
    graph = {}
    for module, path in modules.items():
        targets = set()
        for name in imported_modules(path):
            parts = name.split(".")
            for k in range(len(parts), 1, -1):  # the longest prefix that is a module
                if ".".join(parts[:k]) in modules:
                    targets.add(".".join(parts[:k]))
                    break
        graph[module] = targets - {module, "d2m_ref"}
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every import circle, each once, as the modules around it (Tarjan's strongly connected components
    of more than one module)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_circles():
    assert circles(import_graph()) == []


def test_a_circle_is_found():
    """The detector itself: a circle added to the real graph (model -> check) is reported."""
    graph = import_graph()
    assert "d2m_ref.model" in graph["d2m_ref.check"]
    graph["d2m_ref.model"] = graph["d2m_ref.model"] | {"d2m_ref.check"}
    assert any({"d2m_ref.model", "d2m_ref.check"} <= set(c) for c in circles(graph))


# ---------------------------------------------------------------------------------------------
# files: one refusal message, atomic writes


def test_refuse_existing_and_atomic_write(tmp_path):
    """An existing path is refused by name unless force; the write replaces the file whole."""
    from d2m_ref.errors import OutputExistsError
    from d2m_ref.files import atomic_write_bytes, refuse_existing
    path = tmp_path / "out.json"
    refuse_existing(path, force=False)  # absent: fine
    atomic_write_bytes(path, b"one", force=False)
    with pytest.raises(OutputExistsError, match=re.escape(f"{path}: file exists; pass --force to overwrite it")):
        atomic_write_bytes(path, b"two", force=False)
    assert path.read_bytes() == b"one"
    atomic_write_bytes(path, b"two", force=True)
    assert path.read_bytes() == b"two" and os.listdir(tmp_path) == ["out.json"]


def test_atomic_write_leaves_no_temporary_on_failure(tmp_path, monkeypatch):
    """A failure while writing (here fsync) is named, keeps the old file and leaves no temporary."""
    from d2m_ref.errors import D2MError
    from d2m_ref.files import atomic_write_bytes
    path = tmp_path / "out.json"
    path.write_bytes(b"old")

    def fail(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", fail)
    with pytest.raises(D2MError, match=r"out\.json: cannot write \(No space left on device\)"):
        atomic_write_bytes(path, b"new", force=True)
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["out.json"]


def test_one_refusal_message_everywhere(bare, tmp_path, capsys):
    """trace, demo and safetensors.save refuse an existing output with the same class and message."""
    from d2m_ref.errors import OutputExistsError
    target = tmp_path / "model.safetensors"
    target.write_bytes(b"mine")
    expected = f"{target}: file exists; pass --force to overwrite it"
    status, _, err = call(trace.main, ["--weights", str(bare), "--tokens", "1", "--out", str(target)], capsys)
    assert status == 2 and err == f"error: {expected}\n"
    for attempt in (lambda: build_demo(tmp_path), lambda: save(target, {"a": np.ones(1)})):
        with pytest.raises(OutputExistsError) as info:
            attempt()
        assert str(info.value) == expected
    assert target.read_bytes() == b"mine"


@pytest.fixture(scope="module")
def sharded(tmp_path_factory, demo) -> Path:
    """The demo weights split into two shards with an index and config.json."""
    from d2m_ref.safetensors_io import SafetensorsFile
    d = tmp_path_factory.mktemp("sharded")
    with SafetensorsFile(demo / "model.safetensors") as f:
        names = f.names()
        halves = [names[: len(names) // 2], names[len(names) // 2:]]
        weight_map = {}
        for k, half in enumerate(halves, 1):
            shard = f"model-0000{k}-of-00002.safetensors"
            save(d / shard, {n: f.raw(n) for n in half}, dtypes={n: f.dtype(n) for n in half})
            weight_map |= dict.fromkeys(half, shard)
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    shutil.copy(demo / "config.json", d / "config.json")
    return d


@pytest.mark.parametrize("what", ["the weights file", "a hard link to it", "a shard", "the index",
                                  "the index of a directory", "config.json beside", "tokenizer.json beside"])
def test_trace_never_overwrites_its_own_input(what, bare, sharded, demo, tmp_path, capsys):
    """--out naming (or being the same file as) --weights, one of its shards, or the config or
    tokenizer read with them is refused even with --force."""
    if what == "the index of a directory":
        weights, out = sharded, sharded / "model.safetensors.index.json"
    elif what in ("config.json beside", "tokenizer.json beside"):
        weights, out = demo, demo / what.split()[0]
    elif what == "the weights file":
        weights, out = bare, bare
    elif what == "a hard link to it":
        weights, out = bare, tmp_path / "link.safetensors"
        os.link(bare, out)
    elif what == "a shard":
        weights, out = sharded, sharded / "model-00002-of-00002.safetensors"
    else:
        weights = out = sharded / "model.safetensors.index.json"
    before = out.read_bytes()
    status, _, err = call(trace.main, ["--weights", str(weights), "--tokens", "1", "--out", str(out),
                                       "--force", "--quiet"], capsys)
    assert status == 2 and "Traceback" not in err
    assert f"--out {out} is the same file as" in err and "even with --force" in err
    assert out.read_bytes() == before


# ---------------------------------------------------------------------------------------------
# run: every option checked by name, before anything is printed


RUN_BAD_INPUT = [
    ("negative seed when sampling", ["--seed", "-5", "--temperature", "1"], "seed=-5"),
    ("negative max-new-tokens", ["--max-new-tokens", "-1"], "max_new_tokens=-1"),
    ("top-p 0", ["--top-p", "0"], "top_p=0.0"),
    ("top-p above 1", ["--top-p", "1.5"], "top_p=1.5"),
    ("negative temperature", ["--temperature", "-0.5"], "temperature=-0.5"),
]


@pytest.mark.parametrize("what, argv, culprit", RUN_BAD_INPUT, ids=[b[0] for b in RUN_BAD_INPUT])
def test_run_bad_sampling_options(what, argv, culprit, bare, capsys):
    status, out, err = call(run.main, ["--weights", str(bare), "--tokens", "1,2", *argv], capsys)
    assert status == 2 and culprit in err and err.startswith("error: ")
    assert "Traceback" not in err and out == ""


def test_run_greedy_ignores_the_seed(bare, capsys):
    """The seed matters only when sampling: greedy with --seed -5 runs."""
    status, out, err = call(run.main, ["--weights", str(bare), "--tokens", "1,2", "--seed", "-5",
                                       "--max-new-tokens", "2"], capsys)
    assert status == 0, err


def test_run_zero_new_tokens_is_just_the_prefill(bare, capsys):
    status, out, err = call(run.main, ["--weights", str(bare), "--tokens", "1,2", "--max-new-tokens", "0"], capsys)
    assert status == 0, err
    assert "continuation ids: []" in out and "prefill: 2 tokens" in out and "decode: no tokens" in out


def test_run_demo_bad_tokens_print_nothing(capsys):
    """Even the demo's note comes after validation."""
    status, out, err = call(run.main, ["--tokens", "1,999"], capsys)
    assert status == 2 and "token id 999" in err and out == ""


def test_run_bad_eos_id_prints_nothing(bare, demo, tmp_path, capsys):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({**json.loads((demo / "config.json").read_text()), "eos_token_id": "x"}))
    status, out, err = call(run.main, ["--weights", str(bare), "--config", str(config), "--tokens", "1"], capsys)
    assert status == 2 and "eos_token_id='x'" in err and out == ""


@pytest.mark.filterwarnings("error")  # an overflow warning from the sampler fails the test
def test_run_tiny_temperature_is_greedy(bare, capsys):
    """temperature 1e-310 would overflow logits / T; the result is the greedy continuation, no warning."""
    argv = ["--weights", str(bare), "--tokens", "72,105", "--max-new-tokens", "4"]
    status, greedy_out, err = call(run.main, argv, capsys)
    assert status == 0, err
    status, out, err = call(run.main, [*argv, "--temperature", "1e-310", "--seed", "3"], capsys)
    assert status == 0 and err == ""
    ids = re.search(r"^continuation ids: .*$", out, re.M).group(0)
    assert ids == re.search(r"^continuation ids: .*$", greedy_out, re.M).group(0)


def test_undecodable_prompt_is_named(demo, capsys):
    """A --prompt holding bytes that are not UTF-8 (surrogate escapes in argv) is named, shortened."""
    prompt = "a" * 200 + "\udcff"
    status, out, err = call(run.main, ["--weights", str(demo), "--prompt", prompt], capsys)
    assert status == 2 and "Traceback" not in err and out == ""
    assert "the prompt 'aaaa" in err and "not valid UTF-8 (byte 0xff at position 200)" in err and len(err) < 300


def test_trace_paths_with_undecodable_bytes(bare, tmp_path, capsys):
    """--out and --weights with bytes that are not UTF-8: the trace is written, its metadata shows them as \\xNN."""
    weights = tmp_path / "w\udcfe.safetensors"
    shutil.copy(bare, weights)
    out = tmp_path / "x\udcff.safetensors"
    status, _, err = call(trace.main, ["--weights", str(weights), "--tokens", "1", "--out", str(out), "--quiet"],
                          capsys)
    assert status == 0, err
    metadata = read_trace(out)[1]
    assert metadata["weights"].endswith("w\\xfe.safetensors") and "x\\xff.safetensors" in metadata["command"]


def test_undecodable_paths_in_a_subprocess(bare, tmp_path):
    """The real process, whose stdout is strict UTF-8: the 'wrote' line shows the name as \\xNN."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "LC_ALL": "C.UTF-8", "PYTHONIOENCODING": "utf-8"}
    done = subprocess.run([sys.executable, "-m", "d2m_ref.trace", "--weights", str(bare), "--tokens", "1",
                           "--out", os.fsencode(tmp_path) + b"/x\xff.safetensors"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "x\\xff.safetensors" in done.stdout


@pytest.mark.parametrize("option", ["--weights", "--config"])
def test_input_that_is_not_a_regular_file(option, bare, tmp_path):
    """A FIFO given as --weights or --config is named at once (open() on it would wait forever)."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    argv = ["--weights", str(fifo if option == "--weights" else bare), "--tokens", "1"]
    if option == "--config":
        argv += ["--config", str(fifo)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-m", "d2m_ref.run", *argv], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=20)
    assert done.returncode == 2
    assert done.stderr == f"error: {option} {fifo}: not a regular file (a FIFO)\n"


# ---------------------------------------------------------------------------------------------
# the tokenizer beside the weights is loaded only when needed


@pytest.fixture(scope="module")
def bad_beside(tmp_path_factory, demo) -> Path:
    """The demo weights and config with a broken tokenizer.json beside them."""
    d = tmp_path_factory.mktemp("bad_beside")
    for name in ("model.safetensors", "config.json"):
        shutil.copy(demo / name, d / name)
    (d / "tokenizer.json").write_text("{\"model\": 3}")
    return d


def test_run_tokens_with_a_broken_tokenizer_beside_warns(bad_beside, capsys):
    """Needed only to decode the output: one warning line, ids only."""
    status, out, err = call(run.main, ["--weights", str(bad_beside), "--tokens", "1,2", "--max-new-tokens", "2"],
                            capsys)
    assert status == 0, err
    assert len(err.splitlines()) == 1 and err.startswith("warning: ") and "tokenizer.json" in err
    assert "continuation ids: [" in out and "continuation: " not in out


def test_trace_tokens_ignores_a_broken_tokenizer_beside(bad_beside, tmp_path, capsys):
    status, _, err = call(trace.main, ["--weights", str(bad_beside), "--tokens", "1,2", "--out",
                                       str(tmp_path / "t.safetensors"), "--quiet"], capsys)
    assert status == 0 and err == ""


@pytest.mark.parametrize("argv", [["--prompt", "hi"],
                                  ["--tokens", "1", "--tokenizer", "{dir}/tokenizer.json"]],
                         ids=["needed for --prompt", "given explicitly"])
def test_a_broken_tokenizer_that_is_needed_or_given_is_an_error(argv, bad_beside, capsys):
    argv = [a.format(dir=bad_beside) for a in argv]
    status, out, err = call(run.main, ["--weights", str(bad_beside), *argv], capsys)
    assert status == 2 and "tokenizer.json: not a valid tokenizer.json" in err and out == ""


# ---------------------------------------------------------------------------------------------
# NaN / Inf: run and trace refuse to report non-finite results


@pytest.fixture(scope="module")
def poisoned(tmp_path_factory) -> dict[str, Path]:
    """Demo-shaped F32 checkpoints: 'nan_and_inf' has a NaN in layer 0's up_proj and an Inf in
    model.norm; 'inf_norm' only the Inf."""
    from d2m_ref.config import parse_config
    from d2m_ref.demo import DEMO_SEED, demo_config
    from d2m_ref.synth import random_arrays
    config = demo_config()
    d = tmp_path_factory.mktemp("poisoned")
    paths = {}
    for what in ("nan_and_inf", "inf_norm"):
        arrays = random_arrays(parse_config(config), DEMO_SEED, "F32")
        if what == "nan_and_inf":
            arrays["model.layers.0.mlp.up_proj.weight"][3, 5] = np.nan
        arrays["model.norm.weight"][7] = np.inf
        paths[what] = d / f"{what}.safetensors"
        save(paths[what], arrays, metadata={"config": json.dumps(config)})
    return paths


@pytest.mark.parametrize("what, stage", [("nan_and_inf", "ffn_out.0 (layer 0 FFN output)"),
                                         ("inf_norm", "final_norm (final norm output)")])
@pytest.mark.parametrize("tool", ["run", "trace"])
def test_non_finite_values_are_named_by_their_first_stage(tool, what, stage, poisoned, tmp_path, capsys):
    """The first non-finite tensor in forward order is named; nothing plausible is printed or written."""
    out_file = tmp_path / "t.safetensors"
    argv = ["--weights", str(poisoned[what]), "--tokens", "1,2,3", "--quiet"]
    main = run.main if tool == "run" else trace.main
    status, out, err = call(main, argv if tool == "run" else [*argv, "--out", str(out_file)], capsys)
    assert status == 2 and "Traceback" not in err
    assert f"non-finite values in the prefill: first in {stage}" in err
    assert "continuation" not in out and not out_file.exists()


# ---------------------------------------------------------------------------------------------
# bench


def no_work(*_):
    """Stands in for a benchmark's first piece of work: the arguments must be refused before it."""
    raise AssertionError("work started before the arguments were checked")


def test_bench_kind_not_built_is_named(monkeypatch, capsys):
    """A benchmark kind whose module is absent from this checkout: named, status 2, no traceback."""
    from d2m_ref import bench
    monkeypatch.setitem(bench.KINDS, "gemv", "d2m_ref.no_such_bench_module")
    status, out, err = call(bench.main, ["gemv"], capsys)
    assert status == 2 and err.startswith("error: ") and "Traceback" not in err
    assert "bench gemv" in err and "not available" in err and "d2m_ref.no_such_bench_module" in err


def test_bench_dispatches_to_the_kind_module(monkeypatch, capsys):
    """A present kind module gets the whole argv (its kind first); its D2MError is reported as status 2."""
    import types
    from d2m_ref import bench
    from d2m_ref.errors import InputError
    seen = []

    def main(argv):
        seen.append(argv)
        if "--bad" in argv:
            raise InputError("--bad is bad")
        return 0

    monkeypatch.setitem(sys.modules, "d2m_ref_fake_bench", types.SimpleNamespace(main=main))
    monkeypatch.setitem(bench.KINDS, "gemv", "d2m_ref_fake_bench")
    assert call(bench.main, ["gemv", "--rows", "8"], capsys)[0] == 0 and seen == [["gemv", "--rows", "8"]]
    assert call(bench.main, ["gemv", "--bad"], capsys)[:3:2] == (2, "error: --bad is bad\n")


@pytest.mark.skipif(not c_kernels_available(), reason="C kernels not built")
def test_bench_gemv_and_decode_rows(tmp_path, monkeypatch, capsys):
    """Both kernel benchmarks run end to end on tiny work and write the rows the issue names; a
    --json file already there is refused before any work, kept, and replaced with --force."""
    from d2m_ref import bench, bench_kernels
    monkeypatch.setattr(bench_kernels, "cold_bytes", lambda: 4 << 20)
    out = tmp_path / "gemv.json"
    argv = ["gemv", "--formats", "int4-g32,f16", "--shapes", "33x100", "--threads", "1,2", "--seconds", "0.02",
            "--offset", "16", "--json", str(out)]
    status, text, err = call(bench.main, argv, capsys)
    assert status == 0, err
    rows = json.loads(out.read_text())["rows"]
    assert [(r["format"], r["threads"]) for r in rows] == [("int4-g32", 1), ("int4-g32", 2), ("f16", 1), ("f16", 2)]
    for r in rows:
        assert {"format", "shape", "threads", "gbps", "bandwidth_gbps", "ratio_to_bandwidth", "ratio_to_numpy"} <= set(r)
        assert r["shape"] == "33x100" and r["offset"] == 16 and r["gbps"] > 0 and r["bandwidth_gbps"] > 0
        assert r["pairs"] >= 5 and r["ratio_quartiles"][0] <= r["ratio_to_bandwidth"] <= r["ratio_quartiles"][1]
        assert r["python_gbps"] > 0 and "4 KiB pages" in text
        assert r["hot_gbps"] > 0 and r["hot_rows"] == 33  # 33 rows of 100 columns fit in half of any L2
    out.write_text("mine")
    status, text, err = call(bench.main, argv, capsys)
    assert status == 2 and "--force" in err and out.read_text() == "mine" and "GB/s" not in text

    dec = tmp_path / "decode.json"
    argv = ["decode", "--formats", "bf16,int8", "--groups", "1", "--vocab", "300", "--tokens", "2", "--numpy-tokens", "1",
            "--threads", "1", "--dir", str(tmp_path), "--json", str(dec)]
    status, text, err = call(bench.main, argv, capsys)
    assert status == 0, err
    rows = json.loads(dec.read_text())["rows"]
    assert [(r["format"], r["kernels"]) for r in rows] == [("bf16", "c"), ("bf16", "numpy"), ("int8", "c"), ("int8", "numpy")]
    assert all(r["tokens_per_s"] > 0 and r["ratio_to_bound"] > 0 and 0 < r["kernel_share"] <= 1 for r in rows)
    assert [r["steps"] for r in rows] == [2, 1, 2, 1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["decode.json", "gemv.json"]  # its checkpoints are gone


@pytest.mark.skipif(not c_kernels_available(), reason="C kernels not built")
def test_bench_hot_matrix_fills_half_the_l2(monkeypatch):
    """The hot matrix: the shape's columns, as many of its rows as fill half of the L2; none where
    one row is more than that (its rate would not be a compute rate)."""
    from d2m_ref import bench_kernels
    monkeypatch.setattr(bench_kernels, "l2_cache_bytes", lambda: 64 << 10)
    assert bench_kernels.hot_rows(400, 1000, 100) == 80  # 400-byte rows: 80 fill 32 KiB beside x's 500
    assert bench_kernels.hot_rows(400, 50, 100) == 50  # the whole matrix fits
    assert bench_kernels.hot_rows(40004, 10, 40000) == 0  # one row is more than half
    assert bench_kernels.hot_rows(5004, 10, 5000) == 1  # 5000 + 25000 bytes of x fit, 2 rows would not
    hot = bench_kernels.HotGemv("f32", 80, 100, None, 0)
    assert hot.y.shape == (1, 80) and hot.nbytes == 80 * 400 and hot.rate() > 0
    assert len(hot.ws) == (64 << 20) // (80 * 400)  # 64 MiB a pass
    assert len(bench_kernels.HotGemv("f32", 8, 100, None, 0).ws) == bench_kernels.HOT_PASS_CALLS  # capped
    monkeypatch.setattr(bench_kernels, "l2_cache_bytes", lambda: None)  # sysfs silent: assumed, and said
    assert bench_kernels.hot_rows(400, 10 ** 6, 100) == (bench_kernels.L2_ASSUMED // 2 - 500) // 400
    assert "assumed" in bench_kernels.l2_note()


def test_bench_cache_sizes_from_sysfs(monkeypatch, tmp_path):
    """Instruction caches do not count; an entry without a type counts as unified, one without a
    level still counts towards the last level; unreadable sizes are skipped."""
    from d2m_ref import bench_kernels
    entries = {"index0": ("1", "Data", "32K"), "index1": ("1", "Instruction", "64M"), "index2": ("2", None, "1024K"),
               "index3": (None, "Unified", "16M"), "index4": ("3", "Unified", "lots")}
    cpu = tmp_path / "cpu0" / "cache"
    for name, (level, kind, size) in entries.items():
        (cpu / name).mkdir(parents=True)
        for file, text in (("level", level), ("type", kind), ("size", size)):
            if text is not None:
                (cpu / name / file).write_text(text + "\n")
    real = Path

    def fake_path(text, *rest):
        return real(str(text).replace("/sys/devices/system/cpu", str(tmp_path)), *rest)

    monkeypatch.setattr(bench_kernels, "Path", fake_path)
    assert sorted(bench_kernels.caches(), key=str) == sorted([(1, 32 << 10), (2, 1 << 20), (None, 16 << 20)], key=str)
    assert bench_kernels.l2_cache_bytes() == 1 << 20 and bench_kernels.last_level_cache_bytes() == 16 << 20


def test_bench_timed_kernels_count_their_calls_only():
    """TimedKernels passes every call through unchanged and adds up the clock inside them only: a
    forward pass through it gives the same logits, and with a clock that only the kernels move,
    its seconds are exactly what they moved it by."""
    from d2m_ref.config import parse_config
    from d2m_ref.demo import DEMO_SEED, demo_config
    from d2m_ref.kernels import NumpyKernels
    from d2m_ref.synth import random_model
    from d2m_ref import bench_kernels
    model = random_model(parse_config(demo_config()), DEMO_SEED, "BF16")
    ref, _ = forward(model, [1, 2, 3], dtype=np.float32, kernels=NumpyKernels())
    clock = [0.0]

    class Ticking(NumpyKernels):  # every call moves the clock by one second
        calls = 0

        def _tick(self):
            Ticking.calls += 1
            clock[0] += 1.0

        def linear(self, x, w):
            self._tick()
            return super().linear(x, w)

        def expert(self, x, w):
            self._tick()
            return super().expert(x, w)

        def experts_topk(self, x, experts, topk_ids, topk_weights):
            self._tick()
            return super().experts_topk(x, experts, topk_ids, topk_weights)

    timed = bench_kernels.TimedKernels(Ticking(), clock=lambda: clock[0])
    got, _ = forward(model, [1, 2, 3], dtype=np.float32, kernels=timed)
    np.testing.assert_array_equal(got, ref)
    assert Ticking.calls > 4 and timed.seconds == Ticking.calls


def test_bench_paired_ratio_is_per_pair():
    """Each sample is judged against the read just before it: ratio = rate · bytes per unit / read."""
    from d2m_ref import bench_kernels
    reads, rates = iter([40.0, 80.0, 50.0, 40.0, 60.0]), iter([2.0, 4.0, 2.0, 1.0, 3.0])
    bw = type("FakeBandwidth", (), {"read": lambda self: next(reads)})()
    p = bench_kernels.paired(lambda: next(rates), bw, per_byte=10e9, seconds=0.0, min_pairs=5)
    assert p.ratios == pytest.approx([0.5, 0.5, 0.4, 0.25, 0.5])
    assert (p.ratio, p.rate, p.bandwidth) == (pytest.approx(0.5), 2.0, 50.0)


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="needs Linux's /proc/self/smaps")
def test_bench_buffers_are_on_small_pages():
    """The bandwidth buffer and the matrices are mappings of their own with huge pages refused
    (VmFlags 'nh'), as a memory-mapped checkpoint is not on huge pages; NumPy's own big arrays
    would be ('hg': it asks for them), which made the reference read faster than the weights."""
    from d2m_ref import bench_kernels
    a = bench_kernels._aligned(8 << 20, offset=16)
    assert a.ctypes.data % 64 == 16 and a.nbytes == 8 << 20 and a.flags.writeable

    def flags_at(address: int) -> set[str]:
        region = None
        for line in Path("/proc/self/smaps").read_text().splitlines():
            head = line.split()[0]
            if "-" in head and ":" not in head:
                lo, hi = (int(v, 16) for v in head.split("-"))
                region = lo <= address < hi
            elif region and line.startswith("VmFlags:"):
                return set(line.split()[1:])
        raise AssertionError(f"no mapping holds {address:#x}")

    assert "nh" in flags_at(a.ctypes.data)
    assert "nh" not in flags_at(np.empty(8 << 20, np.uint8).ctypes.data)


def test_bench_decode_checkpoints_removed_as_it_goes(tmp_path):
    """write_models keeps one format's checkpoint on disk at a time (a 0.5B-shaped f32 file is 2 GB)."""
    from d2m_ref import bench_kernels
    cfg = bench_kernels.qwen05b_dense2moe_config(groups=1, vocab=300)
    seen = []
    for fmt, path in bench_kernels.write_models(cfg, ["f32", "int8", "bf16"], tmp_path):
        seen.append(path)
        assert path.exists() and all(not p.exists() for p in seen[:-1]), fmt
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("argv, culprit", [(["gemv", "--threads", "0"], "--threads: 0"),
                                           (["gemv", "--shapes", "8by8"], "--shapes: '8by8'"),
                                           (["gemv", "--formats", "int3"], "int3"),
                                           (["gemv", "--offset", "-1"], "--offset -1"),
                                           (["gemv", "--offset", "2"], "--offset 2"),
                                           (["gemv", "--seconds", "nan"], "--seconds nan"),
                                           (["gemv", "--seconds", "inf"], "--seconds inf"),
                                           (["gemv", "--json", "NOFOLDER/rows.json"], "does not exist"),
                                           (["gemv", "--json", "TMP"], "is a directory"),
                                           (["decode", "--tokens", "0"], "--tokens 0"),
                                           (["decode", "--numpy-tokens", "0"], "--numpy-tokens 0"),
                                           (["decode", "--dir", "NOFOLDER"], "is not an existing folder")])
def test_bench_kernels_bad_arguments(argv, culprit, capsys, tmp_path, monkeypatch):
    """Refused before any work (no bandwidth buffer, matrix or checkpoint): named, status 2."""
    from d2m_ref import bench, bench_kernels
    monkeypatch.setattr(bench_kernels, "Bandwidth", no_work)
    monkeypatch.setattr(bench_kernels, "write_models", no_work)
    argv = [a.replace("NOFOLDER", str(tmp_path / "missing")).replace("TMP", str(tmp_path)) for a in argv]
    status, out, err = call(bench.main, argv, capsys)
    assert status == 2 and culprit in err and err.startswith("error: ") and "Traceback" not in err


@pytest.mark.skipif(not c_kernels_available(), reason="C kernels not built")
@pytest.mark.parametrize("argv, culprit", [(["gemv", "--path", "sve2"], "sve2"),
                                           (["decode", "--threads", "1,9999"], "9999")])
def test_bench_kernels_bad_path_or_threads(argv, culprit, capsys, monkeypatch):
    from d2m_ref import bench, bench_kernels
    monkeypatch.setattr(bench_kernels, "Bandwidth", no_work)
    status, out, err = call(bench.main, argv, capsys)
    assert status == 2 and culprit in err and "Traceback" not in err


BENCH_MEMORY_BAD = [
    (["--prompt-tokens", "-1"], "--prompt-tokens -1"),
    (["--decode-tokens", "0"], "--decode-tokens 0"),
    (["--dtypes", "float64,float16"], "--dtypes: 'float16'"),
    (["--layouts", "dense,moe"], "--layouts: 'moe'"),
    (["--prompt-tokens", "40000"], "max_position_embeddings=32768"),
    (["--json", "EXISTING"], "file exists; pass --force"),
]


@pytest.mark.parametrize("argv, culprit", BENCH_MEMORY_BAD, ids=[a[0] for a, _ in BENCH_MEMORY_BAD])
def test_bench_memory_bad_arguments(argv, culprit, monkeypatch, capsys, tmp_path):
    """Checked before any work (no bandwidth measurement, no checkpoint): named, status 2."""
    from d2m_ref import bench, bench_memory
    monkeypatch.setattr(bench_memory, "measure_bandwidth_gbps", no_work)
    monkeypatch.setattr(bench_memory, "write_model", no_work)
    existing = tmp_path / "rows.json"
    existing.write_text("mine")
    argv = [str(existing) if a == "EXISTING" else a for a in argv]
    status, out, err = call(bench.main, ["memory", *argv], capsys)
    assert existing.read_text() == "mine"
    assert status == 2 and culprit in err and err.startswith("error: ") and "Traceback" not in err


def test_bench_memory_dir_keeps_the_users_files(tmp_path):
    """--dir: config.json is written only when absent, refused when different; model.safetensors is
    reused only when the config stored in it matches."""
    from d2m_ref import bench_memory
    from d2m_ref.errors import D2MError
    tiny = bench_memory.tiny_dense()
    folder = tmp_path / "tiny-dense"
    weights = bench_memory.write_model(tiny, folder, seed=0)
    assert json.loads((folder / "config.json").read_text()) == tiny
    first = weights.stat()
    assert bench_memory.write_model(tiny, folder, seed=0) == weights  # same config: reused as is
    assert (weights.stat().st_ino, weights.stat().st_mtime_ns) == (first.st_ino, first.st_mtime_ns)

    (folder / "config.json").write_text("{\"mine\": 1}")  # the user's own config: never overwritten
    with pytest.raises(D2MError, match=r"config\.json: exists and differs from the benchmark's.*another --dir"):
        bench_memory.write_model(tiny, folder, seed=0)
    assert (folder / "config.json").read_text() == "{\"mine\": 1}"

    (folder / "config.json").unlink()  # a checkpoint of another shape is not reused
    other = dict(tiny, intermediate_size=64)
    with pytest.raises(D2MError, match=r"model\.safetensors: exists but holds another config.*another --dir"):
        bench_memory.write_model(other, folder, seed=0)
    assert not (folder / "config.json").exists() and weights.stat().st_mtime_ns == first.st_mtime_ns


def test_run_kernels_c_and_numpy_agree_in_float32(demo, capsys):
    """--kernels c and --kernels numpy generate the same greedy tokens in float32 and say which ran;
    in float64 the C kernels are not used, and run says so."""
    if not c_kernels_available():
        pytest.skip("the C extension is not built")
    outputs = {}
    for kernels in ("c", "numpy"):
        status, out, err = call(run.main, ["--weights", str(demo), "--tokens", "72,105,33", "--max-new-tokens", "6",
                                           "--dtype", "float32", "--kernels", kernels, "--quiet"], capsys)
        assert status == 0, err
        outputs[kernels] = re.search(r"continuation ids: (.*)", out).group(1)
        assert re.search(rf"kernels: {kernels}\b", out), out
    assert outputs["c"] == outputs["numpy"]
    status, out, err = call(run.main, ["--weights", str(demo), "--tokens", "72", "--max-new-tokens", "1",
                                       "--kernels", "c", "--quiet"], capsys)
    assert status == 0 and "kernels: numpy (c (" in out and "float32 only" in out


def test_unknown_kernels_is_an_argument_error(demo, capsys):
    status, out, err = call(run.main, ["--weights", str(demo), "--tokens", "1", "--kernels", "cuda"], capsys)
    assert status == 2 and "--kernels" in err and "Traceback" not in err


def test_a_closed_pipe_ends_quietly():
    """`run ... | head -1`: the reader goes away; the writer stops with status 141 and no traceback
    (it used to end in a BrokenPipeError traceback: issue 22)."""
    proc = subprocess.Popen([sys.executable, "-m", "d2m_ref.run", "--max-new-tokens", "64", "--quiet"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO)
    proc.stdout.readline()
    proc.stdout.close()  # what head does after its line
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 141 and b"Traceback" not in err, err.decode()[-2000:]


@pytest.mark.parametrize("argv", [
    ["d2m_ref.check", "--weights", "{fifo}", "--candidate", "{trace}"],
    ["d2m_ref.check", "--golden", "qwen2", "--candidate", "{fifo}"],
    ["d2m_ref.check", "--golden", "qwen2", "--candidate", "{trace}", "--map", "{fifo}"],
    ["d2m_ref.check", "--weights", "{golden}", "--config", "/dev/zero", "--candidate", "{trace}"],
    ["d2m_ref.quantize", "--weights", "{fifo}", "--format", "int8", "--out", "{out}"],
    ["d2m_ref.quantize", "--weights", "{golden}", "--config", "{fifo}", "--format", "int8", "--out", "{out}"],
], ids=["check-weights", "check-candidate", "check-map", "check-config-dev-zero", "quantize-weights",
        "quantize-config"])
def test_special_files_are_refused_not_waited_on(argv, tmp_path):
    """A FIFO or a device where a file is read: named error, exit 2, at once (check and quantize waited
    forever on a FIFO, and read /dev/zero until memory ran out: issue 22)."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    names = {"fifo": fifo, "trace": REPO / "golden" / "qwen2" / "trace.safetensors", "golden": REPO / "golden" / "qwen2",
             "out": tmp_path / "q"}
    done = subprocess.run([sys.executable, "-m", *[a.format(**names) for a in argv]], capture_output=True, text=True,
                          cwd=tmp_path, timeout=60)
    assert done.returncode == 2 and "not a regular file" in done.stderr and "Traceback" not in done.stderr


def test_long_output_names(tmp_path):
    """A 250-byte name is written (its temporary's name is cut to fit beside it); a 300-byte one is a
    named error, not an OSError traceback (issue 22)."""
    from d2m_ref.errors import InputError
    from d2m_ref.files import atomic_write_bytes
    ok = tmp_path / ("x" * 250)
    atomic_write_bytes(ok, b"1", force=False)
    assert ok.read_bytes() == b"1" and [p.name for p in tmp_path.iterdir()] == [ok.name]
    with pytest.raises(InputError, match="the file name is 300 bytes"):
        atomic_write_bytes(tmp_path / ("y" * 300), b"1", force=False)
