"""A model's weights checksum remembered against its files' identity, so that a model is hashed once, not at every
start (19 s of a 33 s start at the Gemma-2-2B shape), while a changed file is still hashed again and refused.

The identity of a model directory is, for every regular file in it, its name, size, inode, device, and mtime and
ctime in nanoseconds: git's index decides "unchanged" from the same fields. Any write to a file moves its ctime,
which no user call can set back (utime sets mtime and atime only), so a weights file rewritten in place, replaced,
copied or restored from a backup is hashed again; only an unchanged file keeps its remembered checksum. The
checksum itself stays the one monosemantic.lm.weights_checksum defines (dictionaries are bound to it), keyed also
by the dtype the model was loaded in.

File times move in steps of the kernel's coarse clock (a few ms), so two writes within one step can leave a file's
times as they were: as git does with "racily clean" entries, a directory with a file changed within the last
RACY_S seconds is hashed but not remembered.

The cache is one JSON file in MONOSEMANTIC_CACHE_DIR (default $XDG_CACHE_HOME/monosemantic, else
~/.cache/monosemantic), written atomically; a cache that cannot be read or written is ignored (the checksum is then
computed, as before).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Callable

log = logging.getLogger("monosemantic")

CACHE_FILE = "weights-checksums.json"
RACY_S = 2.0


def cache_dir() -> Path:
    if os.environ.get("MONOSEMANTIC_CACHE_DIR"):
        return Path(os.environ["MONOSEMANTIC_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "monosemantic"


def identity(directory: Path) -> list[list]:
    """Every regular file of the directory (top level, where save_pretrained writes) with the fields that change
    whenever its content can have."""
    out = []
    for entry in sorted(os.scandir(directory), key=lambda e: e.name):
        if entry.is_file(follow_symlinks=True):
            st = entry.stat(follow_symlinks=True)
            out.append([entry.name, st.st_size, st.st_ino, st.st_dev, st.st_mtime_ns, st.st_ctime_ns])
    return out


def _read(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def remembered_checksum(directory: Path, dtype: str, compute: Callable[[], str]) -> str:
    """The checksum of the model in `directory` loaded as `dtype`: remembered when every file is as it was when it
    was computed, else `compute()`d and remembered."""
    key = f"{Path(directory).resolve()}|{dtype}"
    files = identity(Path(directory))
    path = cache_dir() / CACHE_FILE
    entry = _read(path).get(key)
    if isinstance(entry, dict) and entry.get("files") == files and isinstance(entry.get("checksum"), str):
        return entry["checksum"]
    checksum = compute()
    if identity(Path(directory)) != files:  # changed while it was hashed: do not remember either state
        return checksum
    if files and time.time_ns() - max(f[5] for f in files) < RACY_S * 1e9:  # too fresh to tell a later write apart
        return checksum
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = _read(path)
        data[key] = {"files": files, "checksum": checksum}
        with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=".checksums-", delete=False) as fh:
            json.dump(data, fh)
        os.replace(fh.name, path)
    except OSError as exc:  # a read-only home or a full disk: the checksum is still right, only not remembered
        log.debug("weights checksum not remembered: %s", exc)
    return checksum
