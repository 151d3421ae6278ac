"""Writing output files: the one overwrite rule, atomic replacement, and paths fit to print.

Every tool that writes a file the user named goes through here (safetensors_io streams its
tensors through `atomic_write`), so the refusal reads the same everywhere and a failed or
interrupted write leaves the old file or nothing, never half a file.
"""

from __future__ import annotations

import json
import os
import secrets
import stat
from pathlib import Path
from typing import BinaryIO, Callable

from .errors import D2MError, InputError, OutputExistsError


def refuse_existing(path: str | os.PathLike, force: bool) -> None:
    """OutputExistsError if `path` exists (a dangling symlink counts) and not `force`."""
    if not force and os.path.lexists(path):
        raise OutputExistsError(f"{path}: file exists; pass --force to overwrite it")


FILE_KINDS = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
              (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a directory"))


def require_regular(path: str | os.PathLike, what: str, error: type[D2MError] = InputError) -> None:
    """`error` naming `what` if `path` exists but is a FIFO, device, socket or directory: reading a
    FIFO waits for a writer forever and /dev/zero never ends, so every reader asks first.  A missing
    path, or a name the OS refuses, is left to the reader, which says so."""
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError):
        return
    if not stat.S_ISREG(mode):
        kind = next((name for test, name in FILE_KINDS if test(mode)), "not a regular file")
        raise error(f"{what} {path}: not a regular file ({kind})")


def refuse_input(path: str | os.PathLike, option: str, inputs) -> None:
    """InputError if the output `path` is (the same file as) one of the command's inputs, given as
    (what, path or None) pairs: --force allows overwriting an old output, never a file being read."""
    for what, source in inputs:
        if source is not None and same_file(path, source):
            raise InputError(f"{option} {path} is the same file as {what} ({source}): an output never "
                             "replaces an input of the same command, even with --force")


def check_output(path: str | os.PathLike | None, force: bool, option: str, inputs=()) -> None:
    """An output file named by `option`, checked before a long job rather than at its end:
    InputError if it is one of the command's `inputs` ((what, path) pairs, refuse_input), a folder,
    or in a folder that does not exist; OutputExistsError if it exists and not `force`.  None:
    nothing to check."""
    if path is None:
        return
    path = Path(path)
    refuse_input(path, option, inputs)
    if path.is_dir():
        raise InputError(f"{option} {path}: is a directory")
    if not path.parent.is_dir():
        raise InputError(f"{option} {path}: folder {path.parent} does not exist")
    refuse_existing(path, force)


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None], *, force: bool,
                 error: type[D2MError] = InputError) -> None:
    """Call write(f) on a temporary file beside `path`, fsync it, then os.replace it onto `path`.

    Refuses an existing `path` unless `force` (checked before and again just before the rename).
    The temporary is removed on any failure, including one raised inside `write`, so an
    interrupted write leaves the old file or nothing, never half a file.  OSErrors of the file
    operations become `error` naming `path`; exceptions from `write` pass through unchanged."""
    path = Path(path)
    if os.path.isdir(path):  # os.path.isdir never raises (Path.is_dir does, on a name too long)
        raise error(f"{path}: is a directory")
    if len(os.fsencode(path.name)) > 255:
        raise error(f"{printable(path)}: the file name is {len(os.fsencode(path.name))} bytes, longer than a file "
                    "system allows (255)")
    refuse_existing(path, force)
    # the temporary's name is cut so that a name near the 255-byte limit still has room beside it
    tmp = path.with_name(f".{os.fsdecode(os.fsencode(path.name)[:200])}.{secrets.token_hex(4)}.tmp")
    try:
        # O_EXCL: never write into someone else's file; 0o666 & ~umask, like a plain open().
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except OSError as exc:
        raise error(f"{path}: cannot create {tmp.name} beside it ({exc.strerror or exc})") from None
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            try:
                f.flush()
                os.fsync(f.fileno())  # on disk before the rename makes it visible
            except OSError as exc:
                raise error(f"{path}: cannot write ({exc.strerror or exc})") from None
        refuse_existing(path, force)  # it may have appeared while we wrote
        try:
            os.replace(tmp, path)
        except OSError as exc:
            raise error(f"{path}: cannot rename {tmp.name} to it ({exc.strerror or exc})") from None
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, force: bool) -> None:
    """`data` to `path`, atomically (atomic_write)."""

    def write(f: BinaryIO) -> None:
        try:
            f.write(data)
        except OSError as exc:
            raise InputError(f"{path}: cannot write ({exc.strerror or exc})") from None

    atomic_write(path, write, force=force)


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


def read_json(path: str | os.PathLike, option: str, error: type[D2MError] = InputError):
    """The JSON value in a file the user named with `option`, or `error` saying why it cannot be read
    (missing, not a regular file, unreadable, not UTF-8, not JSON, absurdly nested)."""
    require_regular(path, option, error)
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise error(f"{option} {path}: file not found") from None
    except (OSError, ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError: ValueErrors
        raise error(f"{option} {path}: not a readable JSON file ({type(exc).__name__}: {exc})") from None
