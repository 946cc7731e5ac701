"""A state dir written by one server process (snapshot + journal), adopted by its workers.

``--workers N --state-dir DIR`` shares state through SQLite in ``DIR/shared.db``. A folder
that one process served until now holds its state in a snapshot and journals instead: before
the workers start, that state (layers, running statistics, uploaded and deleted layers,
request_ids) becomes the first snapshot of a new ``shared.db``, and the one-process files
move to ``DIR/journal-adopted/`` (kept: a one-process server can be pointed at them again).

The database is built beside the folder's files and renamed into place once complete, so a
crash midway leaves the folder as it was.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

log = logging.getLogger("normcore.service")

ADOPTED = "journal-adopted"
# snapshot.SNAPSHOT and shared.sqlite.FILE, named here so that the check imports neither
# torch nor the state modules: the parent of the workers loads neither unless it adopts.
_SNAPSHOT, _SHARED = "snapshot.ncs", "shared.db"


def needs_adoption(folder: Path) -> bool:
    """Whether ``folder`` holds one process's state and no shared database yet."""
    return (folder / _SNAPSHOT).exists() and not (folder / _SHARED).exists()


def adopt_journal(folder: Path, specs: list, keys_kept: int = 10_000) -> None:
    """Move ``folder``'s one-process state (served as the catalog ``specs`` say) into a new
    ``shared.db`` (see the module)."""
    from .idempotency import KeyWindow
    from .journal import fsync_folder, journal_generations, journal_path
    from .persistence import Persistence
    from .shared.codec import Entry, encode_snapshot
    from .shared.sqlite import FILE, SQLite
    from .snapshot import snapshot_path

    keys = KeyWindow(keys_kept)
    persistence = Persistence(folder)
    try:
        restored = persistence.restore(specs, keys)
    finally:
        persistence.close()
    catalog = {id(spec) for spec in specs}  # restored catalog layers keep their spec object
    entries = {spec.name: Entry(spec, layer, id(spec) not in catalog)
               for spec, layer in restored}
    deleted = {spec.name for spec in specs} - set(entries)
    body = encode_snapshot(0, entries, deleted, keys.recorded())

    building = folder / "shared.db.adopting"
    shutil.rmtree(building, ignore_errors=True)  # what a crash here left behind
    db = SQLite(building)
    with db.connect() as conn:
        db.create_schema(conn)
        db.save_first_snapshot(conn, body)
    for leftover in building.glob(f"{FILE}-*"):  # WAL files, checkpointed on close
        leftover.unlink()
    (building / FILE).rename(folder / FILE)
    fsync_folder(folder)
    building.rmdir()

    moved = folder / ADOPTED
    moved.mkdir(exist_ok=True)
    old = [journal_path(folder, g) for g in journal_generations(folder)]
    for path in [snapshot_path(folder), *old]:
        path.rename(moved / path.name)
    fsync_folder(folder)
    log.warning("%s: the state of one server process (%d layers) is now the workers' shared "
                "state in %s; its files were moved to %s", folder, len(entries), FILE, moved)
