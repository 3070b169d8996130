"""Files replaced whole, so that a reader, or a process restarted after a kill, finds the old
content or the new one, never a part: the daemon's checkpoint and its outbox file, the tiled
mirror's position."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

__all__ = ["replace_file"]


def replace_file(path: Path, data: bytes, *, fsync: bool) -> None:
    """Write ``data`` to ``path`` through a temporary file beside it and a rename (atomic on
    POSIX). ``fsync`` makes the new content durable before the rename, so a power cut does not
    leave the name pointing at an empty file. A write that fails leaves ``path`` as it was and
    removes the temporary file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        # a failed write (a full disk) leaves no part-written temporary file to take the space
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
