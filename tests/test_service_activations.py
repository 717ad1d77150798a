"""/v1/activations and FeatureService.Activations: per-token features, the same on both transports."""

import pytest

from monosemantic.client import GrpcClient, RestClient
from monosemantic.readout import hook_activations

TEXT = "def main():\n    return sorted(items, key=len)\n"


def test_tokens_carry_offsets_into_the_text(client):
    result = client.activations(text=TEXT, top_k=3)
    bos, *tokens = result.tokens
    assert (bos.start, bos.end) == (0, 0)
    assert "".join(TEXT[t.start : t.end] for t in tokens) == TEXT
    assert result.dictionary.name == "reference"


def test_top_features_are_the_strongest_nonzero_ones_in_descending_order(client):
    result = client.activations(text=TEXT, top_k=5)
    for token in result.tokens:
        values = [f.value for f in token.top]
        assert values == sorted(values, reverse=True)
        assert all(v > 0 for v in values)
        assert len(token.top) == min(5, token.l0)


def _expected(reference_model, reference_dictionary, ids):
    x = hook_activations(reference_model, [ids], [reference_dictionary.hook])[0][0]
    sae = reference_dictionary.sae
    features = sae.encode(x)
    return features, (x - sae.decode(features)).norm(dim=-1) / x.norm(dim=-1)


def test_features_match_the_dictionary_applied_to_the_models_activations(client, reference_model, reference_dictionary):
    # The readout may multiply in bf16 (monosemantic/encoder.py, where faster): the same features, values within bf16 rounding.
    result = client.activations(text=TEXT, top_k=4)
    features, errors = _expected(reference_model, reference_dictionary, [t.id for t in result.tokens])
    for t, token in enumerate(result.tokens):
        expected = features[t].topk(4)
        assert token.top[0].feature == int(expected.indices[0])
        assert [f.value for f in token.top] == pytest.approx(expected.values[: len(token.top)].tolist(), rel=2e-2, abs=2e-2)
        assert abs(token.l0 - int((features[t] > 0).sum())) <= 1
        assert token.recon_error == pytest.approx(float(errors[t]), rel=1e-2)


def test_a_float32_readout_matches_the_dictionary_exactly(registry, reference_model, reference_dictionary):
    from conftest import RunningServer

    running = RunningServer(registry=registry, dictionary="reference:1", sae_dtype="float32")
    try:
        with RestClient(running.http_url) as client:
            result = client.activations(text=TEXT, top_k=4)
    finally:
        running.stop()
    features, errors = _expected(reference_model, reference_dictionary, [t.id for t in result.tokens])
    for t, token in enumerate(result.tokens):
        expected = features[t].topk(4)
        assert [f.feature for f in token.top] == expected.indices[: len(token.top)].tolist()
        assert [f.value for f in token.top] == pytest.approx(expected.values[: len(token.top)].tolist(), rel=1e-5)
        assert token.l0 == int((features[t] > 0).sum())
        assert token.recon_error == pytest.approx(float(errors[t]), rel=1e-4)


def test_requested_feature_values_are_reported_at_every_token(client):
    first = client.activations(text=TEXT, top_k=1)
    strongest = first.tokens[3].top[0]
    result = client.activations(text=TEXT, top_k=1, feature_ids=[strongest.feature, 0])
    assert all(len(t.values) == 2 for t in result.tokens)
    assert result.tokens[3].values[0] == pytest.approx(strongest.value)


def test_token_ids_give_the_same_features_as_the_text_they_spell(client):
    by_text = client.activations(text=TEXT, top_k=3)
    by_ids = client.activations(token_ids=[t.id for t in by_text.tokens], top_k=3)
    assert [t.top for t in by_ids.tokens] == [t.top for t in by_text.tokens]
    assert all((t.start, t.end) == (0, 0) for t in by_ids.tokens)


def test_prepend_bos_false_reads_the_text_alone(client):
    with_bos = client.activations(text=TEXT, top_k=1)
    without = client.activations(text=TEXT, top_k=1, prepend_bos=False)
    assert [t.id for t in without.tokens] == [t.id for t in with_bos.tokens[1:]]


def test_rest_and_grpc_give_bitwise_identical_results(server):
    with RestClient(server.http_url) as rest, GrpcClient(server.grpc_target) as grpc_client:
        request = dict(text=TEXT, top_k=8, feature_ids=[1, 2, 3])
        assert rest.activations(**request) == grpc_client.activations(**request)


def test_a_batched_request_gets_the_same_features_as_one_alone(server, reference_model, reference_dictionary):
    # Concurrent requests of different lengths share one padded forward; padding must not leak into them.
    import concurrent.futures

    texts = [TEXT, "x = 1", "import os\nprint(os.getcwd())", "The quick brown fox jumps over the lazy dog."] * 4
    with RestClient(server.http_url) as client, concurrent.futures.ThreadPoolExecutor(16) as pool:
        alone = [client.activations(text=t, top_k=5) for t in texts[:4]]
        together = list(pool.map(lambda t: client.activations(text=t, top_k=5), texts))
    for i, result in enumerate(together):
        for a, b in zip(result.tokens, alone[i % 4].tokens):
            assert [f.feature for f in a.top] == [f.feature for f in b.top]
            assert [f.value for f in a.top] == pytest.approx([f.value for f in b.top], rel=1e-4, abs=1e-4)


def test_readout_rows_are_padded_to_a_bounded_set_of_shapes():
    from monosemantic.encoder import bucketed_rows

    shapes = {bucketed_rows(rows) for rows in range(1, 8193)}
    assert len(shapes) == 35 and all(bucketed_rows(r) >= r for r in range(1, 8193))
    assert bucketed_rows(64) == 64 and bucketed_rows(65) == 128 and bucketed_rows(257) == 512
