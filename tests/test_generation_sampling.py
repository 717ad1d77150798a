"""Direction edits (monosemantic/steering.py) and the sampling options of monosemantic/generation.py: OpenAI's
frequency and presence penalties, reported log-probabilities, raw-direction steering inside a generation; and the
sampler over a batch of rows (monosemantic/sampling.py)."""

from __future__ import annotations

import pytest
import torch

from monosemantic.bound import load_bound
from monosemantic.generation import DictionarySteering, Generation, HookDirections, SamplingConfig
from monosemantic.model import load_model
from monosemantic.sampling import sample_rows
from monosemantic.shipped import REFERENCE_DICTIONARY, reference_lm_path, reference_registry_path
from monosemantic.steering import DirectionEdit, SteeringSpec, apply_direction_edits

X = torch.randn(4, 16, generator=torch.Generator().manual_seed(2))
V = torch.randn(16, generator=torch.Generator().manual_seed(3))
UNIT = V / V.norm()


def test_add_moves_along_the_vector_and_normalize_along_its_unit():
    assert torch.allclose(apply_direction_edits(X, [DirectionEdit(V, "add", 2.5)]), X + 2.5 * V)
    assert torch.allclose(apply_direction_edits(X, [DirectionEdit(V, "add", 2.5, normalize=True)]), X + 2.5 * UNIT)


def test_orthogonal_scales_the_component_along_the_direction_and_keeps_the_rest():
    out = apply_direction_edits(X, [DirectionEdit(V, "orthogonal", 3.0)])
    assert torch.allclose(out @ UNIT, 3.0 * (X @ UNIT), atol=1e-5)
    rest = lambda y: y - (y @ UNIT)[:, None] * UNIT  # noqa: E731
    assert torch.allclose(rest(out), rest(X), atol=1e-5)


def test_orthogonal_at_one_and_a_cap_above_every_projection_leave_the_activation_exactly():
    assert torch.equal(apply_direction_edits(X, [DirectionEdit(V, "orthogonal", 1.0)]), X)
    assert torch.equal(apply_direction_edits(X, [DirectionEdit(V, "cap", 1e6)]), X)


def test_cap_limits_the_projection_from_above_only():
    cap = float((X @ UNIT).median())
    out = apply_direction_edits(X, [DirectionEdit(V, "cap", cap)])
    before, after = X @ UNIT, out @ UNIT
    assert torch.allclose(after, before.clamp(max=cap), atol=1e-5)


def test_edits_apply_in_order():
    edits = [DirectionEdit(V, "add", 1.0), DirectionEdit(V, "orthogonal", 0.0)]
    out = apply_direction_edits(X, edits)
    assert torch.allclose(out @ UNIT, torch.zeros(4), atol=1e-5)  # the add was removed by the projection after it
    assert not torch.allclose(apply_direction_edits(X, edits[::-1]) @ UNIT, torch.zeros(4), atol=1e-3)


@pytest.mark.parametrize("method, normalize", [("orthogonal", False), ("cap", False), ("add", True)])
def test_a_zero_direction_is_refused_where_a_direction_is_needed(method, normalize):
    with pytest.raises(ValueError, match="zero vector"):
        apply_direction_edits(X, [DirectionEdit(torch.zeros(16), method, 1.0, normalize)])


# ---- inside a generation -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model():
    return load_model(str(reference_lm_path()))


@pytest.fixture(scope="module")
def dictionary(model):
    return load_bound(model, reference_registry_path(), REFERENCE_DICTIONARY, None)


PROMPT = "import os\nfor name in "


def _run(model, dictionary, steps=16, steering=(), directions=(), **sampling):
    cfg = SamplingConfig(**{"max_new_tokens": steps, "temperature": 0.9, "top_p": 1.0, "top_k": 0, "seed": 5, "stop": (), "features_top_k": 0, **sampling})
    ids = [model.bos_id, *model.tokenize(PROMPT, prepend_bos=False).ids]
    g = Generation(model, dictionary, ids, cfg, list(steering), True, directions=list(directions))
    results = []
    while not g.done:
        results.append(g.step())
    return g, results


def test_a_direction_add_along_the_raw_decoder_row_generates_what_the_feature_add_does(model, dictionary):
    sae = dictionary.sae
    row = sae.W_dec[7] / sae.cfg.input_scale
    by_feature, _ = _run(model, dictionary, steering=[DictionarySteering(dictionary, [SteeringSpec(7, "add", 8.0)])])
    by_direction, _ = _run(model, dictionary, directions=[HookDirections(dictionary.hook, [DirectionEdit(row, "add", 8.0)])])
    plain, _ = _run(model, dictionary)
    assert by_direction.generated == by_feature.generated
    assert by_direction.generated != plain.generated


def test_penalties_at_zero_sample_exactly_as_without_them(model, dictionary):
    with_zero, _ = _run(model, dictionary, frequency_penalty=0.0, presence_penalty=0.0)
    assert with_zero.generated == _run(model, dictionary)[0].generated


@pytest.mark.parametrize("penalty", ["frequency_penalty", "presence_penalty"])
def test_a_large_penalty_keeps_greedy_decoding_from_repeating_a_token(model, dictionary, penalty):
    plain, _ = _run(model, dictionary, steps=24, temperature=0)
    assert len(set(plain.generated)) < len(plain.generated)  # the reference repeats itself when greedy
    penalised, _ = _run(model, dictionary, steps=24, temperature=0, **{penalty: 100.0})
    assert len(set(penalised.generated)) == len(penalised.generated)


def test_logprobs_are_the_model_s_own_log_softmax_for_each_step(model, dictionary):
    g, results = _run(model, dictionary, steps=6, logprobs=4, frequency_penalty=2.0)
    ids = [model.bos_id, *model.tokenize(PROMPT, prepend_bos=False).ids]
    with torch.no_grad():
        logits = model.lm.model(torch.tensor([ids + g.generated])).logits[0]
    for step, result in enumerate(results):
        expected = torch.log_softmax(logits[len(ids) - 1 + step].float(), -1)
        lp = result.logprobs
        assert lp.token_id == g.generated[step]
        assert lp.logprob == pytest.approx(float(expected[lp.token_id]), abs=1e-4)
        assert [t for t, _ in lp.top] == expected.topk(4).indices.tolist()
        assert [v for _, v in lp.top] == sorted((v for _, v in lp.top), reverse=True)


def test_without_logprobs_none_are_reported(model, dictionary):
    _, results = _run(model, dictionary, steps=2)
    assert all(r.logprobs is None for r in results)


# ---- the sampler over a batch of rows (monosemantic/sampling.py) ------------------------------------------------
def _cfg(temperature=1.0, top_p=1.0, top_k=0, **extra):
    return SamplingConfig(1, temperature, top_p, top_k, 0, (), 0, **extra)


def test_a_row_samples_the_same_token_alone_as_among_rows_with_other_settings():
    logits = torch.randn(6, 300, generator=torch.Generator().manual_seed(1)) * 3
    cfgs = [_cfg(), _cfg(0.0), _cfg(0.7, top_p=0.9), _cfg(1.3, top_k=20), _cfg(frequency_penalty=0.5), _cfg(0.7, top_p=0.9)]
    counts = [None, None, None, None, torch.arange(300.0) % 3, None]
    for seed in range(20):
        together = sample_rows(logits, cfgs, [torch.Generator().manual_seed(seed + r) for r in range(6)], counts)
        alone = [sample_rows(logits[r:r + 1], [cfgs[r]], [torch.Generator().manual_seed(seed + r)], [counts[r]])[0] for r in range(6)]
        assert together == alone


def test_draws_follow_the_distribution():
    logits = torch.tensor([0.5, 0.3, 0.2, 1e-20]).log()  # finite: a -inf logit makes the row greedy
    generator = torch.Generator().manual_seed(0)
    draws = [sample_rows(logits[None], [_cfg()], [generator], [None])[0] for _ in range(20_000)]
    frequencies = torch.bincount(torch.tensor(draws), minlength=4).float() / len(draws)
    assert frequencies.tolist() == pytest.approx([0.5, 0.3, 0.2, 0.0], abs=0.015)


def test_top_k_and_top_p_never_draw_a_token_they_cut():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]] * 2)
    generator = torch.Generator().manual_seed(3)
    seen = set()
    for _ in range(2_000):
        seen.update(sample_rows(logits, [_cfg(5.0, top_k=2), _cfg(5.0, top_p=0.3)], [generator, generator], [None, None]))
    assert seen <= {0, 1}


def test_temperature_zero_and_unusable_distributions_are_greedy():
    logits = torch.tensor([[0.0, 2.0, 1.0], [float("nan"), 1.0, 0.0], [0.0, 5.0, 1.0]])
    tokens = sample_rows(logits, [_cfg(0.0), _cfg(), _cfg(1e-45)], [torch.Generator()] * 3, [None] * 3)
    assert tokens[0] == 1 and tokens[2] == 1
