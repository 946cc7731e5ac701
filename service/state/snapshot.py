"""The snapshot: every layer's full state in one checksummed frame, replaced atomically.

Written to a temporary file in the state dir, fsynced, renamed over ``snapshot.ncs`` and
the folder fsynced, so after a crash the file is either the old snapshot or the new one,
never a mix. A snapshot that fails its checksum is an error that names the file: start-up
stops rather than silently serving defaults in its place.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from .journal import fsync_folder, write_all
from .records import StateFileError, frame, read_frames

SNAPSHOT = "snapshot.ncs"
_TEMP_PREFIX = ".snapshot-"


def snapshot_path(folder: Path) -> Path:
    return folder / SNAPSHOT


def write_snapshot(folder: Path, payload: bytes) -> Path:
    """Replace the snapshot in ``folder`` with ``payload``, atomically and durably."""
    path = snapshot_path(folder)
    temp = folder / f"{_TEMP_PREFIX}{os.getpid()}.tmp"
    data = frame(payload)
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        write_all(fd, data)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        temp.unlink(missing_ok=True)
        raise
    os.close(fd)
    os.replace(temp, path)
    fsync_folder(folder)
    return path


def read_snapshot(folder: Path) -> bytes | None:
    """The snapshot's payload, None if there is none; ``StateFileError`` if it is corrupt."""
    path = snapshot_path(folder)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StateFileError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    advice = ("it is never replaced by defaults: restore the file from a backup, or move the "
              "state dir away to start from the catalog")
    try:
        payloads, end = read_frames(data, str(path))
    except StateFileError as exc:
        raise StateFileError(f"corrupt snapshot: {exc}; {advice}") from None
    if len(payloads) != 1 or end != len(data):
        why = "bad checksum, or truncated" if not payloads else "data after its record"
        raise StateFileError(f"{path}: corrupt snapshot ({why}); {advice}")
    return payloads[0]


def remove_temp_files(folder: Path) -> None:
    """Drop what a crash mid-snapshot left behind (the renamed snapshot is the real one)."""
    for temp in folder.glob(f"{_TEMP_PREFIX}*.tmp"):
        with contextlib.suppress(OSError):  # a read-only folder keeps them, harmlessly
            temp.unlink(missing_ok=True)
