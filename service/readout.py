"""Feature activations for a batch of token sequences: one padded forward to the hook, one SAE encode."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from monosemantic.lm import read_activations
from service.loaded import Loaded


@dataclass
class SequenceReadout:
    """Per-token results for one sequence, as plain tensors (the engine turns them into a response)."""

    l0: Tensor  # [T] int
    recon_error: Tensor  # [T] float
    top_values: Tensor  # [T, min(k, the batch's largest L0)], zero-padded where a token has fewer active
    top_ids: Tensor  # [T, same]
    values: Tensor | None  # [T, len(feature_ids)]
    watched: Tensor | None = None  # [T, len(watch)] the monitored features' values
    squared_error: Tensor | None = None  # [T] ||x - x_hat||²
    squared_norm: Tensor | None = None  # [T] ||x||²


def hook_activations(loaded: Loaded, sequences: list[list[int]]) -> list[Tensor]:
    """The activation at the dictionary's hook for each sequence, [T_i, d_in], from one right-padded forward.

    Right padding keeps every real token at its own position (position ids count from 0), and causal attention
    never looks at the padding that follows, so each row equals the sequence's forward on its own.
    """
    longest = max(len(s) for s in sequences)
    pad = loaded.lm.tokenizer.pad_token_id or 0
    ids = torch.full((len(sequences), longest), pad, dtype=torch.long)
    mask = torch.zeros((len(sequences), longest), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[row, : len(seq)] = 1
    acts = read_activations(loaded.lm, ids, loaded.hook, attention_mask=mask, stop_at_hook=True)
    return [acts[row, : len(seq)].float() for row, seq in enumerate(sequences)]


def read_features(
    loaded: Loaded, sequences: list[list[int]], top_k: list[int], feature_ids: list[list[int] | None], watch: list[int] | None = None
) -> list[SequenceReadout]:
    """Top-k features, L0, relative reconstruction error and requested dense values for every token."""
    acts = hook_activations(loaded, sequences)
    flat = torch.cat(acts)
    features = loaded.encoder.encode(flat)
    active = loaded.encoder.sparse_readout(features)
    l0 = active.l0
    squared_error = (flat - active.reconstruction).pow(2).sum(-1)
    squared_norm = flat.pow(2).sum(-1)
    rel_error = (squared_error / squared_norm.clamp_min(1e-24)).sqrt()
    watched = features[:, watch].float() if watch else None
    top_values, top_ids = active.top_k(max(top_k, default=0))
    out, start = [], 0
    for seq, k, wanted in zip(sequences, top_k, feature_ids):
        end = start + len(seq)
        values = features[start:end, wanted].float() if wanted else None
        out.append(SequenceReadout(
            l0[start:end], rel_error[start:end], top_values[start:end, :k], top_ids[start:end, :k], values,
            None if watched is None else watched[start:end], squared_error[start:end], squared_norm[start:end],
        ))
        start = end
    return out
