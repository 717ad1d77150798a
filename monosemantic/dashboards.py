"""Feature pages, feature lists and feature search over the statistics stored with a dictionary (their layout:
monosemantic/feature_stats.py; computed by trainer/features.py)."""

from __future__ import annotations

import torch
from torch import Tensor

from monosemantic.bound import BoundDictionary
from monosemantic.explanations import ExplanationIndex
from monosemantic.feature_stats import FeatureStatistics
from monosemantic.model import Model

def has_statistics(dictionary: BoundDictionary) -> bool:
    return dictionary.statistics is not None and dictionary.statistics.has_pages


def how_to_compute(dictionary: BoundDictionary) -> str:
    m = dictionary.dictionary.manifest
    return (f"dictionary {m.name} v{m.version} has no feature statistics; compute them with "
            f"`monosemantic-train features --registry REGISTRY --dictionary {m.name}:{m.version}` and reload the new version")


def _stats(dictionary: BoundDictionary) -> FeatureStatistics:
    """The statistics of a dictionary the caller checked with has_statistics."""
    assert dictionary.statistics is not None
    return dictionary.statistics


def window_examples(token_text, tokens: Tensor, acts: Tensor, values: Tensor, centre: int, quantiles: Tensor | None) -> list[dict]:
    """A feature's stored windows as examples (token ids and text, activations, the interval each was sampled from),
    the slots never filled (value 0) left out; ``token_text(id)`` renders a token. Feature pages and the explainer's
    prompts (monosemantic/explain.py) both read them through here."""
    out = []
    for i in range(tokens.shape[0]):
        if float(values[i]) <= 0:
            continue
        ids = tokens[i].long()
        keep = ids >= 0
        first = int(keep.long().argmax())  # windows are clipped at the context's start: drop the padding
        ids, activations = ids[keep].tolist(), acts[i][keep].float().tolist()
        out.append({
            "value": float(values[i]), "centre": centre - first, "token_ids": ids,
            "tokens": [token_text(t) for t in ids], "activations": activations,
            "quantile": None if quantiles is None else int(quantiles[i]),
        })
    return out


def _logits(model: Model, ids: Tensor, values: Tensor) -> list[dict]:
    return [{"id": int(i), "token": model.token_text(int(i)), "value": float(v)} for i, v in zip(ids, values)]


def feature_page(model: Model, dictionary: BoundDictionary, feature: int) -> dict:
    """Everything the dashboard shows for one feature, tokens rendered to text."""
    t = _stats(dictionary)
    labels = dictionary.labels
    centre = t.centre
    page = {
        "feature": feature,
        "label": labels[feature] if labels else "",
        "density": float(t.density[feature]),
        "mean_activation": float(t.mean_activation[feature]),
        "max_activation": float(t.max_activation[feature]),
        "histogram": {"log10_edges": t.histogram_log10_edges.tolist(), "counts": t.histogram_counts[feature].tolist()}
        if t.histogram_counts is not None else {"log10_edges": [], "counts": []},
        "top_examples": window_examples(model.token_text, t.top_tokens[feature], t.top_acts[feature], t.top_values[feature], centre, None),
        "quantile_examples": window_examples(model.token_text, t.quantile_tokens[feature], t.quantile_acts[feature], t.quantile_values[feature],
                                       centre, t.quantile_bins) if t.quantile_tokens is not None else [],
        "logit_up": _logits(model, t.logit_up_ids[feature], t.logit_up_values[feature]) if t.logit_up_ids is not None else [],
        "logit_down": _logits(model, t.logit_down_ids[feature], t.logit_down_values[feature]) if t.logit_down_ids is not None else [],
        "neighbours": [
            {"feature": int(n), "cosine": float(c), "label": labels[int(n)] if labels else ""}
            for n, c in zip(t.neighbour_ids[feature], t.neighbour_cosines[feature])
        ] if t.neighbour_ids is not None else [],
        "statistics_tokens": t.tokens or 0,
    }
    return page


def token_scores(dictionary: BoundDictionary, token_ids: list[int]) -> Tensor:
    """[d_sae] scores: the share of a feature's top examples that peak on one of the tokens, plus 0.5 when one
    of them is among the tokens its decoder direction raises most."""
    t = _stats(dictionary)
    peaks = t.top_tokens[:, :, t.centre].long()
    present = t.top_values > 0
    wanted = torch.tensor(token_ids, dtype=torch.long)
    hits = (torch.isin(peaks, wanted) & present).sum(-1).float() / present.sum(-1).clamp_min(1)
    if t.logit_up_ids is not None:
        hits = hits + 0.5 * torch.isin(t.logit_up_ids.long(), wanted).any(-1).float()
    return hits


def snippet_scores(dictionary: BoundDictionary, peak: Tensor) -> Tensor:
    """[d_sae]: a feature's highest activation on the snippet relative to its own max over the statistics."""
    max_activation = _stats(dictionary).max_activation
    return torch.where(max_activation > 0, peak / max_activation.clamp_min(1e-12), torch.zeros_like(peak))


def summaries(dictionary: BoundDictionary, ids: Tensor, explained: ExplanationIndex | None = None) -> list[dict]:
    """One line per feature: id, label, density, max activation and its best explanation (a list, a search hit)."""
    t, labels = _stats(dictionary), dictionary.labels

    def best(f: int) -> str:
        found = explained.best(f) if explained is not None else None
        return found.explanation if found is not None else ""

    return [{"feature": int(f), "label": labels[int(f)] if labels else "", "density": float(t.density[f]),
             "max_activation": float(t.max_activation[f]), "explanation": best(int(f))} for f in ids]


def explanations(explained: ExplanationIndex | None, feature: int) -> list[dict]:
    """A feature page's explanations, best-scoring first."""
    if explained is None:
        return []
    return [{**e._asdict(), **{kind: getattr(e, kind).model_dump() if getattr(e, kind) else None for kind in ("detection", "fuzzing", "simulation")}}
            for e in explained.by_feature.get(feature, [])]


def feature_order(dictionary: BoundDictionary, order: str, seed: int = 0) -> Tensor:
    """Feature ids in a browsing order: `density` (most often firing first, ties by id), `label` (labelled features
    alphabetically, case-blind, then the unlabelled by id), `id`, or `random` (the live features, density > 0, in
    an order drawn from `seed`)."""
    density = _stats(dictionary).density.float()
    ids = torch.arange(density.numel())
    if order == "density":
        return density.argsort(descending=True, stable=True)
    if order == "label":
        labels = dictionary.labels
        return torch.tensor(sorted((int(i) for i in ids), key=lambda i: (not labels or not labels[i], labels[i].casefold() if labels else "", i)),
                            dtype=torch.long)
    if order == "random":
        live = ids[density > 0]
        return live[torch.randperm(live.numel(), generator=torch.Generator().manual_seed(seed))]
    return ids
