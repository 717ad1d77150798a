"""Steering measured, and dictionaries compared, on the shipped reference (issue 19's tables in bench/RESULTS.md).

Part 1: for --features features of the reference dictionary (live ones, density at least 1e-3, drawn with --seed),
the steering curves of monosemantic/steer_eval.py on held-out text: per method the best strength (in units of the
feature's max activation) and its reading at each KL budget, with the difference-in-means baseline beside the
dictionary's clamp and add, and which reads highest.
Part 2 (with --wide REGISTRY:NAME): the reference against a wider dictionary trained on the same harvest, matched
by activation correlation (monosemantic/compare.py): how many features are one-to-one, split, merged or new.

    python bench/steering_and_compare.py [--features 10] [--wide /tmp/cmpreg:wide16k]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from monosemantic.bound import load_bound
from monosemantic.compare import compare
from monosemantic.model import load_model
from monosemantic.shipped import reference_lm_path, reference_registry_path
from monosemantic.steer_eval import SteerEvalConfig, evaluate_steering
from trainer.pipeline import corpus_contexts


def steering(model, reference, features: int, seed: int, contexts: int) -> None:
    stats = reference.statistics
    live = torch.nonzero(stats.density >= 1e-3).flatten()
    chosen = live[torch.randperm(live.numel(), generator=torch.Generator().manual_seed(seed))[:features]].sort().values.tolist()
    text, _ = corpus_contexts(model.lm.tokenizer, "heldout", 64, None, contexts)
    for effect in ("reading", "promoted"):
        steering_table(model, reference, chosen, text, SteerEvalConfig(effect=effect))


def steering_table(model, reference, chosen: list[int], text, cfg: SteerEvalConfig) -> None:
    stats = reference.statistics
    print(f"\nbest by {cfg.effect}: {len(chosen)} features, {text.shape[0]} held-out contexts of 64 tokens, strengths x{', x'.join(f'{m:g}' for m in cfg.multiples)} "
          "of each feature's max activation; r: reading, the feature's mean activation on greedy steered continuations read "
          "back unsteered, over its max; p: the probability of its 10 promoted tokens (unsteered in brackets)")
    print(f"| feature | label | KL budget | clamp: best x (r / p) | add: best x (r / p) | mean difference: best x (r / p) | most {cfg.effect} |")
    print("|---|---|---|---|---|---|---|")
    wins: dict[str, int] = {}
    started = time.perf_counter()
    for f in chosen:
        result = evaluate_steering(model, reference, f, text, cfg, scale=float(stats.max_activation[f]))
        label = reference.labels[f] if reference.labels else ""
        for budget in cfg.kl_budgets:
            cells = []
            for method in cfg.methods:
                best = next(b.point for b in result.best if b.budget == budget and b.method == method)
                cells.append("—" if best is None else f"x{best.multiple:g} ({best.reading:.3f} / {best.promoted:.3f})")
            winner = result.winners[budget] or "none beats unsteered"
            wins[f"{budget:g}:{winner}"] = wins.get(f"{budget:g}:{winner}", 0) + 1
            u = result.unsteered
            print(f"| {f} | {label!r} | {budget:g} | " + " | ".join(cells) + f" | {winner} ({u.reading:.3f} / {u.promoted:.3f}) |")
    print(f"wins per budget: {dict(sorted(wins.items()))}; {time.perf_counter() - started:.1f} s for {len(chosen)} features")


def comparison(model, reference, wide: str, contexts: int) -> None:
    registry, name = wide.rsplit(":", 1)
    other = load_bound(model, Path(registry), name, None)
    text, _ = corpus_contexts(model.lm.tokenizer, "heldout", 128, None, contexts)
    started = time.perf_counter()
    result = compare(reference, other, lm_a=model.lm, lm_b=model.lm, contexts=text)
    s = result.summary()
    print(f"reference ({s['features_a']:,}) against {name} ({s['features_b']:,}) by correlation >= {s['threshold']:g} on "
          f"{s['tokens']:,} tokens ({time.perf_counter() - started:.1f} s): {s}")
    for family in sorted(result.matching.splits, key=lambda f: -len(f.counterparts))[:5]:
        label = reference.labels[family.feature] if reference.labels else ""
        print(f"  split: {family.feature} {label!r} -> " + ", ".join(f"{p.b} ({p.score:.2f})" for p in family.counterparts))
    cosine = compare(reference, other, by="cosine").summary()
    print(f"by decoder cosine >= 0.5 (no text): {cosine}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--features", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--contexts", type=int, default=32)
    parser.add_argument("--wide", help="REGISTRY:NAME of a wider dictionary on the reference's hook")
    args = parser.parse_args()
    model = load_model(str(reference_lm_path()), "cpu")
    reference = load_bound(model, reference_registry_path(), "reference", None)
    if args.features:
        steering(model, reference, args.features, args.seed, args.contexts)
    if args.wide:
        comparison(model, reference, args.wide, 2 * args.contexts)


if __name__ == "__main__":
    main()
