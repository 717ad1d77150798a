"""The service's steering evaluation (`/v1/steer-eval`, gRPC SteerEval): monosemantic/steer_eval.py on the worker,
one method's curve per job so that other requests interleave with it, answers cached per dictionary version.

Without text the evaluation runs on the model's own samples (16 of 64 tokens, drawn once per loaded model): neutral
text needs no corpus in the service, and the browser's feature page can ask for a curve with nothing but the id.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import TYPE_CHECKING, Any, Callable

import torch

from monosemantic import api as schemas
from monosemantic.errors import ConfigError
from monosemantic.steer_eval import NothingToSteer, SteerEvalConfig, SteeringEvaluation, conclude, measure, neutral_text, plan_steering
from service.batcher import Job
from service.errors import ErrorKind, ServiceError, invalid, not_found

if TYPE_CHECKING:
    from monosemantic.bound import BoundDictionary
    from service.engine import Engine

CACHED = 64  # evaluations kept, the least recently asked for dropped first
DEFAULTS = SteerEvalConfig()


def _call(jobs: list[Job]) -> list[Any]:
    with torch.inference_mode():
        return [jobs[0].payload()]


class SteerEvaluations:
    def __init__(self, engine: "Engine") -> None:
        self.engine = engine
        self._cache: OrderedDict[tuple, schemas.SteerEvalResponse] = OrderedDict()
        self._neutral: tuple[str, torch.Tensor] | None = None  # (model checksum, contexts)

    async def _on_worker(self, fn: Callable[[], Any], tokens: int, deadline: float | None) -> Any:
        return await self.engine.admission.submit(Job(run=_call, payload=fn, tokens=tokens, deadline=deadline))

    def _config(self, req: schemas.SteerEvalRequest) -> SteerEvalConfig:
        return SteerEvalConfig(multiples=tuple(req.multiples) or DEFAULTS.multiples,
                               methods=tuple(dict.fromkeys(req.methods)) or DEFAULTS.methods,
                               kl_budgets=tuple(req.kl_budgets) or DEFAULTS.kl_budgets, effect=req.effect,
                               new_tokens=req.new_tokens, prompts=req.prompts)

    async def _given_text(self, model: Any, texts: list[str], cfg: SteerEvalConfig) -> torch.Tensor:
        if len(texts) < 2:
            raise invalid("texts", "give at least 2 contexts (half give prompts, half the KL), or none for the model's own samples")
        ids = [(await self.engine.limits.token_ids(model, f"texts[{i}]", text, None, prepend_bos=True)).ids for i, text in enumerate(texts)]
        shortest = min(range(len(ids)), key=lambda i: len(ids[i]))
        if len(ids[shortest]) < cfg.prompt_tokens + 2:
            raise invalid(f"texts[{shortest}]", f"is {len(ids[shortest])} tokens with BOS: each context needs at least {cfg.prompt_tokens + 2}")
        length = len(ids[shortest])
        return torch.tensor([row[:length] for row in ids], dtype=torch.long)

    async def _model_samples(self, model: Any, entry: "BoundDictionary", deadline: float | None) -> torch.Tensor:
        if self._neutral is None or self._neutral[0] != model.checksum:
            try:
                text = await self._on_worker(lambda: neutral_text(model, entry), 16 * 64, deadline)
            except ConfigError as exc:
                raise invalid("texts", str(exc)) from None
            self._neutral = (model.checksum, text)
        return self._neutral[1]

    async def evaluate(self, req: schemas.SteerEvalRequest, deadline: float | None = None) -> schemas.SteerEvalResponse:
        engine = self.engine
        repository = engine.loaded
        model, entry = repository.model, repository.get(req.dictionary)
        engine.limits.feature(entry, "feature", req.feature, missing=not_found)
        cfg = self._config(req)
        # The version's manifest digest names its weights (versions are immutable); the model's checksum, what they read.
        key = (entry.ref, entry.dictionary.manifest_sha256, model.checksum, req.feature, cfg, tuple(req.texts))
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key].model_copy(update={"cached": True})
        scale = float(entry.statistics.max_activation[req.feature]) if entry.statistics is not None else None
        with engine.admission.admitted():
            contexts = await (self._given_text(model, req.texts, cfg) if req.texts else self._model_samples(model, entry, deadline))
            try:
                plan = await self._on_worker(lambda: plan_steering(model, entry, req.feature, contexts, cfg, scale), int(contexts.numel()), deadline)
            except NothingToSteer as exc:
                raise ServiceError(ErrorKind.FAILED_PRECONDITION, f"feature: {exc}", "feature") from None
            per_method = len(cfg.multiples)
            groups = [[0]] + [list(range(1 + i * per_method, 1 + (i + 1) * per_method)) for i in range(len(cfg.methods))]
            points = []
            for group in groups:
                points += await self._on_worker(lambda g=group: measure(model, entry, plan, g),
                                                len(group) * (int(plan.measure.numel()) + len(plan.prompts) * cfg.new_tokens), deadline)
        response = self._response(entry, model, conclude(plan, points), "given" if req.texts else "model_samples", cfg)
        self._cache[key] = response
        while len(self._cache) > CACHED:
            self._cache.popitem(last=False)
        return response

    @staticmethod
    def _response(entry: "BoundDictionary", model: Any, result: SteeringEvaluation, text: str, cfg: SteerEvalConfig) -> schemas.SteerEvalResponse:
        plain = result.as_dict()  # non-finite values already None
        return schemas.SteerEvalResponse.model_validate({
            **plain, "dictionary": {"name": entry.name, "version": entry.version},
            "label": entry.labels[result.feature] if entry.labels else "",
            "promoted": [{"id": t, "token": model.token_text(t)} for t in result.promoted_ids],
            "winners": [{"budget": budget, "method": method} for budget, method in result.winners.items()],
            "effect": cfg.effect, "text": text, "cached": False,
        })
