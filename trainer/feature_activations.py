"""Where the dashboards' activations come from: the model run over the contexts, or a harvest's shards, which hold
them already (no model forward).

Either way feature_statistics (trainer/features.py) sees the same thing: the contexts' token ids, and per batch of
contexts the activation at the hook for every position after the BOS, with a mask of the positions that count
(a harvest may have left special tokens out; there the mask is False and the activation zero).
"""

from __future__ import annotations

from typing import Iterator, NamedTuple

import numpy as np
import torch
from torch import Tensor

from monosemantic.errors import ConfigError, MonosemanticError
from monosemantic.lm import LoadedLM, read_activations, resolve_hook
from trainer.activations import HarvestContexts, from_storage, kept_positions, open_harvest
from trainer.progress import progress as progress_bar

class Batch(NamedTuple):
    start: int  # index of its first context
    x: Tensor  # [b, T-1, d] float32, the activation at every position after the BOS
    counted: Tensor | None  # [b, T-1] bool: the positions that count; None when all do


class ModelActivations:
    """The model read at `hook` over `contexts` [n, T], one forward per batch each time they are asked for
    (feature_statistics asks once while pass 1's active entries fit its budget)."""

    def __init__(self, lm: LoadedLM, hook: str, contexts: Tensor, progress: bool = True):
        self.lm, self.contexts, self.progress = lm, contexts, progress
        self.point = resolve_hook(lm.model, hook)
        self.forwards = 0  # passes that ran the model

    def batches(self, size: int, desc: str) -> Iterator[Batch]:
        self.forwards += 1
        for start in progress_bar(range(0, self.contexts.shape[0], size), desc=desc, unit="batch", enabled=self.progress, leave=False):
            ids = self.contexts[start : start + size]
            x = read_activations(self.lm.model, ids, self.point, attention_mask=torch.ones_like(ids))[:, 1:]
            yield Batch(start, x.float(), None)


class HarvestActivations:
    """A harvest's shards over the contexts it recorded (its `contexts.npy`): every position after the BOS, the ones
    the harvest skipped (special tokens it was told to leave out) masked."""

    def __init__(self, directory, tokens: int | None = None, progress: bool = True):
        """Its first contexts holding `tokens` positions after the BOS (all it completed when None)."""
        self.source = open_harvest(directory, check=True)
        recorded = HarvestContexts.read(directory)
        done = int(self.source.description.get("contexts_done") or 0)
        per_context = max(1, recorded.tokens.shape[1] - 1)
        take = done if tokens is None else min(done, max(1, tokens // per_context))
        if take < 1:
            raise MonosemanticError(f"harvest at {directory} has no completed context")
        self.contexts = recorded.tokens[:take]
        self.manifest = recorded.manifest
        self.progress = progress
        keep = kept_positions(self.contexts, self.manifest["skip_bos"], self.manifest.get("excluded_token_ids") or [])
        self._keep = keep
        self._row_start = torch.cat([torch.zeros(1, dtype=torch.long), keep.sum(1).cumsum(0)])
        self._part_start = np.cumsum([0] + [p.shape[0] for p in self.source.parts])
        if int(self._row_start[-1]) > int(self._part_start[-1]):
            raise MonosemanticError(f"harvest at {directory}: its shards hold {int(self._part_start[-1]):,} rows, fewer than "
                                    f"the {int(self._row_start[-1]):,} its contexts.npy and settings imply")

    @property
    def hook(self) -> str:
        return self.source.description["hook"]

    @property
    def model_checksum(self) -> str | None:
        return self.source.description.get("model_checksum")

    @property
    def data_fingerprint(self) -> str | None:
        return self.source.description.get("data_fingerprint")

    def _rows(self, lo: int, hi: int) -> Tensor:
        """Rows [lo, hi) of the shards seen as one matrix, as float32."""
        pieces = []
        for i, part in enumerate(self.source.parts):
            a, b = max(lo, int(self._part_start[i])), min(hi, int(self._part_start[i + 1]))
            if a < b:
                pieces.append(from_storage(part[a - self._part_start[i] : b - self._part_start[i]], self.source.dtype))
        return torch.cat(pieces) if len(pieces) != 1 else pieces[0]

    def batches(self, size: int, desc: str) -> Iterator[Batch]:
        n, length = self.contexts.shape
        d = self.source.d_in
        for start in progress_bar(range(0, n, size), desc=desc, unit="batch", enabled=self.progress, leave=False):
            end = min(n, start + size)
            keep = self._keep[start:end]
            full = torch.zeros(end - start, length, d)
            full[keep] = self._rows(int(self._row_start[start]), int(self._row_start[end]))
            counted = keep[:, 1:]
            yield Batch(start, full[:, 1:], None if bool(counted.all()) else counted)


def check_harvest_matches(activations: HarvestActivations, lm: LoadedLM, hook: str) -> None:
    """A harvest gives a dictionary's dashboards only when it was read at the dictionary's hook of the same model."""
    model_checksum = lm.checksum
    if resolve_hook(lm.model, activations.hook).key != resolve_hook(lm.model, hook).key:
        raise ConfigError(f"harvest: it was read at {activations.hook}, the dictionary at {resolve_hook(lm.model, hook).name}")
    if activations.model_checksum != model_checksum:
        raise ConfigError("harvest: it was read from another model than the dictionary's "
                          f"(weights checksum {str(activations.model_checksum)[:12]}…, the dictionary's {model_checksum[:12]}…)")
