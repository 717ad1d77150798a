"""Per-feature dashboard statistics (Bricken et al. 2023's feature pages), streamed over contexts.

Two passes, holding one batch of dense feature activations at a time:
1. over the contexts' activations: density, mean and max activation, a histogram of activations (fixed log-spaced
   bins), the top-k tokens;
2. over pass 1's active entries (kept while they fit `cache_mib`; else the activations are encoded again):
   examples sampled across activation quantiles (intervals of each feature's own max), by random priority.
Each example carries its token window, with the feature's activation at each of its tokens, from the batch it was
found in. The activations come from the model, run once, or from a harvest's shards without a model forward
(trainer/feature_activations.py). Then what needs no data: logit effects through the direct path, nearest features
by decoder cosine, and a short label made from the top contexts. The BOS position is skipped everywhere, as in
evaluation.

The tensors written, their shapes and meanings are defined in monosemantic/feature_stats.py (``LAYOUT``); they are
assembled here as a ``FeatureStatistics``, which checks them, and stored as ``features.safetensors``.
"""

from __future__ import annotations

from collections import Counter
from typing import Iterator, Literal, NamedTuple

import torch
from pydantic import BaseModel, Field
from torch import Tensor

from monosemantic.encoder import FastEncoder
from monosemantic.feature_stats import FeatureStatistics
from monosemantic.lm import LoadedLM, direct_logit_extremes
from monosemantic.precision import fastest_dtype
from monosemantic.sae import SparseAutoencoder
from monosemantic.support import Support
from monosemantic.top_products import top_products
from trainer.feature_activations import HarvestActivations, ModelActivations

CACHE_MIB = 4096  # pass 1's active entries kept for pass 2 up to this size; beyond it the activations are read twice
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
    cache_mib: int = Field(CACHE_MIB, ge=0, description="pass 1's active entries kept for pass 2 up to this size; beyond "
                                                         "it the activations are read (the model run) again")
    encode_dtype: Literal["auto", "bfloat16", "float32"] = "auto"
    seed: int = 0


def _windows(e: "_Encoded", rows: Tensor, features: Tensor, contexts: Tensor, per_context: int,
             window: Tensor) -> tuple[Tensor, Tensor]:
    """For examples at flat rows `rows` of a batch (-1: no example) of `features`: the feature's activation at each
    token of the window around it [..., w], and those tokens' ids (-1 outside the context), read from `contexts`
    (BOS at 0, so the batch's position p is the context's p + 1)."""
    valid = rows >= 0
    safe = rows.clamp_min(0)
    context, position = safe // per_context, safe % per_context
    positions = position[..., None] + window
    inside = (positions >= 0) & (positions < per_context) & valid[..., None]
    clamped = positions.clamp(0, per_context - 1)
    context = context[..., None].expand_as(positions)
    acts = e.at(context * per_context + clamped, features[..., None].expand_as(positions)) * inside
    tokens = torch.where(inside, contexts[e.start + context, clamped + 1], -1)
    return acts, tokens


class _Encoded(NamedTuple):
    """One batch's features: its active entries, and the dense [rows, d_sae] block while it is being encoded (None
    for entries kept from pass 1, which are looked up instead)."""

    start: int  # the batch's first context
    keys: Tensor  # [nnz] row * d_sae + feature, ascending (row: context * P + position within the batch)
    values: Tensor  # [nnz] float32, > 0
    tokens: int  # positions counted
    d_sae: int
    dense: Tensor | None = None

    @property
    def rows(self) -> Tensor:
        return self.keys // self.d_sae

    @property
    def cols(self) -> Tensor:
        return self.keys % self.d_sae

    def at(self, rows: Tensor, cols: Tensor) -> Tensor:
        """The activations at (row, feature) pairs of any shape, 0 where inactive."""
        if self.dense is not None:
            return self.dense[rows, cols].float()
        if self.keys.numel() == 0:
            return torch.zeros(rows.shape)
        wanted = rows * self.d_sae + cols
        where = torch.searchsorted(self.keys, wanted).clamp_max(self.keys.numel() - 1)
        return torch.where(self.keys[where] == wanted, self.values[where], 0.0)

    def kept(self) -> "_Encoded":
        return self._replace(dense=None)

    @property
    def nbytes(self) -> int:
        return self.keys.numel() * (self.keys.element_size() + self.values.element_size())


def _top_entries(e: _Encoded, d: int, k: int) -> tuple[Tensor, Tensor]:
    """Each feature's k largest active entries in the batch, [k, d] values (0 where it has fewer) and flat rows
    (-1 there); equal values keep the earlier position."""
    by_value = e.values.argsort(descending=True, stable=True)
    order = by_value[e.cols[by_value].argsort(stable=True)]  # grouped by feature, largest first within it
    cols = e.cols[order]
    starts = torch.bincount(cols, minlength=d).cumsum(0) - torch.bincount(cols, minlength=d)
    rank = torch.arange(cols.numel()) - starts[cols]
    keep = rank < k
    values, rows = torch.zeros(k, d), torch.full((k, d), -1, dtype=torch.long)
    values[rank[keep], cols[keep]] = e.values[order[keep]]
    rows[rank[keep], cols[keep]] = e.rows[order[keep]]
    return values, rows


def _encode_dtype(requested: str, sae: SparseAutoencoder) -> torch.dtype:
    """The encoder matmul's dtype: as the service reads activations (auto: bfloat16 where this machine multiplies
    it faster, monosemantic.precision), so a feature page's values are the ones /v1/activations answers."""
    if requested != "auto":
        return getattr(torch, requested)
    return fastest_dtype(sae.cfg.d_in, sae.cfg.d_sae, str(sae.W_enc.device))


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
                       activations: ModelActivations | HarvestActivations | None = None,
                       hook_out: str | None = None) -> tuple[dict[str, Tensor], list[str]]:
    """Everything a feature page shows, as tensors for features.safetensors (monosemantic/feature_stats.py's
    layout), plus one label per feature: over `contexts` [n, T] read from the model at `hook`, or over the
    contexts of `activations` (a harvest's shards) when given. ``hook_out``: where a transcoder writes, so its
    decoder rows' logit effects are taken from there."""
    cfg = cfg or FeatureStatsConfig()
    if activations is None:
        activations = ModelActivations(lm, hook, contexts, progress)
    contexts = activations.contexts
    sae = sae.float().eval()
    n, length = contexts.shape
    per_context = length - 1  # positions per context (BOS dropped)
    d = sae.cfg.d_sae
    bins = len(LOG10_ACTIVATION_EDGES) - 1
    window = torch.arange(-cfg.window_before, cfg.window_after + 1)
    w = window.numel()
    features = torch.arange(d)

    encoder = FastEncoder(sae, _encode_dtype(cfg.encode_dtype, sae))

    def encoded(desc: str) -> Iterator[_Encoded]:
        for batch in activations.batches(cfg.batch_contexts, desc):
            b = batch.x.shape[0]
            f = encoder.encode(batch.x.reshape(-1, batch.x.shape[-1]))  # a reused buffer, valid until the next batch
            if batch.counted is not None:  # positions a harvest left out count as not firing
                f[~batch.counted.reshape(-1)] = 0
            support = Support.from_mask(f)
            counted = b * per_context if batch.counted is None else int(batch.counted.sum())
            yield _Encoded(batch.start, support.rows * d + support.cols, f[support.rows, support.cols].float(), counted, d, f)

    # ---- pass 1: density, mean, max, histogram, top-k with their windows -------------------------------------
    # From the active entries alone (an L0 of ~30 of 24,576 features): the dense [tokens, d_sae] reductions cost
    # 3.5 s a batch at GPT-2's shape, the entries' a few ms (bench/dashboards.py).
    fires = torch.zeros(d, dtype=torch.float64)
    total = torch.zeros(d, dtype=torch.float64)
    max_act = torch.zeros(d)
    histogram = torch.zeros(d * bins, dtype=torch.int64)
    tokens = 0
    top_values = torch.zeros(0, d)
    # global token index (context * per_context + position - 1; -1: none), window activations, window token ids
    top: tuple[Tensor, ...] = (torch.zeros(0, d, dtype=torch.long), torch.zeros(0, d, w), torch.zeros(0, d, w, dtype=torch.long))
    # Pass 1's active entries (12 bytes each: 380 MB for 1M tokens at an L0 of 32) are kept for pass 2, so the
    # activations are read, and the model run, once; past cache_mib pass 2 encodes them again.
    kept: list[_Encoded] | None = []
    kept_bytes = 0
    for e in encoded("features 1/2"):
        kept_bytes += e.nbytes
        if kept is not None and kept_bytes <= cfg.cache_mib * 2**20:
            kept.append(e.kept())
        else:
            kept = None
        tokens += e.tokens
        fires += torch.bincount(e.cols, minlength=d).double()
        total += torch.bincount(e.cols, weights=e.values.double(), minlength=d)
        max_act = max_act.scatter_reduce(0, e.cols, e.values, reduce="amax")
        which = torch.bucketize(torch.log10(e.values), LOG10_ACTIVATION_EDGES[1:-1])
        histogram.index_add_(0, e.cols * bins + which, torch.ones_like(e.cols))
        batch_values, batch_rows = _top_entries(e, d, cfg.top_k)
        acts, ids = _windows(e, batch_rows, features.expand_as(batch_rows), contexts, per_context, window)
        found = (torch.where(batch_rows >= 0, batch_rows + e.start * per_context, -1), acts, ids)
        top_values, top = _merge_top(top_values, top, batch_values, found, cfg.top_k)
    density = (fires / max(tokens, 1)).float()

    # ---- pass 2: examples across activation quantiles, with their windows -------------------------------------
    q, m = cfg.quantile_bins, cfg.per_quantile
    generator = torch.Generator().manual_seed(cfg.seed)
    sample_keys = torch.full((m, d * q), -1.0)
    sample_feature = torch.arange(d * q) // q
    sampled: tuple[Tensor, ...] = (torch.full((m, d * q), -1, dtype=torch.long), torch.zeros(m, d * q, w),
                                   torch.full((m, d * q, w), -1, dtype=torch.long))
    for e in kept if kept is not None else encoded("features 2/2"):
        fraction = e.values / max_act[e.cols].clamp_min(1e-12)
        group = e.cols * q + (fraction * q).long().clamp_max(q - 1)
        keys = torch.rand(e.rows.shape[0], generator=generator)
        # one candidate per (feature, interval) per batch: the entry with the highest random key
        best = torch.full((d * q,), -1.0).scatter_reduce(0, group, keys, reduce="amax")
        winners = (keys == best[group]).nonzero(as_tuple=True)[0]
        cand_keys = torch.full((1, d * q), -1.0)
        cand_rows = torch.full((1, d * q), -1, dtype=torch.long)
        cand_keys[0, group[winners]] = keys[winners]
        cand_rows[0, group[winners]] = e.rows[winners]
        acts, ids = _windows(e, cand_rows, sample_feature[None], contexts, per_context, window)
        found = (torch.where(cand_rows >= 0, cand_rows + e.start * per_context, -1), acts, ids)
        sample_keys, sampled = _merge_top(sample_keys, sampled, cand_keys, found, m)
    encoder.release()

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
    # not be allocated at Gemma-2's (16,384 × 256,000). Ranked in the encoder's dtype, the values exact in float32.
    extremes = direct_logit_extremes(lm.model, hook_out or hook, sae.W_dec.detach(), cfg.logit_k, screen_dtype=encoder.dtype)
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
        **_neighbours(sae, cfg.neighbours, encoder.dtype),
    )
    labels = [label_feature(statistics, i, lm.tokenizer) for i in range(d)]
    return statistics.to_tensors(), labels


def _neighbours(sae: SparseAutoencoder, k: int, screen_dtype: torch.dtype) -> dict[str, Tensor]:
    """The k features whose decoder directions are closest in cosine (excluding the feature itself)."""
    directions = torch.nn.functional.normalize(sae.W_dec.detach().float(), dim=-1)
    near = top_products(directions, directions, k, screen_dtype=screen_dtype, exclude_self=True)
    return {"neighbour_ids": near.indices.int(), "neighbour_cosines": near.values}


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
