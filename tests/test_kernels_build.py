"""The build helper (d2m_ref/_build_kernels.py) and the no-compiler fallback.

- the cffi cdef is the header's declarations, and the built library has every one of them;
- the SIMD units and their flags follow the compiler's target (a cross-compiler is believed);
- with no working compiler, `setup.py build_ext` still succeeds, says why once, and d2m_ref then
  runs on the NumPy kernels with one warning.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from d2m_ref import _build_kernels as bk
from d2m_ref import ckernels

ROOT = Path(__file__).resolve().parent.parent


def test_cdef_is_the_header_section_and_the_library_has_it_all():
    """cdef_text() is exactly the marked part of c_src/d2m_kernels.h; every function it declares is
    in the built extension (when built)."""
    header = bk.HEADER.read_text()
    section = bk.cdef_text()
    assert header.index(section) > header.index(bk.CDEF_BEGIN)
    functions = re.findall(r"\b(d2m_\w+)\(", section)
    assert {"d2m_gemv", "d2m_expert", "d2m_experts_topk", "d2m_ctx_create", "d2m_stream_read"} <= set(functions)
    if ckernels.available():
        for name in functions:
            assert hasattr(ckernels.lib, name), name


def fake_compiler(tmp_path: Path, machine: str) -> str:
    path = tmp_path / f"fake-{machine}-gcc"
    path.write_text(f"#!/bin/sh\n[ \"$1\" = -dumpmachine ] && echo {machine}-linux-gnu && exit 0\nexit 1\n")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return str(path)


def test_target_and_units_follow_the_compiler(tmp_path):
    """x86-64 gets the AVX2 and AVX-512 units, aarch64 the NEON and dotprod units, each with its own -march;
    an unknown target gets only the portable scalar path."""
    assert bk.target_arch([fake_compiler(tmp_path, "aarch64")]) == "aarch64"
    assert bk.target_arch([fake_compiler(tmp_path, "x86_64")]) == "x86_64"
    assert bk.target_arch([str(tmp_path / "missing-cc")]) == bk.platform.machine()
    arm = {u.source: u.flags for u in bk.simd_units("aarch64")}
    assert arm == {"simd_neon.c": ("-march=armv8-a",), "simd_dotprod.c": ("-march=armv8.2-a+dotprod+fp16",)}
    assert [u.macro for u in bk.simd_units("x86_64")] == ["D2M_HAVE_AVX2", "D2M_HAVE_AVX512"]
    assert bk.simd_units("riscv64") == ()
    for flags in list(arm.values()) + [bk.COMMON_FLAGS]:
        assert not any("fast-math" in f and not f.startswith("-fno-") for f in flags)
        assert not any(f == "-Ofast" for f in flags)


def test_build_info_macros_are_c_strings():
    macros = dict(bk.build_info_macros(["gcc", "-O2", '-DX="y"'], "x86_64", bk.simd_units("x86_64"), ["-g"]))
    for value in macros.values():
        assert value.startswith('"') and value.endswith('"') and '"' not in value[1:-1] and "\\" not in value
    assert "simd_avx2.c: -mavx2 -mfma -mf16c" in macros["D2M_BUILD_FLAGS"]
    assert "-ffp-contract=off" in macros["D2M_BUILD_FLAGS"]


@pytest.mark.slow
def test_without_a_compiler_the_install_goes_on_and_numpy_runs(tmp_path):
    """CC=false: build_ext exits 0 with one 'not built' warning and no extension; d2m_ref imports,
    kernels_for('c') gives the NumPy kernels and warns exactly once."""
    tree = tmp_path / "tree"
    tree.mkdir()
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, tree / name)
    shutil.copytree(ROOT / "c_src", tree / "c_src", ignore=shutil.ignore_patterns("build"))
    shutil.copytree(ROOT / "d2m_ref", tree / "d2m_ref", ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    env = dict(os.environ, CC="false", LDSHARED="false")
    build = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=tree, env=env,
                           capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-2000:]
    assert (build.stdout + build.stderr).count("the C kernels were not built") == 1
    assert not list((tree / "d2m_ref").glob("_d2m_kernels*"))
    probe = ("import sys, warnings\n"
             # an editable install of the real tree answers imports of d2m_ref before sys.path does
             "sys.meta_path = [f for f in sys.meta_path if '__editable__' not in getattr(f, '__module__', '')]\n"
             "import d2m_ref\n"
             f"assert d2m_ref.__file__.startswith({str(tree)!r}), d2m_ref.__file__\n"
             "warnings.simplefilter('always')\n"
             "from d2m_ref.kernel_choice import kernels_for\nfrom d2m_ref.kernels import NumpyKernels\n"
             "with warnings.catch_warnings(record=True) as caught:\n"
             "    ks = [kernels_for('c'), kernels_for('c')]\n"
             "assert all(type(k) is NumpyKernels for k in ks), ks\n"
             "print(len([w for w in caught if 'not built' in str(w.message)]))\n")
    run = subprocess.run([sys.executable, "-c", probe], cwd=tree, capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, PYTHONPATH=str(tree)))
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip() == "1"
