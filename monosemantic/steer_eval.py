"""Steering evaluation: does steering a feature do what its dashboard suggests, and what does it cost? One curve of
effect against cost per steering method over a range of strengths, with a difference-in-means direction beside the
dictionary's own steering as the baseline (AxBench, Wu et al. 2025, found that feature steering often loses to such
simple baselines, so the baseline is measured the same way and the winner is reported as found).

For each method and strength, on a held-out text split in two (the first half `pool`, the second `measure`):
- cost, on `measure` with the steering applied at every position after BOS (teacher forced): `kl`, the mean over
  positions of KL(p ‖ q) of the steered next-token distribution q from the unsteered p, and `loss`, the steered
  next-token cross-entropy;
- effect: `reading`, the feature's own mean activation on continuations generated greedily under the steering from
  the starts of the `pool` contexts and read back without it (the text itself, not the edited activation, must
  evoke the feature), over the feature's scale; `firing`, the share of those tokens where it fires; and `promoted`,
  the probability q gives on `measure` to the tokens the feature promotes (its direct logit effects, Bricken et al.
  2023's logit weights; at a hook with no direct path to the logits, the tokens it fires on most in `pool`).
Methods (monosemantic/steering.py): `clamp` and `add` at strength m × scale, the scale being the feature's max
activation (its dashboard's, else the most it reaches in `pool`); `mean_difference`, x + m·v with v the mean
activation at the hook over the `pool` positions where the feature fires most minus the mean over all of `pool`
(the difference in means of Marks & Tegmark 2023 and AxBench's DiffMean).
A transcoder reads at its hook and is steered where it writes (its hook_out, apply_transcoder_steering): the
baseline's direction and the promoted tokens are taken there, the reading at its input.
The best strength at a KL budget is the point of highest effect (`reading`, or `promoted` if asked) whose KL is
within it.
"""

from __future__ import annotations

import math
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, NamedTuple

import torch
from torch import Tensor

from monosemantic.bound import BoundDictionary
from monosemantic.decode_batch import run_together
from monosemantic.errors import ConfigError, MonosemanticError
from monosemantic.generation import DictionarySteering, Generation, HookDirections
from monosemantic.lm import HookPoint, direct_logit_extremes, hooked_replacement, read_activations, read_activations_at
from monosemantic.model import Model
from monosemantic.sampling import SamplingConfig
from monosemantic.steering import (DirectionEdit, SteeringSpec, apply_direction_edits, apply_steering, apply_transcoder_steering,
                                   features_at)

METHODS = ("clamp", "add", "mean_difference")
EFFECTS = ("reading", "promoted")


class NothingToSteer(MonosemanticError):
    """The feature gives no scale to steer at: it never fires on the text and has no recorded max activation."""


@dataclass(frozen=True)
class SteerEvalConfig:
    multiples: tuple[float, ...] = (0.0, 0.25, 0.5, 1.0, 2.0, 3.0, 4.0, 8.0, 16.0)  # strengths, in units of the feature's scale
    methods: tuple[str, ...] = METHODS
    kl_budgets: tuple[float, ...] = (0.1, 0.5)
    effect: str = "reading"  # what the best point maximises: "reading" or "promoted"
    prompts: int = 8  # continuations generated per point (from the first `pool` contexts)
    prompt_tokens: int = 8  # each prompt: BOS and the next tokens of its context
    new_tokens: int = 24
    promoted_tokens: int = 10
    top_positions: int = 32  # the feature's strongest `pool` positions: the baseline's mean and the top-context tokens
    batch: int = 8  # contexts per teacher-forced forward

    def check(self) -> None:
        if not self.multiples or any(not math.isfinite(m) or m < 0 for m in self.multiples):
            raise ConfigError("multiples: at least one finite strength >= 0")
        if not self.methods or any(m not in METHODS for m in self.methods):
            raise ConfigError(f"methods: some of {', '.join(METHODS)}")
        if self.effect not in EFFECTS:
            raise ConfigError(f"effect: one of {', '.join(EFFECTS)}")
        if any(not math.isfinite(b) or b <= 0 for b in self.kl_budgets):
            raise ConfigError("kl_budgets: finite and > 0")
        for name in ("prompts", "prompt_tokens", "new_tokens", "promoted_tokens", "top_positions", "batch"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: at least 1")


class Point(NamedTuple):
    multiple: float
    strength: float  # in the method's own units: a feature activation (clamp, add), the coefficient of v (mean_difference)
    kl: float
    loss: float
    promoted: float
    reading: float
    firing: float

    @property
    def finite(self) -> bool:
        return all(math.isfinite(v) for v in self)


class Curve(NamedTuple):
    method: str
    points: list[Point]

    def best(self, budget: float, effect: str = "reading") -> Point | None:
        """The point of highest `effect` whose KL is within `budget` (None: every point exceeds it)."""
        within = [p for p in self.points if p.finite and p.kl <= budget]
        return max(within, key=lambda p: (getattr(p, effect), -p.kl), default=None)


class Best(NamedTuple):
    budget: float
    method: str
    point: Point | None


class SteeringEvaluation(NamedTuple):
    feature: int
    scale: float  # the feature activation a multiple of 1 means
    scale_from: str  # "statistics" | "text"
    promoted_ids: list[int]
    promoted_from: str  # "logit_effects" | "top_contexts"
    unsteered: Point  # the model as it is: kl 0, its loss, promoted probability and reading
    curves: list[Curve]
    best: list[Best]  # per budget, per method
    winners: dict[float, str | None]  # per budget: the method of most effect within it (None: none beats unsteered)
    measured_tokens: int  # teacher-forced positions per point
    generated_tokens: int  # continuation tokens read per point

    def as_dict(self) -> dict:
        """Plain JSON: a value that is not finite (a strength whose steered output overflowed) is None."""
        def point(p: Point) -> dict:
            return {k: (v if math.isfinite(v) else None) for k, v in p._asdict().items()}

        return {
            "feature": self.feature, "scale": self.scale, "scale_from": self.scale_from,
            "promoted_ids": self.promoted_ids, "promoted_from": self.promoted_from, "unsteered": point(self.unsteered),
            "curves": [{"method": c.method, "points": [point(p) for p in c.points]} for c in self.curves],
            "best": [{"budget": b.budget, "method": b.method, "point": None if b.point is None else point(b.point)} for b in self.best],
            "winners": {str(k): v for k, v in self.winners.items()},
            "measured_tokens": self.measured_tokens, "generated_tokens": self.generated_tokens,
        }


def _feature_values(dictionary: BoundDictionary, x: Tensor, feature: int) -> Tensor:
    """The feature's activation at each row of x [..., d_in]."""
    return features_at(dictionary.sae, x, torch.tensor([feature], device=x.device))[..., 0]


class _Method(NamedTuple):
    edit: Callable[[Tensor, Tensor], Tensor]  # (read at the hook, written at the edited hook) -> the steered written
    steering: list[DictionarySteering]  # the same edit, as a Generation takes it
    directions: list[HookDirections]


def _written(dictionary: BoundDictionary) -> HookPoint:
    """Where steering edits: a transcoder's output hook (it reads at `hook` and writes at `hook_out`), else the hook."""
    return dictionary.hook_out if dictionary.hook_out is not None else dictionary.hook


def _method(dictionary: BoundDictionary, feature: int, method: str, strength: float, direction: Tensor) -> _Method:
    if method == "mean_difference":
        edits = [DirectionEdit(direction, "add", strength)]
        return _Method(lambda x, y: apply_direction_edits(y, edits), [], [HookDirections(_written(dictionary), edits)])
    specs = [SteeringSpec(feature, method, strength)]
    if dictionary.hook_out is not None:
        return _Method(lambda x, y: apply_transcoder_steering(dictionary.sae, x, y, specs).activation, [DictionarySteering(dictionary, specs)], [])
    return _Method(lambda x, y: apply_steering(dictionary.sae, y, specs).activation, [DictionarySteering(dictionary, specs)], [])


@contextmanager
def _steered(net, dictionary: BoundDictionary, edit: Callable[[Tensor, Tensor], Tensor]) -> Iterator[None]:
    """Within it every forward steers at every position after BOS (a transcoder's input captured at its hook first)."""
    read: list[Tensor] = []

    def capture(x: Tensor) -> Tensor:
        read[:] = [x[:, 1:].float()]
        return x

    def replace(y: Tensor) -> Tensor:
        out = y.clone()
        out[:, 1:] = edit(read[0] if read else y[:, 1:].float(), y[:, 1:].float()).to(y.dtype)
        return out

    with ExitStack() as hooks:
        if dictionary.hook_out is not None:
            hooks.enter_context(hooked_replacement(net, dictionary.hook, capture))
        hooks.enter_context(hooked_replacement(net, _written(dictionary), replace))
        yield


class _Pool(NamedTuple):
    scale: float
    scale_from: str
    direction: Tensor  # [d] the difference in means where steering writes, raw units
    top_tokens: list[int]  # the tokens at the feature's strongest positions, strongest first, without repeats


@torch.no_grad()
def _pool(model: Model, dictionary: BoundDictionary, feature: int, pool: Tensor, cfg: SteerEvalConfig, scale: float | None) -> _Pool:
    hooks = [dictionary.hook] if dictionary.hook_out is None else [dictionary.hook, dictionary.hook_out]
    read = read_activations_at(model.lm, pool, hooks, attention_mask=torch.ones_like(pool))  # BOS's activation is no context's
    x, y = (r[:, 1:].float().reshape(-1, r.shape[-1]) for r in (read[0], read[-1]))
    ids = pool[:, 1:].reshape(-1)
    values = _feature_values(dictionary, x, feature)
    found = float(values.max()) if values.numel() else 0.0
    if scale is None or not math.isfinite(scale) or scale <= 0:
        if found <= 0:
            raise NothingToSteer(f"feature {feature} never fires on the evaluation text and has no recorded max "
                                 "activation: there is no strength to steer it at (compute its statistics, or give text it fires on)")
        scale, scale_from = found, "text"
    else:
        scale_from = "statistics"
    firing = int((values > 0).sum())
    top = values.topk(max(1, min(cfg.top_positions, firing))).indices
    direction = y[top].mean(0) - y.mean(0)  # where steering writes: a transcoder's output
    return _Pool(float(scale), scale_from, direction, list(dict.fromkeys(ids[top].tolist())))


def _promoted(model: Model, dictionary: BoundDictionary, feature: int, pool: _Pool, k: int) -> tuple[list[int], str]:
    extremes = direct_logit_extremes(model.lm, _written(dictionary), dictionary.sae.W_dec[feature:feature + 1].float(), k)
    if extremes is not None:
        return extremes.up_ids[0].tolist(), "logit_effects"
    return pool.top_tokens[:k], "top_contexts"


@torch.no_grad()
def _costs(model: Model, dictionary: BoundDictionary, measure: Tensor, methods: list[_Method | None], promoted: list[int],
           batch: int) -> list[tuple[float, float, float]]:
    """Per method (None: unsteered), (kl, loss, promoted probability) over `measure`'s predicted positions."""
    net = model.lm.model
    device = next(net.parameters()).device
    sums = [[0.0, 0.0, 0.0] for _ in methods]
    count = 0
    promoted_ids = torch.tensor(promoted, dtype=torch.long, device=device)
    for start in range(0, measure.shape[0], batch):
        ids = measure[start:start + batch].to(device)
        targets = ids[:, 1:].reshape(-1)
        mask = torch.ones_like(ids)
        clean = torch.log_softmax(net(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1].float(), -1).reshape(targets.numel(), -1)
        clean_p = clean.exp()  # once per batch, not per method
        count += targets.numel()
        for totals, method in zip(sums, methods):
            if method is None:
                logq = clean
            else:
                with _steered(net, dictionary, method.edit):
                    logits = net(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1].float()
                logq = torch.log_softmax(logits, -1).reshape(targets.numel(), -1)
            totals[0] += float((clean_p * (clean - logq)).sum())
            totals[1] += float(-logq.gather(1, targets[:, None]).sum())
            totals[2] += float(logq.index_select(1, promoted_ids).exp().sum())
    return [tuple(t / max(count, 1) for t in totals) for totals in sums]


@torch.no_grad()
def _readings(model: Model, dictionary: BoundDictionary, feature: int, prompts: list[list[int]], methods: list[_Method | None],
              cfg: SteerEvalConfig, scale: float) -> list[tuple[float, float]]:
    """Per method, (mean reading over scale, firing share) on its greedy continuations of every prompt, read back
    unsteered; (nan, nan) for a method whose steered output stopped being finite."""
    sampling = SamplingConfig(cfg.new_tokens, 0.0, 1.0, 0, 0, (), 1)
    rows = [Generation(model, dictionary, prompt, sampling, m.steering if m else [], True, directions=m.directions if m else [])
            for m in methods for prompt in prompts]
    failed = run_together(rows)
    out = []
    for i in range(len(methods)):
        group = rows[i * len(prompts):(i + 1) * len(prompts)]
        if any(id(g) in failed for g in group):
            out.append((math.nan, math.nan))
            continue
        values = []
        for g in group:
            if not g.generated:
                continue
            ids = torch.tensor([g.prompt_ids + g.generated], dtype=torch.long)
            x = read_activations(model.lm, ids, dictionary.hook, attention_mask=torch.ones_like(ids))[0, len(g.prompt_ids):].float()
            values.append(_feature_values(dictionary, x, feature))
        read = torch.cat(values) if values else torch.zeros(0)
        out.append((float(read.mean()) / scale if read.numel() else 0.0, float((read > 0).float().mean()) if read.numel() else 0.0))
    return out


class SteeringPlan(NamedTuple):
    """What every point of an evaluation shares, decided once (`plan_steering`); the points are then measured in
    any grouping (`measure`: the service runs a few per worker job, so other requests interleave) and concluded."""

    feature: int
    cfg: SteerEvalConfig
    pool: _Pool
    promoted: list[int]
    promoted_from: str
    points: list[tuple[str, float, float]]  # (method, multiple, strength); index 0 is the model unsteered
    methods: list[_Method | None]  # one per point; None: unsteered
    prompts: list[list[int]]
    measure: Tensor


@torch.no_grad()
def plan_steering(model: Model, dictionary: BoundDictionary, feature: int, contexts: Tensor,
                  cfg: SteerEvalConfig = SteerEvalConfig(), scale: float | None = None) -> SteeringPlan:
    cfg.check()
    if not 0 <= feature < dictionary.d_sae:
        raise ConfigError(f"feature: {feature} is not a feature of {dictionary.ref} (0 to {dictionary.d_sae - 1})")
    if contexts.ndim != 2 or contexts.shape[1] < 2:
        raise ConfigError("contexts: [n, ctx] token ids with ctx >= 2")
    half = contexts.shape[0] // 2
    pool_ids, measure = (contexts[:half], contexts[half:]) if half else (contexts, contexts)
    pool = _pool(model, dictionary, feature, pool_ids, cfg, scale)
    promoted, promoted_from = _promoted(model, dictionary, feature, pool, cfg.promoted_tokens)
    points = [("none", 0.0, 0.0)] + [(method, m, m * (1.0 if method == "mean_difference" else pool.scale))
                                     for method in cfg.methods for m in cfg.multiples]
    methods = [None] + [_method(dictionary, feature, method, s, pool.direction) for method, _, s in points[1:]]
    prompts = [row[:cfg.prompt_tokens + 1].tolist() for row in pool_ids[:cfg.prompts]]
    return SteeringPlan(feature, cfg, pool, promoted, promoted_from, points, methods, prompts, measure)


def measure(model: Model, dictionary: BoundDictionary, plan: SteeringPlan, indices: list[int]) -> list[Point]:
    """The points `indices` of the plan (0: unsteered)."""
    methods = [plan.methods[i] for i in indices]
    costs = _costs(model, dictionary, plan.measure, methods, plan.promoted, plan.cfg.batch)
    readings = _readings(model, dictionary, plan.feature, plan.prompts, methods, plan.cfg, plan.pool.scale)
    return [Point(plan.points[i][1], plan.points[i][2], *cost, *reading) for i, cost, reading in zip(indices, costs, readings)]


def conclude(plan: SteeringPlan, points: list[Point]) -> SteeringEvaluation:
    """The evaluation from every point of the plan, in its order."""
    cfg, unsteered = plan.cfg, points[0]
    curves = [Curve(method, [p for (name, _, _), p in zip(plan.points, points) if name == method]) for method in cfg.methods]
    best, winners = [], {}
    for budget in cfg.kl_budgets:
        found = [(c.method, c.best(budget, cfg.effect)) for c in curves]
        best.extend(Best(budget, method, p) for method, p in found)
        # A method wins a budget only by more effect than the model unsteered has: else none does.
        baseline = getattr(unsteered, cfg.effect)
        ranked = [(getattr(p, cfg.effect), method) for method, p in found if p is not None and getattr(p, cfg.effect) > baseline]
        winners[budget] = max(ranked)[1] if ranked else None
    return SteeringEvaluation(plan.feature, plan.pool.scale, plan.pool.scale_from, plan.promoted, plan.promoted_from, unsteered,
                              curves, best, winners, int(plan.measure[:, 1:].numel()), len(plan.prompts) * cfg.new_tokens)


def evaluate_steering(model: Model, dictionary: BoundDictionary, feature: int, contexts: Tensor,
                      cfg: SteerEvalConfig = SteerEvalConfig(), scale: float | None = None) -> SteeringEvaluation:
    """The steering curves of `feature` (module docstring) on held-out `contexts` [n, ctx] token ids, each
    starting with BOS; `scale`: the feature's max activation where its statistics record one."""
    plan = plan_steering(model, dictionary, feature, contexts, cfg, scale)
    return conclude(plan, measure(model, dictionary, plan, list(range(len(plan.points)))))


@torch.no_grad()
def neutral_text(model: Model, dictionary: BoundDictionary, contexts: int = 16, length: int = 64, seed: int = 0) -> Tensor:
    """[contexts, length + 1] token ids: BOS and the model's own unsteered samples (temperature 1, seeds seed…),
    neutral text for an evaluation where the user gives none (the service's default). A sample that ends early
    (EOS) is left out; ConfigError if every one does."""
    start = model.bos_id if model.bos_id is not None else model.eos_id
    if start is None:
        raise ConfigError("the model has neither a BOS nor an EOS token to start samples from: give the text")
    rows = [Generation(model, dictionary, [start], SamplingConfig(length, 1.0, 1.0, 0, seed + i, (), 1), [], False)
            for i in range(contexts)]
    run_together(rows)
    kept = [[start, *g.generated] for g in rows if len(g.generated) == length and g.finish_reason == "length"]
    if not kept:
        raise ConfigError("every sample of the model ended before its length: no neutral text (give the text)")
    return torch.tensor(kept, dtype=torch.long)
