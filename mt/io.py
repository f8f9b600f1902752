"""Atomic file writes and strict UTF-8 line reading, shared by every module that touches disk.

Whatever mt writes (checkpoints, translations, the resolved config, caches) goes to a temporary file in the
same directory first and is renamed into place, so an interrupted run never leaves a half-written file
where a good one was.
"""

from __future__ import annotations

import contextlib
import gzip
import os
import sys
import tempfile
from pathlib import Path
from typing import IO, Iterator

from mt.errors import MTError


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[IO]:
    """Open a temporary file beside `path`; on success it replaces `path`, on error it is removed."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise cannot_write(path, e) from None
    try:
        with os.fdopen(fd, mode, encoding=None if "b" in mode else encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def cannot_write(path: Path, e: OSError) -> MTError:
    """The one-line error for a place mt cannot write to: a parent that is a regular file, no permission."""
    blocker = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
    why = f"{blocker} is not a directory" if blocker else e.strerror or type(e).__name__
    return MTError(f"{path}: cannot write here ({why})")


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_open(path, "w") as f:
        f.write(text)


def open_text(path: str | Path) -> IO[bytes]:
    """Open a plain or gzip-compressed file for reading bytes; a missing file is a user error."""
    path = Path(path)
    if not path.is_file():
        raise MTError(f"{path}: file not found")
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def read_lines(path: str | Path) -> Iterator[str]:
    """Yield the lines of a UTF-8 text file (plain or .gz; '-' is stdin) without their line ending.

    Decoding is strict and per line, so invalid UTF-8 is reported with the file and line number rather than
    silently replaced.
    """
    if str(path) == "-":
        path = "<stdin>"
        stream = contextlib.nullcontext(sys.stdin.buffer)
    else:
        stream = open_text(path)
    with stream as f:
        for number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise MTError(f"{path}:{number}: invalid UTF-8 (byte {e.start} of the line)") from None
            yield line.rstrip("\r\n")
