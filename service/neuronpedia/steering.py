"""Neuronpedia's steer/completion over the engine's generation: STEERED and DEFAULT completions of one prompt with
the same seed, steered by features or by raw vectors, answered whole or as server-sent events.

How Neuronpedia's strength maps onto a dictionary here, exactly. Neuronpedia adds `strength × strength_multiplier
× W_dec[index]` to the activation at the source's hook at every position, with W_dec in the model's raw units
(apps/inference, endpoints/steer/completion.py). A dictionary here reads x·s (its `input_scale`, 1 for most), so
its decoder row in raw units is W_dec[i]/s, and that sum is precisely the service's own `add` steering with value
c = strength × multiplier: x' = x + c·W_dec[i]/s (monosemantic/steering.py), which is the code that runs. So a
SIMPLE_ADDITIVE feature steer here equals /v1/generate with `{"feature": i, "mode": "add", "value": c}` and
`steer_prompt: true` at the same seed, and strength 0 equals the DEFAULT completion token for token.

The other cases are direction edits in raw units (monosemantic/steering.py, DirectionEdit): `normalize_steering`
(the unit row, c added), raw `vectors` at their hook, ORTHOGONAL_DECOMP ((I − P)x + c·Px) and PROJECTION_CAP (the
projection onto the direction capped above at c, as Neuronpedia's vLLM backend applies it). Sampling adds what
Neuronpedia's server accepts and ignores: `freq_penalty` is OpenAI's frequency penalty over the generated tokens,
and `n_logprobs` reports the model's own log-probabilities (service/neuronpedia/routes.py answers).
"""

from __future__ import annotations

import math
from typing import Any, AsyncIterator, NamedTuple

from monosemantic.api import MAX_STEERING_VALUE
from monosemantic.generation import DictionarySteering, Generation, HookDirections, SamplingConfig
from monosemantic.lm import HookPoint, hook_dim
from monosemantic.steering import DirectionEdit, SteeringSpec
from service.batcher import Job
from service.errors import invalid, over_limit
from service.neuronpedia import schemas as np
from service.neuronpedia.operations import NeuronpediaOperations, finite_vector

_METHOD = {np.SteerMethod.SIMPLE_ADDITIVE: "add", np.SteerMethod.ORTHOGONAL_DECOMP: "orthogonal", np.SteerMethod.PROJECTION_CAP: "cap"}


class FrameStream(NamedTuple):
    """A streamed answer: its first frame (already computed) and the rest."""

    first: dict
    rest: AsyncIterator[dict]


class NeuronpediaSteering:
    def __init__(self, engine: Any, ops: NeuronpediaOperations) -> None:
        self.engine, self.ops = engine, ops

    # ---- the request, checked and resolved ------------------------------------------------------------------------
    def _coefficient(self, field: str, strength: float, multiplier: float) -> float:
        c = float(strength) * float(multiplier)
        if not math.isfinite(c) or abs(c) > MAX_STEERING_VALUE:
            raise invalid(field, f"strength × strength_multiplier = {c} must be finite and at most {MAX_STEERING_VALUE:g} in size")
        return c

    def _features(self, req: np.SteerCompletionRequest, naming) -> tuple[list[DictionarySteering], list[HookDirections]]:
        """Each feature as the service's own `add` steering where that is exact (SIMPLE_ADDITIVE, not normalised),
        else as a direction edit along its raw decoder row."""
        groups: dict[str, DictionarySteering] = {}
        directions: dict[str, HookDirections] = {}
        seen: set[tuple[str, int]] = set()
        method = _METHOD[req.steer_method]
        for i, feature in enumerate(req.features or []):
            naming.check_model(f"features[{i}].model", feature.model)
            entry = naming.source(f"features[{i}].source", feature.source)
            self.engine.limits.feature(entry, f"features[{i}].index", feature.index)
            if (entry.name, feature.index) in seen:
                raise invalid(f"features[{i}].index", f"feature {feature.index} of {feature.source} is listed twice; give it once")
            seen.add((entry.name, feature.index))
            c = self._coefficient(f"features[{i}].strength", feature.strength, req.strength_multiplier)
            if method == "add" and not req.normalize_steering:
                groups.setdefault(entry.name, DictionarySteering(entry, [])).specs.append(SteeringSpec(feature.index, "add", c))
            else:
                # The feature's direction where the dictionary writes: its hook, or a transcoder's output hook.
                row = (entry.sae.W_dec[feature.index].detach().float() / entry.sae.output_scale).clone()
                self._edit(directions, entry.hook_out or entry.hook, row, method, c, req.normalize_steering, f"features[{i}].index")
        return list(groups.values()), list(directions.values())

    def _edit(self, directions: dict[str, HookDirections], hook: HookPoint, vector, method: str, c: float, normalize: bool, field: str) -> None:
        if (method != "add" or normalize) and not bool(vector.any()):
            raise invalid(field, "its direction is the zero vector, which has no direction to steer along")
        directions.setdefault(hook.key, HookDirections(hook, [])).edits.append(DirectionEdit(vector, method, c, normalize))

    async def _vectors(self, req: np.SteerCompletionRequest) -> list[HookDirections]:
        model = self.engine.loaded.model
        directions: dict[str, HookDirections] = {}
        method = _METHOD[req.steer_method]
        for i, vector in enumerate(req.vectors or []):
            hook = self.ops.hook(model, vector.hook)
            values = finite_vector(f"vectors[{i}].steering_vector", vector.steering_vector)
            width = await self.engine.run(Job(run=_hook_width, payload=(model, hook)))
            if values.numel() != width:
                raise invalid(f"vectors[{i}].steering_vector", f"has {values.numel()} values; the activation at {hook.name} has {width}")
            c = self._coefficient(f"vectors[{i}].strength", vector.strength, req.strength_multiplier)
            self._edit(directions, hook, values, method, c, req.normalize_steering, f"vectors[{i}].steering_vector")
        return list(directions.values())

    def _sampling(self, req: np.SteerCompletionRequest) -> SamplingConfig:
        s = self.engine.settings
        if req.n_completion_tokens > s.max_new_tokens:
            raise over_limit("n_completion_tokens", req.n_completion_tokens, s.max_new_tokens, "max_new_tokens")
        for field in ("temperature", "freq_penalty", "strength_multiplier", "seed"):
            if not math.isfinite(float(getattr(req, field))):
                raise invalid(field, "must be a finite number")
        seed = int(req.seed)
        if not 0 <= seed < 2**63:
            raise invalid("seed", f"{seed} is outside 0 ≤ seed < 2^63")
        return SamplingConfig(
            max_new_tokens=req.n_completion_tokens, temperature=float(req.temperature), top_p=1.0, top_k=0, seed=seed, stop=(),
            features_top_k=0, frequency_penalty=float(req.freq_penalty), logprobs=req.n_logprobs,
        )

    # ---- the operation -----------------------------------------------------------------------------------------
    async def completion(self, req: np.SteerCompletionRequest, deadline: float | None) -> Any:
        naming = self.ops.naming()
        naming.check_model("model", req.model)
        if (req.features is None) == (req.vectors is None):
            raise invalid("features", "give exactly one of features and vectors")
        if len(set(req.types)) != len(req.types):
            raise invalid("types", "a type is listed twice")
        steer = np.SteerType.STEERED in req.types
        if steer and not (req.features or req.vectors):
            raise invalid("features" if req.features is not None else "vectors", "is empty: give something to steer with")
        count = len(req.features or req.vectors or [])
        if count > self.engine.settings.max_steering:
            raise over_limit("features" if req.features is not None else "vectors", count, self.engine.settings.max_steering, "max_steering")
        cfg = self._sampling(req)
        features, directions = self._features(req, naming) if req.features is not None else ([], await self._vectors(req))
        model = naming.repository.model
        ids = (await self.ops.prompt(model, "prompt", req.prompt)).ids
        if len(ids) >= model.max_positions:
            raise invalid("prompt", f"{len(ids)} tokens leave no room to generate in the model's context of {model.max_positions}")
        reader = features[0].dictionary if features else naming.repository.default

        def generation(kind: np.SteerType) -> Generation:
            steered = kind is np.SteerType.STEERED
            return Generation(model, reader, ids, cfg, features if steered else [], True, directions=directions if steered else [])

        frames = self._frames(req, generation, deadline)
        if req.stream:
            # the first frame before answering 200, so that a request refused on its first step gets its status
            return FrameStream(await anext(frames), frames)
        last = None
        async for last in frames:
            pass
        return last

    async def _frames(self, req: np.SteerCompletionRequest, generation, deadline: float | None) -> AsyncIterator[dict]:
        """The answer after every generated token, STEERED and DEFAULT in the order asked, the last being the whole
        answer; one admission slot for all of it. The types run side by side, rows of one decode batch
        (service/decoder.py): a frame follows each token of either, taken in turn."""
        outputs: dict[np.SteerType, dict] = {kind: {"type": kind.value, "output": ""} for kind in req.types}
        if req.n_logprobs:
            for out in outputs.values():
                out["logprobs"] = []
        model = self.engine.loaded.model
        field = "features" if req.features is not None else "vectors"
        with self.engine.admission.admitted():
            runs = [(kind, generation(kind)) for kind in req.types]
            async for i, step in self.engine.interleaved([run for _, run in runs], deadline, field=field):
                kind, run = runs[i]
                out = outputs[kind]
                out["output"] = run.text
                if step.logprobs is not None:
                    lp = step.logprobs
                    out["logprobs"].append({
                        "token": model.token_text(lp.token_id), "logprob": lp.logprob,
                        "top_logprobs": [{"token": model.token_text(t), "logprob": v} for t, v in lp.top],
                    })
                yield {"outputs": [dict(o) for o in outputs.values()]}


def _hook_width(jobs: list[Job]) -> list[int]:
    model, hook = jobs[0].payload
    return [hook_dim(model.lm, hook)]


