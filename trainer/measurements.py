"""What ``steer-eval`` runs: a published dictionary's steering curves (monosemantic/steer_eval.py) on held-out text,
and their readable table."""

from __future__ import annotations

from pathlib import Path

from monosemantic.artifact import parse_reference
from monosemantic.bound import bind
from monosemantic.artifact import load_dictionary
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
        parts = [f"{b.method} x{b.point.multiple:g} (reading {b.point.reading:.4f})" if b.point else f"{b.method} none"
                 for b in result.best if b.budget == budget]
        lines.append(f"at KL <= {budget:g}: " + ", ".join(parts) + f"; best: {winner or 'none beats unsteered'}")
    return "\n".join(lines)
