"""Harvest activations at a hook into memory-mapped shards: forward stopped at the hook layer, resumable."""

from __future__ import annotations

import fcntl
import hashlib
import io
import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from monosemantic.errors import ConfigError, MonosemanticError, WriteFailed, os_reason
from monosemantic.lm import HookPoint, LoadedLM, hook_dim, model_source, read_activations, resolve_hook
from trainer.activations import (
    HARVEST_MANIFEST, SHARD_DTYPES, first_non_finite_row, read_json, to_storage, write_json_atomic,
)
from trainer.progress import progress as progress_bar

LOCK_FILE = ".lock"


@contextmanager
def exclusive(directory: Path, what: str) -> Iterator[None]:
    """Hold ``directory``'s lock for a writer, refusing at once if another process holds it; then remove the
    temporary files a killed writer left (no one else can be writing them)."""
    try:
        fd = os.open(Path(directory) / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise WriteFailed(f"cannot write into {directory}: {os_reason(exc)}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise MonosemanticError(f"another {what} is writing into {directory}; wait for it or use another directory") from None
        for stale in Path(directory).glob("*.tmp"):
            stale.unlink(missing_ok=True)
        yield
    finally:
        os.close(fd)


def require_free_space(directory: Path, needed: int, what: str) -> None:
    """Refuse before any work when ``directory``'s file system cannot hold ``needed`` bytes."""
    free = shutil.disk_usage(directory).free
    if free < needed:
        raise WriteFailed(f"{what} needs about {needed / 2**30:.2f} GiB in {directory}, which has {free / 2**30:.2f} GiB free")


def harvest(
    lm: LoadedLM,
    contexts: torch.Tensor,
    hook: str,
    out_dir: Path,
    *,
    dtype: str = "float16",
    contexts_per_shard: int = 1024,
    batch_size: int = 32,
    skip_bos: bool = True,
    data_fingerprint: str | None = None,
    progress: bool = True,
    data: dict | None = None,
) -> dict:
    """Write the activations of ``contexts`` [n, ctx] at ``hook`` under ``out_dir``; returns the manifest.

    A restarted harvest of the same contexts continues after the last completed shard (each shard covers a
    fixed range of contexts and is renamed into place only when whole). The BOS position is skipped by
    default: its activations are atypical (an attention sink) and SAEBench masks it too."""
    if dtype not in SHARD_DTYPES:
        raise ConfigError(f"dtype {dtype!r} is not supported for shards; use one of {sorted(SHARD_DTYPES)}")
    if contexts.ndim != 2 or contexts.shape[0] == 0:
        raise ConfigError(f"contexts must be a non-empty [n, context_length] tensor, got {tuple(contexts.shape)}")
    hook_point = resolve_hook(lm.model, hook)
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise WriteFailed(f"cannot create the harvest directory {out_dir}: {os_reason(exc)}") from None
    with exclusive(out_dir, "harvest"):
        return _harvest(lm, contexts, hook_point, out_dir, dtype=dtype, contexts_per_shard=contexts_per_shard,
                        batch_size=batch_size, skip_bos=skip_bos, data_fingerprint=data_fingerprint, progress=progress,
                        data=data or {})


def _harvest(lm: LoadedLM, contexts: torch.Tensor, hook_point: HookPoint, out_dir: Path, *, dtype: str, contexts_per_shard: int,
             batch_size: int, skip_bos: bool, data_fingerprint: str | None, progress: bool, data: dict) -> dict:
    identity = {
        "hook": hook_point.name, "module_path": hook_point.module_path, "model_checksum": lm.checksum,
        "dtype": dtype, "contexts": int(contexts.shape[0]), "context_length": int(contexts.shape[1]),
        "contexts_per_shard": contexts_per_shard, "skip_bos": skip_bos, "data_fingerprint": data_fingerprint,
        "contexts_checksum": _checksum(contexts),
    }
    manifest_path = out_dir / HARVEST_MANIFEST
    if manifest_path.exists():
        manifest = read_json(manifest_path, "harvest")
        if {k: manifest.get(k) for k in identity} != identity:
            raise MonosemanticError(f"{out_dir} holds a harvest of different data, model or hook; use an empty directory")
        if any("sha256" not in shard for shard in manifest.get("shards", [])):
            raise MonosemanticError(f"{out_dir} holds a harvest by an earlier release (shards without checksums); use an empty directory")
    else:
        manifest = {**identity, "model_source": model_source(lm.source), "data": data, "shards": [], "contexts_done": 0, "tokens": 0,
                    "complete": False}
        write_json_atomic(manifest_path, manifest)

    n = contexts.shape[0]
    positions = contexts.shape[1] - (1 if skip_bos else 0)
    remaining = (n - manifest["contexts_done"]) * positions * hook_dim(lm.model, hook_point) * np.dtype(SHARD_DTYPES[dtype]).itemsize
    require_free_space(out_dir, int(remaining * 1.01) + (1 << 20), "the harvest")
    started = time.perf_counter()
    tokens_before = manifest["tokens"]
    bar = progress_bar(total=n, initial=manifest["contexts_done"], unit="ctx", desc="harvest", enabled=progress)
    try:
        while manifest["contexts_done"] < n:
            lo = manifest["contexts_done"]
            hi = min(n, lo + contexts_per_shard)
            rows = []
            for b in range(lo, hi, batch_size):
                ids = contexts[b : min(hi, b + batch_size)]
                acts = read_activations(lm.model, ids, hook_point, stop_at_hook=True)
                if skip_bos:
                    acts = acts[:, 1:]
                rows.append(to_storage(acts.reshape(-1, acts.shape[-1]), dtype))
                bar.update(ids.shape[0])
            shard = np.concatenate(rows)
            if (bad := first_non_finite_row(shard, dtype)) is not None:
                raise MonosemanticError(
                    f"the activation of context {lo + bad // max(1, positions)} at {hook_point.name} does not fit {dtype} "
                    f"(it became inf or NaN); harvest with --dtype bfloat16 or float32")
            recorded = len(manifest["shards"])
            name = f"shard_{recorded:05d}.npy"
            try:
                sha256 = _write_shard(out_dir / name, shard)
                manifest["shards"].append({"file": name, "rows": int(shard.shape[0]), "contexts": [lo, hi],
                                           "shape": list(shard.shape), "sha256": sha256})
                manifest["contexts_done"] = hi
                manifest["tokens"] += int(shard.shape[0])
                manifest["d_in"] = int(shard.shape[1])
                manifest["complete"] = hi >= n
                write_json_atomic(manifest_path, manifest)
            except WriteFailed as exc:  # a shard not yet in the manifest is rewritten by the resume
                raise WriteFailed(f"{exc}; the {recorded} shards recorded before it are kept and the same command "
                                  "resumes after them") from None
            elapsed = time.perf_counter() - started
            bar.set_postfix(tok_s=f"{(manifest['tokens'] - tokens_before) / max(elapsed, 1e-9):,.0f}")
    finally:
        bar.close()
    return manifest


def _write_shard(path: Path, shard: np.ndarray) -> str:
    """Write beside, fsync, rename: a shard is whole or absent; a failed write (a full disk) leaves no temporary
    file, and the harvest resumes from the last whole shard once there is room. Returns the file's sha256, taken
    from the bytes as they are written rather than by reading the shard back."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        header = io.BytesIO()
        np.lib.format.write_array_header_1_0(header, np.lib.format.header_data_from_array_1_0(shard))
        body = memoryview(np.ascontiguousarray(shard)).cast("B")
        digest = hashlib.sha256(header.getvalue())
        digest.update(body)
        with open(tmp, "wb") as fh:
            # np.save's own tofile() reports a full disk as an OSError without errno ("N requested and M written");
            # writing the same bytes through the file object keeps ENOSPC / EROFS as the kernel said them.
            fh.write(header.getvalue())
            fh.write(body)
            fh.flush()
            os.fsync(fh.fileno())
        tmp.replace(path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise WriteFailed(f"cannot write harvest shard {path.name} in {path.parent}: {os_reason(exc)}") from None
    return digest.hexdigest()


def _checksum(contexts: torch.Tensor) -> str:
    return hashlib.sha256(contexts.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()[:16]
