"""Which features of dictionary A are the features of dictionary B: one-to-one, split (one of A ↔ several of B, the
feature families Bricken et al. 2023 follow from 512 to 131k features), merged (several of A ↔ one of B), or
without a counterpart.

Two scores between a feature a of A and b of B:
- `cosine`, of their decoder rows: only where both write into the same space (the same model and hook);
- `correlation`, Pearson's, of their activations over the same tokens: also across two models that read the same
  text (the paper's universality), and the one that says whether two features fire on the same things.
Matching takes, for every feature on each side, its best counterpart on the other (the highest score): a pair that
are each other's best is one-to-one; b's whose best is the same a, each at or above the threshold, are a's split
(and the mirror image a merge); a feature whose best is below the threshold has no counterpart. A feature that
never fires on the text has no correlation (it is reported dead). The full [n_a, n_b] score matrix is never held:
it is computed in blocks of A's features (a 16k × 65k matrix is 4.3 GB in float32) and each block keeps only the
best per row and per column.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Iterable, NamedTuple

import torch
from torch import Tensor

from monosemantic.errors import ConfigError

if TYPE_CHECKING:
    from monosemantic.bound import BoundDictionary
    from monosemantic.lm import LoadedLM

BLOCK_BYTES = 256 << 20  # one [block, n_b] block of scores held at a time


class BestMatches(NamedTuple):
    """Each feature's best counterpart on the other side and its score (NaN: no score, a dead feature)."""

    a_to_b: Tensor  # [n_a] long
    a_score: Tensor  # [n_a] float32
    b_to_a: Tensor  # [n_b] long
    b_score: Tensor  # [n_b] float32


class Pair(NamedTuple):
    a: int
    b: int
    score: float


class Family(NamedTuple):
    """One feature and its several counterparts on the other side, best first."""

    feature: int
    counterparts: list[Pair]


class Matching(NamedTuple):
    one_to_one: list[Pair]
    splits: list[Family]  # a feature of A and the B features it split into
    merges: list[Family]  # a feature of B and the A features merged into it
    loose: list[Pair]  # a's best b is at or above the threshold, but neither a pair nor a family (b's best is another a)
    unmatched_a: list[int]  # live features of A whose best counterpart scores below the threshold
    unmatched_b: list[int]
    dead_a: list[int]  # no correlation: they fire on too few tokens of the text (Codes.dead)
    dead_b: list[int]


def _blocks(n_a: int, n_b: int, block_bytes: int) -> Iterable[slice]:
    size = max(1, block_bytes // (4 * max(n_b, 1)))
    for start in range(0, n_a, size):
        yield slice(start, min(start + size, n_a))


def _best_over_blocks(n_a: int, n_b: int, score_block, block_bytes: int) -> BestMatches:
    """score_block(rows: slice) -> [rows, n_b] scores (NaN where undefined) → the per-row and per-column bests."""
    a_to_b, a_score = torch.zeros(n_a, dtype=torch.long), torch.full((n_a,), math.nan)
    b_to_a, b_score = torch.zeros(n_b, dtype=torch.long), torch.full((n_b,), -math.inf)
    for rows in _blocks(n_a, n_b, block_bytes):
        scores = score_block(rows).float()
        finite = scores.nan_to_num(nan=-math.inf)
        values, index = finite.max(1)
        a_to_b[rows], a_score[rows] = index, torch.where(torch.isinf(values), math.nan, values)
        values, index = finite.max(0)
        better = values > b_score
        b_score = torch.where(better, values, b_score)
        b_to_a = torch.where(better, index + rows.start, b_to_a)
    return BestMatches(a_to_b, a_score, b_to_a, torch.where(torch.isinf(b_score), math.nan, b_score))


def best_by_cosine(decoder_a: Tensor, decoder_b: Tensor, block_bytes: int = BLOCK_BYTES) -> BestMatches:
    """Best counterparts by the cosine of decoder rows [n_a, d] and [n_b, d] (the same space)."""
    if decoder_a.shape[1] != decoder_b.shape[1]:
        raise ConfigError(f"decoder rows of width {decoder_a.shape[1]} and {decoder_b.shape[1]}: not one space to compare in")
    a = torch.nn.functional.normalize(decoder_a.float(), dim=1)
    b = torch.nn.functional.normalize(decoder_b.float(), dim=1)
    return _best_over_blocks(a.shape[0], b.shape[0], lambda rows: a[rows] @ b.T, block_bytes)


class Codes:
    """A dictionary's feature activations over tokens, kept sparse (a chunk of tokens at a time), with the moments
    a correlation needs."""

    def __init__(self, n: int, min_firing: int = 1) -> None:
        self.n, self.chunks, self.tokens, self.min_firing = n, [], 0, min_firing
        self.sum = torch.zeros(n, dtype=torch.float64)
        self.sum_sq = torch.zeros(n, dtype=torch.float64)
        self.firing = torch.zeros(n, dtype=torch.long)

    def add(self, features: Tensor) -> None:
        """features [tokens, n] of one chunk."""
        features = features.float()
        self.sum += features.sum(0).double()
        self.sum_sq += features.square().sum(0).double()
        self.firing += (features != 0).sum(0)
        self.tokens += features.shape[0]
        self.chunks.append(features.to_sparse())

    @property
    def mean(self) -> Tensor:
        return self.sum / max(self.tokens, 1)

    @property
    def std(self) -> Tensor:
        return (self.sum_sq / max(self.tokens, 1) - self.mean.square()).clamp_min(0).sqrt()

    @property
    def dead(self) -> Tensor:
        """Features without a correlation: they fire on fewer than `min_firing` tokens (features that fire on the
        same one or two tokens correlate perfectly whatever they mean: on 2,032 tokens 50 of the reference's
        features, in 24 groups, matched each other exactly), or never vary."""
        return (self.firing < self.min_firing) | (self.std <= 1e-12)


def best_by_correlation(a: Codes, b: Codes, block_bytes: int = BLOCK_BYTES) -> BestMatches:
    """Best counterparts by the Pearson correlation of activations over the same tokens (a and b saw the same
    tokens, chunk by chunk); a dead feature (no variance) has none."""
    if a.tokens != b.tokens or len(a.chunks) != len(b.chunks):
        raise ConfigError(f"the two dictionaries' codes cover {a.tokens} and {b.tokens} tokens: not the same tokens")
    mean_a, mean_b, std_a, std_b = a.mean.float(), b.mean.float(), a.std.float(), b.std.float()
    std_a, std_b = torch.where(a.dead, math.nan, std_a), torch.where(b.dead, math.nan, std_b)

    def score(rows: slice) -> Tensor:
        moment = torch.zeros(rows.stop - rows.start, b.n)
        for chunk_a, chunk_b in zip(a.chunks, b.chunks):
            moment += chunk_a.to_dense()[:, rows].T @ chunk_b.to_dense()
        covariance = moment / a.tokens - mean_a[rows, None] * mean_b[None]
        return covariance / (std_a[rows, None] * std_b[None])

    return _best_over_blocks(a.n, b.n, score, block_bytes)


def classify(best: BestMatches, threshold: float) -> Matching:
    """One-to-one pairs, splits, merges and the features without a counterpart (module docstring)."""
    a_to_b, a_score, b_to_a, b_score = (t.tolist() for t in best)
    children: dict[int, list[Pair]] = {}
    for b, (a, s) in enumerate(zip(b_to_a, b_score)):
        if s >= threshold:  # NaN compares false: a dead b has no parent
            children.setdefault(a, []).append(Pair(a, b, s))
    parents: dict[int, list[Pair]] = {}
    for a, (b, s) in enumerate(zip(a_to_b, a_score)):
        if s >= threshold:
            parents.setdefault(b, []).append(Pair(a, b, s))
    one_to_one, loose = [], []
    for a, (b, s) in enumerate(zip(a_to_b, a_score)):
        if not s >= threshold or len(children.get(a, [])) > 1 or len(parents.get(b, [])) > 1:
            continue
        (one_to_one if b_to_a[b] == a and b_score[b] >= threshold else loose).append(Pair(a, b, s))
    by_score = lambda pairs: sorted(pairs, key=lambda p: (-p.score, p.a, p.b))  # noqa: E731
    splits = [Family(a, by_score(c)) for a, c in sorted(children.items()) if len(c) > 1]
    merges = [Family(b, by_score(p)) for b, p in sorted(parents.items()) if len(p) > 1]
    return Matching(
        one_to_one, splits, merges, loose,
        [a for a, s in enumerate(a_score) if s < threshold], [b for b, s in enumerate(b_score) if s < threshold],
        [a for a, s in enumerate(a_score) if math.isnan(s)], [b for b, s in enumerate(b_score) if math.isnan(s)])


BY = ("correlation", "cosine")


class Comparison(NamedTuple):
    by: str  # the score the matching used
    threshold: float
    n_a: int
    n_b: int
    tokens: int  # tokens the correlation was measured on (0 by cosine)
    matching: Matching
    best: BestMatches  # by `by`
    cosine: BestMatches | None  # by decoder cosine, where both write into one space (else None)

    def summary(self) -> dict:
        m = self.matching
        return {"by": self.by, "threshold": self.threshold, "features_a": self.n_a, "features_b": self.n_b, "tokens": self.tokens,
                "one_to_one": len(m.one_to_one), "split": len(m.splits), "split_into": sum(len(f.counterparts) for f in m.splits),
                "merged": len(m.merges), "merged_from": sum(len(f.counterparts) for f in m.merges), "loose": len(m.loose),
                "unmatched_a": len(m.unmatched_a), "unmatched_b": len(m.unmatched_b), "dead_a": len(m.dead_a), "dead_b": len(m.dead_b)}


@torch.no_grad()
def codes_on(lm: "LoadedLM", dictionary: "BoundDictionary", contexts: Tensor, batch: int = 8, min_firing: int = 1) -> Codes:
    """A bound dictionary's activations on contexts [n, ctx] (BOS first; its position is skipped), read from `lm`."""
    from monosemantic.lm import read_activations

    codes = Codes(dictionary.d_sae, min_firing)
    for start in range(0, contexts.shape[0], batch):
        ids = contexts[start:start + batch]
        x = read_activations(lm, ids, dictionary.hook, attention_mask=torch.ones_like(ids))[:, 1:].float()
        codes.add(dictionary.sae.encode(x.reshape(-1, x.shape[-1])))
    return codes


def same_space(a: "BoundDictionary", b: "BoundDictionary") -> bool:
    """Two bound dictionaries write into one space: the same model (weights checksum) and hook, the same width."""
    ma, mb = a.dictionary.manifest, b.dictionary.manifest
    return (ma.model.checksum == mb.model.checksum and a.hook.key == b.hook.key and a.sae.W_dec.shape[1] == b.sae.W_dec.shape[1])


def compare(a: "BoundDictionary", b: "BoundDictionary", *, lm_a: "LoadedLM | None" = None, lm_b: "LoadedLM | None" = None,
            contexts: Tensor | None = None, by: str = "correlation", threshold: float = 0.5,
            min_firing: int = 5, block_bytes: int = BLOCK_BYTES) -> Comparison:
    """Match the features of bound dictionaries `a` and `b`: by the correlation of their activations on `contexts`
    (read from `lm_a` and `lm_b`, which may be two models that share a tokenizer), or by decoder cosine (no text).
    By correlation a feature firing on fewer than `min_firing` tokens of the text is reported dead (Codes.dead)."""
    if by not in BY:
        raise ConfigError(f"by: {by!r}; expected one of {', '.join(BY)}")
    if not math.isfinite(threshold) or not -1 <= threshold <= 1:
        raise ConfigError(f"threshold: {threshold} is not a score between -1 and 1")
    cosine = best_by_cosine(a.sae.W_dec, b.sae.W_dec, block_bytes) if same_space(a, b) else None
    if by == "cosine":
        if cosine is None:
            raise ConfigError("by cosine: the two dictionaries do not write into one space (another model, hook or width); "
                             "compare them by correlation on the same text")
        return Comparison(by, threshold, a.d_sae, b.d_sae, 0, classify(cosine, threshold), cosine, cosine)
    if contexts is None or lm_a is None or lm_b is None:
        raise ConfigError("by correlation: give the text (contexts) and each dictionary's model")
    best = best_by_correlation(codes_on(lm_a, a, contexts, min_firing=min_firing), codes_on(lm_b, b, contexts, min_firing=min_firing), block_bytes)
    tokens = int(contexts[:, 1:].numel())
    return Comparison(by, threshold, a.d_sae, b.d_sae, tokens, classify(best, threshold), best, cosine)


def counterparts(a: "BoundDictionary", feature: int, b: "BoundDictionary", k: int = 3) -> list[Pair]:
    """Feature `feature` of `a`'s k closest features in `b` by decoder cosine, closest first (a feature page's
    counterparts in another loaded dictionary, and search from a feature of another dictionary); [] where the two
    do not write into one space."""
    if not same_space(a, b):
        return []
    scores = cosine_to(a.sae.W_dec[feature], b)
    top = scores.topk(min(k, scores.numel()))
    return [Pair(feature, int(i), float(s)) for s, i in zip(top.values, top.indices)]


def cosine_to(direction: Tensor, b: "BoundDictionary") -> Tensor:
    """[d_sae of b]: the cosine of each of b's decoder rows with `direction` [d]."""
    rows = b.sae.W_dec.float()
    return (rows @ direction.float()) / (rows.norm(dim=1) * direction.float().norm()).clamp_min(1e-12)
