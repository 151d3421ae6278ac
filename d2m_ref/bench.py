"""`python -m d2m_ref.bench KIND ...`: benchmarks, reported as ratios against a reference measured in
the same run (memory bandwidth, NumPy, a peer).  Never used by tests to assert a time.

Kinds: `gemv` and `decode` (kernels, d2m_ref/bench_kernels.py), `memory` (streaming forward at
deployment sizes, d2m_ref/bench_memory.py).
"""

from __future__ import annotations

import importlib
import sys

KINDS = {"gemv": "d2m_ref.bench_kernels", "decode": "d2m_ref.bench_kernels", "memory": "d2m_ref.bench_memory"}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in KINDS:
        print(f"usage: python -m d2m_ref.bench {{{','.join(KINDS)}}} [options]  (--help after the kind)",
              file=sys.stderr)
        return 2
    module = importlib.import_module(KINDS[argv[0]])
    return module.main(argv)


if __name__ == "__main__":
    sys.exit(main())
