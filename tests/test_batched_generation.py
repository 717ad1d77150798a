"""Generations batched into one forward per step (monosemantic/decode_batch.py): every row gets exactly the text it
gets alone — whatever the others steer, whenever rows join or leave, on GPT-2, Llama (rotary positions) and a
model whose cache cannot be padded (Gemma-2's sliding window) — and a row's failure stays its own."""

from __future__ import annotations

import pytest
import torch

from monosemantic.artifact import HookRef, ModelRef, publish
from monosemantic.bound import load_bound
from monosemantic.decode_batch import DecodeBatch, batchable
from monosemantic.generation import DictionarySteering, Generation, HookDirections, NonFiniteOutput, SamplingConfig
from monosemantic.lm import load_lm, resolve_hook
from monosemantic.model import Model
from monosemantic.sae import SAEConfig, build_sae
from monosemantic.steering import DirectionEdit, SteeringSpec

from conftest import tiny_llama

PROMPTS = ["import os\nfor name in ", "def main():\n    ", "class A:\n", "x = ", "# a comment about", "return self.", "if not ", "print("]


def _generation(model, dictionary, i: int, steering=(), steps: int = 24, directions=()) -> Generation:
    """The i-th request of a mixed batch: greedy and sampled rows, steering the prompt or only the generated text."""
    cfg = SamplingConfig(steps, 0.0 if i % 2 == 0 else 0.9, 0.95 if i % 3 else 1.0, 40 if i % 4 == 1 else 0, 100 + i, (), 5)
    ids = [model.bos_id, *model.tokenize(PROMPTS[i % len(PROMPTS)], prepend_bos=False).ids]
    entries = [DictionarySteering(dictionary, list(steering))] if steering else []
    return Generation(model, dictionary, ids, cfg, entries, i % 3 == 0, directions=list(directions))


def _alone(generation: Generation) -> list:
    steps = []
    while not generation.done:
        steps.append(generation.step())
    return steps


def _batched(generations: list[Generation], leave_after: dict[int, int] | None = None) -> dict[int, list]:
    """Every generation through one DecodeBatch, joining one per step (prefilled alone, as the service does);
    leave_after: generation index -> steps after which it is dropped (its caller gone)."""
    batch, steps, waiting = DecodeBatch(), {id(g): [] for g in generations}, list(generations)
    errors: dict[int, BaseException] = {}
    index = {id(g): i for i, g in enumerate(generations)}
    while waiting or len(batch):
        if waiting:
            g = waiting.pop(0)
            steps[id(g)].append(g.step())
            if not g.done:
                batch.join(g)
        gone = set()
        for outcome in batch.step():
            g = outcome.generation
            if outcome.error is not None:
                errors[index[id(g)]] = outcome.error
                gone.add(id(g))
                continue
            steps[id(g)].append(outcome.result)
            if g.done or (leave_after and len(steps[id(g)]) >= leave_after.get(index[id(g)], 10**9)):
                gone.add(id(g))
        batch.leave(gone)
    return {index[k]: v for k, v in steps.items()}, errors


def _assert_same(alone_steps: list, batched_steps: list) -> None:
    assert [s.token_id for s in batched_steps] == [s.token_id for s in alone_steps]
    assert "".join(s.text for s in batched_steps) == "".join(s.text for s in alone_steps)
    for a, b in zip(alone_steps, batched_steps):
        assert [f for f, _ in b.top] == [f for f, _ in a.top]
        assert [v for _, v in b.top] == pytest.approx([v for _, v in a.top], abs=1e-4)
        assert [s.feature for s in b.steered] == [s.feature for s in a.steered]
        assert [v for s in b.steered for v in (s.before, s.after)] == pytest.approx([v for s in a.steered for v in (s.before, s.after)], abs=1e-4)


STEERINGS = [(), (SteeringSpec(7, "add", 8.0),), (SteeringSpec(3329, "add", 4.0), SteeringSpec(2508, "clamp", 0.0)),
             (SteeringSpec(100, "clamp", 5.0),), (), (SteeringSpec(9, "add", -3.0),), (SteeringSpec(2000, "clamp", 10.0),),
             (SteeringSpec(3329, "add", 4.0), SteeringSpec(2508, "clamp", 0.0))]


def test_eight_rows_with_different_steering_generate_exactly_their_texts_alone(reference_model, reference_dictionary):
    alone = [_alone(_generation(reference_model, reference_dictionary, i, s)) for i, s in enumerate(STEERINGS)]
    batched, errors = _batched([_generation(reference_model, reference_dictionary, i, s) for i, s in enumerate(STEERINGS)])
    assert not errors
    for i in range(len(STEERINGS)):
        _assert_same(alone[i], batched[i])
    assert len({tuple(s.token_id for s in steps) for steps in alone}) > 4  # the rows really differ


def test_a_seed_samples_the_same_text_in_and_out_of_a_batch_and_another_seed_does_not(reference_model, reference_dictionary):
    def sampled(seed: int) -> Generation:
        cfg = SamplingConfig(32, 1.0, 1.0, 0, seed, (), 0)
        return Generation(reference_model, reference_dictionary, [reference_model.bos_id], cfg, [], False)

    alone = _alone(sampled(11))
    batched, _ = _batched([sampled(5), sampled(11), sampled(12)])
    assert [s.token_id for s in batched[1]] == [s.token_id for s in alone]
    assert [s.token_id for s in batched[2]] != [s.token_id for s in alone]


def test_a_row_that_leaves_mid_batch_leaves_the_others_as_they_are_alone(reference_model, reference_dictionary):
    alone = [_alone(_generation(reference_model, reference_dictionary, i, s)) for i, s in enumerate(STEERINGS[:4])]
    batched, _ = _batched([_generation(reference_model, reference_dictionary, i, s) for i, s in enumerate(STEERINGS[:4])],
                          leave_after={1: 5})
    assert len(batched[1]) == 5
    for i in (0, 2, 3):
        _assert_same(alone[i], batched[i])


def test_a_row_whose_steered_output_is_not_finite_fails_alone_and_the_others_go_on(reference_model, reference_dictionary):
    rows = [_generation(reference_model, reference_dictionary, i, s) for i, s in enumerate(STEERINGS[:3])]
    rows.insert(1, _generation(reference_model, reference_dictionary, 4, (SteeringSpec(7, "add", 3e38),)))
    rows[1].steer_prompt = False  # its prompt runs, its first generated position overflows in the batch
    batched, errors = _batched(rows)
    assert set(errors) == {1} and isinstance(errors[1], NonFiniteOutput)
    for i, s in ((0, STEERINGS[0]), (2, STEERINGS[1]), (3, STEERINGS[2])):
        _assert_same(_alone(_generation(reference_model, reference_dictionary, i - (i > 1), s)), batched[i])


def test_a_hook_that_raises_for_one_row_fails_that_row_and_the_batch_goes_on_row_by_row(reference_model, reference_dictionary):
    # A zero direction cannot be normalized: the edit raises inside the forward, which the batch shares.
    zero = HookDirections(reference_dictionary.hook, [DirectionEdit(torch.zeros(reference_dictionary.sae.cfg.d_in), "add", 1.0, normalize=True)])
    rows = [_generation(reference_model, reference_dictionary, i, s) for i, s in enumerate(STEERINGS[:3])]
    bad = _generation(reference_model, reference_dictionary, 3, ())
    bad.directions, bad.steer_prompt = [zero], False
    batched, errors = _batched(rows + [bad])
    assert set(errors) == {3}
    for i, s in enumerate(STEERINGS[:3]):
        _assert_same(_alone(_generation(reference_model, reference_dictionary, i, s)), batched[i])


def _tiny_bound(lm, hook: str, d_in: int, root):
    model = Model.of(lm)
    point = resolve_hook(lm, hook)
    sae = build_sae(SAEConfig.build(architecture="relu", d_in=d_in, d_sae=256), seed=1)
    with torch.no_grad():
        sae.b_enc.fill_(0.05)
    publish(root, "tiny", sae, model=ModelRef(name="tiny", checksum=lm.checksum),
            hook=HookRef(name=hook, module_path=point.module_path, alias=point.alias, kind=point.kind))
    return model, load_bound(model, root, "tiny", None)


def test_llama_rows_with_rotary_positions_batch_exactly(tmp_path):
    lm = load_lm(tiny_llama(tmp_path / "model"))
    model, bound = _tiny_bound(lm, "blocks.0.hook_resid_post", 64, tmp_path / "registry")
    steering = [(), (SteeringSpec(3, "add", 2.0),), (SteeringSpec(5, "clamp", 1.0),), ()]
    alone = [_alone(_generation(model, bound, i, s, steps=16)) for i, s in enumerate(steering)]
    batched, errors = _batched([_generation(model, bound, i, s, steps=16) for i, s in enumerate(steering)])
    assert not errors
    for i in range(len(steering)):
        _assert_same(alone[i], batched[i])


def test_a_sliding_window_cache_is_not_padded_and_its_rows_still_step_exactly(tmp_path):
    from transformers import AutoTokenizer, Gemma2Config, Gemma2ForCausalLM

    from monosemantic.shipped import reference_lm_path

    torch.manual_seed(0)
    config = Gemma2Config(vocab_size=4096, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, head_dim=12, sliding_window=8, max_position_embeddings=256,
                          bos_token_id=0, eos_token_id=0, pad_token_id=0)
    Gemma2ForCausalLM(config).save_pretrained(tmp_path / "model")
    AutoTokenizer.from_pretrained(reference_lm_path()).save_pretrained(tmp_path / "model")
    lm = load_lm(str(tmp_path / "model"))
    model, bound = _tiny_bound(lm, "blocks.0.hook_resid_post", 48, tmp_path / "registry")
    probe = _generation(model, bound, 0, (), steps=2)
    probe.step()
    assert not batchable(probe.own_cache)
    steering = [(), (SteeringSpec(3, "add", 2.0),), ()]
    alone = [_alone(_generation(model, bound, i, s, steps=16)) for i, s in enumerate(steering)]
    batched, errors = _batched([_generation(model, bound, i, s, steps=16) for i, s in enumerate(steering)])
    assert not errors
    for i in range(len(steering)):
        _assert_same(alone[i], batched[i])


def test_a_generation_in_a_batch_cannot_be_stepped_on_its_own(reference_model, reference_dictionary):
    batch = DecodeBatch()
    first, second = (_generation(reference_model, reference_dictionary, i) for i in range(2))
    for g in (first, second):
        g.step()
        batch.join(g)
    with pytest.raises(Exception, match="DecodeBatch"):
        first.step()


def test_rows_steering_through_two_dictionaries_at_two_hooks_batch_exactly(reference_model, reference_dictionary, tmp_path):
    # a second dictionary, at the residual stream after the block, beside the shipped one at the MLP
    point = resolve_hook(reference_model.lm, "blocks.0.hook_resid_post")
    sae = build_sae(SAEConfig.build(architecture="relu", d_in=128, d_sae=256), seed=3)
    with torch.no_grad():
        sae.b_enc.fill_(0.05)
    publish(tmp_path, "residual", sae, model=reference_dictionary.dictionary.manifest.model,
            hook=HookRef(name=point.name, module_path=point.module_path, alias=point.alias, kind=point.kind))
    residual = load_bound(reference_model, tmp_path, "residual", None)

    def row(i: int, both: bool) -> Generation:
        g = _generation(reference_model, reference_dictionary, i, STEERINGS[i])
        if both:
            g.steering.append(DictionarySteering(residual, [SteeringSpec(5, "clamp", 3.0), SteeringSpec(17, "add", 2.0)]))
        return g

    plan = [(1, True), (2, False), (3, True), (5, True), (0, False)]
    alone = [_alone(row(i, both)) for i, both in plan]
    batched, errors = _batched([row(i, both) for i, both in plan])
    assert not errors
    for k in range(len(plan)):
        _assert_same(alone[k], batched[k])
    assert {s.dictionary for s in alone[0][0].steered} == {"reference", "residual"}


def test_rows_outgrowing_the_cache_s_spare_room_still_generate_exactly_their_texts_alone(reference_model, reference_dictionary):
    # A batch's cache has room for about its length again (monosemantic/decode_batch.py's _GrowingLayer), never more
    # than the model's context; 240 steps from ~6-token prompts outgrow it three times, the last up to that bound.
    steps = 240
    alone = [_alone(_generation(reference_model, reference_dictionary, i, STEERINGS[i], steps=steps)) for i in range(3)]
    rows = [_generation(reference_model, reference_dictionary, i, STEERINGS[i], steps=steps) for i in range(3)]
    batch = DecodeBatch()
    for g in rows:
        g.step()
        batch.join(g)
    capacities = set()
    batched = _batched_from(batch, rows, lambda: capacities.add(batch._cache.layers[0]._keys.shape[-2]) if batch.rows else None)
    assert len(capacities) >= 3 and max(capacities) <= reference_model.max_positions
    for i in range(3):
        assert [s.token_id for s in batched[i]] == [s.token_id for s in alone[i]][1:]


def _batched_from(batch: DecodeBatch, rows: list[Generation], after_step=lambda: None) -> list[list]:
    steps = {id(g): [] for g in rows}
    while len(batch):
        outcomes = batch.step()
        after_step()
        for o in outcomes:
            assert o.error is None
            steps[id(o.generation)].append(o.result)
        batch.leave({id(o.generation) for o in outcomes if o.generation.done})
    return [steps[id(g)] for g in rows]
