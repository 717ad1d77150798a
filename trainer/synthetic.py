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
    probs = decay ** torch.arange(n_features, dtype=torch.float32)
    probs = (probs * mean_active / probs.sum()).clamp(max=1.0)
    fires = torch.rand(n, n_features, generator=gen) < probs
    codes = fires * torch.rand(n, n_features, generator=gen)
    return SyntheticData(activations=codes @ directions, directions=directions, mean_l0=float(fires.sum(1).float().mean()))


def mean_max_cosine(true_directions: Tensor, learned_rows: Tensor) -> float:
    """MMCS(G→D): for every true direction, the best cosine with any learned row, averaged."""
    g = true_directions / true_directions.norm(dim=1, keepdim=True)
    d = learned_rows / learned_rows.norm(dim=1, keepdim=True).clamp_min(1e-8)
    return float((g @ d.t()).max(dim=1).values.mean())
