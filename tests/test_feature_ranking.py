"""A text's features ranked over its tokens (monosemantic/feature_ranking.py): the same order as one stable sort of
every feature, ties in index order, the BOS column zeroed on request, and every active pair of a text."""

from __future__ import annotations

import pytest
import torch

from monosemantic.feature_ranking import SourceRanking, active_pairs, merge_rankings, rank_features


def _by_full_sort(features, n, sort_positions=(), zero_first=False):
    """The definition, spelled out: zero the BOS row, then one stable descending sort of every feature's key."""
    block = features.float().clone()
    if zero_first:
        block[0] = 0
    by_feature = block.T
    maxima, positions = by_feature.max(dim=1)
    sums = by_feature[:, list(sort_positions)].sum(dim=1) if sort_positions else torch.zeros_like(maxima)
    order = (sums if sort_positions else maxima).sort(descending=True, stable=True).indices[:n]
    return [(int(f), by_feature[f].tolist(), float(maxima[f]), int(positions[f])) for f in order]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 2, 64])
@pytest.mark.parametrize("n", [1, 40, 600])
@pytest.mark.parametrize("sort_positions, zero_first", [((), False), ((), True), ((0, 1), False), ((0, 1), True)])
def test_the_ranking_is_one_stable_sort_of_every_feature(dtype, tokens, n, sort_positions, zero_first):
    features = torch.relu(torch.randn(tokens, 512, generator=torch.Generator().manual_seed(tokens + n)) - 1.5).to(dtype)
    features[:, 100] = 0  # dead features: ties at zero, the common case
    positions = tuple(p for p in sort_positions if p < tokens)
    before = features.clone()
    got = rank_features(features, n, positions, zero_first)
    assert [(f.feature, f.values, f.max_value, f.max_position) for f in got] == _by_full_sort(features, n, positions, zero_first)
    assert torch.equal(features, before)  # the caller's block (the encoder's buffer) is never written


def test_the_sum_at_positions_is_reported():
    features = torch.tensor([[1.0, 0.0], [2.0, 5.0], [0.0, 1.0]])
    ranked = rank_features(features, 2, (0, 2))
    assert [(f.feature, f.sum_at) for f in ranked] == [(0, 1.0), (1, 1.0)]  # a tie: index order


def test_merging_keeps_the_earlier_dictionary_first_among_equal_keys():
    features = torch.tensor([[0.0, 3.0, 1.0]])
    a, b = SourceRanking("0-a", rank_features(features, 2)), SourceRanking("1-b", rank_features(features, 2))
    assert [(s, f.feature) for s, f in merge_rankings([a, b], 3, by_sum=False)] == [("0-a", 1), ("1-b", 1), ("0-a", 2)]


def test_active_pairs_leave_out_the_bos_and_round():
    features = torch.tensor([[9.0, 0.0], [0.12345, 0.0], [0.0, 2.0]])
    assert active_pairs(features, skip_first=True, decimals=3) == {0: [(1, 0.123)], 1: [(2, 2.0)]}
