"""Feature explanations and their scores, the field's method as arithmetic and text: the explainer's prompt from a
feature's examples, its answer parsed, and the detection and fuzzing scorers' prompts, answers and scores.

Method (EleutherAI's delphi, Paulo et al. 2024, arXiv 2410.13928; after Bills et al. 2023 and Bricken et al. 2023):
an explainer model reads a feature's activating examples, the tokens where it fires marked ``<<…>>`` (above 0.3 of
the example's own maximum) and their activations scaled to integers 0-10, and answers ending ``[EXPLANATION]: …``.
A scorer model that sees only the explanation is then shown examples the explainer did not see, five at a time:

- detection: plain text, activating examples from every activation interval and non-activating ones; it answers a
  list of 0/1, one per example ("does the feature fire here?");
- fuzzing: activating examples only, half with the feature's own tokens marked and half with as many other tokens
  marked; it answers whether each marking is right.

Each score is the balanced accuracy of those answers (the mean of the true-positive and true-negative rates, so a
scorer answering all 1s scores 0.5), given with the number of examples it was computed on. Nothing here talks to a
model: the caller sends the messages (monosemantic/explain_client.py does, to any OpenAI-compatible endpoint) and
hands the answers back, so the arithmetic is tested on planted answers.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from typing import Iterable, NamedTuple, Sequence

PROMPT_VERSION = "delphi-1"  # recorded with every run: a change to the prompts below is a new version
MARK_FRACTION = 0.3  # delphi's threshold: tokens at or above this share of the example's maximum are marked
BATCH = 5  # examples per scorer prompt, as delphi's


class Example(NamedTuple):
    """One window of text: its tokens rendered to strings and the feature's activation on each."""

    tokens: tuple[str, ...]
    activations: tuple[float, ...]

    @property
    def peak(self) -> float:
        return max(self.activations, default=0.0)

    @property
    def fires(self) -> bool:
        return self.peak > 0

    def marked(self, positions: Iterable[int] | None = None) -> str:
        """The text with ``positions`` (default: the tokens at or above MARK_FRACTION of the peak) wrapped in
        ``<<…>>``; adjacent marked tokens share one pair of brackets."""
        if positions is None:
            positions = [i for i, a in enumerate(self.activations) if self.fires and a >= MARK_FRACTION * self.peak]
        chosen, out = set(positions), []
        for i, token in enumerate(self.tokens):
            opening = i in chosen and (i - 1) not in chosen
            closing = i in chosen and (i + 1) not in chosen
            out.append(("<<" if opening else "") + token + (">>" if closing else ""))
        return "".join(out)

    def plain(self) -> str:
        return "".join(self.tokens)


def scaled(activations: Sequence[float], maximum: float) -> list[int]:
    """Activations as integers 0-10 of ``maximum`` (the feature's, so examples compare), as Bills et al. show them."""
    if maximum <= 0:
        return [0 for _ in activations]
    return [max(0, min(10, round(10 * a / maximum))) for a in activations]


# ---- the explainer ------------------------------------------------------------------------------------------------
EXPLAINER_SYSTEM = (
    "You are a meticulous AI researcher investigating a specific feature of a language model. You will be shown "
    "text examples where the feature is active. In each example the tokens where it fires are marked between "
    "<< and >>, and the activation of each marked token (0-10) is listed after the example. Look for the common "
    "pattern: which tokens it fires on and in what context. Write a concise explanation, a single phrase or "
    "sentence, of what the feature detects. End your answer with a last line of the form\n"
    "[EXPLANATION]: <your explanation>")


def explainer_messages(examples: Sequence[Example], maximum: float) -> list[dict]:
    """The chat messages asking for an explanation of a feature from its ``examples`` (activations shown on the
    0-10 scale of ``maximum``, the feature's own maximum)."""
    lines = []
    for n, example in enumerate(examples, 1):
        values = scaled(example.activations, maximum)
        marked = [f"{example.tokens[i]!r} ({values[i]})" for i, a in enumerate(example.activations)
                  if example.fires and a >= MARK_FRACTION * example.peak]
        lines.append(f"Example {n}: {example.marked()}\nActivations: {', '.join(marked) or 'none'}")
    return [{"role": "system", "content": EXPLAINER_SYSTEM}, {"role": "user", "content": "\n\n".join(lines)}]


_EXPLANATION = re.compile(r"\[EXPLANATION\]\s*:\s*(.+)", re.IGNORECASE)


def parse_explanation(answer: str) -> str | None:
    """The explanation after the last ``[EXPLANATION]:`` of an answer, or None when it has none (an answer that
    does not parse is recorded as such by the caller, never dropped)."""
    found = _EXPLANATION.findall(answer or "")
    text = found[-1].strip().strip('"').strip() if found else ""
    return text or None


# ---- the scorers --------------------------------------------------------------------------------------------------
DETECTION_SYSTEM = (
    "You are an intelligent and meticulous linguistics researcher. You will be given an explanation of a feature "
    "of a language model and several numbered text examples. For each example, decide whether the feature the "
    "explanation describes is present in it. Answer with only a JSON list of 0s and 1s, one per example in order, "
    "1 where the feature is present, e.g. [1, 0, 0, 1, 0].")

FUZZING_SYSTEM = (
    "You are an intelligent and meticulous linguistics researcher. You will be given an explanation of a feature "
    "of a language model and several numbered text examples, each with some tokens marked between << and >>. "
    "For each example, decide whether the marked tokens are the ones the explanation describes. Answer with only "
    "a JSON list of 0s and 1s, one per example in order, 1 where the marking is correct, e.g. [1, 0, 0, 1, 0].")


def scorer_messages(kind: str, explanation: str, texts: Sequence[str]) -> list[dict]:
    """Messages asking a scorer (``detection`` or ``fuzzing``) to judge ``texts`` against ``explanation``."""
    system = {"detection": DETECTION_SYSTEM, "fuzzing": FUZZING_SYSTEM}[kind]
    body = "\n".join(f"Example {n}: {text}" for n, text in enumerate(texts, 1))
    return [{"role": "system", "content": system},
            {"role": "user", "content": f"Explanation: {explanation}\n\n{body}"}]


def parse_labels(answer: str, count: int) -> list[int] | None:
    """The 0/1 list of a scorer's answer: the last bracketed list of ``count`` 0s and 1s in it, or None."""
    for found in reversed(re.findall(r"\[[^\[\]]*\]", answer or "")):
        try:
            values = json.loads(found)
        except ValueError:
            continue
        if isinstance(values, list) and len(values) == count and all(v in (0, 1) and not isinstance(v, float) for v in values):
            return [int(v) for v in values]
    return None


@dataclass(frozen=True)
class Trial:
    """One example put to a scorer: what it is shown and the right answer."""

    text: str
    truth: int  # 1: the feature fires here (detection) / the marking is the feature's own (fuzzing)
    quantile: int | None = None  # the activating example's interval, for per-interval accuracy; None if not activating


def detection_trials(activating: Sequence[tuple[Example, int | None]], quiet: Sequence[Example]) -> list[Trial]:
    """Detection: the activating examples (each with its interval) as plain text, truth 1, and the non-activating
    ones, truth 0."""
    return ([Trial(e.plain(), 1, q) for e, q in activating] + [Trial(e.plain(), 0) for e in quiet])


def fuzzing_trials(activating: Sequence[tuple[Example, int | None]], seed: int) -> list[Trial]:
    """Fuzzing: every other activating example with its own tokens marked (truth 1), the rest with as many
    tokens marked among those it does not fire on (truth 0). An example that fires on every token cannot be
    mis-marked and is marked correctly."""
    rng, trials = random.Random(seed), []
    for n, (example, quantile) in enumerate(activating):
        own = [i for i, a in enumerate(example.activations) if example.fires and a >= MARK_FRACTION * example.peak]
        others = [i for i in range(len(example.tokens)) if i not in own]
        if n % 2 == 0 or not others:
            trials.append(Trial(example.marked(own), 1, quantile))
        else:
            trials.append(Trial(example.marked(rng.sample(others, min(len(own), len(others)))), 0, quantile))
    return trials


def batches(trials: Sequence[Trial], seed: int, size: int = BATCH) -> list[list[Trial]]:
    """The trials shuffled (seeded, so a resumed run asks the same questions) into prompts of ``size``."""
    order = list(trials)
    random.Random(seed).shuffle(order)
    return [order[i:i + size] for i in range(0, len(order), size)]


class Score(NamedTuple):
    """A scorer's result on one feature."""

    balanced_accuracy: float | None  # None when no batch's answer parsed
    examples: int  # trials whose answers parsed and were counted
    unparsed: int  # trials in batches whose answer did not parse (not counted)
    true_positive_rate: float | None
    true_negative_rate: float | None


def balanced_accuracy(truths: Sequence[int], answers: Sequence[int]) -> tuple[float | None, float | None, float | None]:
    """(balanced accuracy, true-positive rate, true-negative rate); a rate is None when its class is absent, and
    the balanced accuracy is then the one rate there is."""
    positives = [a for t, a in zip(truths, answers) if t == 1]
    negatives = [a for t, a in zip(truths, answers) if t == 0]
    tpr = sum(positives) / len(positives) if positives else None
    tnr = sum(1 - a for a in negatives) / len(negatives) if negatives else None
    rates = [r for r in (tpr, tnr) if r is not None]
    return (sum(rates) / len(rates) if rates else None), tpr, tnr


def score(asked: Sequence[Sequence[Trial]], answers: Sequence[list[int] | None]) -> Score:
    """The score of batches of trials from the scorer's parsed answers (None where a batch's did not parse)."""
    truths, given, unparsed = [], [], 0
    for trials, labels in zip(asked, answers):
        if labels is None or len(labels) != len(trials):
            unparsed += len(trials)
            continue
        truths += [t.truth for t in trials]
        given += labels
    accuracy, tpr, tnr = balanced_accuracy(truths, given)
    return Score(accuracy, len(truths), unparsed, tpr, tnr)


# ---- which examples go where --------------------------------------------------------------------------------------
class ExampleSplit(NamedTuple):
    """A feature's examples divided so that none is both shown to the explainer and scored."""

    shown: list[Example]  # to the explainer: the strongest
    scored: list[tuple[Example, int | None]]  # to the scorers, with the interval each came from (None: a top example)


def split_examples(top: Sequence[Example], quantiles: Sequence[tuple[Example, int]], shown: int) -> ExampleSplit:
    """The explainer sees the first ``shown`` activating top examples and every other sample of each activation
    interval (delphi's explainers see quantile samples beside the top, so an explanation covers the weak end too);
    the rest of the top examples and the other interval samples are scored, so every interval is on both sides. A
    window that is both a top example and an interval sample (the two samplers can pick one) goes where it was
    first put and is never on both sides."""
    firing = [e for e in top if e.fires]
    explainer = list(firing[:shown])
    scored: list[tuple[Example, int | None]] = [(e, None) for e in firing[shown:]]
    taken: dict[int, int] = {}  # interval -> samples seen so far
    for example, quantile in quantiles:
        if not example.fires:
            continue
        nth = taken.get(quantile, 0)
        taken[quantile] = nth + 1
        if nth % 2 == 0:
            explainer.append(example)
        else:
            scored.append((example, quantile))
    seen = set(explainer)
    return ExampleSplit(explainer, [(e, q) for e, q in scored if e not in seen])


def feature_examples(statistics, feature: int, token_text) -> tuple[list[Example], list[tuple[Example, int]]]:
    """A feature's stored examples (monosemantic/feature_stats.py), read as its feature page reads them
    (dashboards.window_examples): its top windows, strongest first, and its samples across activation intervals with
    each one's interval; ``token_text(id)`` renders a token."""
    from monosemantic.dashboards import window_examples

    s = statistics

    def read(tokens, acts, values, bins) -> list[dict]:
        return window_examples(token_text, tokens[feature], acts[feature], values[feature], s.centre, bins) if tokens is not None else []

    def as_example(d: dict) -> Example:
        return Example(tuple(d["tokens"]), tuple(d["activations"]))

    top = [as_example(d) for d in read(s.top_tokens, s.top_acts, s.top_values, None)]
    samples = read(s.quantile_tokens, s.quantile_acts, s.quantile_values, s.quantile_bins)
    return top, [(as_example(d), d["quantile"]) for d in samples]


# ---- simulation (Bills et al. 2023): the scorer predicts each token's activation from the explanation --------------
SIMULATION_SYSTEM = (
    "You are an intelligent and meticulous linguistics researcher. You will be given an explanation of a feature "
    "of a language model and a text, one numbered token per line. For every token, predict how strongly the "
    "feature the explanation describes is active on it, from 0 (not at all) to 10 (most). Answer with one line per "
    "token, in order, each the token's number, a tab and your prediction, e.g.\n1\t0\n2\t7")

_SIMULATED_LINE = re.compile(r"^\s*(\d+)\s*[\t:]\s*(\d+(?:\.\d+)?)\s*$")


def simulation_messages(explanation: str, example: Example) -> list[dict]:
    lines = "\n".join(f"{n}\t{json.dumps(token)}" for n, token in enumerate(example.tokens, 1))
    return [{"role": "system", "content": SIMULATION_SYSTEM},
            {"role": "user", "content": f"Explanation: {explanation}\n\nTokens:\n{lines}"}]


class TokenChoice(NamedTuple):
    """One token of an answer and the alternatives the endpoint gave for it (text, logprob)."""

    text: str
    alternatives: tuple[tuple[str, float], ...]


def _expected_digit(choice: TokenChoice) -> float | None:
    """The expected activation at a token that is itself a prediction 0-10, over the alternatives that are too."""
    import math

    weights = [(int(text.strip()), math.exp(logprob)) for text, logprob in choice.alternatives
               if text.strip().isdigit() and 0 <= int(text.strip()) <= 10]
    total = sum(w for _, w in weights)
    return sum(v * w for v, w in weights) / total if total > 0 else None


def parse_simulation(answer: str, count: int, tokens: Sequence[TokenChoice] | None = None) -> tuple[list[float], bool] | None:
    """(a prediction per token, whether any came from logprobs) from a simulator's answer, or None unless it gives
    every token 1..count a value 0-10. Where the endpoint gave logprobs, a prediction whose digits are one token is
    its expected value over the alternatives (Bills et al.'s simulator reads the distribution, not the sample)."""
    predicted: dict[int, float] = {}
    for line in (answer or "").splitlines():
        found = _SIMULATED_LINE.match(line)
        if found and 1 <= int(found.group(1)) <= count:
            predicted[int(found.group(1))] = min(10.0, float(found.group(2)))
    if sorted(predicted) != list(range(1, count + 1)):
        return None
    refined = False
    if tokens:
        text, line = "", None
        for choice in tokens:
            before = text
            text += choice.text
            current = before.rsplit("\n", 1)[-1]
            if current.endswith("\t") and choice.text.strip().isdigit():
                index = current.strip().rstrip("\t:").strip()
                line = int(index) if index.isdigit() else None
                value = _expected_digit(choice)
                if line in predicted and value is not None:
                    predicted[line] = value
                    refined = True
    return [predicted[i] for i in range(1, count + 1)], refined


def correlation(truth: Sequence[float], predicted: Sequence[float]) -> float | None:
    """Pearson's r over tokens; None when either side is constant (no correlation to speak of)."""
    n = len(truth)
    if n < 2 or len(predicted) != n:
        return None
    mt, mp = sum(truth) / n, sum(predicted) / n
    st = sum((t - mt) ** 2 for t in truth)
    sp = sum((p - mp) ** 2 for p in predicted)
    if st <= 0 or sp <= 0:
        return None
    return sum((t - mt) * (p - mp) for t, p in zip(truth, predicted)) / (st * sp) ** 0.5
