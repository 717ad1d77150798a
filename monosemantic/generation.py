"""Token-by-token generation with the SAE reading (and optionally steering) the hook at every position.

A Generation holds one request's state (token ids, KV cache, its own random generator) and advances one
decode step per call; monosemantic/decode_batch.py steps many in one forward, each through this class's own
hooks (`prepare`, `hooks`) and sampling (`conclude`), so a row's text is the same alone or in a batch. Several dictionaries may steer at once, each at its own
hook (or several at one hook, applied in order), and raw-direction edits may follow them at any hook; one
dictionary's features are reported at every step. Sampling takes OpenAI's frequency and presence penalties and
can report each step's log-probabilities.
"""

from __future__ import annotations

import functools
import inspect
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, NamedTuple

import torch
from torch import Tensor

from monosemantic.bound import BoundDictionary
from monosemantic.errors import MonosemanticError
from monosemantic.lm import HookPoint, hooked_replacement
from monosemantic.model import Model
from monosemantic.sampling import SamplingConfig, sample_rows
from monosemantic.steering import (DirectionEdit, Steer, SteeringSpec, apply_direction_edits, apply_transcoder_steering,
                                   steer_at_hook)


class NonFiniteOutput(MonosemanticError):
    """The steered model's logits are not finite: sampling from them would be meaningless."""


class DictionarySteering(NamedTuple):
    """One dictionary's steering entries in a generation."""

    dictionary: BoundDictionary
    specs: list[SteeringSpec]


class HookDirections(NamedTuple):
    """Direction edits at one hook, applied after any dictionary's steering there."""

    hook: HookPoint
    edits: list[DirectionEdit]


class TokenLogprobs(NamedTuple):
    """A step's log-probabilities: of the emitted token, and the most likely candidates (most likely first)."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]


class SteeredFeature(NamedTuple):
    dictionary: str  # its name
    feature: int
    before: float
    after: float


def cache_kwarg(model: torch.nn.Module) -> str:
    """transformers ≥ 5.2x names the KV cache `cache` (in and out); earlier releases say `past_key_values`."""
    return _cache_kwarg_of(type(model))


@functools.lru_cache(maxsize=None)
def _cache_kwarg_of(cls: type) -> str:  # per class: inspect.signature took 2.5% of a batched step's time
    return "cache" if "cache" in inspect.signature(cls.forward).parameters else "past_key_values"


@dataclass
class StepResult:
    index: int
    token_id: int
    text: str  # the new characters this token adds to the generated text
    top: list[tuple[int, float]]  # the reading dictionary's strongest features at the predicting position
    steered: list[SteeredFeature]  # every steered feature there, grouped by dictionary in the order of `steering`
    finish_reason: str | None  # set on the last step
    logprobs: TokenLogprobs | None = None  # with cfg.logprobs


_IN_A_BATCH = object()  # a Generation's _cache once a DecodeBatch holds its rows of the batched cache


@dataclass
class _Seen:
    """What one step's hooks read: the reader's features at the predicting position, and per steering entry (its
    index in Generation.steering) its features there before and after steering."""

    features: Tensor | None = None
    steered: dict[int, tuple[Tensor, Tensor]] = field(default_factory=dict)
    steered_here: bool = False  # this step steers (a steered output that is not finite is refused)
    read_input: Tensor | None = None  # the activation the reader encodes, where steering did not encode it already
    top: list[tuple[int, float]] | None = None  # the strongest features, where a batch ranked its rows at once


def strongest(features: Tensor, k: int) -> list[list[tuple[int, float]]]:
    """Per row of `features` [rows, d_sae], its k strongest active features (id, value), strongest first."""
    k = min(k, features.shape[-1])
    if not k:
        return [[] for _ in range(features.shape[0])]
    values, ids = features.topk(k, dim=-1)
    return [[(i, v) for i, v in zip(row_ids, row_values) if v > 0] for row_ids, row_values in zip(ids.tolist(), values.tolist())]


@dataclass
class Generation:
    model: Model
    reader: BoundDictionary  # whose features each step reports
    prompt_ids: list[int]
    cfg: SamplingConfig
    steering: list[DictionarySteering]
    steer_prompt: bool
    directions: list[HookDirections] = field(default_factory=list)
    generated: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    _emitted: str = ""  # the text already handed to a streaming client
    _cache: Any = None
    _generator: torch.Generator | None = None
    _counts: Tensor | None = None  # [vocab] times each token was generated, kept when a penalty needs it

    def __post_init__(self) -> None:
        self._generator = torch.Generator().manual_seed(self.cfg.seed)

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def hooks(self, seens: list["_Seen"]) -> list[tuple[HookPoint, Callable[[Tensor], Tensor]]]:
        """One replacement per hook that is steered or read, for a batch of rows that all steer as this generation
        does (the same `signature`), row r recording into seens[r]: it steers (at the last position's view of the
        cache, every new position), records each steered feature before and after, and keeps what the reader reads."""
        steer_here = seens[0].steered_here
        at: dict[str, list[int]] = {}  # hook key -> indices into self.steering (a transcoder's: at its output hook)
        points: dict[str, HookPoint] = {self.reader.hook.key: self.reader.hook}
        inputs: dict[str, Tensor | None] = {}  # a steering transcoder's input hook -> the activation the model ran on there
        for i, entry in enumerate(self.steering):
            written = entry.dictionary.hook_out or entry.dictionary.hook
            at.setdefault(written.key, []).append(i)
            points.setdefault(written.key, written)
            if entry.dictionary.hook_out is not None:
                points.setdefault(entry.dictionary.hook.key, entry.dictionary.hook)
                inputs[entry.dictionary.hook.key] = None  # until the forward passes it
        edits: dict[str, list[DirectionEdit]] = {}
        for group in self.directions:
            edits.setdefault(group.hook.key, []).extend(group.edits)
            points.setdefault(group.hook.key, group.hook)

        def input_of(i: int) -> Tensor:
            """A steering transcoder's input, as the model ran on it at its input hook in this forward."""
            seen_input = inputs[self.steering[i].dictionary.hook.key]
            if seen_input is None:
                raise MonosemanticError(f"transcoder {self.steering[i].dictionary.ref} writes at a hook the model runs "
                                        "before the one it reads: it cannot steer")
            return seen_input

        def at_hook(key: str) -> Callable[[Tensor], Tensor]:
            def replace(x: Tensor) -> Tensor:
                x_float, indices = x.float(), at.get(key, [])
                dictionaries = [i for i in indices if self.steering[i].dictionary.hook_out is None]
                transcoders = [i for i in indices if self.steering[i].dictionary.hook_out is not None]
                read: Tensor | None = None  # the reader's features of what the model runs on, where steering encoded them
                x_out = x
                if dictionaries and steer_here:
                    result = steer_at_hook(x_float, [Steer(self.steering[i].dictionary.sae, self.steering[i].specs) for i in dictionaries])
                    for i, before, after, full in zip(dictionaries, result.before, result.after, result.features_after):
                        for r, seen in enumerate(seens):
                            seen.steered[i] = (before[r, -1], after[r, -1])
                        if self.steering[i].dictionary is self.reader:
                            read = full[:, -1]
                    x_out, x_float = result.activation, result.activation
                elif dictionaries:
                    for i in dictionaries:  # generated-only steering, prompt positions: the features as they are
                        ids = [s.feature for s in self.steering[i].specs]
                        now = self.steering[i].dictionary.sae.encode(x_float[:, -1])[:, ids]
                        for r, seen in enumerate(seens):
                            seen.steered[i] = (now[r], now[r])
                for i in transcoders:  # their output edits, after the dictionaries' at the same hook
                    entry = self.steering[i]
                    if steer_here:
                        result = apply_transcoder_steering(entry.dictionary.sae, input_of(i), x_float, entry.specs)
                        for r, seen in enumerate(seens):
                            seen.steered[i] = (result.before[r, -1], result.after[r, -1])
                        x_out, x_float = result.activation, result.activation
                    else:
                        now = entry.dictionary.sae.encode(input_of(i)[:, -1])[:, [s.feature for s in entry.specs]]
                        for r, seen in enumerate(seens):
                            seen.steered[i] = (now[r], now[r])
                if steer_here and key in edits:
                    x_float = apply_direction_edits(x_float, edits[key])
                    x_out, read = x_float, None
                if key in inputs:  # a steering transcoder reads here: what the model runs on, after this hook's edits
                    inputs[key] = x_float
                if key == self.reader.hook.key:
                    # Encoded after the forward (Generation.conclude), so a batch of rows reading one dictionary is
                    # one encode (monosemantic/decode_batch.py) rather than one matvec per row.
                    for r, seen in enumerate(seens):
                        seen.features, seen.read_input = (None, x_float[r, -1]) if read is None else (read[r], None)
                return x_out
            return replace

        return [(points[key], at_hook(key)) for key in points]

    def hand_over_cache(self) -> Any:
        """Its KV cache, for a DecodeBatch to hold (monosemantic/decode_batch.py); until `take_back_cache` this
        generation steps only through the batch."""
        cache, self._cache = self._cache, _IN_A_BATCH
        return cache

    def take_back_cache(self, cache: Any) -> None:
        """Its own cache again (its rows of the batch's), or None once the batch has dropped it."""
        self._cache = cache

    @property
    def own_cache(self) -> Any:
        """The cache it steps with alone (None before its first step, or while a batch holds it)."""
        return None if self._cache is _IN_A_BATCH else self._cache

    @property
    def prefilled(self) -> bool:
        """Its prompt has run (the first step): every later step feeds one token."""
        return bool(self.generated)

    def prepare(self) -> tuple[list[int], "_Seen"]:
        """The next step's input ids (the whole prompt first, then the last token) and the record its hooks fill."""
        first = not self.prefilled
        steer_here = bool(self.steering or self.directions) and (self.steer_prompt or not first)
        return (self.prompt_ids if first else [self.generated[-1]]), _Seen(steered_here=steer_here)

    def signature(self, steer_here: bool) -> Hashable:
        """Generations with equal signatures steer and read identically, so one set of hooks serves all their rows
        (monosemantic/decode_batch.py): the same reader, the same dictionaries with the same entries. Direction
        edits carry tensors: a generation with them batches only with itself."""
        if self.directions:
            return id(self)
        return (id(self.reader), steer_here, tuple((id(e.dictionary), tuple(e.specs)) for e in self.steering))

    @property
    def position(self) -> int:
        """The position of the token the next decode step feeds (the last generated one)."""
        return len(self.prompt_ids) + len(self.generated) - 1

    def step(self) -> StepResult:
        """Run one forward (the whole prompt on the first call, one token after) and sample the next token."""
        if self._cache is _IN_A_BATCH:
            raise MonosemanticError("this generation's cache is held by a DecodeBatch: step it there")
        net = self.model.lm.model
        device = next(net.parameters()).device
        new_ids, seen = self.prepare()
        hooked = self.hooks([seen])
        total = len(self.prompt_ids) + len(self.generated)
        cache_name = cache_kwarg(net)
        with torch.inference_mode(), ExitStack() as hooks:
            for point, replace in hooked:
                hooks.enter_context(hooked_replacement(net, point, replace))
            out = net(
                input_ids=torch.tensor([new_ids], dtype=torch.long, device=device),
                attention_mask=torch.ones((1, total), dtype=torch.long, device=device),
                use_cache=True,
                **{cache_name: self._cache},
            )
        self._cache = out[cache_name]
        return self.conclude(out.logits[0, -1], seen)

    def check(self, logits: Tensor, seen: "_Seen", finite: bool | None = None) -> None:
        """Refuse a steered step whose logits are not finite (`finite`: where the caller checked a batch's at once).
        The bound on steering values keeps float32 finite in the steered activation itself; a model can still
        overflow downstream of it. Refuse rather than sample from NaN (which answered 200 with an empty text)."""
        if seen.steered_here and not (finite if finite is not None else bool(torch.isfinite(logits).all())):
            raise NonFiniteOutput("the steered model's output is not finite (inf or NaN): use smaller steering values")

    def penalty_counts(self, vocab: int, device: torch.device) -> Tensor | None:
        """[vocab] times each token was generated, kept once a penalty needs it; None otherwise."""
        if self._counts is None and (self.cfg.frequency_penalty or self.cfg.presence_penalty):
            self._counts = torch.zeros(vocab, dtype=torch.float32, device=device)
        return self._counts

    @property
    def generator(self) -> torch.Generator:
        return self._generator

    def conclude(self, logits: Tensor, seen: "_Seen", finite: bool | None = None, token: int | None = None) -> StepResult:
        """The step after its forward: `logits` at this row's last position, `seen` what its hooks recorded;
        `token` where the caller sampled a batch's rows at once (monosemantic/sampling.py)."""
        self.check(logits, seen, finite)
        if seen.features is None:
            # One float32 row: its matvec (3.1 ms at 768 x 24,576 here) beats the serving encoder's bf16 (7.5 ms:
            # bf16 pays off from tens of rows, monosemantic/precision.py probes 64).
            seen.features = self.reader.sae.encode(seen.read_input)
        cfg = self.cfg
        counts = self.penalty_counts(logits.shape[-1], logits.device)
        if token is None:
            token = sample_rows(logits[None], [cfg], [self._generator], [counts])[0]
        if counts is not None:
            counts[token] += 1
        self.generated.append(token)
        result = self._finish_step(token, seen)
        if cfg.logprobs:
            # The model's own distribution (float32, before penalties and temperature): what vLLM reports by default.
            logprobs = torch.log_softmax(logits.float(), dim=-1)
            values, ids = logprobs.topk(min(cfg.logprobs, logprobs.numel()))
            result.logprobs = TokenLogprobs(token, float(logprobs[token]), list(zip(ids.tolist(), values.tolist())))
        return result

    def _finish_step(self, token: int, seen: "_Seen") -> StepResult:
        tokenizer = self.model.lm.tokenizer
        previous = self.text
        full = tokenizer.decode(self.generated)
        reason = None
        if token == self.model.eos_id:
            reason, full = "eos", tokenizer.decode(self.generated[:-1])
        else:
            cut = min((i for s in self.cfg.stop if (i := full.find(s, max(0, len(previous) - len(s)))) >= 0), default=-1)
            if cut >= 0:
                reason, full = "stop", full[:cut]
            elif len(self.generated) >= self.cfg.max_new_tokens:
                reason = "length"
            elif len(self.prompt_ids) + len(self.generated) >= self.model.max_positions:
                reason = "length"
        self.text, self.finish_reason = full, reason
        top = seen.top if seen.top is not None else strongest(seen.features[None], self.cfg.features_top_k)[0]
        steered = []
        for i, entry in enumerate(self.steering):
            before, after = seen.steered[i]
            steered.extend(SteeredFeature(entry.dictionary.name, s.feature, b, a)
                           for s, b, a in zip(entry.specs, before.tolist(), after.tolist()))
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
