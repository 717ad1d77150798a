"""What ``steer-eval`` and ``compare`` run: a published dictionary's steering curves (monosemantic/steer_eval.py) on
held-out text, the matching of two dictionaries' features (monosemantic/compare.py), and their readable tables."""

from __future__ import annotations

from pathlib import Path

from monosemantic.artifact import load_dictionary, parse_reference
from monosemantic.bound import BoundDictionary, bind
from monosemantic.compare import Comparison, compare
from monosemantic.errors import ConfigError
from monosemantic.model import Model
from monosemantic.steer_eval import SteerEvalConfig, SteeringEvaluation, evaluate_steering
from trainer.pipeline import _dictionary_model, corpus_contexts
from trainer.text import TextSpec


def steer_eval_dictionary(registry: Path, reference: str, feature: int, *, model: str | Path | None = None,
                          contexts: int = 32, context_length: int = 64, text: TextSpec | None = None,
                          cfg: SteerEvalConfig = SteerEvalConfig(), model_dtype: str = "auto") -> tuple[SteeringEvaluation, str]:
    """The steering curves of one feature of NAME[:VERSION] on `contexts` held-out contexts of the built-in corpus or
    the user's `text`, at the scale its dashboard records (else the most it reaches on that text); and the label."""
    name, version = parse_reference(reference)
    lm = _dictionary_model(registry, name, version, model, model_dtype)
    loaded = Model.of(lm)
    dictionary = bind(loaded, load_dictionary(registry, name, version, expected_model_checksum=lm.checksum))
    held_out, _ = corpus_contexts(lm.tokenizer, "heldout", context_length, None, contexts, text=text)
    scale = None
    if dictionary.statistics is not None and 0 <= feature < dictionary.d_sae:
        scale = float(dictionary.statistics.max_activation[feature])
    result = evaluate_steering(loaded, dictionary, feature, held_out, cfg, scale=scale)
    return result, (dictionary.labels[feature] if dictionary.labels and 0 <= feature < len(dictionary.labels) else "")


def steering_table(result: SteeringEvaluation, label: str = "") -> str:
    """One line per method and strength (reading and promoted probability against KL and loss), then the best
    point of each method at each KL budget and the winner."""
    u = result.unsteered
    lines = [f"feature {result.feature}{f' ({label})' if label else ''}: scale {result.scale:.4g} (from {result.scale_from}), "
             f"promoted tokens from {result.promoted_from}",
             f"unsteered: loss {u.loss:.4f}, promoted {u.promoted:.4f}, reading {u.reading:.4f}, firing {u.firing:.3f}",
             f"{'method':<16}{'x scale':>8}{'strength':>10}{'KL':>9}{'loss':>9}{'promoted':>10}{'reading':>9}{'firing':>8}"]
    for curve in result.curves:
        for p in curve.points:
            lines.append(f"{curve.method:<16}{p.multiple:>8g}{p.strength:>10.4g}{p.kl:>9.4f}{p.loss:>9.4f}{p.promoted:>10.4f}"
                         f"{p.reading:>9.4f}{p.firing:>8.3f}")
    for budget, winner in result.winners.items():
        parts = [f"{b.method} x{b.point.multiple:g} (reading {b.point.reading:.4f}, promoted {b.point.promoted:.4f})" if b.point
                 else f"{b.method} none" for b in result.best if b.budget == budget]
        lines.append(f"at KL <= {budget:g}: " + ", ".join(parts) + f"; best: {winner or 'none beats unsteered'}")
    return "\n".join(lines)


def _bound(registry: Path, reference: str, model: str | Path | None, model_dtype: str, loaded: Model | None = None) -> tuple[Model, BoundDictionary]:
    """NAME[:VERSION] bound to its model (`model`, else the one it records, else the shipped reference); `loaded`:
    a model already loaded, used when the dictionary was made for it."""
    name, version = parse_reference(reference)
    if loaded is not None:
        dictionary = load_dictionary(registry, name, version)
        if dictionary.manifest.model.checksum == loaded.checksum:  # the check expected_model_checksum makes
            return loaded, bind(loaded, dictionary)
    loaded = Model.of(_dictionary_model(registry, name, version, model, model_dtype))
    return loaded, bind(loaded, load_dictionary(registry, name, version, expected_model_checksum=loaded.checksum))


def compare_dictionaries(registry: Path, reference_a: str, reference_b: str, *, registry_b: Path | None = None,
                         model_a: str | Path | None = None, model_b: str | Path | None = None, by: str = "correlation",
                         threshold: float = 0.5, min_firing: int = 5, contexts: int = 64, context_length: int = 128, text: TextSpec | None = None,
                         model_dtype: str = "auto") -> tuple[Comparison, BoundDictionary, BoundDictionary]:
    """Match A's features with B's (B from `registry_b`, default the same registry): by correlation on `contexts`
    held-out contexts (each dictionary read on its own model; two models must share a tokenizer), or by cosine."""
    loaded_a, a = _bound(registry, reference_a, model_a, model_dtype)
    loaded_b, b = _bound(registry_b or registry, reference_b, model_b, model_dtype, None if model_b is not None else loaded_a)
    if by == "cosine":
        return compare(a, b, by="cosine", threshold=threshold), a, b
    if loaded_b is not loaded_a and loaded_a.lm.tokenizer.get_vocab() != loaded_b.lm.tokenizer.get_vocab():
        raise ConfigError("the two dictionaries' models tokenize differently: correlation needs them to read the same tokens")
    held_out, _ = corpus_contexts(loaded_a.lm.tokenizer, "heldout", context_length, None, contexts, text=text)
    return compare(a, b, lm_a=loaded_a.lm, lm_b=loaded_b.lm, contexts=held_out, by=by, threshold=threshold, min_firing=min_firing), a, b


def comparison_dict(result: Comparison, a: BoundDictionary, b: BoundDictionary) -> dict:
    m = result.matching
    pair = lambda p: {"a": p.a, "b": p.b, "score": p.score}  # noqa: E731
    family = lambda f: {"feature": f.feature, "counterparts": [pair(p) for p in f.counterparts]}  # noqa: E731
    return {"a": a.ref, "b": b.ref, "counts": result.summary(), "one_to_one": [pair(p) for p in m.one_to_one],
            "splits": [family(f) for f in m.splits], "merges": [family(f) for f in m.merges], "loose": [pair(p) for p in m.loose],
            "unmatched_a": m.unmatched_a, "unmatched_b": m.unmatched_b, "dead_a": m.dead_a, "dead_b": m.dead_b}


def comparison_table(result: Comparison, a: BoundDictionary, b: BoundDictionary, families: int = 10) -> str:
    """The counts, then the largest splits and merges with their labels."""
    s, m = result.summary(), result.matching

    def label(d: BoundDictionary, i: int) -> str:
        return f"{i}" + (f" {d.labels[i]!r}" if d.labels and d.labels[i] else "")

    measured = f"on {s['tokens']:,} tokens" if s["tokens"] else "by decoder cosine"
    lines = [f"{a.ref} ({s['features_a']:,} features) against {b.ref} ({s['features_b']:,}), by {s['by']} >= {s['threshold']:g}, {measured}",
             f"{'one-to-one':>14}: {s['one_to_one']:,}",
             f"{'split':>14}: {s['split']:,} features of A into {s['split_into']:,} of B",
             f"{'merged':>14}: {s['merged_from']:,} features of A into {s['merged']:,} of B",
             f"{'loose':>14}: {s['loose']:,} (A's best counterpart prefers another feature)",
             f"{'no counterpart':>14}: {s['unmatched_a']:,} of A, {s['unmatched_b']:,} of B",
             f"{'too rare':>14}: {s['dead_a']:,} of A, {s['dead_b']:,} of B fire too seldom on this text to correlate"]
    for title, found, mine, theirs, of_a in (("splits", m.splits, a, b, True), ("merges", m.merges, b, a, False)):
        if found:
            lines.append(f"largest {title}:")
            for f in sorted(found, key=lambda f: -len(f.counterparts))[:families]:
                parts = ", ".join(f"{label(theirs, p.b if of_a else p.a)} ({p.score:.2f})" for p in f.counterparts)
                lines.append(f"  {label(mine, f.feature)} -> {parts}")
    return "\n".join(lines)
