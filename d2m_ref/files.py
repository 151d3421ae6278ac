"""Writing output files: the one overwrite rule, atomic replacement, and paths fit to print.

Every tool that writes a file the user named goes through here (safetensors_io keeps its own
streaming temp+rename writer but refuses through `refuse_existing`), so the refusal reads the
same everywhere and a failed or interrupted write leaves the old file or nothing, never half a file.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from .errors import InputError, OutputExistsError


def refuse_existing(path: str | os.PathLike, force: bool) -> None:
    """OutputExistsError if `path` exists (a dangling symlink counts) and not `force`."""
    if not force and os.path.lexists(path):
        raise OutputExistsError(f"{path}: file exists; pass --force to overwrite it")


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, force: bool) -> None:
    """Write `data` to `path` through a temporary file beside it (fsync, then os.replace).

    Refuses an existing `path` unless `force` (checked before and again just before the rename);
    an OSError is an InputError naming `path`; the temporary is removed on any failure."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{path}: is a directory")
    refuse_existing(path, force)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # O_EXCL: never someone else's file
    except OSError as exc:
        raise InputError(f"{path}: cannot write ({exc.strerror or exc})") from None
    try:
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())  # on disk before the rename makes it visible
            refuse_existing(path, force)  # it may have appeared while we wrote
            os.replace(tmp, path)
        except OSError as exc:
            raise InputError(f"{path}: cannot write ({exc.strerror or exc})") from None
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """True if both exist and are one file (same path, a symlink to it, or a hard link)."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def printable(text: str | os.PathLike) -> str:
    """A path or argv string -> text any UTF-8 stream or JSON can hold: bytes that were not valid
    UTF-8 (surrogate escapes, as Python decodes argv and file names) become backslash escapes \\xNN."""
    return os.fsencode(text).decode("utf-8", "backslashreplace")
