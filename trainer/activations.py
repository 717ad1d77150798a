"""Activation data on disk: the harvest's memory-mapped shards, or a matrix a user brings (.npy/.safetensors).

Shards are plain ``.npy`` files (fp16, or bf16 stored as its uint16 bit pattern since NumPy has no bf16),
listed in a ``harvest.json`` manifest. Readers stream them in shuffled chunks so data larger than RAM works.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from safetensors import safe_open
from torch import Tensor

from monosemantic.errors import ConfigError, MonosemanticError

HARVEST_MANIFEST = "harvest.json"
SHARD_DTYPES = {"float16": np.float16, "bfloat16": np.uint16, "float32": np.float32}


def to_storage(x: Tensor, dtype: str) -> np.ndarray:
    """A float tensor as the NumPy array stored in a shard."""
    if dtype == "bfloat16":
        return x.detach().to(torch.bfloat16).cpu().view(torch.int16).numpy().view(np.uint16)
    return x.detach().to(getattr(torch, dtype)).cpu().numpy()


def from_storage(a: np.ndarray, dtype: str) -> Tensor:
    """A shard's rows back as a float32 tensor."""
    if dtype == "bfloat16":
        # A bfloat16 is the top half of the float32 with the same value, so one shift widens it exactly, into a new
        # array. torch.from_numpy of the read-only map itself would warn that writes are undefined (and the shift
        # ran 24 ms here against 41 ms for torch's view-and-cast of 65,536 × 512 values).
        return torch.from_numpy(np.left_shift(a, 16, dtype=np.uint32).view(np.float32))
    return torch.from_numpy(np.array(a, dtype=np.float32))  # a copy: shards are read-only memory maps


def write_json_atomic(path: Path, data: dict) -> None:
    """Write, flush and rename, so a reader never sees half a file."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as fh:
        json.dump(data, fh, indent=2, sort_keys=True)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


@dataclass
class ActivationSource:
    """A list of row-matrices (memory-mapped where possible) seen as one [rows, d_in] dataset."""

    parts: list[np.ndarray]
    dtype: str  # storage dtype name
    description: dict = field(default_factory=dict)

    @property
    def d_in(self) -> int:
        return int(self.parts[0].shape[1])

    @property
    def rows(self) -> int:
        return int(sum(p.shape[0] for p in self.parts))

    def sample(self, n: int, seed: int = 0) -> Tensor:
        """n rows chosen uniformly at random (without replacement when possible), as float32."""
        rng = np.random.default_rng(seed)
        take = np.sort(rng.choice(self.rows, size=min(n, self.rows), replace=False))
        return self._gather(take)

    def _gather(self, sorted_rows: np.ndarray) -> Tensor:
        out, start = [], 0
        for part in self.parts:
            end = start + part.shape[0]
            lo, hi = np.searchsorted(sorted_rows, [start, end])
            if hi > lo:
                out.append(from_storage(part[sorted_rows[lo:hi] - start], self.dtype))
            start = end
        return torch.cat(out)

    def in_order(self, batch_size: int = 8192) -> Iterator[Tensor]:
        """Every row once, in storage order, as float32 batches (for evaluation)."""
        for part in self.parts:
            for start in range(0, part.shape[0], batch_size):
                yield from_storage(part[start : start + batch_size], self.dtype)

    def batches(self, batch_size: int, seed: int, chunk_rows: int = 1 << 19, start_batch: int = 0) -> Iterator[Tensor]:
        """Endless shuffled batches. Each epoch visits chunks of ``chunk_rows`` contiguous rows (fast on a
        memmap) in a seeded order, shuffles each chunk in memory and cuts it into batches (a chunk's ragged
        tail is left for another epoch, where the shuffle differs). ``start_batch`` skips ahead without
        reading, which is how a resumed run sees exactly the data it would have seen."""
        if batch_size > self.rows:
            raise ConfigError(f"batch_size ({batch_size}) exceeds the {self.rows} rows of activation data")
        chunk_rows = max(chunk_rows, batch_size)
        spans = [(i, s, min(s + chunk_rows, p.shape[0])) for i, p in enumerate(self.parts) for s in range(0, p.shape[0], chunk_rows)]
        spans = [span for span in spans if span[2] - span[1] >= batch_size]
        if not spans:
            raise ConfigError(f"batch_size ({batch_size}) exceeds every shard of the activation data; use a smaller batch")
        produced, epoch = 0, 0
        while True:
            rng = np.random.default_rng([seed, epoch])
            for j in rng.permutation(len(spans)):
                i, s, e = spans[j]
                permutation = rng.permutation(e - s)
                n_full = (e - s) // batch_size
                if produced + n_full <= start_batch:
                    produced += n_full
                    continue
                chunk = from_storage(self.parts[i][s:e], self.dtype)[torch.from_numpy(permutation)]
                for b in range(n_full):
                    if produced >= start_batch:
                        yield chunk[b * batch_size : (b + 1) * batch_size]
                    produced += 1
            epoch += 1


def open_harvest(directory: Path) -> ActivationSource:
    """The shards a harvest has completed so far, memory-mapped."""
    manifest_path = Path(directory) / HARVEST_MANIFEST
    if not manifest_path.exists():
        raise MonosemanticError(f"no harvest at {directory}: {HARVEST_MANIFEST} is missing")
    manifest = json.loads(manifest_path.read_text())
    if not manifest["shards"]:
        raise MonosemanticError(f"harvest at {directory} has no completed shard yet")
    parts = [np.load(Path(directory) / s["file"], mmap_mode="r") for s in manifest["shards"]]
    return ActivationSource(parts=parts, dtype=manifest["dtype"],
                            description={"kind": "harvest", **{k: manifest[k] for k in ("hook", "module_path", "model_checksum", "tokens")}})


def open_activation_file(path: Path) -> ActivationSource:
    """A user's own activation matrix [rows, d_in]: ``.npy`` (memory-mapped) or ``.safetensors`` (one 2-D tensor)."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"activations: file {path} does not exist")
    if path.suffix == ".npy":
        try:
            array = np.load(path, mmap_mode="r", allow_pickle=False)
        except ValueError as exc:
            raise ConfigError(f"activations: {path.name} is not a readable .npy matrix ({exc})") from None
        if array.dtype not in (np.float16, np.float32, np.float64):
            raise ConfigError(f"activations: {path.name} has dtype {array.dtype}; expected a float matrix")
        dtype = {np.dtype(np.float16): "float16", np.dtype(np.float32): "float32"}.get(array.dtype, "float32")
        if array.dtype == np.float64:
            array = array.astype(np.float32)
    elif path.suffix == ".safetensors":
        try:
            with safe_open(str(path), framework="pt") as fh:
                keys = list(fh.keys())
                if len(keys) != 1:
                    raise ConfigError(f"activations: {path.name} must hold exactly one tensor, found {len(keys)}: {keys[:5]}")
                tensor = fh.get_tensor(keys[0])
        except ConfigError:
            raise
        except Exception as exc:  # safetensors raises its own error types for a malformed header
            raise ConfigError(f"activations: {path.name} is not a readable safetensors file ({exc})") from None
        array = tensor.float().numpy()
        dtype = "float32"
    else:
        raise ConfigError(f"activations: {path.name} must end in .npy or .safetensors")
    if array.ndim != 2 or array.shape[0] == 0 or array.shape[1] == 0:
        raise ConfigError(f"activations: expected a 2-D [rows, d_in] matrix, got shape {tuple(array.shape)}")
    return ActivationSource(parts=[array], dtype=dtype, description={"kind": "file", "file": path.name, "rows": int(array.shape[0])})


def split_tail(source: ActivationSource, fraction: float = 0.05, max_rows: int = 200_000) -> tuple[ActivationSource, ActivationSource]:
    """(train, held-out): the last rows (a ``fraction``, at most ``max_rows``) are kept out of training.
    The tail rather than a random subset, because rows of a user's file are usually in document order."""
    holdout = min(max_rows, max(1, int(source.rows * fraction)))
    if source.rows - holdout < 1:
        raise ConfigError(f"activations: {source.rows} rows are too few to hold some out for evaluation")
    train_parts, held_parts, remaining = [], [], source.rows - holdout
    for part in source.parts:
        take = min(remaining, part.shape[0])
        if take:
            train_parts.append(part[:take])
        if take < part.shape[0]:
            held_parts.append(part[take:])
        remaining -= take
    return (ActivationSource(train_parts, source.dtype, {**source.description, "split": "train"}),
            ActivationSource(held_parts, source.dtype, {**source.description, "split": "heldout"}))
