"""Small file helpers shared by the daemons."""

from __future__ import annotations

import os
from pathlib import Path


def atomic_write_bytes(path: Path, data: bytes, mode: int = 0o644, owner: tuple[int, int] | None = None) -> None:
    """Write via a temporary file and rename, so a crash never leaves half a file behind.
    ``owner`` (uid, gid) is set on the new file before it replaces the old one, so a reader
    never finds it with the wrong owner."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        if owner is not None:  # keeping another file's owner and mode: exactly, whatever the umask
            os.fchown(fd, *owner)
            os.fchmod(fd, mode)
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
