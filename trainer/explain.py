"""What ``monosemantic-train explain`` runs: a published dictionary's features explained and scored by models behind
any OpenAI-compatible endpoint (vLLM, Ollama, a hosted API, this project's own /openai/v1), the prompts and the
score arithmetic from monosemantic/explain.py, each feature's result appended to the run's record
(monosemantic/explanations.py) as it completes.

The endpoint is called through the `openai` SDK (the `explain` extra): its client retries 408/409/429/5xx with
exponential backoff, honouring `Retry-After`, so the retries users expect from an OpenAI client are the SDK's
own. Requests in flight are bounded by ``concurrency``; the prompt and completion tokens each stage spent are
summed from the answers' `usage`. The key is read from an environment variable and only handed to the client.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from monosemantic import explain as method
from monosemantic.artifact import load_dictionary, parse_reference
from monosemantic.bound import BoundDictionary, bind
from monosemantic.errors import ConfigError
from monosemantic.explanations import (ExplanationRun, FeatureExplanation, RunWriter, ScoreRecord, SimulationRecord, Usage, read_run,
                                       run_name, run_path, version_digest)
from monosemantic.model import Model
from trainer.pipeline import _dictionary_model, corpus_contexts
from trainer.progress import progress


@dataclass(frozen=True)
class ExplainSettings:
    shown: int = 6  # top examples shown to the explainer (with every other interval sample); the rest are scored
    quiet_contexts: int = 256  # held-out contexts searched for windows where a feature is silent (detection's negatives)
    concurrency: int = 4
    max_tokens: int = 200  # per answer
    simulated: int = 4  # activating examples the simulation scorer predicts token by token (and half as many silent ones)
    retries: int = 8  # the SDK's max_retries: 8 waits of Retry-After (or its backoff, up to 8 s)
    timeout_s: float = 120.0
    seed: int = 0

    def as_record(self) -> dict:
        return {k: getattr(self, k) for k in ("shown", "quiet_contexts", "max_tokens", "simulated", "seed")}


@dataclass
class Endpoint:
    """An OpenAI-compatible endpoint and the models to ask there."""

    url: str
    explainer_model: str
    scorer_model: str
    api_key: str | None = None
    extra_body: dict = field(default_factory=dict)  # e.g. a chat_template for a server that needs one
    scorer_url: str | None = None  # the scorer's endpoint, when not the explainer's (its key: the same)

    def where(self, role: str) -> tuple[str, str]:
        """(base URL, model) of the ``explainer`` or the ``scorer``."""
        if role == "explainer":
            return self.url, self.explainer_model
        return self.scorer_url or self.url, self.scorer_model


def parse_features(spec: str | None, sample: int | None, every: bool, d_sae: int, seed: int) -> list[int]:
    """``--features 0-99,512`` / ``--sample N`` / ``--all`` as feature ids (exactly one of them; ConfigError naming
    the option otherwise)."""
    given = [name for name, value in (("--features", spec), ("--sample", sample), ("--all", every)) if value]
    if len(given) != 1:
        raise ConfigError("give exactly one of --features, --sample and --all" + (f" (got {', '.join(given)})" if given else ""))
    if every:
        return list(range(d_sae))
    if sample is not None:
        if not 1 <= sample <= d_sae:
            raise ConfigError(f"--sample must be between 1 and {d_sae} (the dictionary's features), got {sample}")
        return sorted(random.Random(seed).sample(range(d_sae), sample))
    ids: list[int] = []
    for part in str(spec).split(","):
        try:
            low, _, high = part.strip().partition("-")
            first, last = int(low), int(high) if high else int(low)
        except ValueError:
            raise ConfigError(f"--features: {part.strip()!r} is not a feature id or a range like 0-99") from None
        if not 0 <= first <= last < d_sae:
            raise ConfigError(f"--features: {part.strip()!r} is outside 0-{d_sae - 1}")
        ids.extend(range(first, last + 1))
    return sorted(set(ids))


def quiet_windows(model: Model, dictionary: BoundDictionary, contexts: torch.Tensor, window: int,
                  features: Sequence[int], per_feature: int = 32) -> dict[int, list[method.Example]]:
    """For each feature, up to ``per_feature`` windows of ``window`` tokens of the held-out ``contexts`` on which it
    does not fire at all (read through the model and the dictionary, as the service reads them): detection's
    non-activating examples. Bounded per feature, so explaining every feature of a wide dictionary holds a few
    thousand windows, not one per silent feature per window."""
    from monosemantic.lm import read_activations

    wanted = torch.tensor(list(features), dtype=torch.long)
    found: dict[int, list[method.Example]] = {f: [] for f in features}
    short = torch.ones(len(wanted), dtype=torch.bool)  # features still short of `per_feature` windows
    for start in range(0, contexts.shape[0], 8):
        ids = contexts[start:start + 8]
        with torch.no_grad():
            x = read_activations(model.lm, ids, dictionary.hook, attention_mask=torch.ones_like(ids))[:, 1:].float()
            codes = dictionary.sae.encode(x.reshape(-1, x.shape[-1]))[:, wanted].reshape(x.shape[0], x.shape[1], -1)
        body = ids[:, 1:]
        for row in range(body.shape[0]):
            for lo in range(0, body.shape[1] - window + 1, window):
                takers = (codes[row, lo:lo + window].amax(0) <= 0) & short  # silent here, and still wanting windows
                if not bool(takers.any()):
                    continue
                tokens = tuple(model.token_text(int(t)) for t in body[row, lo:lo + window])
                example = method.Example(tokens, tuple(0.0 for _ in tokens))  # one object, shared by every taker
                for column in takers.nonzero().flatten().tolist():
                    mine = found[int(wanted[column])]
                    mine.append(example)
                    if len(mine) >= per_feature:
                        short[column] = False
        if not bool(short.any()):
            break
    return found


class Refused(Exception):
    """The endpoint answered one request 400: that feature (or that scorer prompt) is recorded as refused and the run
    goes on; any other failure (a wrong key or model, the endpoint down after the retries) ends the run."""


class _Asker:
    """One endpoint's chat completions, bounded in flight, tokens counted per stage."""

    def __init__(self, endpoint: Endpoint, settings: ExplainSettings) -> None:
        try:
            import openai
        except ImportError:
            raise ConfigError("explain talks to the endpoint through the openai SDK: pip install 'monosemantic[explain]'") from None
        self.endpoint, self.settings = endpoint, settings
        self.clients = {url: openai.AsyncOpenAI(base_url=url, api_key=endpoint.api_key or "none", max_retries=settings.retries,
                                                timeout=settings.timeout_s)
                        for url in {endpoint.where("explainer")[0], endpoint.where("scorer")[0]}}
        self.gate = asyncio.Semaphore(settings.concurrency)

    async def ask(self, role: str, messages: list[dict], max_tokens: int | None = None, logprobs: bool = False) -> tuple[str, Usage]:
        """The ``explainer``'s or the ``scorer``'s answer to ``messages`` (greedy), and the tokens it cost."""
        text, usage, _ = await self.ask_with_choices(role, messages, max_tokens, logprobs)
        return text, usage

    async def ask_with_choices(self, role: str, messages: list[dict], max_tokens: int | None = None,
                               logprobs: bool = False) -> tuple[str, Usage, list[method.TokenChoice] | None]:
        """As ask, and the answer's tokens with their alternatives where ``logprobs`` was asked and given."""
        import openai

        url, model = self.endpoint.where(role)
        extra = {"logprobs": True, "top_logprobs": 5} if logprobs else {}
        async with self.gate:
            try:
                answer = await self.clients[url].chat.completions.create(
                    model=model, messages=messages, max_tokens=max_tokens or self.settings.max_tokens, temperature=0,
                    extra_body=self.endpoint.extra_body or None, **extra)
            except openai.BadRequestError as exc:  # this prompt (too long for the model, say), not the endpoint
                raise Refused(f"the {role} refused the request: {exc.message}") from None
        usage, choice = answer.usage, answer.choices[0]
        tokens = None
        if logprobs and choice.logprobs is not None and choice.logprobs.content:
            tokens = [method.TokenChoice(t.token, tuple((a.token, a.logprob) for a in (t.top_logprobs or [])))
                      for t in choice.logprobs.content]
        return (choice.message.content or "",
                Usage(prompt_tokens=usage.prompt_tokens if usage else 0, completion_tokens=usage.completion_tokens if usage else 0, requests=1),
                tokens)

    async def close(self) -> None:
        for client in self.clients.values():
            await client.close()


async def _score(asker: _Asker, kind: str, explanation: str, trials: list[method.Trial], seed: int) -> tuple[ScoreRecord, Usage]:
    asked = method.batches(trials, seed)

    async def one(batch: list[method.Trial]) -> tuple[str, Usage]:
        try:
            return await asker.ask("scorer", method.scorer_messages(kind, explanation, [t.text for t in batch]))
        except Refused:
            return "", Usage(requests=1)  # counted as a prompt whose answer did not parse

    answers = await asyncio.gather(*(one(b) for b in asked))
    labels = [method.parse_labels(text, len(b)) for (text, _), b in zip(answers, asked)]
    result = method.score(asked, labels)
    usage = Usage()
    for _, spent in answers:
        usage = usage.add(spent)
    return ScoreRecord(**result._asdict()), usage


async def _one_feature(asker: _Asker, dictionary: BoundDictionary, model: Model, feature: int,
                       quiet: list[method.Example], settings: ExplainSettings) -> FeatureExplanation:
    top, intervals = method.feature_examples(dictionary.statistics, feature, model.token_text)
    split = method.split_examples(top, intervals, settings.shown)
    if not split.shown:
        return FeatureExplanation(feature=feature, explanation=None, shown=0, skipped="it never fired on the statistics' text")
    maximum = float(dictionary.statistics.max_activation[feature])
    try:
        answer, spent = await asker.ask("explainer", method.explainer_messages(split.shown, maximum))
    except Refused as refused:
        return FeatureExplanation(feature=feature, explanation=None, shown=len(split.shown), skipped=str(refused))
    explanation = method.parse_explanation(answer)
    record = FeatureExplanation(feature=feature, explanation=explanation, shown=len(split.shown),
                                unparsed_answer=None if explanation else answer[:2000], usage={"explain": spent})
    if explanation is None or not split.scored:
        return record
    seed = settings.seed * 1_000_003 + feature
    negatives = random.Random(seed).sample(quiet, min(len(quiet), len(split.scored)))
    (detection, d_spent), (fuzzing, f_spent), (simulation, s_spent) = await asyncio.gather(
        _score(asker, "detection", explanation, method.detection_trials(split.scored, negatives), seed),
        _score(asker, "fuzzing", explanation, method.fuzzing_trials(split.scored, seed), seed),
        _simulate(asker, explanation, split.scored, negatives, settings))
    return record.model_copy(update={"detection": detection, "fuzzing": fuzzing, "simulation": simulation,
                                     "usage": {**record.usage, "detection": d_spent, "fuzzing": f_spent, "simulation": s_spent}})


async def _simulate(asker: _Asker, explanation: str, scored: list[tuple[method.Example, int | None]],
                    quiet: list[method.Example], settings: ExplainSettings) -> tuple[SimulationRecord | None, Usage]:
    """The simulation scorer on a few activating examples spread over the scored ones, and as many silent ones."""
    if settings.simulated <= 0:
        return None, Usage()
    step = max(1, len(scored) // settings.simulated)
    examples = [e for e, _ in scored[::step][:settings.simulated]] + quiet[:max(1, settings.simulated // 2)]

    async def one(example: method.Example):
        try:
            text, spent, tokens = await asker.ask_with_choices("scorer", method.simulation_messages(explanation, example),
                                                               max_tokens=8 * len(example.tokens) + 16, logprobs=True)
        except Refused:
            return None, Usage(requests=1)
        return method.parse_simulation(text, len(example.tokens), tokens), spent

    answers = await asyncio.gather(*(one(e) for e in examples))
    truth, predicted, parsed, unparsed, from_logprobs, usage = [], [], 0, 0, False, Usage()
    for example, (result, spent) in zip(examples, answers):
        usage = usage.add(spent)
        if result is None:
            unparsed += 1
            continue
        values, refined = result
        truth += list(example.activations)
        predicted += values
        parsed += 1
        from_logprobs = from_logprobs or refined
    return SimulationRecord(correlation=method.correlation(truth, predicted), examples=parsed, tokens=len(truth),
                            unparsed=unparsed, from_logprobs=from_logprobs), usage


@dataclass
class ExplainResult:
    path: Path
    done: int  # features completed in this invocation
    resumed: int  # features already in the record, not asked again
    usage: Usage
    parsed: int  # of the features done, those whose explanation parsed
    skipped: int = 0  # of the features done, those not explained (never fired, or the explainer refused the prompt)


def explain_dictionary(registry: Path, reference: str, endpoint: Endpoint, *, features: str | None = None,
                       sample: int | None = None, every: bool = False, model: str | Path | None = None,
                       settings: ExplainSettings = ExplainSettings(), model_dtype: str = "auto", show_progress: bool = True) -> ExplainResult:
    """Explain and score the chosen features of NAME[:VERSION] at ``endpoint``, appending each to the run's record
    (a rerun with the same models continues it); the model reads the held-out windows detection needs silent."""
    name, version = parse_reference(reference)
    lm = _dictionary_model(registry, name, version, model, model_dtype)
    loaded = Model.of(lm)
    artifact = load_dictionary(registry, name, version, expected_model_checksum=lm.checksum)
    dictionary = bind(loaded, artifact)
    if dictionary.statistics is None or dictionary.statistics.top_tokens is None:
        raise ConfigError(f"dictionary {name} v{artifact.manifest.version} has no feature examples to explain from; compute them with "
                          f"`monosemantic-train features --registry {registry} --dictionary {name}:{artifact.manifest.version}`")
    wanted = parse_features(features, sample, every, dictionary.d_sae, settings.seed)
    m = artifact.manifest
    header = ExplanationRun(run=run_name(endpoint.explainer_model, endpoint.scorer_model, method.PROMPT_VERSION), dictionary=m.name,
                            version=m.version, manifest_sha256=version_digest(artifact), explainer_model=endpoint.explainer_model,
                            scorer_model=endpoint.scorer_model, prompt_version=method.PROMPT_VERSION, endpoint=endpoint.url,
                            scorer_endpoint=endpoint.scorer_url,
                            settings=settings.as_record())
    path = run_path(registry, m.name, m.version, header.run)
    _, finished = read_run(path)
    todo = [f for f in wanted if f not in finished]
    writer = RunWriter(path, header)
    try:
        window = int(dictionary.statistics.top_tokens.shape[-1])
        contexts, _ = corpus_contexts(lm.tokenizer, "heldout", 4 * window + 1, None, settings.quiet_contexts, seed=settings.seed)
        quiet = quiet_windows(loaded, dictionary, contexts, window, todo) if todo else {}
        return asyncio.run(_run(writer, endpoint, settings, dictionary, loaded, todo, quiet, path, len(wanted) - len(todo), show_progress))
    finally:
        writer.close()


async def _run(writer: RunWriter, endpoint: Endpoint, settings: ExplainSettings, dictionary: BoundDictionary, model: Model,
               todo: list[int], quiet: dict[int, list[method.Example]], path: Path, resumed: int, show_progress: bool) -> ExplainResult:
    asker = _Asker(endpoint, settings)
    finished: list[FeatureExplanation] = []
    bar: Any = progress(total=len(todo), desc="explain", unit="feature", enabled=show_progress)
    pending: set[asyncio.Task] = set()
    try:
        # Features are started a few at a time beyond the request bound, so a finished one is written while others
        # are in flight, and a stop loses at most those in flight.
        for feature in todo:
            pending.add(asyncio.create_task(_one_feature(asker, dictionary, model, feature, quiet.get(feature, []), settings)))
            if len(pending) >= 2 * settings.concurrency:
                finished += await _write_next(pending, writer, bar)
        while pending:
            finished += await _write_next(pending, writer, bar)
    finally:
        for task in pending:
            task.cancel()
        bar.close()
        await asker.close()
    usage = Usage()
    for spent in (spent for record in finished for spent in record.usage.values()):
        usage = usage.add(spent)
    return ExplainResult(path=path, done=len(todo), resumed=resumed, usage=usage,
                         parsed=sum(r.explanation is not None for r in finished), skipped=sum(r.skipped is not None for r in finished))


async def _write_next(pending: set, writer: RunWriter, bar: Any) -> list[FeatureExplanation]:
    """Write the features that finish next (at least one) and give them back."""
    done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
    records = []
    for task in done:
        pending.discard(task)
        records.append(task.result())
        writer.write(records[-1])
        bar.update(1)
    return records
