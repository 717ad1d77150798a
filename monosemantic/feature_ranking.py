"""A text's features ranked over its tokens (the strongest features of a prompt, as Neuronpedia's activation/all
ranks them) and every active (token, feature) pair of a text (its activation/source).

Both read a dense [tokens, d_sae] block of one dictionary's activations and keep only what they return, so a
caller reading several dictionaries holds one block at a time.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
from torch import Tensor


class RankedFeature(NamedTuple):
    """One feature's activations over a text's tokens, and the keys it was ranked by."""

    feature: int
    values: list[float]  # [tokens]
    max_value: float
    max_position: int  # the first token where max_value is reached
    sum_at: float  # the sum of its values at the positions ranked by (0.0 when ranked by max)


class SourceRanking(NamedTuple):
    """A dictionary's ranked features, tagged with what the caller calls the dictionary."""

    source: str
    features: list[RankedFeature]


def rank_features(features: Tensor, n: int, sort_positions: Sequence[int] = (), zero_first: bool = False) -> list[RankedFeature]:
    """The n strongest features of one text under one dictionary, `features` [tokens, d_sae] (non-negative, as
    every architecture's activations are).

    By max value over the tokens, or, with `sort_positions`, by the sum of the values at those positions; the sort
    is stable, so equal keys keep ascending feature order (on a short text most features are exactly 0, so ties
    are the rule in the tail). `zero_first` sets every feature's value at position 0 (the BOS) to 0 first.
    Source: Neuronpedia apps/inference, endpoints/activation/all.py (`_source_top_rows`).

    Cheap where it can be: the maxima by amax along the tokens, the n best by topk and a stable sort of only the
    candidates at or above the n-th key (exactly the order of a stable sort of all), and first positions only for
    those n: 0.5 ms for 64 bf16 tokens × 4,096 features against 2.2 ms for a transposed max with indices and a full
    sort (measured here)."""
    block = features.float()
    if zero_first and block.shape[0]:
        if block.data_ptr() == features.data_ptr():  # float() gave the input itself (the encoder's buffer): copy
            block = block.clone()
        block[0] = 0
    maxima = block.amax(dim=0) if block.shape[0] else torch.zeros(block.shape[1])
    sums = block[list(sort_positions)].sum(dim=0) if sort_positions else None
    key = maxima if sums is None else sums
    order = stable_top(key, n)
    columns = block[:, order]  # [tokens, n]
    positions = columns.argmax(dim=0).tolist() if block.shape[0] else [0] * len(order)  # the first maximum
    rows = columns.T.tolist()
    sum_values = sums[order].tolist() if sums is not None else [0.0] * len(rows)
    return [
        RankedFeature(int(f), values, float(m), int(p), float(s))
        for f, values, m, p, s in zip(order.tolist(), rows, maxima[order].tolist(), positions, sum_values)
    ]


def stable_top(key: Tensor, n: int) -> Tensor:
    """The indices of the n largest keys, largest first, equal keys in ascending index order: what
    `key.sort(descending=True, stable=True).indices[:n]` gives, sorting only what reaches the n-th key."""
    n = max(0, min(n, key.numel()))
    if n == 0:
        return torch.zeros(0, dtype=torch.long)
    threshold = key.topk(n).values[-1]
    candidates = (key >= threshold).nonzero().squeeze(1)  # ascending index order
    return candidates[key[candidates].sort(descending=True, stable=True).indices[:n]]


def merge_rankings(rankings: Sequence[SourceRanking], n: int, by_sum: bool) -> list[tuple[str, RankedFeature]]:
    """The n strongest of several dictionaries' rankings together, each already in order: stable, so among equal
    keys an earlier dictionary's feature comes first (what one sort over all of them would give: a dictionary can
    contribute at most n features to the top n, so ranking each to n first loses nothing)."""
    tagged = [(r.source, f) for r in rankings for f in r.features]
    tagged.sort(key=lambda pair: pair[1].sum_at if by_sum else pair[1].max_value, reverse=True)  # list.sort is stable
    return tagged[: max(0, n)]


def active_pairs(features: Tensor, skip_first: bool = True, decimals: int | None = None) -> dict[int, list[tuple[int, float]]]:
    """Every non-zero activation of one text, feature → [(position, value), …] in position order; position 0 (the
    BOS) left out with `skip_first`, values rounded to `decimals` when given (Neuronpedia's activation/source
    rounds to 3)."""
    block = features.float()
    positions, ids = block.nonzero(as_tuple=True)
    values = block[positions, ids]
    if skip_first:
        keep = positions > 0
        positions, ids, values = positions[keep], ids[keep], values[keep]
    # by feature, then by position (nonzero is row-major: position order within each feature after a stable sort)
    order = ids.sort(stable=True).indices
    out: dict[int, list[tuple[int, float]]] = {}
    for f, t, v in zip(ids[order].tolist(), positions[order].tolist(), values[order].tolist()):
        out.setdefault(f, []).append((t, round(v, decimals) if decimals is not None else v))
    return out
