"""Synthetic sparse data with known ground-truth directions (Sharkey, Braun & Millidge 2022 style).

Used to prove that an SAE recovers real features: samples are sparse non-negative combinations of unit
directions, with geometrically decaying firing probabilities, so the true dictionary is known.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class SyntheticData:
    activations: Tensor  # [n, d]
    directions: Tensor  # [n_features, d], unit rows
    mean_l0: float


def make_sparse_data(n: int, d: int = 64, n_features: int = 128, mean_active: float = 5.0,
                     decay: float = 0.99, seed: int = 0) -> SyntheticData:
    """n samples of x = Σ_i c_i·g_i with c_i ~ U(0, 1) when feature i fires; firing probability ∝ decay^i,
    scaled so that ``mean_active`` features fire per sample (the Sharkey et al. generator, uncorrelated)."""
    gen = torch.Generator().manual_seed(seed)
    directions = torch.randn(n_features, d, generator=gen)
    directions /= directions.norm(dim=1, keepdim=True)
    codes = _power_law_codes(n, n_features, mean_active, decay, gen)
    return SyntheticData(activations=codes @ directions, directions=directions, mean_l0=float((codes > 0).sum(1).float().mean()))


def _power_law_codes(n: int, n_features: int, mean_active: float, decay: float, gen: torch.Generator) -> Tensor:
    """[n, n_features] coefficients U(0, 1) where feature i fires, with probability ∝ decay^i, ``mean_active`` per row."""
    probs = decay ** torch.arange(n_features, dtype=torch.float32)
    probs = (probs * mean_active / probs.sum()).clamp(max=1.0)
    fires = torch.rand(n, n_features, generator=gen) < probs
    return fires * torch.rand(n, n_features, generator=gen)


def mean_max_cosine(true_directions: Tensor, learned_rows: Tensor) -> float:
    """MMCS(G→D): for every true direction, the best cosine with any learned row, averaged."""
    g = true_directions / true_directions.norm(dim=1, keepdim=True)
    d = learned_rows / learned_rows.norm(dim=1, keepdim=True).clamp_min(1e-8)
    return float((g @ d.t()).max(dim=1).values.mean())


@dataclass
class HierarchicalData:
    """Independent features plus parent/child families: a child fires only with its parent (``parents[j]`` is a
    row index of ``directions``; ``children[j]`` the rows of its children)."""

    activations: Tensor  # [n, d]
    directions: Tensor  # [features, d], unit rows: the independent ones first, then each family's parent and children
    codes: Tensor  # [n, features] the true coefficients
    parents: list[int]
    children: list[list[int]]


def make_hierarchical_data(n: int, d: int = 64, independent: int = 128, families: int = 8, children: int = 4,
                           mean_active: float = 4.0, parent_rate: float = 0.05, child_share: float = 0.8,
                           seed: int = 0) -> HierarchicalData:
    """A planted hierarchy, the setting where feature absorption appears (Chanin et al. 2024, "A is for
    Absorption"): each family's parent fires on ``parent_rate`` of the samples and, on ``child_share`` of those,
    exactly one of its children fires with it; a child never fires alone. Coefficients U(0.5, 1.5) for the
    families (a child's token carries both directions at full strength), the independent features as
    ``make_sparse_data``'s."""
    gen = torch.Generator().manual_seed(seed)
    directions = torch.randn(independent + families * (1 + children), d, generator=gen)
    directions /= directions.norm(dim=1, keepdim=True)
    codes = torch.zeros(n, directions.shape[0])
    codes[:, :independent] = _power_law_codes(n, independent, mean_active, 0.99, gen)
    parents, kids = [], []
    for family in range(families):
        parent = independent + family * (1 + children)
        mine = list(range(parent + 1, parent + 1 + children))
        parents.append(parent)
        kids.append(mine)
        fires = torch.rand(n, generator=gen) < parent_rate
        codes[fires, parent] = 0.5 + torch.rand(int(fires.sum()), generator=gen)
        with_child = fires & (torch.rand(n, generator=gen) < child_share)
        which = torch.randint(children, (n,), generator=gen)
        rows = with_child.nonzero().squeeze(1)
        codes[rows, torch.tensor(mine)[which[rows]]] = 0.5 + torch.rand(rows.numel(), generator=gen)
    return HierarchicalData(activations=codes @ directions, directions=directions, codes=codes, parents=parents, children=kids)


def absorption(data: HierarchicalData, features: Tensor, learned_rows: Tensor) -> float:
    """The share of child tokens on which the parent's latent stays silent, averaged over families: the parent's
    latent is the learned row closest to the parent's direction; a latent that absorbed the parent into a child
    fires on that child instead (Chanin et al. 2024's absorption, on ground truth)."""
    rows = learned_rows / learned_rows.norm(dim=1, keepdim=True).clamp_min(1e-8)
    shares = []
    for parent, children in zip(data.parents, data.children):
        latent = int((rows @ data.directions[parent]).argmax())
        child_tokens = (data.codes[:, children] > 0).any(1)
        shares.append(float((features[child_tokens, latent] == 0).float().mean()))
    return sum(shares) / len(shares)


@dataclass
class PairedData:
    """A transcoder's ground truth: each sample's features write ``inputs`` along ``reads`` and ``targets`` along
    ``writes``; with a skip, the inputs also carry dense noise in dimensions no feature reads, mapped linearly into the
    targets by ``skip``."""

    inputs: Tensor  # [n, d_in]
    targets: Tensor  # [n, d_out]
    reads: Tensor  # [features, d_in], unit rows
    writes: Tensor  # [features, d_out], unit rows: what a transcoder's decoder should find
    skip: Tensor | None  # [d_out, d_in]: zero on the features' dimensions
    codes: Tensor  # [n, features] the true coefficients


def make_paired_data(n: int, d_in: int = 32, d_out: int = 24, n_features: int = 128, mean_active: float = 4.0,
                     decay: float = 0.99, skip_dims: int = 0, seed: int = 0) -> PairedData:
    """Planted input-output pairs: the codes of ``make_sparse_data`` read through one set of unit directions and
    written through another (an MLP that is a sparse sum of features, the transcoder's premise). With ``skip_dims``
    the last that many input dimensions hold dense Gaussian noise that no feature reads, and the targets add a linear
    map of it (y = c·writes + x·Sᵀ with S zero outside those dimensions): a linear path no sparse code can stand in
    for."""
    gen = torch.Generator().manual_seed(seed)
    reads = torch.randn(n_features, d_in, generator=gen)
    reads[:, d_in - skip_dims:] = 0
    reads /= reads.norm(dim=1, keepdim=True)
    writes = torch.randn(n_features, d_out, generator=gen)
    writes /= writes.norm(dim=1, keepdim=True)
    codes = _power_law_codes(n, n_features, mean_active, decay, gen)
    inputs, targets = codes @ reads, codes @ writes
    linear = None
    if skip_dims:
        inputs[:, d_in - skip_dims:] = 0.5 * torch.randn(n, skip_dims, generator=gen)
        linear = torch.zeros(d_out, d_in)
        linear[:, d_in - skip_dims:] = torch.randn(d_out, skip_dims, generator=gen) / skip_dims ** 0.5
        targets = targets + inputs @ linear.T
    return PairedData(inputs, targets, reads, writes, linear, codes)


def code_recovery(codes: Tensor, features: Tensor) -> float:
    """For every true feature, the best Pearson correlation of its coefficients [n] with any learned latent's
    activations [n], averaged: recovery judged on what fires, for a transcoder whose skip path makes its decoder rows
    differ from the planted writes."""
    def standardised(a: Tensor) -> Tensor:
        a = a.float() - a.float().mean(0)
        return a / a.norm(dim=0).clamp_min(1e-8)
    return float((standardised(codes).T @ standardised(features)).max(dim=1).values.mean())
