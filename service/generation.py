"""Token-by-token generation with the SAE reading (and optionally steering) the hook at every position.

A Generation holds one request's state (token ids, KV cache, its own random generator) and advances one
decode step per call, so the engine's worker can interleave the steps of many streams with other work and a
client that goes away simply stops asking for steps.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from monosemantic.lm import hooked_replacement
from service.errors import invalid
from service.loaded import Loaded
from service.steering import SteeringSpec, apply_steering


def _cache_kwarg(model: torch.nn.Module) -> str:
    """transformers ≥ 5.2x names the KV cache `cache` (in and out); earlier releases say `past_key_values`."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@dataclass(frozen=True)
class SamplingConfig:
    max_new_tokens: int
    temperature: float
    top_p: float
    top_k: int
    seed: int
    stop: tuple[str, ...]
    features_top_k: int


@dataclass
class StepResult:
    index: int
    token_id: int
    text: str  # the new characters this token adds to the generated text
    top: list[tuple[int, float]]
    steered: list[tuple[int, float, float]]  # (feature, before, after)
    finish_reason: str | None  # set on the last step


def sample_next(logits: Tensor, cfg: SamplingConfig, generator: torch.Generator) -> int:
    """Temperature, then top-k, then nucleus (top-p) filtering; temperature 0 is greedy. Extreme settings degrade
    to greedy rather than to an invalid distribution: a temperature so small that the scaled logits overflow, or a
    top_p so small that float32 rounds it to 0 (the most likely token is always kept)."""
    logits = logits.float()
    greedy = int(logits.argmax())
    if cfg.temperature == 0:
        return greedy
    logits = logits / cfg.temperature
    if not torch.isfinite(logits).all():
        return greedy
    if cfg.top_k:
        kth = logits.topk(min(cfg.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(-1)
    if cfg.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        # keep the smallest prefix whose mass reaches top_p (the token that crosses it stays in)
        drop = sorted_probs.cumsum(-1) - sorted_probs >= cfg.top_p
        drop[0] = False
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
    if not (torch.isfinite(probs).all() and float(probs.sum()) > 0):
        return greedy
    return int(torch.multinomial(probs, 1, generator=generator))


@dataclass
class Generation:
    loaded: Loaded
    prompt_ids: list[int]
    cfg: SamplingConfig
    steering: list[SteeringSpec]
    steer_prompt: bool
    generated: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    _emitted: str = ""  # the text already handed to a streaming client
    _cache: Any = None
    _generator: torch.Generator | None = None

    def __post_init__(self) -> None:
        self._generator = torch.Generator().manual_seed(self.cfg.seed)

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def step(self) -> StepResult:
        """Run one forward (the whole prompt on the first call, one token after) and sample the next token."""
        model, sae = self.loaded.lm.model, self.loaded.dictionary.sae
        device = next(model.parameters()).device
        first = self._cache is None
        new_ids = self.prompt_ids if first else [self.generated[-1]]
        steer_here = bool(self.steering) and (self.steer_prompt or not first)
        seen: dict[str, Tensor] = {}

        def read_and_steer(x: Tensor) -> Tensor:
            x_float = x.float()
            if steer_here:
                result = apply_steering(sae, x_float, self.steering)
                seen["features"] = result.features_after[0, -1]
                seen["before"], seen["after"] = result.before[0, -1], result.after[0, -1]
                return result.activation
            seen["features"] = sae.encode(x_float[0, -1])
            if self.steering:  # generated-only steering, prompt position: report the features as they are
                ids = [s.feature for s in self.steering]
                seen["before"] = seen["after"] = seen["features"][ids]
            return x

        total = len(self.prompt_ids) + len(self.generated)
        cache_name = _cache_kwarg(model)
        with torch.inference_mode(), hooked_replacement(model, self.loaded.hook, read_and_steer):
            out = model(
                input_ids=torch.tensor([new_ids], dtype=torch.long, device=device),
                attention_mask=torch.ones((1, total), dtype=torch.long, device=device),
                use_cache=True,
                **{cache_name: self._cache},
            )
        if steer_here and not torch.isfinite(out.logits[0, -1]).all():
            # The bound on steering values keeps float32 finite in the steered activation itself; a model can still
            # overflow downstream of it. Refuse rather than sample from NaN (which answered 200 with an empty text).
            raise invalid("steering", "the steered model's output is not finite (inf or NaN): use smaller steering values")
        self._cache = out[cache_name]
        token = sample_next(out.logits[0, -1], self.cfg, self._generator)
        self.generated.append(token)
        return self._finish_step(token, seen)

    def _finish_step(self, token: int, seen: dict[str, Tensor]) -> StepResult:
        tokenizer = self.loaded.lm.tokenizer
        previous = self.text
        full = tokenizer.decode(self.generated)
        reason = None
        if token == self.loaded.eos_id:
            reason, full = "eos", tokenizer.decode(self.generated[:-1])
        else:
            cut = min((i for s in self.cfg.stop if (i := full.find(s, max(0, len(previous) - len(s)))) >= 0), default=-1)
            if cut >= 0:
                reason, full = "stop", full[:cut]
            elif len(self.generated) >= self.cfg.max_new_tokens:
                reason = "length"
            elif len(self.prompt_ids) + len(self.generated) >= self.loaded.max_positions:
                reason = "length"
        self.text, self.finish_reason = full, reason
        features = seen["features"]
        k = min(self.cfg.features_top_k, features.numel())
        values, ids = features.topk(k) if k else (features[:0], features[:0].long())
        top = [(int(i), float(v)) for i, v in zip(ids, values) if v > 0]
        steered = []
        if self.steering:
            steered = [(s.feature, float(b), float(a)) for s, b, a in zip(self.steering, seen["before"], seen["after"])]
        delta = self._advance_emitted(full, reason is not None)
        return StepResult(len(self.generated) - 1, token, delta, top, steered, reason)

    def _advance_emitted(self, full: str, finished: bool) -> str:
        """What a streaming client appends now. Until the end, hold back a partial UTF-8 character (decoded as
        U+FFFD) and any tail that could still grow into a stop string, so streamed text is never taken back."""
        stable = full
        if not finished:
            stable = stable.rstrip("\ufffd")
            hold = 0
            for stop in self.cfg.stop:
                for n in range(min(len(stop) - 1, len(stable)), 0, -1):
                    if stable.endswith(stop[:n]):
                        hold = max(hold, n)
                        break
            stable = stable[: len(stable) - hold]
        delta = stable[len(self._emitted):]
        self._emitted = stable
        return delta
