"""An OpenAI completions or chat request as the engine's generations: its prompts tokenized (a chat rendered by its
template), its fields checked by the engine's own rules (Limits.generation, resolve_steering), one Generation per
choice, and the choices' steps in turn until every one is done.

`n` choices of one prompt use seeds seed, seed+1, … (so a seeded request is reproducible and its choices differ);
without a seed each choice draws its own. Completions prepend the BOS as /v1/generate does (the same text for the
same seed and steering); a chat prompt is the template's rendering, tokenized as it is (templates write their own
BOS).
"""

from __future__ import annotations

import secrets
from typing import Any, AsyncIterator, NamedTuple

from monosemantic import api
from monosemantic.bound import BoundDictionary
from monosemantic.generation import Generation, StepResult
from monosemantic.model import Model
from service.engine import SamplingExtras
from service.errors import ErrorKind, ServiceError, invalid
from service.openai_api import schemas as oa

# Our field names as the OpenAI request spells them, for errors raised by the engine's shared checks.
_RENAMED = {"max_new_tokens": "max_tokens", "token_ids": "prompt"}


class Choice(NamedTuple):
    index: int
    prompt: int  # which prompt it continues
    generation: Generation


class Plan(NamedTuple):
    """Everything a request runs, resolved: its choices, and what each response needs to say about them."""

    reader: BoundDictionary
    choices: list[Choice]
    prompt_tokens: int
    steering: list[api.Steering]
    order: dict[tuple[str, int], int]


def renamed(exc: ServiceError, limit_field: str) -> ServiceError:
    """An engine error with the field spelled as the OpenAI request names it."""
    field = exc.field
    if field is None:
        return exc
    head = field.split(".")[0].split("[")[0]
    new = limit_field if head == "max_new_tokens" else _RENAMED.get(head, head)
    if new == head:
        return exc
    return ServiceError(exc.kind, exc.message.replace(head, new, 1), field.replace(head, new, 1))


class ChoiceRunner:
    def __init__(self, engine: Any) -> None:
        self.engine = engine

    # ---- prompts --------------------------------------------------------------------------------------------------
    async def completion_prompts(self, model: Model, req: oa.CompletionRequest) -> list[list[int]]:
        prompts = req.prompts()
        out = []
        for i, prompt in enumerate(prompts):
            field = "prompt" if len(prompts) == 1 else f"prompt[{i}]"
            try:
                if isinstance(prompt, str):
                    out.append((await self.engine.limits.token_ids(model, field, prompt, None, prepend_bos=True)).ids)
                else:
                    out.append((await self.engine.limits.token_ids(model, field, None, prompt, prepend_bos=False)).ids)
            except ServiceError as exc:
                raise renamed(exc, "max_tokens") from None
        return out

    async def chat_prompt(self, model: Model, req: oa.ChatRequest, default_template: str | None) -> list[int]:
        tokenizer = model.lm.tokenizer
        template = req.chat_template or default_template or getattr(tokenizer, "chat_template", None)
        if not template:
            refusal = ServiceError(ErrorKind.INVALID_ARGUMENT,
                                   "messages: the model has no chat template; give one per request (chat_template) or at startup "
                                   "(MONOSEMANTIC_CHAT_TEMPLATE), or use /completions on raw text", "messages")
            refusal.code = "chat_template_missing"  # OpenAI's error `code` (service/openai_api/routes.py)
            raise refusal
        messages = [{"role": m.role, "content": m.text(), **({"name": m.name} if m.name else {})} for m in req.messages]
        try:
            text = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False, add_generation_prompt=req.add_generation_prompt)
        except Exception as exc:  # a Jinja error in the template, or one it raises for the messages (raise_exception)
            raise invalid("chat_template" if req.chat_template else "messages", f"the chat template failed: {exc}") from None
        limits = self.engine.limits
        if len(text) > limits.settings.max_text_chars * 2:
            raise invalid("messages", f"the rendered conversation has {len(text)} characters, over the limit")
        tokenized = await limits.token_ids(model, "messages", text, None, prepend_bos=False)
        return tokenized.ids

    # ---- the plan -------------------------------------------------------------------------------------------------
    def logit_bias(self, model: Model, bias: dict[str, float] | None) -> tuple[tuple[int, float], ...]:
        out = []
        for key, value in (bias or {}).items():
            if not key.strip().isdigit() or not 0 <= int(key) < model.vocab_size:
                raise invalid(f"logit_bias[{key}]", f"{key!r} is not a token id (vocabulary size {model.vocab_size})")
            if not -100 <= value <= 100:
                raise invalid(f"logit_bias[{key}]", f"{value} is outside -100..100")
            out.append((int(key), float(value)))
        if len(out) > 300:
            raise invalid("logit_bias", f"{len(out)} tokens; at most 300")
        return tuple(out)

    async def plan(self, req: oa.CompletionRequest | oa.ChatRequest, prompts: list[list[int]], max_tokens: int | None,
                   limit_field: str, logprobs: int) -> Plan:
        engine = self.engine
        repository = engine.loaded
        model = repository.model
        s = engine.settings
        share = max(1, int(s.max_queue * s.max_request_share))
        if len(prompts) * req.n > share:  # each choice holds an admission slot: more could never be admitted
            raise invalid("n", f"{len(prompts)} prompt(s) × n = {req.n} make {len(prompts) * req.n} generations, more than the {share} one "
                               "request may hold (settings MONOSEMANTIC_MAX_QUEUE, MONOSEMANTIC_MAX_REQUEST_SHARE)")
        longest = max(len(p) for p in prompts)
        room = model.max_positions - longest
        wanted = max_tokens if max_tokens is not None else max(1, min(engine.settings.max_new_tokens, room))
        try:
            generate = api.GenerateRequest(
                prompt="", max_new_tokens=wanted, temperature=req.temperature, top_p=req.top_p, top_k=req.top_k, seed=req.seed,
                stop=req.stops(), steering=req.steering, steer_prompt=req.steer_prompt, features_top_k=req.features_top_k,
                dictionary=req.dictionary,
            )
            reader = repository.get(req.dictionary)
            engine.limits.generation(model, generate)
            steering, order = engine.resolve_steering(repository, reader, generate)
        except ServiceError as exc:
            raise renamed(exc, limit_field) from None
        extras = SamplingExtras(req.frequency_penalty, req.presence_penalty, logprobs, self.logit_bias(model, req.logit_bias))
        choices = []
        for p, ids in enumerate(prompts):
            for j in range(req.n):
                seed = req.seed + j if req.seed is not None else secrets.randbits(63)
                seed %= 2**63
                field = "messages" if isinstance(req, oa.ChatRequest) else "prompt"
                generation = await engine.new_generation(model, reader, generate, steering, seed, extras, prompt_ids=ids, field=field)
                choices.append(Choice(len(choices), p, generation))
        return Plan(reader, choices, sum(len(p) for p in prompts), list(req.steering), order)

    async def steps(self, plan: Plan, deadline: float | None) -> AsyncIterator[tuple[Choice, StepResult]]:
        """Every choice's steps, one step of each unfinished choice in turn (rows of the decode batch, side by
        side), holding one admission slot per choice for the whole request."""
        with self.engine.admission.admitted(len(plan.choices)):
            async for i, step in self.engine.interleaved([choice.generation for choice in plan.choices], deadline):
                yield plan.choices[i], step
