"""`python -m d2m_ref.bench KIND ...`: benchmarks, reported as ratios against a reference measured in
the same run (memory bandwidth, NumPy, a peer).  Never used by tests to assert a time.

`--table FILE` (any kind) also writes what the run prints to FILE as a dated markdown page naming
the CPU, for docs/benchmarks/ (refused if FILE exists, unless --force).

Kinds: `gemv` and `decode` (kernels, d2m_ref/bench_kernels.py), `memory` (streaming forward at
deployment sizes, d2m_ref/bench_memory.py), `convert` (calibrating and converting at deployment size,
d2m_ref/bench_convert.py).  Each kind's module has `main(argv)`, argv starting
with the kind; it runs under the same exit-status rules as run and trace (d2m_ref.cli).
"""

from __future__ import annotations

import contextlib
import datetime
import importlib
import io
import shlex
import sys
from pathlib import Path

from . import cli
from .errors import InputError
from .files import atomic_write_bytes, check_output

KINDS = {"gemv": "d2m_ref.bench_kernels", "decode": "d2m_ref.bench_kernels", "memory": "d2m_ref.bench_memory",
         "convert": "d2m_ref.bench_convert"}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in KINDS:
        print(f"usage: python -m d2m_ref.bench {{{','.join(KINDS)}}} [options]  (--help after the kind)",
              file=sys.stderr)
        return cli.EXIT_BAD_INPUT
    argv, table = split_table_option(argv)
    if table is None:
        return cli.status_of(lambda: kind_module(argv[0]).main(argv))
    return cli.status_of(lambda: run_with_table(argv, table, "--force" in argv))


def split_table_option(argv: list[str]) -> tuple[list[str], Path | None]:
    """argv without `--table FILE` / `--table=FILE`, and FILE (None if not given)."""
    out, table, it = [], None, iter(argv)
    for a in it:
        if a == "--table":
            value = next(it, None)
            if value is None:
                raise InputError("--table needs a file name")
            table = Path(value)
        elif a.startswith("--table="):
            table = Path(a.split("=", 1)[1])
        else:
            out.append(a)
    return out, table


def run_with_table(argv: list[str], table: Path, force: bool) -> int:
    """Run the kind with its printed output also captured, then write it to `table` as markdown."""
    from .evaluate import cpu_name
    check_output(table, force, "--table")
    captured, outer = io.StringIO(), sys.stdout

    class Tee(io.TextIOBase):
        def write(self, text: str) -> int:
            outer.write(text)
            return captured.write(text)

        def flush(self) -> None:
            outer.flush()

    with contextlib.redirect_stdout(Tee()):
        status = kind_module(argv[0]).main(argv)
    if status == 0:
        page = (f"# `python -m d2m_ref.bench {shlex.join(argv)}`\n\n{cpu_name()}, "
                f"{datetime.date.today().isoformat()}\n\n```\n{captured.getvalue().rstrip()}\n```\n")
        atomic_write_bytes(table, page.encode("utf-8"), force=force)
    return status


def kind_module(kind: str):
    """The module of a benchmark kind, or InputError if it (or a module it needs) is not there."""
    try:
        return importlib.import_module(KINDS[kind])
    except ModuleNotFoundError as exc:
        missing = "" if exc.name == KINDS[kind] else f": it needs {exc.name}, which is not installed"
        raise InputError(f"bench {kind}: not available in this build ({KINDS[kind]}{missing or ' is missing'})") from None


if __name__ == "__main__":
    sys.exit(main())
