"""A dictionary's version ledger, ``<registry>/<name>/versions.json``, and the lock publishers take to write it.

The ledger records every version number ever given and the sha256 of that version's ``manifest.json``. It is
what makes two promises of the dictionary format (README.md, "The dictionary format (v1)") hold: a version number is never reused (the ledger remembers numbers whose
directories were deleted), and the manifest is covered by a digest checked on every read (recorded outside the
version directory, so editing ``manifest.json`` — or copying ``v1`` to ``v3`` — is caught, not trusted).

Publishers serialise on ``flock(2)`` of ``<name>/.lock``. Each also holds a lock on its own temporary directory
while writing it, so the next publisher can remove temporary directories left by killed ones and never one that
is still being written.
"""

from __future__ import annotations

import datetime as _dt
import fcntl
import hashlib
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from pydantic import BaseModel, ValidationError

from monosemantic.errors import ArtifactError

LEDGER_FILE = "versions.json"
LOCK_FILE = ".lock"
TEMPORARY_PREFIX = ".tmp-"
LEDGER_FORMAT = 1


class LedgerEntry(BaseModel):
    manifest_sha256: str
    recorded: str  # when the number was given (UTC, ISO 8601)


class Ledger(BaseModel):
    format_version: int = LEDGER_FORMAT
    name: str
    last: int = 0  # the highest number ever given; survives the deletion of its directory
    versions: dict[int, LedgerEntry] = {}

    def next_number(self, existing: list[int]) -> int:
        return max([self.last, *existing]) + 1


def digest_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_ledger(directory: Path, name: str) -> Ledger | None:
    """The ledger of the dictionary whose directory is ``directory``; None when it has none."""
    path = Path(directory) / LEDGER_FILE
    if not path.exists():
        return None
    try:
        ledger = Ledger.model_validate(json.loads(path.read_bytes()))
    except (json.JSONDecodeError, UnicodeDecodeError, ValidationError):
        raise ArtifactError(f"dictionary {name!r}: {LEDGER_FILE} is not a valid version ledger (corrupted or edited)") from None
    if ledger.format_version != LEDGER_FORMAT or ledger.name != name:
        raise ArtifactError(f"dictionary {name!r}: {LEDGER_FILE} belongs to {ledger.name!r} (format {ledger.format_version})")
    return ledger


def write_ledger(directory: Path, ledger: Ledger) -> None:
    """Replace the ledger atomically and durably."""
    write_durably(Path(directory) / LEDGER_FILE, ledger.model_dump_json(indent=2))


def write_durably(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` so that a reader sees the old file or the new one, never half, and the new one
    survives a power cut: written beside, fsynced, renamed, the directory fsynced. On a failed write (a full disk)
    the temporary file is removed and the OSError raised; the previous file stays."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def publishing_lock(directory: Path) -> Iterator[None]:
    """Exclusive among publishers of one dictionary (blocking; the kernel drops it if the holder dies)."""
    fd = os.open(Path(directory) / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


@contextmanager
def held_directory(path: Path) -> Iterator[Path]:
    """Create ``path`` and hold a lock on it while the caller writes into it.

    Between ``mkdir`` and ``flock`` the new directory is unlocked, so another publisher's ``remove_abandoned`` may
    take it for a dead writer's and remove it (it holds the lock while it removes, so ours waits for that to
    finish). Once the lock is ours, a directory with no links left was removed underneath: make it again."""
    while True:
        path.mkdir()
        fd = os.open(path, os.O_RDONLY)
        fcntl.flock(fd, fcntl.LOCK_EX)
        if os.fstat(fd).st_nlink > 0:
            break
        os.close(fd)
    try:
        yield path
    finally:
        os.close(fd)


def remove_abandoned(directory: Path) -> list[str]:
    """Remove temporary directories whose writer has died (their lock is free); returns their names."""
    removed = []
    for path in Path(directory).iterdir():
        if not path.name.startswith(TEMPORARY_PREFIX) or not path.is_dir():
            continue
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            continue  # still being written
        try:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path.name)
        finally:
            os.close(fd)
    return removed
