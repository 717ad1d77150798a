"""Paired activation rows for transcoders: one harvest at an input hook and one at an output hook of the same
forward, read together as rows ``[input | target]``.

``harvest --hook-in A --hook-out B --out OUT`` writes the two shard sets as a several-hook harvest does
(``OUT/<hook>/``, trainer/harvest.py) and ``OUT/paired.json`` naming which is which. Both sets hold the same tokens in
the same order, shard for shard, so one seeded shuffle of the row indices serves both: ``PairedSource`` yields each
batch as the two widths side by side, and ``split_pair`` is the one place that layout is cut apart.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from torch import Tensor

from trainer.activations import ActivationSource, DataError, open_harvest, read_json, split_tail, write_json_atomic

PAIRED_MANIFEST = "paired.json"


def split_pair(rows: Tensor, d_in: int) -> tuple[Tensor, Tensor]:
    """Paired rows [n, d_in + d_out] → (inputs [n, d_in], targets [n, d_out])."""
    return rows[:, :d_in], rows[:, d_in:]


@dataclass
class PairedSource:
    """Two aligned ActivationSources read as one: every method of ActivationSource the trainer uses, on rows
    ``[input | target]``; ``d_in`` is the input's width and ``d_out`` the target's."""

    inputs: ActivationSource
    targets: ActivationSource
    description: dict
    paired = True  # (ActivationSource's is False)

    def __post_init__(self) -> None:
        ins, outs = [p.shape[0] for p in self.inputs.parts], [p.shape[0] for p in self.targets.parts]
        if ins != outs:
            raise DataError(f"paired harvest: the input and output shard sets hold different rows ({sum(ins)} in "
                            f"{len(ins)} shards against {sum(outs)} in {len(outs)}); harvest them together with "
                            "--hook-in and --hook-out")

    @property
    def d_in(self) -> int:
        return self.inputs.d_in

    @property
    def d_out(self) -> int:
        return self.targets.d_in

    @property
    def rows(self) -> int:
        return self.inputs.rows

    def split(self, rows: Tensor) -> tuple[Tensor, Tensor]:
        return split_pair(rows, self.d_in)

    def require_finite(self) -> None:
        self.inputs.require_finite()
        self.targets.require_finite()

    def identity(self) -> dict:
        a, b = self.inputs.identity(), self.targets.identity()
        digest = hashlib.sha256(f"{a['sha256']}:{b['sha256']}".encode()).hexdigest()
        return {"sha256": digest, "rows": self.rows, "d_in": self.d_in, "d_out": self.d_out, "dtype": self.inputs.dtype}

    def sample(self, n: int, seed: int = 0) -> Tensor:
        # The same seed draws the same row indices from both (each samples by its own row count, equal here).
        return torch.cat([self.inputs.sample(n, seed), self.targets.sample(n, seed)], dim=1)

    def in_order(self, batch_size: int = 8192) -> Iterator[Tensor]:
        for x, y in zip(self.inputs.in_order(batch_size), self.targets.in_order(batch_size)):
            yield torch.cat([x, y], dim=1)

    def batches(self, batch_size: int, seed: int, chunk_rows: int = 1 << 19, start_batch: int = 0) -> Iterator[Tensor]:
        # Equal shard row counts give both the same spans and the same permutations from the same seed.
        pairs = zip(self.inputs.batches(batch_size, seed, chunk_rows, start_batch),
                    self.targets.batches(batch_size, seed, chunk_rows, start_batch))
        for x, y in pairs:
            yield torch.cat([x, y], dim=1)


def write_pairing(out_dir: Path, hook_in: dict, hook_out: dict) -> None:
    """``OUT/paired.json``: which of the harvest's hook directories is the input and which the target."""
    write_json_atomic(Path(out_dir) / PAIRED_MANIFEST, {"input": hook_in, "output": hook_out})


def is_paired(directory: Path) -> bool:
    return (Path(directory) / PAIRED_MANIFEST).exists()


def side_directory(directory: Path, side: str) -> Path:
    """The shard set of one side ("input" or "output") of a paired harvest, as its paired.json names it."""
    directory = Path(directory)
    entry = read_json(directory / PAIRED_MANIFEST, "paired harvest").get(side)
    if not isinstance(entry, dict) or not isinstance(entry.get("directory"), str):
        raise DataError(f"paired harvest at {directory}: {PAIRED_MANIFEST} names no {side} directory (edited or truncated)")
    return directory / Path(entry["directory"]).name


def input_directory(directory: Path) -> Path:
    return side_directory(directory, "input")


def open_paired(directory: Path, check: bool = True) -> PairedSource:
    inputs, targets = (open_harvest(side_directory(directory, side), check=check) for side in ("input", "output"))
    description = {**inputs.description, "hook_out": targets.description.get("hook"),
                   "module_path_out": targets.description.get("module_path"), "hook_kind_out": targets.description["hook_kind"],
                   "complete": inputs.description["complete"] and targets.description["complete"],
                   "contexts_done": min(inputs.description["contexts_done"] or 0, targets.description["contexts_done"] or 0)}
    return PairedSource(inputs, targets, description)


def open_training_data(directory: Path, check: bool = True) -> ActivationSource | PairedSource:
    """A harvest directory as training data: paired rows where it was harvested with --hook-in/--hook-out."""
    return open_paired(directory, check) if is_paired(directory) else open_harvest(directory, check)


def split_paired_tail(source: PairedSource) -> tuple[PairedSource, PairedSource]:
    """split_tail of both sides at the same row."""
    (a_train, a_held), (b_train, b_held) = split_tail(source.inputs), split_tail(source.targets)
    return (PairedSource(a_train, b_train, {**source.description, "split": "train"}),
            PairedSource(a_held, b_held, {**source.description, "split": "heldout"}))
