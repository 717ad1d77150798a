"""Per-feature dashboard statistics (Bricken et al. 2023's feature pages), streamed over held-out contexts.

Three passes over the contexts, each holding only one batch of feature activations at a time:
1. density, mean and max activation, a histogram of activations (fixed log-spaced bins), the top-k tokens;
2. examples sampled across activation quantiles (intervals of each feature's own max), by random priority;
3. for every example kept, the token window around it with the feature's activation at each of its tokens.
Then what needs no data: logit effects through the direct path, nearest features by decoder cosine, and a
short label made from the top contexts. The BOS position is skipped everywhere, as in evaluation.

The tensors written, their shapes and meanings are defined in monosemantic/feature_stats.py (``LAYOUT``); they are
assembled here as a ``FeatureStatistics``, which checks them, and stored as ``features.safetensors``.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch
from pydantic import BaseModel, Field
from torch import Tensor

from monosemantic.feature_stats import FeatureStatistics
from monosemantic.lm import LoadedLM, direct_logit_extremes, read_activations, resolve_hook
from monosemantic.sae import SparseAutoencoder
from trainer.progress import progress as progress_bar

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
    seed: int = 0


@dataclass
class _Batches:
    lm: LoadedLM
    sae: SparseAutoencoder
    hook: str
    contexts: Tensor
    batch: int
    progress: bool

    def __iter__(self):
        """(first context index, features [b, T-1, d_sae]) per batch; position 0 (BOS) dropped."""
        point = resolve_hook(self.lm.model, self.hook)
        for start in progress_bar(range(0, self.contexts.shape[0], self.batch), desc="features", unit="batch",
                                  enabled=self.progress, leave=False):
            ids = self.contexts[start : start + self.batch]
            x = read_activations(self.lm.model, ids, point, attention_mask=torch.ones_like(ids))[:, 1:].float()
            yield start, self.sae.encode(x)


def _merge_top(values: Tensor, index: Tensor, new_values: Tensor, new_index: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Keep the k largest along dim 0 of the union."""
    all_values, all_index = torch.cat([values, new_values]), torch.cat([index, new_index])
    top = all_values.topk(min(k, all_values.shape[0]), dim=0)
    return top.values, all_index.gather(0, top.indices)


@torch.no_grad()
def feature_statistics(lm: LoadedLM, sae: SparseAutoencoder, hook: str, contexts: Tensor,
                       cfg: FeatureStatsConfig | None = None, progress: bool = True) -> tuple[dict[str, Tensor], list[str]]:
    """Everything a feature page shows, as tensors for features.safetensors (monosemantic/feature_stats.py's
    layout), plus one label per feature."""
    cfg = cfg or FeatureStatsConfig()
    sae = sae.float().eval()
    n, length = contexts.shape
    per_context = length - 1  # tokens counted per context (BOS dropped)
    d = sae.cfg.d_sae
    batches = _Batches(lm, sae, hook, contexts, cfg.batch_contexts, progress)
    bins = len(LOG10_ACTIVATION_EDGES) - 1

    # ---- pass 1: density, mean, max, histogram, top-k -----------------------------------------------------
    fires = torch.zeros(d, dtype=torch.float64)
    total = torch.zeros(d, dtype=torch.float64)
    max_act = torch.zeros(d)
    histogram = torch.zeros(d * bins, dtype=torch.int64)
    top_values = torch.zeros(0, d)
    top_index = torch.zeros(0, d, dtype=torch.long)  # global token index: context * per_context + position - 1
    for start, f in batches:
        flat = f.reshape(-1, d)
        fires += (flat > 0).sum(0).double()
        total += flat.sum(0).double()
        max_act = torch.maximum(max_act, flat.max(0).values)
        rows, feats = flat.nonzero(as_tuple=True)
        which = torch.bucketize(torch.log10(flat[rows, feats]), LOG10_ACTIVATION_EDGES[1:-1])
        histogram.index_add_(0, feats * bins + which, torch.ones_like(feats))
        k = min(cfg.top_k, flat.shape[0])
        batch_top = flat.topk(k, dim=0)
        top_values, top_index = _merge_top(top_values, top_index, batch_top.values, batch_top.indices + start * per_context, cfg.top_k)
    tokens = n * per_context
    density = (fires / max(tokens, 1)).float()

    # ---- pass 2: examples across activation quantiles ------------------------------------------------------
    q, m = cfg.quantile_bins, cfg.per_quantile
    generator = torch.Generator().manual_seed(cfg.seed)
    sample_keys = torch.full((m, d * q), -1.0)
    sample_index = torch.full((m, d * q), -1, dtype=torch.long)
    for start, f in batches:
        flat = f.reshape(-1, d)
        rows, feats = flat.nonzero(as_tuple=True)
        fraction = flat[rows, feats] / max_act[feats].clamp_min(1e-12)
        group = feats * q + (fraction * q).long().clamp_max(q - 1)
        keys = torch.rand(rows.shape[0], generator=generator)
        # one candidate per (feature, interval) per batch: the entry with the highest random key
        best = torch.full((d * q,), -1.0).scatter_reduce(0, group, keys, reduce="amax")
        winners = (keys == best[group]).nonzero(as_tuple=True)[0]
        cand_keys = torch.full((1, d * q), -1.0)
        cand_index = torch.full((1, d * q), -1, dtype=torch.long)
        cand_keys[0, group[winners]] = keys[winners]
        cand_index[0, group[winners]] = rows[winners] + start * per_context
        sample_keys, sample_index = _merge_top(sample_keys, sample_index, cand_keys, cand_index, m)

    # ---- pass 3: the window around every kept example, with the feature's activation at each token ---------
    top_feature = torch.arange(d).expand(top_index.shape[0], d)
    sample_feature = torch.arange(d * q).expand(m, d * q) // q
    examples_index = torch.cat([top_index.T.reshape(-1), sample_index.T.reshape(-1)])
    examples_feature = torch.cat([top_feature.T.reshape(-1), sample_feature.T.reshape(-1)])
    valid = examples_index >= 0
    window = torch.arange(-cfg.window_before, cfg.window_after + 1)
    w = window.numel()
    window_tokens = torch.full((examples_index.shape[0], w), -1, dtype=torch.long)
    window_acts = torch.zeros(examples_index.shape[0], w)
    context_of = torch.where(valid, examples_index // per_context, -1)
    position = examples_index % per_context + 1  # position in the context, BOS at 0
    positions = (position[:, None] + window[None, :])
    in_range = (positions >= 1) & (positions < length) & valid[:, None]
    for start, f in batches:
        end = start + f.shape[0]
        here = ((context_of >= start) & (context_of < end)).nonzero(as_tuple=True)[0]
        if here.numel() == 0:
            continue
        local = (context_of[here] - start)[:, None].expand(-1, w)
        pos = positions[here].clamp(1, length - 1)
        window_acts[here] = f[local, pos - 1, examples_feature[here][:, None].expand(-1, w)] * in_range[here]
        window_tokens[here] = torch.where(in_range[here], contexts[context_of[here][:, None], pos], -1)

    n_top = top_index.numel()
    shape_top, shape_sample = (d, top_index.shape[0], w), (d, q * m, w)
    token_dtype = torch.int16 if lm.model.get_output_embeddings().weight.shape[0] < 2**15 else torch.int32
    quantile_values = torch.zeros(d, q * m)
    sample_valid = sample_index.T.reshape(d, q, m).reshape(d, q * m) >= 0
    # the activation at the centre of each sampled window is the sampled value
    quantile_values = window_acts[n_top:].reshape(d, q * m, w)[:, :, cfg.window_before] * sample_valid

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
        top_tokens=window_tokens[:n_top].reshape(shape_top).to(token_dtype),
        top_acts=window_acts[:n_top].reshape(shape_top).half(),
        quantile_values=quantile_values.contiguous(),
        quantile_bins=(torch.arange(q * m) // m).int(),
        quantile_tokens=window_tokens[n_top:].reshape(shape_sample).to(token_dtype),
        quantile_acts=window_acts[n_top:].reshape(shape_sample).half(),
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
