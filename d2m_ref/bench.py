"""`python -m d2m_ref.bench KIND ...`: benchmarks, reported as ratios against a reference measured in
the same run (memory bandwidth, NumPy, a peer).  Never used by tests to assert a time.

Kinds: `gemv` and `decode` (kernels, d2m_ref/bench_kernels.py), `memory` (streaming forward at
deployment sizes, d2m_ref/bench_memory.py), `convert` (calibrating and converting at deployment size,
d2m_ref/bench_convert.py).  Each kind's module has `main(argv)`, argv starting
with the kind; it runs under the same exit-status rules as run and trace (d2m_ref.cli).
"""

from __future__ import annotations

import importlib
import sys

from . import cli
from .errors import InputError

KINDS = {"gemv": "d2m_ref.bench_kernels", "decode": "d2m_ref.bench_kernels", "memory": "d2m_ref.bench_memory",
         "convert": "d2m_ref.bench_convert"}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in KINDS:
        print(f"usage: python -m d2m_ref.bench {{{','.join(KINDS)}}} [options]  (--help after the kind)",
              file=sys.stderr)
        return cli.EXIT_BAD_INPUT
    return cli.status_of(lambda: kind_module(argv[0]).main(argv))


def kind_module(kind: str):
    """The module of a benchmark kind, or InputError if it (or a module it needs) is not there."""
    try:
        return importlib.import_module(KINDS[kind])
    except ModuleNotFoundError as exc:
        missing = "" if exc.name == KINDS[kind] else f": it needs {exc.name}, which is not installed"
        raise InputError(f"bench {kind}: not available in this build ({KINDS[kind]}{missing or ' is missing'})") from None


if __name__ == "__main__":
    sys.exit(main())
