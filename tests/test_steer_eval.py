"""Steering evaluation (monosemantic/steer_eval.py) on a dictionary whose answer is known: a one-layer model read at
its embeddings, where feature i is token i's one-hot direction (tests/conftest.py's one_hot_lm_and_sae), so the
feature promotes token i through the direct path, and a continuation made of token i reads as the feature at its
scale. And on the shipped reference, the shape every curve has."""

from __future__ import annotations

import math

import pytest
import torch

from monosemantic.artifact import HookRef, ModelRef, publish
from monosemantic.bound import load_bound
from monosemantic.errors import ConfigError
from monosemantic.lm import resolve_hook
from monosemantic.model import Model
from monosemantic.steer_eval import Curve, NothingToSteer, Point, SteerEvalConfig, evaluate_steering

from conftest import one_hot_lm_and_sae

PLANTED = 7
HOOK = "blocks.0.hook_resid_pre"
SMALL = SteerEvalConfig(multiples=(0.0, 1.0, 4.0, 16.0, 64.0), prompts=4, prompt_tokens=4, new_tokens=8, promoted_tokens=1)


@pytest.fixture(scope="module")
def one_hot(tmp_path_factory):
    lm, sae = one_hot_lm_and_sae(32)
    model = Model.of(lm)
    point = resolve_hook(lm, HOOK)
    root = tmp_path_factory.mktemp("steer-eval")
    publish(root, "one-hot", sae, model=ModelRef(name="one-hot", checksum=lm.checksum),
            hook=HookRef(name=HOOK, module_path=point.module_path, alias=point.alias, kind=point.kind))
    return model, load_bound(model, root, "one-hot", None)


def _contexts(seed: int = 0, rows: int = 16, length: int = 24, vocab: int = 32) -> torch.Tensor:
    """BOS (w0), then tokens drawn from w1..w31: the planted token appears about once in 31 positions."""
    ids = torch.randint(1, vocab, (rows, length), generator=torch.Generator().manual_seed(seed))
    ids[:, 0] = 0
    return ids


def _curve(result, method: str) -> Curve:
    return next(c for c in result.curves if c.method == method)


def test_the_promoted_tokens_of_a_planted_direction_are_its_logit_effect(one_hot):
    model, dictionary = one_hot
    result = evaluate_steering(model, dictionary, PLANTED, _contexts(), SMALL)
    assert result.promoted_from == "logit_effects" and result.promoted_ids[0] == PLANTED


def test_the_scale_is_the_features_max_activation_on_the_text_without_statistics(one_hot):
    model, dictionary = one_hot
    result = evaluate_steering(model, dictionary, PLANTED, _contexts(), SMALL)
    assert result.scale_from == "text" and result.scale == pytest.approx(0.5)  # one-hot token 7 minus b_enc 0.5
    assert evaluate_steering(model, dictionary, PLANTED, _contexts(), SMALL, scale=2.0).scale == 2.0


@pytest.mark.parametrize("method", ["clamp", "add", "mean_difference"])
def test_cost_and_effect_rise_with_strength_until_the_text_is_the_feature(one_hot, method):
    model, dictionary = one_hot
    result = evaluate_steering(model, dictionary, PLANTED, _contexts(), SMALL)
    points = _curve(result, method).points
    kl, promoted = [p.kl for p in points], [p.promoted for p in points]
    assert kl == sorted(kl) and kl[-1] > 1.0
    assert promoted == sorted(promoted) and promoted[-1] > 0.8 > 10 * result.unsteered.promoted  # the final LayerNorm bounds a logit lead: 0.87 at most here
    # Steered hard enough the continuation is token 7 throughout, and read back unsteered it is the feature at its scale.
    assert points[-1].reading == pytest.approx(1.0) and points[-1].firing == 1.0
    assert result.unsteered.reading < 0.2


def test_no_steering_costs_nothing(one_hot):
    model, dictionary = one_hot
    result = evaluate_steering(model, dictionary, PLANTED, _contexts(), SMALL)
    assert result.unsteered.kl == 0.0
    for method in ("add", "mean_difference"):
        zero = _curve(result, method).points[0]
        assert zero.kl == pytest.approx(0.0, abs=1e-6) and zero.loss == pytest.approx(result.unsteered.loss, abs=1e-6)


def test_the_best_point_is_the_highest_reading_within_the_kl_budget():
    points = [Point(0.0, 0.0, 0.0, 3.0, 0.1, 0.0, 0.0), Point(1.0, 1.0, 0.05, 3.1, 0.2, 0.4, 0.5),
              Point(2.0, 2.0, 0.3, 3.5, 0.4, 0.9, 1.0), Point(4.0, 4.0, 0.2, 3.4, 0.3, 0.5, 0.6)]
    curve = Curve("add", points)
    assert curve.best(0.1) == points[1]
    assert curve.best(0.25) == points[3]
    assert curve.best(1.0) == points[2]
    assert Curve("add", points[2:]).best(0.1) is None


def test_the_winner_at_each_budget_is_the_method_reading_highest_within_it(one_hot):
    model, dictionary = one_hot
    result = evaluate_steering(model, dictionary, PLANTED, _contexts(), SMALL)
    for budget, winner in result.winners.items():
        within = {b.method: b.point for b in result.best if b.budget == budget and b.point is not None}
        assert all(p.kl <= budget for p in within.values())
        if winner is None:
            assert all(p.reading <= result.unsteered.reading for p in within.values())
        else:
            assert within[winner].reading == max(p.reading for p in within.values()) > result.unsteered.reading


def test_a_feature_that_never_fires_and_has_no_scale_is_refused_by_name(one_hot):
    model, dictionary = one_hot
    text = _contexts()
    text[text == 9] = 10  # token 9 never appears: feature 9 never fires
    with pytest.raises(NothingToSteer, match="feature 9 never fires"):
        evaluate_steering(model, dictionary, 9, text, SMALL)


@pytest.mark.parametrize("cfg, field", [(SteerEvalConfig(multiples=()), "multiples"), (SteerEvalConfig(multiples=(math.inf,)), "multiples"),
                                        (SteerEvalConfig(methods=("project",)), "methods"), (SteerEvalConfig(kl_budgets=(0.0,)), "kl_budgets"),
                                        (SteerEvalConfig(new_tokens=0), "new_tokens")])
def test_a_bad_configuration_is_refused_naming_the_field(one_hot, cfg, field):
    model, dictionary = one_hot
    with pytest.raises(ConfigError, match=field):
        evaluate_steering(model, dictionary, PLANTED, _contexts(), cfg)


def test_a_feature_out_of_range_is_refused(one_hot):
    model, dictionary = one_hot
    with pytest.raises(ConfigError, match="feature: 32"):
        evaluate_steering(model, dictionary, 32, _contexts(), SMALL)


@pytest.mark.slow
def test_on_the_reference_every_curve_costs_more_as_it_steers_harder(reference_model, reference_dictionary):
    from trainer.pipeline import corpus_contexts

    contexts, _ = corpus_contexts(reference_model.lm.tokenizer, "heldout", 48, None, 16)
    feature = int(reference_dictionary.statistics.density.argsort(descending=True)[10])
    cfg = SteerEvalConfig(multiples=(0.0, 1.0, 4.0, 16.0), prompts=4, new_tokens=12)
    result = evaluate_steering(reference_model, reference_dictionary, feature, contexts, cfg,
                               scale=float(reference_dictionary.statistics.max_activation[feature]))
    assert result.scale_from == "statistics" and result.promoted_from == "logit_effects"
    for curve in result.curves:
        kl = [p.kl for p in curve.points]
        assert kl == sorted(kl) and all(p.finite for p in curve.points)
    assert result.measured_tokens == 8 * 47 and result.generated_tokens == 4 * 12


def test_a_transcoder_is_steered_where_it_writes_and_read_where_it_reads(reference_model, tmp_path):
    """A TopK transcoder from the reference MLP's input to its output (random weights: k features fire on every
    token): its curves are measured with the edit at hook_mlp_out."""
    from monosemantic.sae import SAEConfig, build_sae
    from trainer.pipeline import corpus_contexts

    read, written = resolve_hook(reference_model.lm, "blocks.0.ln2.hook_normalized"), resolve_hook(reference_model.lm, "blocks.0.hook_mlp_out")
    sae = build_sae(SAEConfig.build(architecture="transcoder", d_in=128, d_out=128, d_sae=256, k=8), seed=0)
    ref = lambda p: HookRef(name=p.name, module_path=p.module_path, alias=p.alias, kind=p.kind)  # noqa: E731
    publish(tmp_path, "tc", sae, model=ModelRef(name="reference-lm", checksum=reference_model.checksum), hook=ref(read), extra={"hook_out": ref(written)})
    transcoder = load_bound(reference_model, tmp_path, "tc", None)
    contexts, _ = corpus_contexts(reference_model.lm.tokenizer, "heldout", 32, None, 8)
    result = evaluate_steering(reference_model, transcoder, 3, contexts, SteerEvalConfig(multiples=(0.0, 2.0, 8.0), prompts=2, new_tokens=4))
    assert result.scale_from == "text" and result.promoted_from == "logit_effects"  # hook_mlp_out has a direct path
    for method in ("add", "mean_difference"):
        kl = [p.kl for p in _curve(result, method).points]
        assert kl == sorted(kl) and kl[0] == pytest.approx(0.0, abs=1e-6) and kl[-1] > 0
    # Added along its decoder row at hook_mlp_out, the tokens that row raises through the direct path gain.
    assert _curve(result, "add").points[-1].promoted > 3 * result.unsteered.promoted
    # A clamp replaces the MLP's output by the transcoder's prediction (apply_transcoder_steering), here an untrained
    # one's: it costs even at strength 0, where add costs nothing.
    assert all(p.finite and p.kl > 0.1 for p in _curve(result, "clamp").points)
