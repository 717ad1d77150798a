"""/v1/attributions: features + error + rest add up to the logit the plain model gives."""

import pytest
import torch

TEXT = "def hello(self):\n    return self"


def _plain_logits(reference_model, reference_dictionary, ids):
    with torch.no_grad():
        return reference_model.lm.model(input_ids=torch.tensor([ids])).logits[0]


def test_the_decomposition_is_exact_at_the_last_layer_and_sums_to_the_plain_models_logit(client, reference_model, reference_dictionary):
    result = client.attributions(text=TEXT, target=" self", top_k=10)
    ids = reference_model.tokenize(TEXT, prepend_bos=True).ids
    plain = float(_plain_logits(reference_model, reference_dictionary, ids)[len(ids) - 1, result.target_id])
    assert result.exact
    assert result.value == pytest.approx(plain, rel=1e-5)
    total = result.features_total + result.error + result.rest
    assert total == pytest.approx(plain, rel=1e-3)
    assert abs(result.remainder) < 1e-3 * abs(plain)


def test_a_contrast_explains_the_logit_difference(client, reference_model, reference_dictionary):
    result = client.attributions(text=TEXT, target=" self", contrast=")", position=3)
    ids = reference_model.tokenize(TEXT, prepend_bos=True).ids
    logits = _plain_logits(reference_model, reference_dictionary, ids)[3]
    assert result.value == pytest.approx(float(logits[result.target_id] - logits[result.contrast_id]), rel=1e-5)
    assert result.features_total + result.error + result.rest == pytest.approx(result.value, rel=1e-3)


def test_listed_features_are_the_largest_attributions_with_their_activations(client, reference_model, reference_dictionary):
    result = client.attributions(text=TEXT, target=" self", top_k=50)
    magnitudes = [abs(f.attribution) for f in result.features]
    assert magnitudes == sorted(magnitudes, reverse=True)
    # One layer, hook at its MLP: only the target position's own features reach its logit.
    assert {f.position for f in result.features} == {result.position}
    activations = client.activations(text=TEXT, top_k=0, feature_ids=[f.feature for f in result.features])
    at_position = activations.tokens[result.position].values
    assert [f.activation for f in result.features] == pytest.approx(at_position, rel=2e-2, abs=2e-2)  # bf16 readout


def test_a_target_given_by_id_equals_the_same_target_given_by_text(client):
    by_text = client.attributions(text=TEXT, target=" self")
    by_id = client.attributions(text=TEXT, target=by_text.target_id)
    assert by_id.value == by_text.value


def test_a_negative_position_counts_from_the_end(client):
    last = client.attributions(text=TEXT, target=" self")
    also_last = client.attributions(text=TEXT, target=" self", position=-1)
    assert also_last.position == last.position and also_last.value == last.value
