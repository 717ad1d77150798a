"""Activation data on disk: the harvest's memory-mapped shards, or a matrix a user brings (.npy/.safetensors).

Shards are plain ``.npy`` files (fp16, or bf16 stored as its uint16 bit pattern since NumPy has no bf16),
listed in a ``harvest.json`` manifest with each one's sha256 and shape. Opening data for training reads it once,
at disk speed, checking those digests and refusing a row that is NaN or infinite (named by its index); readers
then stream it in shuffled chunks so data larger than RAM works.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from safetensors import safe_open
from torch import Tensor

from monosemantic.artifact import sha256_file
from monosemantic.errors import ConfigError, MonosemanticError, WriteFailed, os_reason
from monosemantic.ledger import write_durably

HARVEST_MANIFEST = "harvest.json"
HARVEST_CONTEXTS = "contexts.npy"  # the token ids harvested, [contexts, context_length] int32, beside the manifest
SHARD_DTYPES = {"float16": np.float16, "bfloat16": np.uint16, "float32": np.float32}
SCAN_BYTES = 1 << 20  # 1 MiB blocks stay in cache between the hash and the finite test: 1.36 GB/s, against 0.71 with 64 MiB (bench/data_check.py)


class DataError(ConfigError):
    """Activation data that cannot be trained on as it is: non-finite rows, a shard that does not match its
    recorded digest or shape, a manifest that cannot be read."""


# Each storage dtype's exponent bits: all set is an infinity or a NaN (IEEE 754; bfloat16 is float32's top half).
# Testing them as integers runs at ~5 GB/s here, 4x np.isfinite on float16, so the check keeps up with the disk.
EXPONENT_BITS = {"float16": (np.uint16, 0x7C00), "bfloat16": (np.uint16, 0x7F80), "float32": (np.uint32, 0x7F800000)}


def first_non_finite_row(block: np.ndarray, dtype: str) -> int | None:
    """The index of the first row of a stored block holding a NaN or an infinity, or None."""
    unsigned, mask = EXPONENT_BITS[dtype]
    bits = np.ascontiguousarray(block).view(unsigned) & unsigned(mask)
    if bits.size == 0 or bits.max() != mask:
        return None
    return int(np.flatnonzero((bits == mask).any(axis=1))[0])


def check_rows_finite(array: np.ndarray, dtype: str, what: str, first_row: int = 0) -> None:
    """Refuse data holding a non-finite value, naming the row: a NaN or inf row is a bug upstream (a float16
    harvest of activations past 65,504, a corrupted file), and training on it gives a NaN dictionary. Refused
    rather than skipped, so the cause is fixed instead of hidden behind a silently smaller dataset."""
    step = max(1, SCAN_BYTES // max(1, array.shape[1] * array.dtype.itemsize))
    for start in range(0, array.shape[0], step):
        _refuse_non_finite(np.asarray(array[start : start + step]), dtype, what, first_row + start)


def _refuse_non_finite(block: np.ndarray, dtype: str, what: str, first_row: int) -> None:
    if (bad := first_non_finite_row(block, dtype)) is not None:
        raise DataError(f"{what}: row {first_row + bad} holds NaN or inf; fix the data (a float16 harvest overflows past "
                        "65,504: harvest with --dtype bfloat16) or remove the row")


def scan_npy(path: Path, array: np.memmap, dtype: str) -> tuple[str, int | None]:
    """One sequential pass over a memory-mapped ``.npy`` file: its sha256 and the first row holding NaN or inf (or
    None). The same bytes serve both, so data larger than RAM is read from disk once."""
    row_bytes = array.shape[1] * array.dtype.itemsize
    rows_per_block = max(1, SCAN_BYTES // max(1, row_bytes))
    digest, row, bad = hashlib.sha256(), 0, None
    with open(path, "rb") as fh:
        digest.update(fh.read(array.offset))
        while block := fh.read(rows_per_block * row_bytes):
            digest.update(block)
            whole = len(block) // row_bytes * row_bytes
            rows = np.frombuffer(block[:whole], dtype=array.dtype).reshape(-1, array.shape[1])
            if bad is None and (found := first_non_finite_row(rows, dtype)) is not None:
                bad = row + found
            row += rows.shape[0]
    return digest.hexdigest(), bad


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
    """Write, flush and rename, so a reader never sees half a file; on a failed write (a full disk) the
    temporary file is removed and the previous file stays."""
    try:
        write_durably(path, json.dumps(data, indent=2, sort_keys=True))
    except OSError as exc:
        raise WriteFailed(f"cannot write {path.name} in {path.parent}: {os_reason(exc)}") from None


def read_json(path: Path, what: str) -> dict:
    """A JSON object written by this project, or a clear error naming the file (truncated, edited, unreadable)."""
    try:
        data = json.loads(Path(path).read_bytes())
    except FileNotFoundError:
        raise MonosemanticError(f"{what}: {Path(path).name} is missing in {Path(path).parent}") from None
    except OSError as exc:
        raise MonosemanticError(f"{what}: {Path(path).name} cannot be read ({os_reason(exc)})") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise DataError(f"{what}: {Path(path).name} in {Path(path).parent} is not valid JSON (truncated or edited)") from None
    if not isinstance(data, dict):
        raise DataError(f"{what}: {Path(path).name} must hold a JSON object")
    return data


@dataclass
class ActivationSource:
    """A list of row-matrices (memory-mapped where possible) seen as one [rows, d_in] dataset."""

    parts: list[np.ndarray]
    dtype: str  # storage dtype name
    description: dict = field(default_factory=dict)
    digest: str | None = None  # sha256 identifying the data (its files' digests); computed from the rows if None
    checked: bool = False  # every row already found finite (open_harvest and open_activation_file read them all)

    def require_finite(self) -> None:
        """Refuse a NaN or inf row (named by its index); a pass over rows not checked when they were opened."""
        if not self.checked:
            first_row = 0
            for part in self.parts:
                check_rows_finite(part, self.dtype, "activation data", first_row)
                first_row += part.shape[0]
            self.checked = True

    def identity(self) -> dict:
        """What a checkpoint records so that a resume against other data is refused."""
        if self.digest is None:
            h = hashlib.sha256()
            for part in self.parts:
                step = max(1, SCAN_BYTES // max(1, part.shape[1] * part.dtype.itemsize))
                for start in range(0, part.shape[0], step):
                    h.update(np.ascontiguousarray(part[start : start + step]).tobytes())
            self.digest = h.hexdigest()
        return {"sha256": self.digest, "rows": self.rows, "d_in": self.d_in, "dtype": self.dtype}

    paired = False  # rows of one activation (trainer/paired.py's PairedSource holds input-target pairs)

    @property
    def d_in(self) -> int:
        return int(self.parts[0].shape[1])

    @property
    def d_out(self) -> int:
        return self.d_in

    def split(self, rows: Tensor) -> tuple[Tensor, None]:
        """(inputs, targets) of a batch: a dictionary reconstructs its own input, so no targets."""
        return rows, None

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


def contexts_checksum(contexts: Tensor) -> str:
    """What a harvest's manifest records of its contexts (`contexts_checksum`), to know them again."""
    return hashlib.sha256(contexts.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()[:16]


def kept_positions(contexts: Tensor, skip_bos: bool, special: list[int]) -> Tensor:
    """[n, ctx] booleans: the positions of a harvest's contexts whose activations became its rows, in order."""
    keep = torch.ones(contexts.shape, dtype=torch.bool)
    if skip_bos:
        keep[:, 0] = False
    if special:
        keep &= ~torch.isin(contexts, torch.tensor(special, dtype=contexts.dtype))
    return keep


@dataclass
class HarvestContexts:
    """The token ids a harvest read (its `contexts.npy`), so its rows can be put back at their tokens: the
    dashboards' windows need them. Checked against the manifest's `contexts_checksum` when read."""

    tokens: Tensor  # [contexts, context_length] int64
    manifest: dict

    @staticmethod
    def write(directory: Path, contexts: Tensor) -> None:
        path = Path(directory) / HARVEST_CONTEXTS
        tmp = path.with_name(path.name + ".tmp")
        try:
            with open(tmp, "wb") as fh:
                np.save(fh, contexts.to(torch.int32).contiguous().numpy(), allow_pickle=False)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise WriteFailed(f"cannot write {HARVEST_CONTEXTS} in {directory}: {os_reason(exc)}") from None

    @classmethod
    def read(cls, directory: Path) -> "HarvestContexts":
        directory = Path(directory)
        manifest = read_json(directory / HARVEST_MANIFEST, "harvest")
        path = directory / HARVEST_CONTEXTS
        if not path.exists():
            raise MonosemanticError(f"harvest at {directory} does not record its token ids ({HARVEST_CONTEXTS}; harvested by "
                                    "an earlier release): harvest again, or compute the dashboards from the model")
        try:
            tokens = torch.from_numpy(np.load(path, allow_pickle=False).astype(np.int64))
        except (ValueError, OSError) as exc:
            raise DataError(f"harvest at {directory}: {HARVEST_CONTEXTS} cannot be read ({exc})") from None
        if tokens.ndim != 2 or contexts_checksum(tokens) != manifest.get("contexts_checksum"):
            raise DataError(f"harvest at {directory}: {HARVEST_CONTEXTS} is not the contexts its {HARVEST_MANIFEST} records "
                            "(edited or from another harvest)")
        return cls(tokens=tokens, manifest=manifest)


def open_harvest(directory: Path, check: bool = True) -> ActivationSource:
    """The shards a harvest has completed so far, memory-mapped. With ``check`` (training, evaluation) every shard
    is read once to compare it with the sha256 and shape its manifest recorded and to refuse non-finite rows."""
    directory = Path(directory)
    if not (directory / HARVEST_MANIFEST).exists():
        if hooks := sorted(p.parent for p in directory.glob(f"*/{HARVEST_MANIFEST}")):
            raise MonosemanticError(f"{directory} holds a harvest at {len(hooks)} hooks, one directory each; give one: "
                                    + ", ".join(f"--harvest {h}" for h in hooks))
        raise MonosemanticError(f"no harvest at {directory}: {HARVEST_MANIFEST} is missing")
    manifest = read_json(directory / HARVEST_MANIFEST, "harvest")
    shards = manifest.get("shards")
    if not isinstance(shards, list) or not all(isinstance(s, dict) and {"file", "rows"} <= s.keys() for s in shards):
        raise DataError(f"harvest at {directory}: {HARVEST_MANIFEST} lists no valid shards (edited or truncated)")
    if not shards:
        raise MonosemanticError(f"harvest at {directory} has no completed shard yet")
    if manifest.get("dtype") not in SHARD_DTYPES:
        raise DataError(f"harvest at {directory}: unknown shard dtype {manifest.get('dtype')!r}")
    parts, first_row = [], 0
    for shard in shards:
        what = f"harvest shard {shard['file']}"
        if "sha256" not in shard or "shape" not in shard:
            raise DataError(f"{what} has no recorded sha256 (harvested by an earlier release): harvest again into an empty directory")
        path = directory / Path(shard["file"]).name
        if not path.exists():
            raise DataError(f"{what} is missing")
        try:
            array = np.load(path, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError) as exc:
            raise DataError(f"{what} cannot be read as a .npy matrix (truncated or corrupted: {exc})") from None
        if list(array.shape) != list(shard["shape"]) or array.dtype != SHARD_DTYPES[manifest["dtype"]]:
            raise DataError(f"{what} holds {array.dtype}{list(array.shape)}, not the {list(shard['shape'])} its manifest recorded")
        if check:
            digest, bad = scan_npy(path, array, manifest["dtype"])
            if digest != shard["sha256"]:
                raise DataError(f"{what} does not match its sha256 in {HARVEST_MANIFEST} (corrupted or overwritten)")
            if bad is not None:
                _refuse_non_finite(np.asarray(array[bad : bad + 1]), manifest["dtype"], what, first_row + bad)
        parts.append(array)
        first_row += array.shape[0]
    digest = hashlib.sha256("".join(s["sha256"] for s in shards).encode()).hexdigest()
    description = {"kind": "harvest", **{k: manifest.get(k) for k in ("hook", "module_path", "model_checksum", "tokens",
                                                                       "data", "data_fingerprint", "model_source")},
                   "hook_kind": manifest.get("hook_kind") or _kind_of(str(manifest.get("hook"))),
                   "complete": bool(manifest.get("complete")), "contexts_done": manifest.get("contexts_done"),
                   "contexts": manifest.get("contexts")}
    return ActivationSource(parts=parts, dtype=manifest["dtype"], description=description, digest=digest, checked=check)


def _kind_of(hook_name: str) -> str:
    """A harvest's hook kind where its manifest predates ``hook_kind``: an HF key says ":input"; an alias meant an
    output then for every hook this project has served from a harvest."""
    return "input" if hook_name.endswith(":input") else "output"


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
    if isinstance(array, np.memmap):
        digest, bad = scan_npy(path, array, dtype)
        if bad is not None:
            _refuse_non_finite(np.asarray(array[bad : bad + 1]), dtype, f"activations {path.name}", bad)
    else:
        check_rows_finite(array, dtype, f"activations {path.name}")
        digest = sha256_file(path)
    return ActivationSource(parts=[array], dtype=dtype, description={"kind": "file", "file": path.name, "rows": int(array.shape[0])},
                            digest=digest, checked=True)


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
    def split(name: str) -> str | None:
        return hashlib.sha256(f"{source.digest}:{name}:{holdout}".encode()).hexdigest() if source.digest else None

    return (ActivationSource(train_parts, source.dtype, {**source.description, "split": "train"}, split("train"), source.checked),
            ActivationSource(held_parts, source.dtype, {**source.description, "split": "heldout"}, split("heldout"), source.checked))
