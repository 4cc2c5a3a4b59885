"""On-disk spool for audit batches while the database is unreachable.

How this works: one file per batch, named by a sequence number that only grows
(``0000000000000042.batch``), so a directory listing sorted by name is the order the
batches were formed in.  A file is written under a temporary name, fsynced, renamed into
place and the directory fsynced, so a crash leaves either the whole batch or nothing
(stray ``*.tmp`` files are deleted on open).  The writer replays files in order and
deletes one only after its batch committed; the batch id inside the file makes a replay
of an already committed batch a no-op (see ``audit_batches``), so a crash between the
commit and the delete writes nothing twice.

One process owns a spool directory at a time (``flock`` on ``.lock``).  A second process
on the same directory (``--workers N``) takes the first free ``w1``, ``w2``, ...
subdirectory instead, so each worker replays its own leftovers when it starts again.
A file that cannot be decoded, or that the database keeps refusing for a reason other
than being unreachable, is moved to ``rejected/`` for a person to look at: never lost,
never blocking the batches behind it.

    file state   event                      next
    (none)       write(): tmp, fsync, rename  pending
    pending      batch committed (or known)   deleted
    pending      undecodable / refused        rejected/
"""
from __future__ import annotations

import bisect
import fcntl
import os
import threading
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import orjson

from gwcore.ports import AuditRecord

SUFFIX = ".batch"
FORMAT_VERSION = 1
AUDIT_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(AuditRecord))
# Enough for any --workers count anyone runs on one machine.
MAX_WORKER_DIRS = 256


@dataclass(slots=True)
class Batch:
    """Records written (or spooled) together, all or none; ``id`` makes it exactly once."""
    id: str           # uuid4 hex, recorded in audit_batches in the same transaction
    seq: int          # position in the spool's order
    records: list[AuditRecord]


def encode_batch(batch: Batch) -> bytes:
    rows = [[getattr(r, f) for f in AUDIT_FIELDS] for r in batch.records]
    return orjson.dumps({"v": FORMAT_VERSION, "id": batch.id, "seq": batch.seq,
                         "fields": AUDIT_FIELDS, "rows": rows})


def decode_batch(data: bytes) -> Batch:
    doc = orjson.loads(data)
    if doc.get("v") != FORMAT_VERSION:
        raise ValueError(f"unknown spool format version {doc.get('v')!r}")
    names = doc["fields"]
    # Fields are named in the file, so a record type that gained a field (with a
    # default) still reads files written before.
    known = set(AUDIT_FIELDS)
    records = []
    for row in doc["rows"]:
        kw: dict[str, Any] = {n: v for n, v in zip(names, row, strict=True) if n in known}
        records.append(AuditRecord(**kw))
    return Batch(id=doc["id"], seq=int(doc["seq"]), records=records)


class SpoolLocked(Exception):
    pass


class Spool:
    """A directory of pending batches.  Sync, thread-safe; callers use worker threads."""

    def __init__(self, directory: str | Path) -> None:
        root = Path(directory)
        root.mkdir(parents=True, exist_ok=True)
        self.dir, self._lock_fd = self._claim(root)
        self.rejected_dir = self.dir / "rejected"
        self._mutex = threading.Lock()
        for stale in self.dir.glob(f"*{SUFFIX}.tmp"):
            stale.unlink(missing_ok=True)
        self._seqs: list[int] = sorted(int(p.name[:-len(SUFFIX)])
                                       for p in self.dir.glob(f"*{SUFFIX}")
                                       if p.name[:-len(SUFFIX)].isdigit())
        self._next = (self._seqs[-1] + 1) if self._seqs else 1
        self.rejected = 0

    @staticmethod
    def _claim(root: Path) -> tuple[Path, int]:
        for i in range(MAX_WORKER_DIRS + 1):
            d = root if i == 0 else root / f"w{i}"
            d.mkdir(exist_ok=True)
            fd = os.open(d / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            return d, fd
        raise SpoolLocked(f"every spool directory under {root} is in use")

    def close(self) -> None:
        if self._lock_fd >= 0:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = -1

    def next_seq(self) -> int:
        with self._mutex:
            seq = self._next
            self._next += 1
            return seq

    def pending(self) -> list[int]:
        with self._mutex:
            return list(self._seqs)

    def count(self) -> int:
        return len(self._seqs)

    def path(self, seq: int) -> Path:
        return self.dir / f"{seq:016d}{SUFFIX}"

    def write(self, batch: Batch) -> None:
        final = self.path(batch.seq)
        tmp = final.with_name(final.name + ".tmp")
        data = encode_batch(batch)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, final)
        self._fsync_dir()
        with self._mutex:
            bisect.insort(self._seqs, batch.seq)

    def read(self, seq: int) -> Batch:
        return decode_batch(self.path(seq).read_bytes())

    def remove(self, seq: int) -> None:
        self.path(seq).unlink(missing_ok=True)
        self._forget(seq)

    def reject(self, seq: int) -> Path:
        self.rejected_dir.mkdir(exist_ok=True)
        target = self.rejected_dir / self.path(seq).name
        os.replace(self.path(seq), target)
        self._forget(seq)
        self.rejected += 1
        return target

    def _forget(self, seq: int) -> None:
        with self._mutex:
            i = bisect.bisect_left(self._seqs, seq)
            if i < len(self._seqs) and self._seqs[i] == seq:
                del self._seqs[i]

    def _fsync_dir(self) -> None:
        fd = os.open(self.dir, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
