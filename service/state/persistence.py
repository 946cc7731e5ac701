"""The state dir: restore at start, journal every change, compact into snapshots, close.

    snapshot.ncs          every layer's full state, the recent request_ids, and the
                          generation of the journal that follows it (``snapshot.py``)
    journal-<gen>.log     the changes since then, one record each (``journal.py``)
    lock                  held by the one server process that uses the folder

A record holds the layer's resulting state, not the request's input: a train step records
the layer's buffers (running_mean, running_var, num_batches_tracked: tiny), a reset or an
uploaded state the full state, a created layer its kind, config and full state. So
restoring is exact and cheap: the snapshot, then for each layer the last journal state
wins. The state dir's statistics win over the catalog's checkpoints; the catalog still
decides each catalog layer's configuration and what a reset returns it to.

Start-up restores, writes a fresh snapshot and opens a new journal generation, so the
server never appends after a torn record. If the state dir cannot be written then (a full
disk, a read-only mount), the server starts read-only: it serves what it restored, refuses
changes with a message saying why, and retries in the background until the snapshot can
be written, then takes changes again without a restart.

Every ``snapshot_every`` records a background compaction rotates the journal, snapshots
the state as of the rotation and deletes the journals the snapshot covers. A graceful stop
syncs the journal and writes a last snapshot.
"""

from __future__ import annotations

import fcntl
import logging
import os
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.catalog import LayerSpec
from .changes import Change, Waiter
from .idempotency import Applied, KeyWindow
from .journal import (
    Journal,
    JournalFailedError,
    fsync_folder,
    journal_generations,
    journal_path,
    replay,
)
from .layer_records import load_saved_state, origin_spec, pick, snapshot_layers, spec_meta
from .records import StateFileError, decode_record, encode_record, frame
from .snapshot import read_snapshot, remove_temp_files, snapshot_path, write_snapshot

log = logging.getLogger("normcore.service")

_FORMAT = 1
READ_ONLY_RETRY_S = 2.0  # how often a read-only start tries the state dir again
Tensors = dict[str, torch.Tensor]


@dataclass
class _Layer:
    """One layer as the state dir knows it."""

    spec: LayerSpec  # for a layer created through the admin API, spec.state is its origin
    uploaded: bool
    layer: nn.Module | None = None  # the latest recorded layer (never modified once served)
    state: Tensors = field(default_factory=dict)  # while restoring: the recorded tensors


class Persistence:
    """Keeps a store's state in ``folder``: the store's ``ChangeLog``
    (``Store(log=Persistence(folder))``)."""

    shared = False  # one process: the store orders changes

    def __init__(self, folder: Path, *, snapshot_every: int = 10_000,
                 fsync: Callable[[int], None] = os.fdatasync) -> None:
        self.folder = Path(folder)
        self.snapshot_every = snapshot_every
        self.journal: Journal | None = None
        self._fsync = fsync
        self._lock = threading.Lock()  # orders appends with the view below
        self._compacting = threading.Lock()
        self._layers: dict[str, _Layer] = {}  # what the journal has recorded, by name
        self._deleted: set[str] = set()  # catalog layers deleted through the admin API
        self._catalog: set[str] = set()
        self._keys: KeyWindow | None = None  # the store's, given to restore
        self._since_snapshot = 0
        self._lock_fd: int | None = None
        self._first = 0  # the generation the restored snapshot was followed by
        self._read_only: str | None = None  # why the state dir cannot be written now
        self._closed = threading.Event()

    @property
    def status(self) -> str:
        """"durable"; "starting" until restored; else why changes are refused."""
        if self._read_only is not None:
            return f"read-only: {self._read_only}"
        if self.journal is None:
            return "starting"
        failed = self.journal.failed
        return "durable" if failed is None else f"failed: {failed}"

    # --- start ----------------------------------------------------------------------------

    def restore(self, specs: Iterable[LayerSpec],
                keys: KeyWindow) -> list[tuple[LayerSpec, nn.Module]]:
        """``specs`` with the state dir's state over them, and the layers created since;
        saved request_ids go into ``keys``. Changes are journaled from then on."""
        self._keys = keys
        self.folder.mkdir(parents=True, exist_ok=True)
        self._lock_fd = _lock_folder(self.folder)
        try:
            first, records = self._read(list(specs))
            self._first = first
            try:
                self._open_journal()
            except OSError as exc:
                self._start_read_only(exc)
        except BaseException:
            os.close(self._lock_fd)
            self._lock_fd = None
            raise
        log.info("restored %d layers from %s (%s, %d journal records)", len(self._layers),
                 self.folder, "snapshot" if first else "no snapshot", records)
        return [(entry.spec, entry.layer) for entry in self._layers.values()]

    def follow(self, apply: object) -> None:
        """Nothing to follow: no other process writes to the state dir."""

    def _open_journal(self) -> None:
        """Snapshot what was restored and start a new journal generation after it."""
        generation = max([self._first, *journal_generations(self.folder)]) + 1
        self._write(generation, *self._capture(generation))
        self.journal = Journal(self.folder, generation, fsync=self._fsync)

    def _start_read_only(self, exc: OSError) -> None:
        self._read_only = f"the state dir cannot be written ({exc.strerror or exc})"
        log.error("%s: serving read-only; changes are refused until it can be written, "
                  "retried every %g s", self._read_only, READ_ONLY_RETRY_S)
        threading.Thread(target=self._retry_writable, name="normcore-read-only",
                         daemon=True).start()

    def _retry_writable(self) -> None:
        while not self._closed.wait(READ_ONLY_RETRY_S):
            with self._compacting, self._lock:
                if self._closed.is_set():
                    return
                try:
                    remove_temp_files(self.folder)
                    self._open_journal()
                except OSError as exc:
                    self._read_only = f"the state dir cannot be written ({exc.strerror or exc})"
                    continue
                self._read_only = None
            log.warning("the state dir %s can be written again: changes are taken", self.folder)
            return

    def _read(self, specs: list[LayerSpec]) -> tuple[int, int]:
        """Build every layer from the snapshot and the journals; (first generation to
        replay, journal records replayed)."""
        remove_temp_files(self.folder)
        self._catalog = {spec.name for spec in specs}
        self._layers = {spec.name: _Layer(spec, False) for spec in specs}
        first = 0
        payload = read_snapshot(self.folder)
        if payload is not None:
            first = self._load_snapshot(payload)
        records = 0
        for generation, payload in replay(self.folder, first):
            self._apply(*decode_record(payload, str(journal_path(self.folder, generation))))
            records += 1
        for name, entry in self._layers.items():
            entry.layer = self._build(name, entry)
            entry.state = {}
        return first, records

    def _load_snapshot(self, payload: bytes) -> int:
        source = str(snapshot_path(self.folder))
        meta, tensors = decode_record(payload, source)
        if meta.get("format") != _FORMAT:
            raise StateFileError(f"{source}: unknown snapshot format {meta.get('format')!r}")
        try:
            for name in meta["deleted"]:
                self._layers.pop(name, None)
                self._deleted.add(name)
            for layer in meta["layers"]:
                name = layer["name"]
                state = pick(tensors, f"{name}/state/")
                if layer["uploaded"]:
                    spec = origin_spec(name, layer, pick(tensors, f"{name}/origin/"))
                    self._layers[name] = _Layer(spec, True, state=state)
                elif name in self._layers:
                    self._layers[name].state = state
                else:
                    log.warning("%s: layer %r is no longer in the catalog; its saved state "
                                "is dropped", source, name)
            for key, layer, digest, count in meta["keys"]:
                self._keys.add(key, Applied(layer, digest, count, recorded=True))
            return int(meta["journal"])
        except (KeyError, TypeError, ValueError) as exc:
            raise StateFileError(f"{source}: malformed snapshot ({exc!r})") from None

    def _apply(self, meta: dict[str, Any], tensors: Tensors) -> None:
        """Fold one journal record into the state being restored."""
        op, name = meta.get("op"), meta.get("layer")
        if op == "put":
            self._layers[name] = _Layer(origin_spec(name, meta, tensors), True,
                                        state=dict(tensors))
            self._deleted.discard(name)
        elif op == "delete":
            self._layers.pop(name, None)
            self._deleted.add(name)
        elif op in ("train", "reset", "load_state"):
            if meta.get("key") is not None:
                key, digest, count = meta["key"]
                self._keys.add(key, Applied(name, digest, count, recorded=True))
            entry = self._layers.get(name)
            if entry is None:
                return  # a layer since removed from the catalog
            entry.state = {**entry.state, **tensors} if op == "train" else dict(tensors)
        else:
            raise StateFileError(f"{self.folder}: journal record with unknown op {op!r}")

    def _build(self, name: str, entry: _Layer) -> nn.Module:
        layer = entry.spec.build(torch.device("cpu"))
        if entry.state:
            load_saved_state(layer, entry.state, name, self.folder, f"layer {name!r}")
        return layer

    # --- changes --------------------------------------------------------------------------

    def record(self, change: Change) -> Waiter | None:
        """Journal ``change``; return what waits until it is on disk."""
        journal = self.journal
        if journal is None:
            if self._read_only is not None:
                raise JournalFailedError(f"state changes are refused: {self._read_only}; "
                                         "they are taken again once it can be written")
            raise JournalFailedError("state changes are refused: the state dir is not "
                                     "restored yet")
        journal.check()
        record = _describe(change)
        if record is None:
            return None  # nothing durable changed (a train step of a layer without buffers)
        data = frame(encode_record(*record))
        with self._lock:
            seq = journal.append(data)
            self._track(change)
            self._since_snapshot += 1
            due = self._since_snapshot >= self.snapshot_every
            if due:
                self._since_snapshot = 0
        if due:
            threading.Thread(target=self._compact_quietly, name="normcore-snapshot",
                             daemon=True).start()
        return journal.waiter(seq)

    def _track(self, change: Change) -> None:
        name = change.name
        if change.key is not None and change.applied is not None:
            self._keys.mark_recorded(change.key, change.applied.num_batches_tracked)
        if change.op == "put":
            origin = {k: v.detach().clone() for k, v in change.layer.state_dict().items()}
            spec = origin_spec(name, spec_meta(change.spec), origin)
            self._layers[name] = _Layer(spec, True, change.layer)
            self._deleted.discard(name)
        elif change.op == "delete":
            self._layers.pop(name, None)
            self._deleted.add(name)
        elif name in self._layers:
            self._layers[name].layer = change.layer

    # --- snapshots ------------------------------------------------------------------------

    def compact(self) -> None:
        """Start a new journal, snapshot the state as of that moment, drop older journals."""
        with self._compacting:
            with self._lock:
                generation = self.journal.generation + 1
                self.journal.rotate(generation)
                captured = self._capture(generation)
            self._write(generation, *captured)

    def _compact_quietly(self) -> None:
        try:
            self.compact()
        except (OSError, JournalFailedError, StateFileError) as exc:
            # The journals stay until a snapshot covers them, so nothing is lost.
            log.error("snapshot failed (the journal still holds every acknowledged change): "
                      "%s", exc)

    def _capture(self, generation: int) -> tuple[dict[str, Any], Tensors]:
        """The snapshot's metadata and tensors; recorded layers are immutable, so the
        tensors can be encoded after the lock is released."""
        layers, tensors = snapshot_layers((name, e.spec, e.layer, e.uploaded)
                                          for name, e in self._layers.items())
        keys = [[k, e.layer, e.digest, e.num_batches_tracked] for k, e in self._keys.recorded()]
        meta = {"format": _FORMAT, "journal": generation, "layers": layers, "keys": keys,
                "deleted": sorted(self._deleted & self._catalog)}
        return meta, tensors

    def _write(self, generation: int, meta: dict[str, Any], tensors: Tensors) -> None:
        write_snapshot(self.folder, encode_record(meta, tensors))
        for old in journal_generations(self.folder):
            if old < generation:
                journal_path(self.folder, old).unlink(missing_ok=True)
        fsync_folder(self.folder)

    def close(self) -> None:
        """Sync the journal and write a last snapshot; later changes are refused."""
        self._closed.set()
        with self._compacting, self._lock:
            if self._lock_fd is None:
                return  # never restored, or closed already
            if self.journal is None:  # read-only: nothing was changed, nothing to save
                os.close(self._lock_fd)
                self._lock_fd = None
                return
            failed = self.journal.failed
            if not self.journal.close() and failed is None:
                failed = self.journal.failed  # its last records were refused: not saved
            if failed is None:
                generation = self.journal.generation + 1
                self._write(generation, *self._capture(generation))
                log.info("state saved to %s", self.folder)
            else:
                log.error("no final snapshot: %s; the next start recovers from the journal",
                          failed)
            os.close(self._lock_fd)  # lets the next server in
            self._lock_fd = None


def _lock_folder(folder: Path) -> int:
    """Hold ``folder/lock`` for the life of the process: two servers appending to one
    journal would corrupt it. The kernel drops the lock when the process dies, even by
    SIGKILL, so a crash never leaves it stale."""
    try:
        fd = os.open(folder / "lock", os.O_RDWR | os.O_CREAT, 0o644)
        lock = fcntl.lockf
    except OSError as exc:
        # A read-only mount, or a full disk without the file yet: the server will start
        # read-only, so a lock on the folder itself serves (it needs no write access).
        log.warning("%s: cannot open its lock file (%s); locking the folder instead", folder,
                    exc.strerror or exc)
        fd, lock = os.open(folder, os.O_RDONLY), fcntl.flock
    try:
        lock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise StateFileError(f"{folder}: in use by another server process") from None
    return fd


def _buffers(layer: nn.Module) -> dict[str, torch.Tensor]:
    """``dict(layer.named_buffers())``, read straight from a layer without submodules (a
    record per train step: the generic walk costs more than encoding the tensors)."""
    if layer._modules:
        return dict(layer.named_buffers())
    return {name: t for name, t in layer._buffers.items() if t is not None}


def _describe(change: Change) -> tuple[dict[str, Any], Tensors] | None:
    """The journal record for ``change``: (metadata, tensors), or None if nothing to keep."""
    meta: dict[str, Any] = {"op": change.op, "layer": change.name}
    if change.op == "delete":
        return meta, {}
    if change.op == "train":
        tensors = _buffers(change.layer)  # running statistics and their count
        if change.key is not None and change.applied is not None:
            meta["key"] = [change.key, change.applied.digest,
                           change.applied.num_batches_tracked]
        return (meta, tensors) if tensors or "key" in meta else None
    if change.op == "put":
        meta |= spec_meta(change.spec)
    return meta, change.layer.state_dict()

