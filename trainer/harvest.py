"""Harvest activations at one or several hooks into memory-mapped shards: one forward per batch, stopped at the
deepest hook; resumable."""

from __future__ import annotations

import fcntl
import hashlib
import io
import os
import shutil
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from monosemantic.errors import ConfigError, MonosemanticError, WriteFailed, os_reason
from monosemantic.lm import HookPoint, LoadedLM, model_source, read_activations_at, resolve_hook, weights_dtype
from trainer.activations import (
    HARVEST_CONTEXTS, HARVEST_MANIFEST, SHARD_DTYPES, HarvestContexts, contexts_checksum, first_non_finite_row, kept_positions,
    read_json, to_storage, write_json_atomic,
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


def hook_directory(out_dir: Path, hook_name: str) -> Path:
    """Where a several-hook harvest keeps one hook's shard set: ``OUT/<hook>/``, each a harvest of its own (``train
    --harvest OUT/<hook>``). A one-hook harvest is ``OUT`` itself."""
    return Path(out_dir) / hook_name.replace(":", "-")


def harvest(lm: LoadedLM, contexts: torch.Tensor, hook: str, out_dir: Path, **options) -> dict:
    """Write the activations of ``contexts`` [n, ctx] at ``hook`` under ``out_dir``; returns its manifest."""
    return next(iter(harvest_hooks(lm, contexts, [hook], out_dir, **options).values()))


def harvest_hooks(
    lm: LoadedLM,
    contexts: torch.Tensor,
    hooks: Sequence[str],
    out_dir: Path,
    *,
    dtype: str = "float16",
    contexts_per_shard: int = 1024,
    batch_size: int = 32,
    skip_bos: bool = True,
    exclude_special_tokens: bool = False,
    data_fingerprint: str | None = None,
    progress: bool = True,
    data: dict | None = None,
) -> dict[str, dict]:
    """Write the activations of ``contexts`` [n, ctx] at each of ``hooks`` from one forward per batch (run up to the
    deepest hook); returns each hook's manifest by hook name. One hook writes into ``out_dir``; several write one
    shard set each into ``hook_directory(out_dir, hook)``.

    A restarted harvest of the same contexts continues after the last completed shard (each shard covers a fixed
    range of contexts and is renamed into place only when whole). The BOS position is skipped by default: its
    activations are atypical (an attention sink) and SAEBench masks it too. ``exclude_special_tokens`` drops every
    position holding one of the tokenizer's special tokens (BOS/EOS/PAD between packed documents as well)."""
    if dtype not in SHARD_DTYPES:
        raise ConfigError(f"dtype {dtype!r} is not supported for shards; use one of {sorted(SHARD_DTYPES)}")
    if contexts.ndim != 2 or contexts.shape[0] == 0:
        raise ConfigError(f"contexts must be a non-empty [n, context_length] tensor, got {tuple(contexts.shape)}")
    if not hooks:
        raise ConfigError("hook: give at least one hook point")
    points = [resolve_hook(lm.model, hook) for hook in hooks]
    if len({p.key for p in points}) < len(points):
        raise ConfigError(f"hook: {', '.join(hooks)} name the same hook point more than once")
    out_dir = Path(out_dir)
    directories = [out_dir] if len(points) == 1 else [hook_directory(out_dir, p.name) for p in points]
    if exclude_special_tokens and lm.tokenizer is None:
        raise ConfigError("exclude_special_tokens needs the model's tokenizer to know its special tokens")
    special = sorted(set(lm.tokenizer.all_special_ids)) if exclude_special_tokens else []
    settings = dict(dtype=dtype, contexts_per_shard=contexts_per_shard, skip_bos=skip_bos, special=special,
                    data_fingerprint=data_fingerprint, data=data or {})
    with ExitStack() as held:
        for directory in directories:
            try:
                directory.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise WriteFailed(f"cannot create the harvest directory {directory}: {os_reason(exc)}") from None
            held.enter_context(exclusive(directory, "harvest"))
        shard_sets = [_ShardSet.open(lm, contexts, p, d, settings) for p, d in zip(points, directories)]
        _run(lm, contexts, shard_sets, batch_size=batch_size, keep=kept_positions(contexts, skip_bos, special),
             progress=progress)
    return {s.point.name: s.manifest for s in shard_sets}


class _ShardSet:
    """One hook's shards and manifest in one directory, written shard by shard."""

    def __init__(self, point: HookPoint, directory: Path, manifest: dict):
        self.point, self.directory, self.manifest = point, directory, manifest

    @classmethod
    def open(cls, lm: LoadedLM, contexts: torch.Tensor, point: HookPoint, directory: Path, settings: dict) -> "_ShardSet":
        identity = {
            "hook": point.name, "module_path": point.module_path, "model_checksum": lm.checksum,
            "dtype": settings["dtype"], "contexts": int(contexts.shape[0]), "context_length": int(contexts.shape[1]),
            "contexts_per_shard": settings["contexts_per_shard"], "skip_bos": settings["skip_bos"],
            "excluded_token_ids": settings["special"], "data_fingerprint": settings["data_fingerprint"],
            "contexts_checksum": contexts_checksum(contexts), "model_dtype": weights_dtype(lm),
        }
        path = directory / HARVEST_MANIFEST
        if path.exists():
            manifest = read_json(path, "harvest")
            # A harvest from before excluded_token_ids existed excluded none, and ran the model in float32.
            defaults = {"excluded_token_ids": [], "model_dtype": "float32"}
            if {k: manifest.get(k, defaults.get(k)) for k in identity} != identity:
                raise MonosemanticError(f"{directory} holds a harvest of different data, model, hook or settings; use an empty directory")
            if any("sha256" not in shard for shard in manifest.get("shards", [])):
                raise MonosemanticError(f"{directory} holds a harvest by an earlier release (shards without checksums); use an empty directory")
        else:
            # hook_kind beside the identity, not in it: a harvest from before it existed resumes as it is.
            manifest = {**identity, "hook_kind": point.kind, "model_source": model_source(lm.source), "data": settings["data"], "shards": [],
                        "contexts_done": 0, "tokens": 0, "complete": False}
            write_json_atomic(path, manifest)
        if not (directory / HARVEST_CONTEXTS).exists():  # the token ids, for dashboards from the shards (a resumed
            HarvestContexts.write(directory, contexts)  # harvest by an earlier release gets them too: the same contexts)
        return cls(point, directory, manifest)

    def remaining_bytes(self, positions: int, width: int) -> int:
        rows = (self.manifest["contexts"] - self.manifest["contexts_done"]) * positions
        return rows * width * np.dtype(SHARD_DTYPES[self.manifest["dtype"]]).itemsize

    def write(self, shard: np.ndarray, lo: int, hi: int, owners: np.ndarray) -> None:
        manifest, dtype = self.manifest, self.manifest["dtype"]
        if (bad := first_non_finite_row(shard, dtype)) is not None:
            raise MonosemanticError(
                f"the activation of context {lo + int(owners[bad])} at {self.point.name} does not fit {dtype} "
                f"(it became inf or NaN); harvest with --dtype bfloat16 or float32")
        recorded = len(manifest["shards"])
        name = f"shard_{recorded:05d}.npy"
        try:
            sha256 = _write_shard(self.directory / name, shard)
            manifest["shards"].append({"file": name, "rows": int(shard.shape[0]), "contexts": [lo, hi],
                                       "shape": list(shard.shape), "sha256": sha256})
            manifest["contexts_done"] = hi
            manifest["tokens"] += int(shard.shape[0])
            manifest["d_in"] = int(shard.shape[1])
            manifest["complete"] = hi >= manifest["contexts"]
            write_json_atomic(self.directory / HARVEST_MANIFEST, manifest)
        except WriteFailed as exc:  # a shard not yet in the manifest is rewritten by the resume
            raise WriteFailed(f"{exc}; the {recorded} shards recorded before it are kept and the same command "
                              "resumes after them") from None


def _run(lm: LoadedLM, contexts: torch.Tensor, shard_sets: list[_ShardSet], *, batch_size: int, keep: torch.Tensor,
         progress: bool) -> None:
    n = contexts.shape[0]
    per = shard_sets[0].manifest["contexts_per_shard"]
    positions = int(keep.sum(1).max())
    token = torch.zeros((1, 1), dtype=torch.long)  # every hook's width from one one-token forward
    widths = [a.shape[-1] for a in read_activations_at(lm.model, token, [s.point for s in shard_sets], torch.ones_like(token))]
    needed = sum(s.remaining_bytes(positions, width) for s, width in zip(shard_sets, widths))
    require_free_space(shard_sets[0].directory.parent if len(shard_sets) > 1 else shard_sets[0].directory,
                       int(needed * 1.01) + (1 << 20), "the harvest")
    done = lambda: min(s.manifest["contexts_done"] for s in shard_sets)  # noqa: E731
    tokens = lambda: shard_sets[-1].manifest["tokens"]  # noqa: E731
    started, first, tokens_before = time.perf_counter(), done(), tokens()
    bar = progress_bar(total=n, initial=first, unit="ctx", desc="harvest", enabled=progress)
    try:
        while (lo := done()) < n:
            hi = min(n, lo + per)
            # A set ahead of the others (killed between two sets' writes) is not written twice.
            behind = [s for s in shard_sets if s.manifest["contexts_done"] == lo]
            storage = behind[0].manifest["dtype"]
            # Each batch's rows go straight into the shard's own array: the harvest holds one shard, not the
            # batches' pieces and their concatenation beside them (2048 contexts at Gemma-2-2B's width are 2.4 GB).
            shards = [np.empty((int(keep[lo:hi].sum()), width), SHARD_DTYPES[storage])
                      for s, width in zip(shard_sets, widths) if s in behind]
            filled = 0
            for b in range(lo, hi, batch_size):
                ids, kept = contexts[b : min(hi, b + batch_size)], keep[b : min(hi, b + batch_size)]
                count = int(kept.sum())
                for shard, acts in zip(shards, read_activations_at(lm.model, ids, [s.point for s in behind])):
                    shard[filled : filled + count] = to_storage(acts[kept.to(acts.device)], storage)
                filled += count
                bar.update(ids.shape[0])
            owners = torch.arange(hi - lo).repeat_interleave(keep[lo:hi].sum(1)).numpy()
            for shard_set, shard in zip(behind, shards):
                shard_set.write(shard, lo, hi, owners)
            del shards
            bar.set_postfix(tok_s=f"{(tokens() - tokens_before) / max(time.perf_counter() - started, 1e-9):,.0f}")
    finally:
        bar.close()


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
