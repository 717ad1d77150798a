"""Feature activations of a batch of token sequences under one or many dictionaries: one right-padded forward
that stops after the deepest hook any of them reads, then one encode per dictionary over the rows that asked for it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, NamedTuple, Sequence

import torch
from torch import Tensor

from monosemantic.bound import BoundDictionary
from monosemantic.feature_ranking import RankedFeature, active_pairs, rank_features
from monosemantic.lm import HookPoint, read_activations_at
from monosemantic.model import Model


@dataclass
class SequenceReadout:
    """Per-token results for one sequence under one dictionary, as plain tensors."""

    l0: Tensor  # [T] int
    recon_error: Tensor  # [T] float
    top_values: Tensor  # [T, min(k, the batch's largest L0)], zero-padded where a token has fewer active
    top_ids: Tensor  # [T, same]
    values: Tensor | None  # [T, len(feature_ids)]
    watched: Tensor | None = None  # [T, len(watch)] the monitored features' values
    squared_error: Tensor | None = None  # [T] ||x - x_hat||²
    squared_norm: Tensor | None = None  # [T] ||x||²
    ranked: list[RankedFeature] | None = None  # with Read.rank: the sequence's strongest features over its tokens
    active: dict[int, list[tuple[int, float]]] | None = None  # with Read.active: every non-zero (position, value) by feature


class Ranking(NamedTuple):
    """Rank a sequence's features over its tokens (monosemantic/feature_ranking.py)."""

    n: int
    sort_positions: tuple[int, ...] = ()
    zero_first: bool = False


class Read(NamedTuple):
    """What one sequence asks of one dictionary."""

    dictionary: BoundDictionary
    top_k: int = 0
    feature_ids: list[int] | None = None
    rank: Ranking | None = None
    active: bool = False  # every non-zero activation after position 0, values rounded to 3 decimals


def _padded(model: Model, sequences: Sequence[Sequence[int]]) -> tuple[Tensor, Tensor]:
    longest = max(len(s) for s in sequences)
    pad = model.lm.tokenizer.pad_token_id or 0
    ids = torch.full((len(sequences), longest), pad, dtype=torch.long)
    mask = torch.zeros((len(sequences), longest), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[row, : len(seq)] = 1
    return ids, mask


def hook_activations(model: Model, sequences: Sequence[Sequence[int]], hooks: Sequence[HookPoint]) -> list[list[Tensor]]:
    """For each hook, the activation of each sequence there, [T_i, d] in float32, from one right-padded forward
    that runs only as deep as the deepest hook.

    Right padding keeps every real token at its own position (position ids count from 0), and causal attention
    never looks at the padding that follows, so each row equals the sequence's forward on its own.
    """
    ids, mask = _padded(model, sequences)
    acts = read_activations_at(model.lm, ids, list(hooks), attention_mask=mask)
    return [[a[row, : len(seq)].float() for row, seq in enumerate(sequences)] for a in acts]


def read_features(
    model: Model, sequences: Sequence[Sequence[int]], reads: Sequence[Sequence[Read]], watch: Mapping[str, list[int]] | None = None
) -> list[list[SequenceReadout]]:
    """Top-k features, L0, relative reconstruction error and requested dense values for every token of every
    sequence, under each dictionary its `reads` entry names (in that order). `watch`: dictionary name → the
    monitored features whose values are kept for monitoring."""
    hooks: dict[str, HookPoint] = {}
    for wanted in reads:
        for read in wanted:
            hooks.setdefault(read.dictionary.hook.key, read.dictionary.hook)
            if (written := read.dictionary.hook_out) is not None:  # a transcoder's error is of what it predicts
                hooks.setdefault(written.key, written)
    order = list(hooks)
    acts = dict(zip(order, hook_activations(model, sequences, [hooks[k] for k in order])))
    # Every dictionary once, over the rows of the sequences that read it.
    users: dict[int, tuple[BoundDictionary, list[tuple[int, int]]]] = {}
    for s, wanted in enumerate(reads):
        for slot, read in enumerate(wanted):
            users.setdefault(id(read.dictionary), (read.dictionary, []))[1].append((s, slot))
    out: list[list[SequenceReadout | None]] = [[None] * len(wanted) for wanted in reads]
    for dictionary, places in users.values():
        rows = [acts[dictionary.hook.key][s] for s, _ in places]
        targets = [acts[dictionary.hook_out.key][s] for s, _ in places] if dictionary.hook_out is not None else None
        for (s, slot), readout in zip(places, _read_one(dictionary, rows, [reads[s][slot] for s, slot in places],
                                                         (watch or {}).get(dictionary.name), targets)):
            out[s][slot] = readout
    return out  # type: ignore[return-value]


def _read_one(dictionary: BoundDictionary, acts: list[Tensor], reads: list[Read], watch: list[int] | None,
              targets: list[Tensor] | None = None) -> list[SequenceReadout]:
    """One dictionary's readouts of its rows; ``targets``: a transcoder's rows at its output hook, which its
    reconstruction error is measured against."""
    encoder = dictionary.encoder
    flat = torch.cat(acts)
    features = encoder.encode(flat)
    active = encoder.sparse_readout(features, flat)
    reconstructed = flat if targets is None else torch.cat(targets)
    squared_error = (reconstructed - active.reconstruction).pow(2).sum(-1)
    squared_norm = reconstructed.pow(2).sum(-1)
    rel_error = (squared_error / squared_norm.clamp_min(1e-24)).sqrt()
    watched = features[:, watch].float() if watch else None
    top_values, top_ids = active.top_k(max((r.top_k for r in reads), default=0))
    out, start = [], 0
    for rows, read in zip(acts, reads):
        end = start + rows.shape[0]
        k, wanted = read.top_k, read.feature_ids
        values = features[start:end, wanted].float() if wanted else None
        block = features[start:end]
        ranked = None if read.rank is None else rank_features(block, read.rank.n, read.rank.sort_positions, read.rank.zero_first)
        out.append(SequenceReadout(
            active.l0[start:end], rel_error[start:end], top_values[start:end, :k], top_ids[start:end, :k], values,
            None if watched is None else watched[start:end], squared_error[start:end], squared_norm[start:end],
            ranked, active_pairs(block, skip_first=True, decimals=3) if read.active else None,
        ))
        start = end
    return out
