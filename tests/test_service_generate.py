"""/v1/generate: seeded sampling, steering that really pins features, streaming, and the unsteered comparison."""

import pytest
import torch

from monosemantic.client import RestClient
from monosemantic.readout import hook_activations
from monosemantic.steering import SteeringSpec, apply_steering

PROMPT = "def main():\n    "


@pytest.fixture(scope="module")
def real_activations(reference_model, reference_dictionary):
    ids = reference_model.tokenize("import os\nfor name in os.listdir(path):\n    print(name)\n", True).ids
    return hook_activations(reference_model, [ids], [reference_dictionary.hook])[0][0]


def test_clamp_pins_the_feature_when_the_steered_activation_is_re_encoded(reference_model, reference_dictionary, real_activations):
    sae = reference_dictionary.sae
    specs = [SteeringSpec(7, "clamp", 6.0), SteeringSpec(1200, "clamp", 2.5), SteeringSpec(300, "add", 4.0)]
    steered = apply_steering(sae, real_activations, specs).activation
    re_encoded = sae.encode(steered)
    assert re_encoded[:, 7] == pytest.approx(torch.full((len(steered),), 6.0), abs=1e-3)
    assert re_encoded[:, 1200] == pytest.approx(torch.full((len(steered),), 2.5), abs=1e-3)


def test_clamp_to_zero_switches_an_active_feature_off_and_leaves_inactive_ones_alone(reference_model, reference_dictionary, real_activations):
    sae = reference_dictionary.sae
    features = sae.encode(real_activations)
    active_feature = int(features[3].argmax())
    result = apply_steering(sae, real_activations, [SteeringSpec(active_feature, "clamp", 0.0)])
    assert float(sae.encode(result.activation)[3, active_feature]) == pytest.approx(0.0, abs=1e-4)
    untouched = features[:, active_feature] == 0
    assert torch.equal(result.activation[untouched], real_activations[untouched])


def test_add_moves_the_activation_along_the_decoder_direction(reference_model, reference_dictionary, real_activations):
    sae = reference_dictionary.sae
    result = apply_steering(sae, real_activations, [SteeringSpec(42, "add", 3.0)])
    expected = real_activations + 3.0 * sae.W_dec[42] / sae.cfg.input_scale
    assert torch.allclose(result.activation, expected, atol=1e-6)


def test_the_same_seed_gives_the_same_text(client):
    first = client.generate(prompt=PROMPT, max_new_tokens=12, seed=7, temperature=1.0)
    again = client.generate(prompt=PROMPT, max_new_tokens=12, seed=7, temperature=1.0)
    assert first.text == again.text and first.seed == 7
    assert len(first.tokens) == 12 and first.finish_reason == "length"


def test_both_transports_generate_the_same_tokens_for_a_seed(server):
    from monosemantic.client import GrpcClient

    request = dict(prompt=PROMPT, max_new_tokens=10, seed=3, temperature=0.8, top_p=0.9, top_k=50,
                   steering=[{"feature": 11, "mode": "clamp", "value": 8.0}])
    with RestClient(server.http_url) as rest, GrpcClient(server.grpc_target) as grpc_client:
        assert rest.generate(**request) == grpc_client.generate(**request)


def test_steered_tokens_report_the_clamped_value_after_steering(client):
    # 30 is above every feature's largest activation on the dashboards' million tokens (25.9), so a pinned
    # feature that still lost the top spot would mean the clamp did not hold.
    result = client.generate(prompt=PROMPT, max_new_tokens=6, seed=1, steering=[{"feature": 5, "mode": "clamp", "value": 30.0}])
    for token in result.tokens:
        (steered,) = token.steered
        assert steered.feature == 5 and steered.after == pytest.approx(30.0, abs=1e-3)
        assert token.top[0].feature == 5  # the pinned feature is now the strongest at that position


def test_steering_changes_the_text_and_the_unsteered_continuation_comes_beside_it(client):
    steering = [{"feature": 5, "mode": "clamp", "value": 30.0}]
    result = client.generate(prompt=PROMPT, max_new_tokens=10, seed=5, steering=steering, compare_unsteered=True)
    plain = client.generate(prompt=PROMPT, max_new_tokens=10, seed=5)
    assert result.unsteered.text == plain.text
    assert result.text != plain.text


def test_steering_generated_positions_only_leaves_the_first_token_unsteered(client):
    steering = [{"feature": 5, "mode": "clamp", "value": 10.0}]
    result = client.generate(prompt=PROMPT, max_new_tokens=3, seed=2, steering=steering, steer_prompt=False)
    first, second = result.tokens[0].steered[0], result.tokens[1].steered[0]
    assert first.before == first.after
    assert second.after == pytest.approx(10.0, abs=1e-3)


def test_a_stop_string_ends_the_text_before_it(client):
    free = client.generate(prompt=PROMPT, max_new_tokens=20, seed=11, temperature=0)
    stop = free.text[5:8]
    result = client.generate(prompt=PROMPT, max_new_tokens=20, seed=11, temperature=0, stop=[stop])
    assert result.finish_reason == "stop"
    assert stop not in result.text and free.text.startswith(result.text)


def test_streamed_tokens_add_up_to_the_final_text(client):
    events = list(client.generate_stream(prompt=PROMPT, max_new_tokens=8, seed=4, features_top_k=2))
    *tokens, done = events
    assert [t.index for t in tokens] == list(range(8))
    assert "".join(t.text for t in tokens) == done.text
    assert [t.id for t in tokens] == [t.id for t in done.tokens]


def test_greedy_generation_follows_the_models_argmax(client, reference_model, reference_dictionary):
    result = client.generate(prompt=PROMPT, max_new_tokens=4, temperature=0)
    ids = reference_model.tokenize(PROMPT, True).ids
    for token in result.tokens:
        with torch.no_grad():
            logits = reference_model.lm.model(input_ids=torch.tensor([ids])).logits[0, -1]
        assert token.id == int(logits.argmax())
        ids.append(token.id)


@pytest.mark.parametrize("settings", [dict(top_p=5e-324), dict(temperature=1e-300), dict(temperature=1e300, top_k=1)])
def test_extreme_sampling_settings_still_generate(client, settings):
    # found by fuzzing: a top_p that float32 rounds to 0 once dropped every token (a 500 before the fix)
    result = client.generate(prompt=PROMPT, max_new_tokens=3, seed=1, **settings)
    assert len(result.tokens) == 3
