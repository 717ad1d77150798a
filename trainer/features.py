"""Per-feature dashboard statistics (Bricken et al. 2023's feature pages), streamed over contexts.

Two passes over the contexts' activations, each holding only one batch of feature activations at a time:
1. density, mean and max activation, a histogram of activations (fixed log-spaced bins), the top-k tokens;
2. examples sampled across activation quantiles (intervals of each feature's own max), by random priority.
Each example carries its token window, with the feature's activation at each of its tokens, from the batch it was
found in (so no third pass is needed to fetch them). The activations come from the model, run once (kept for the
second pass while they fit `cache_mib`), or from a harvest's shards without a model forward
(trainer/feature_activations.py). Then what needs no data: logit effects through the direct path, nearest features
by decoder cosine, and a short label made from the top contexts. The BOS position is skipped everywhere, as in
evaluation.

The tensors written, their shapes and meanings are defined in monosemantic/feature_stats.py (``LAYOUT``); they are
assembled here as a ``FeatureStatistics``, which checks them, and stored as ``features.safetensors``.
"""

from __future__ import annotations

from collections import Counter

import torch
from pydantic import BaseModel, Field
from torch import Tensor

from monosemantic.feature_stats import FeatureStatistics
from monosemantic.lm import LoadedLM, direct_logit_extremes
from monosemantic.sae import SparseAutoencoder
from trainer.feature_activations import CACHE_MIB, HarvestActivations, ModelActivations

LOG10_ACTIVATION_EDGES = torch.linspace(-2.0, 2.0, 41)  # activations 0.01 … 100, 40 bins; the ends catch the rest


class FeatureStatsConfig(BaseModel):
    top_k: int = Field(10, ge=1, description="top activating examples kept per feature")
    quantile_bins: int = Field(4, ge=1, description="activation intervals (fractions of the feature's max) sampled")
    per_quantile: int = Field(3, ge=1, description="examples sampled in each interval")
    window_before: int = Field(8, ge=0)
    window_after: int = Field(3, ge=0)
    logit_k: int = Field(10, ge=1)
    neighbours: int = Field(5, ge=1)
    batch_contexts: int = Field(16, ge=1)
    cache_mib: int = Field(CACHE_MIB, ge=0, description="the model's activations kept between the passes up to this size")
    seed: int = 0


def _windows(f: Tensor, rows: Tensor, features: Tensor, contexts: Tensor, start: int, window: Tensor) -> tuple[Tensor, Tensor]:
    """For examples at flat rows `rows` of a batch's features f [b, P, d] (-1: no example) of `features`: the
    feature's activation at each token of the window around it [..., w], and those tokens' ids (-1 outside the
    context), read from `contexts` (BOS at 0, so the batch's position p is the context's p + 1)."""
    per_context = f.shape[1]
    valid = rows >= 0
    safe = rows.clamp_min(0)
    context, position = safe // per_context, safe % per_context
    positions = position[..., None] + window
    inside = (positions >= 0) & (positions < per_context) & valid[..., None]
    clamped = positions.clamp(0, per_context - 1)
    context = context[..., None].expand_as(positions)
    acts = f[context, clamped, features[..., None].expand_as(positions)] * inside
    tokens = torch.where(inside, contexts[start + context, clamped + 1], -1)
    return acts, tokens


def _merge_top(values: Tensor, carried: tuple[Tensor, ...], new_values: Tensor, new_carried: tuple[Tensor, ...],
               k: int) -> tuple[Tensor, tuple[Tensor, ...]]:
    """Keep the k largest along dim 0 of the union of [k, d] values, with what each carries ([k, d, ...])."""
    all_values = torch.cat([values, new_values])
    top = all_values.topk(min(k, all_values.shape[0]), dim=0)
    kept = []
    for old, new in zip(carried, new_carried):
        both = torch.cat([old, new])
        index = top.indices.reshape(*top.indices.shape, *([1] * (both.ndim - 2))).expand(-1, -1, *both.shape[2:])
        kept.append(both.gather(0, index))
    return top.values, tuple(kept)


@torch.no_grad()
def feature_statistics(lm: LoadedLM, sae: SparseAutoencoder, hook: str, contexts: Tensor | None = None,
                       cfg: FeatureStatsConfig | None = None, progress: bool = True,
                       activations: ModelActivations | HarvestActivations | None = None) -> tuple[dict[str, Tensor], list[str]]:
    """Everything a feature page shows, as tensors for features.safetensors (monosemantic/feature_stats.py's
    layout), plus one label per feature: over `contexts` [n, T] read from the model at `hook`, or over the
    contexts of `activations` (a harvest's shards) when given."""
    cfg = cfg or FeatureStatsConfig()
    if activations is None:
        activations = ModelActivations(lm, hook, contexts, cfg.cache_mib, progress)
    contexts = activations.contexts
    sae = sae.float().eval()
    n, length = contexts.shape
    per_context = length - 1  # positions per context (BOS dropped)
    d = sae.cfg.d_sae
    bins = len(LOG10_ACTIVATION_EDGES) - 1
    window = torch.arange(-cfg.window_before, cfg.window_after + 1)
    w = window.numel()
    features = torch.arange(d)

    def encoded(desc: str):
        for batch in activations.batches(cfg.batch_contexts, desc):
            f = sae.encode(batch.x)
            if batch.counted is not None:  # positions a harvest left out count as not firing
                f = f * batch.counted[..., None]
            yield batch, f

    # ---- pass 1: density, mean, max, histogram, top-k with their windows -------------------------------------
    fires = torch.zeros(d, dtype=torch.float64)
    total = torch.zeros(d, dtype=torch.float64)
    max_act = torch.zeros(d)
    histogram = torch.zeros(d * bins, dtype=torch.int64)
    tokens = 0
    top_values = torch.zeros(0, d)
    # global token index (context * per_context + position - 1), window activations, window token ids
    top: tuple[Tensor, ...] = (torch.zeros(0, d, dtype=torch.long), torch.zeros(0, d, w), torch.zeros(0, d, w, dtype=torch.long))
    for batch, f in encoded("features 1/2"):
        flat = f.reshape(-1, d)
        tokens += flat.shape[0] if batch.counted is None else int(batch.counted.sum())
        fires += (flat > 0).sum(0).double()
        total += flat.sum(0).double()
        max_act = torch.maximum(max_act, flat.max(0).values)
        rows, feats = flat.nonzero(as_tuple=True)
        which = torch.bucketize(torch.log10(flat[rows, feats]), LOG10_ACTIVATION_EDGES[1:-1])
        histogram.index_add_(0, feats * bins + which, torch.ones_like(feats))
        batch_top = flat.topk(min(cfg.top_k, flat.shape[0]), dim=0)
        acts, ids = _windows(f, batch_top.indices, features.expand_as(batch_top.indices), contexts, batch.start, window)
        found = (batch_top.indices + batch.start * per_context, acts, ids)
        top_values, top = _merge_top(top_values, top, batch_top.values, found, cfg.top_k)
    density = (fires / max(tokens, 1)).float()

    # ---- pass 2: examples across activation quantiles, with their windows -------------------------------------
    q, m = cfg.quantile_bins, cfg.per_quantile
    generator = torch.Generator().manual_seed(cfg.seed)
    sample_keys = torch.full((m, d * q), -1.0)
    sample_feature = torch.arange(d * q) // q
    sampled: tuple[Tensor, ...] = (torch.full((m, d * q), -1, dtype=torch.long), torch.zeros(m, d * q, w),
                                   torch.full((m, d * q, w), -1, dtype=torch.long))
    for batch, f in encoded("features 2/2"):
        flat = f.reshape(-1, d)
        rows, feats = flat.nonzero(as_tuple=True)
        fraction = flat[rows, feats] / max_act[feats].clamp_min(1e-12)
        group = feats * q + (fraction * q).long().clamp_max(q - 1)
        keys = torch.rand(rows.shape[0], generator=generator)
        # one candidate per (feature, interval) per batch: the entry with the highest random key
        best = torch.full((d * q,), -1.0).scatter_reduce(0, group, keys, reduce="amax")
        winners = (keys == best[group]).nonzero(as_tuple=True)[0]
        cand_keys = torch.full((1, d * q), -1.0)
        cand_rows = torch.full((1, d * q), -1, dtype=torch.long)
        cand_keys[0, group[winners]] = keys[winners]
        cand_rows[0, group[winners]] = rows[winners]
        acts, ids = _windows(f, cand_rows, sample_feature[None], contexts, batch.start, window)
        found = (torch.where(cand_rows >= 0, cand_rows + batch.start * per_context, -1), acts, ids)
        sample_keys, sampled = _merge_top(sample_keys, sampled, cand_keys, found, m)

    top_index, top_acts, top_tokens = top
    sample_index, sample_acts, sample_tokens = sampled
    token_dtype = torch.int16 if lm.model.get_output_embeddings().weight.shape[0] < 2**15 else torch.int32
    # [k, d, w] -> [d, k, w]; the samples [m, d * q, w] -> [d, q * m, w], interval-major as quantile_bins says
    by_feature = lambda t: t.transpose(0, 1).contiguous()  # noqa: E731
    by_interval = lambda t: t.transpose(0, 1).reshape(d, q, m, *t.shape[2:]).reshape(d, q * m, *t.shape[2:])  # noqa: E731
    sample_valid = by_interval(sample_index) >= 0
    quantile_acts = by_interval(sample_acts)
    # the activation at the centre of each sampled window is the sampled value
    quantile_values = quantile_acts[:, :, cfg.window_before] * sample_valid

    # Chunked over features: the whole [d_sae, vocab] matrix was 4.9 GB at GPT-2's shape (24,576 × 50,257) and could
    # not be allocated at Gemma-2's (16,384 × 256,000).
    extremes = direct_logit_extremes(lm.model, hook, sae.W_dec.detach(), cfg.logit_k)
    logits: dict[str, Tensor] = {}
    if extremes is not None:
        logits = {"logit_up_ids": extremes.up_ids.int(), "logit_up_values": extremes.up_values,
                  "logit_down_ids": extremes.down_ids.int(), "logit_down_values": extremes.down_values}
    statistics = FeatureStatistics(
        density=density,
        mean_activation=(total / fires.clamp_min(1)).float(),
        max_activation=max_act,
        histogram_counts=histogram.reshape(d, bins).int(),
        histogram_log10_edges=LOG10_ACTIVATION_EDGES.clone(),
        top_values=top_values.T.contiguous(),
        top_tokens=by_feature(top_tokens).to(token_dtype),
        top_acts=by_feature(top_acts).half(),
        quantile_values=quantile_values.contiguous(),
        quantile_bins=(torch.arange(q * m) // m).int(),
        quantile_tokens=by_interval(sample_tokens).to(token_dtype),
        quantile_acts=quantile_acts.half(),
        window_offsets=window.int(),
        stats_tokens=torch.tensor([tokens], dtype=torch.int64),
        **logits,
        **_neighbours(sae, cfg.neighbours),
    )
    labels = [label_feature(statistics, i, lm.tokenizer) for i in range(d)]
    return statistics.to_tensors(), labels


def _neighbours(sae: SparseAutoencoder, k: int, chunk: int = 1024) -> dict[str, Tensor]:
    """The k features whose decoder directions are closest in cosine (excluding the feature itself)."""
    directions = torch.nn.functional.normalize(sae.W_dec.detach().float(), dim=-1)
    ids, cosines = [], []
    for start in range(0, directions.shape[0], chunk):
        sims = directions[start : start + chunk] @ directions.T
        sims[torch.arange(sims.shape[0]), torch.arange(start, start + sims.shape[0])] = -2.0
        top = sims.topk(k, dim=-1)
        ids.append(top.indices.int())
        cosines.append(top.values)
    return {"neighbour_ids": torch.cat(ids), "neighbour_cosines": torch.cat(cosines)}


def label_feature(statistics: FeatureStatistics, feature: int, tokenizer) -> str:
    """A short label from the top examples, no model involved. The token at the centre of each top window
    (where the feature peaks) is counted: one token in at least half of them gives `"tok"`; otherwise a shared
    preceding token gives `after "tok"`; otherwise the three most common centre tokens. A feature that never
    fired is labelled "dead"."""
    if float(statistics.max_activation[feature]) <= 0:
        return "dead"
    before = statistics.centre
    windows = statistics.top_tokens[feature].long()
    present = statistics.top_values[feature] > 0
    centres = [int(t) for t in windows[present, before] if t >= 0]
    if not centres:
        return "dead"
    text = lambda ids: tokenizer.decode(ids).replace("\n", "⏎")  # noqa: E731
    common = Counter(centres).most_common(3)
    if common[0][1] * 2 >= len(centres):
        return f'"{text([common[0][0]])}"'
    if before:
        previous = Counter(int(t) for t in windows[present, before - 1] if t >= 0).most_common(1)
        if previous and previous[0][1] * 2 >= len(centres):
            return f'after "{text([previous[0][0]])}"'
    return " / ".join(f'"{text([token])}"' for token, _ in common)
