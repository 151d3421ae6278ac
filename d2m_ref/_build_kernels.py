"""cffi build script for the C kernels (out-of-line API mode), used by setup.py's `cffi_modules`.

    ffibuilder   the FFI: its cdef is read from c_src/d2m_kernels.h (between the cdef-begin and
                 cdef-end markers), so the binding and the header cannot drift apart
    BuildExt     setuptools' build_ext with two additions:
                 - the SIMD units are compiled one by one with their own -march flags (only the
                   units of the compiler's target: AVX2 and AVX-512 on x86-64, NEON and dotprod on aarch64),
                   and linked in as extra objects; the portable units get the common flags only;
                 - a failed compile or link is caught: the install goes on without the extension
                   and d2m_ref runs on the NumPy kernels (d2m_ref/ckernels.py says so once).

Extra flags for special builds (sanitizers, cross-compiling) come from the environment:
D2M_EXTRA_CFLAGS and D2M_EXTRA_LDFLAGS; CC / LDSHARED / CFLAGS are setuptools' own.
Nothing here is imported at run time.
"""

from __future__ import annotations

import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parent.parent
C_SRC = ROOT / "c_src"
HEADER = C_SRC / "d2m_kernels.h"
MODULE = "d2m_ref._d2m_kernels"

PORTABLE_SOURCES = ("gemv_f32.c", "gemv_f16.c", "gemv_bf16.c", "gemv_q8.c", "gemv_q4.c", "quant_act.c",
                    "gemv.c", "expert.c", "threads.c", "stream.c", "dispatch.c")
# -ffp-contract=off: no fused multiply-add unless written as one, so the scalar reference sums the
# same way on x86 and aarch64.  Never -ffast-math (it would license reordering every sum).
COMMON_FLAGS = ("-O2", "-std=c11", "-ffp-contract=off", "-fno-fast-math", "-pthread")
LINK_FLAGS = ("-pthread",)


class SimdUnit(NamedTuple):
    source: str
    flags: tuple[str, ...]
    macro: str  # defined for dispatch.c when the unit is linked in


SIMD_UNITS: dict[str, tuple[SimdUnit, ...]] = {
    "x86_64": (SimdUnit("simd_avx2.c", ("-mavx2", "-mfma", "-mf16c"), "D2M_HAVE_AVX2"),
               SimdUnit("simd_avx512.c", ("-mavx2", "-mfma", "-mf16c", "-mavx512f", "-mavx512bw",
                                          "-mavx512vl", "-mavx512vnni"), "D2M_HAVE_AVX512")),
    "aarch64": (SimdUnit("simd_neon.c", ("-march=armv8-a",), "D2M_HAVE_NEON"),
                SimdUnit("simd_dotprod.c", ("-march=armv8.2-a+dotprod+fp16",), "D2M_HAVE_DOTPROD")),
}
HEADERS = ("d2m_kernels.h", "internal.h", "simd_arm_q.h")

CDEF_BEGIN, CDEF_END = "/* cdef-begin */", "/* cdef-end */"


def cdef_text(header: Path = HEADER) -> str:
    """The declarations between the cdef markers of the public header."""
    text = header.read_text()
    start, end = text.find(CDEF_BEGIN), text.find(CDEF_END)
    if start < 0 or end < start:
        raise RuntimeError(f"{header}: no '{CDEF_BEGIN}' ... '{CDEF_END}' section")
    return text[start + len(CDEF_BEGIN):end]


def _rel(path: Path) -> str:
    """setuptools wants source paths relative to the setup.py directory (the cwd of a build)."""
    try:
        return os.path.relpath(path)
    except ValueError:  # another drive (not on Linux)
        return str(path)


def make_ffibuilder():
    from cffi import FFI

    ffi = FFI()
    ffi.cdef(cdef_text())
    ffi.set_source(MODULE, '#include "d2m_kernels.h"',
                   sources=[_rel(C_SRC / s) for s in PORTABLE_SOURCES],
                   depends=[_rel(C_SRC / h) for h in HEADERS],
                   include_dirs=[_rel(C_SRC)],
                   extra_compile_args=list(COMMON_FLAGS),
                   extra_link_args=list(LINK_FLAGS),
                   libraries=["m"])
    return ffi


def target_arch(compiler_cmd: list[str] | None) -> str:
    """The architecture the compiler builds for ("x86_64", "aarch64", ...): `cc -dumpmachine`,
    so a cross-compiler is taken at its word; the running machine when that fails."""
    if compiler_cmd:
        try:
            out = subprocess.run([compiler_cmd[0], "-dumpmachine"], capture_output=True, text=True,
                                 timeout=30, check=True).stdout.strip()
            if out:
                return out.split("-")[0]
        except (OSError, subprocess.SubprocessError):
            pass
    return platform.machine()


def simd_units(arch: str) -> tuple[SimdUnit, ...]:
    return SIMD_UNITS.get({"amd64": "x86_64", "arm64": "aarch64"}.get(arch.lower(), arch), ())


def _c_string(text: str) -> str:
    """A C string literal for a -D macro (no quotes or backslashes inside)."""
    return '"' + text.replace("\\", "/").replace('"', "'") + '"'


def build_info_macros(compiler_cmd: list[str], arch: str, units: tuple[SimdUnit, ...],
                      extra: list[str]) -> list[tuple[str, str]]:
    flags = " ".join(list(compiler_cmd[1:]) + list(COMMON_FLAGS) + extra)
    flags += "".join(f"; {u.source}: {' '.join(u.flags)}" for u in units)
    return [("D2M_BUILD_CC", _c_string(compiler_cmd[0] if compiler_cmd else "cc")),
            ("D2M_BUILD_FLAGS", _c_string(flags)),
            ("D2M_BUILD_TARGET", _c_string(arch))]


def _env_flags(name: str) -> list[str]:
    return shlex.split(os.environ.get(name, ""))


def configure_extension(ext, compiler, build_temp: str) -> None:
    """Compile the target's SIMD units (each with its own flags) into extra objects and set the
    macros dispatch.c reads.  Raises the compiler's error on failure."""
    compiler_cmd = list(getattr(compiler, "compiler_so", None) or ["cc"])
    arch = target_arch(compiler_cmd)
    units = simd_units(arch)
    extra_c, extra_ld = _env_flags("D2M_EXTRA_CFLAGS"), _env_flags("D2M_EXTRA_LDFLAGS")
    objects = []
    for unit in units:
        objects += compiler.compile([_rel(C_SRC / unit.source)], output_dir=build_temp,
                                    include_dirs=[_rel(C_SRC)],
                                    extra_postargs=list(COMMON_FLAGS) + list(unit.flags) + extra_c,
                                    depends=[_rel(C_SRC / h) for h in HEADERS])
    ext.extra_objects = list(ext.extra_objects or []) + objects
    # relink when a SIMD unit changes (build_ext only compares `sources` and `depends` with the .so)
    ext.depends = list(ext.depends or []) + [_rel(C_SRC / u.source) for u in units]
    ext.define_macros = list(ext.define_macros or []) + [(u.macro, "1") for u in units]
    ext.define_macros += build_info_macros(compiler_cmd, arch, units, extra_c)
    ext.extra_compile_args = list(ext.extra_compile_args or []) + extra_c
    ext.extra_link_args = list(ext.extra_link_args or []) + extra_ld


NOT_BUILT = ("d2m_ref: the C kernels were not built ({reason}); d2m_ref is installed and will run on "
             "its NumPy kernels.  Install a C compiler (e.g. gcc) and reinstall to get the C kernels.")


def build_ext_class():
    """setuptools' build_ext with the SIMD units and the no-compiler fallback (see module doc)."""
    from setuptools.command.build_ext import build_ext

    class BuildExt(build_ext):
        def build_extension(self, ext):
            if ext.name != MODULE:
                return super().build_extension(ext)
            try:
                configure_extension(ext, self.compiler, self.build_temp)
                super().build_extension(ext)
            except Exception as exc:  # noqa: BLE001 - CompileError, LinkError, OSError, ...: all mean "no C"
                reason = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"
                print("WARNING: " + NOT_BUILT.format(reason=reason), file=sys.stderr)
                self._d2m_not_built = True

        def _missing(self, path: str) -> bool:
            return getattr(self, "_d2m_not_built", False) and not os.path.exists(path)

        def get_outputs(self):
            return [p for p in super().get_outputs() if not self._missing(p)]

        def get_output_mapping(self):
            return {k: v for k, v in super().get_output_mapping().items() if not self._missing(k)}

        def copy_extensions_to_source(self):
            if not getattr(self, "_d2m_not_built", False):
                super().copy_extensions_to_source()

    return BuildExt


ffibuilder = make_ffibuilder()
