"""The block-maxima top-k (monosemantic/block_topk.py) selects exactly torch.topk's values, and TopK's dead-latent
selection is the same whichever way it reads the dead columns."""

from __future__ import annotations

import pytest
import torch

from monosemantic.block_topk import topk_indices
from monosemantic.sae import SAEConfig, TopKSAE


def sorted_values(values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    return values.gather(-1, indices).sort(-1).values


@pytest.mark.parametrize("width,k", [(24576, 32), (4096, 32), (65536, 64), (2048, 256), (4100, 32), (300, 40), (8, 8)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_selects_the_values_torch_topk_selects(width, k, dtype):
    values = torch.randn(37, width, generator=torch.Generator().manual_seed(width + k)).to(dtype)
    expected = values.topk(k, dim=-1, sorted=False).values.sort(-1).values
    indices = topk_indices(values, k)
    assert indices.shape == (37, k)
    assert torch.equal(sorted_values(values, indices), expected)
    assert all(len(set(row.tolist())) == k for row in indices)  # k distinct latents per row


def test_ties_give_the_tied_values_and_distinct_indices():
    values = torch.randint(0, 4, (16, 8192), generator=torch.Generator().manual_seed(1)).float()  # mostly ties
    indices = topk_indices(values, 32)
    assert torch.equal(sorted_values(values, indices), values.topk(32, dim=-1).values.sort(-1).values)
    assert all(len(set(row.tolist())) == 32 for row in indices)


def test_masked_rows_pick_the_finite_entries():
    values = torch.randn(8, 16384, generator=torch.Generator().manual_seed(2))
    keep = torch.zeros(16384, dtype=torch.bool)
    keep[torch.randperm(16384, generator=torch.Generator().manual_seed(3))[:500]] = True
    masked = values.masked_fill(~keep, float("-inf"))
    indices = topk_indices(masked, 100)
    assert bool(keep[indices].all())
    assert torch.equal(sorted_values(masked, indices), masked.topk(100, dim=-1).values.sort(-1).values)


def test_leading_dimensions_are_kept():
    values = torch.randn(2, 3, 4096, generator=torch.Generator().manual_seed(4))
    indices = topk_indices(values, 16)
    assert indices.shape == (2, 3, 16)
    assert torch.equal(sorted_values(values, indices), values.topk(16, dim=-1).values.sort(-1).values)


def test_k_over_the_width_is_torch_topks_error():
    with pytest.raises(RuntimeError):
        topk_indices(torch.randn(2, 10), 11)


@pytest.mark.parametrize("dead_count", [100, 3000])  # gathered columns (few dead), then masking (most dead)
def test_dead_top_k_matches_masking_every_live_latent(dead_count):
    sae = TopKSAE(SAEConfig(architecture="topk", d_in=16, d_sae=4096, k=8))
    pre = torch.randn(64, 4096, generator=torch.Generator().manual_seed(dead_count))
    dead = torch.zeros(4096, dtype=torch.bool)
    dead[torch.randperm(4096, generator=torch.Generator().manual_seed(5))[:dead_count]] = True
    values, indices = sae.dead_top_k(pre, dead, 64)
    assert bool(dead[indices].all())
    assert torch.equal(pre.gather(-1, indices), values)
    expected = pre.masked_fill(~dead, float("-inf")).topk(64, dim=-1).values.sort(-1).values
    assert torch.equal(values.sort(-1).values, expected)
