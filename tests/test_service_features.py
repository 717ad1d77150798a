"""/v1/features/{id} and /v1/features/search (GetFeature, SearchFeatures): the dashboards of the shipped reference."""

import pytest

from monosemantic.client import ServiceCallError


def _first_live_feature(client):
    hits = client.search_features("def", by="token")
    return hits.results[0].feature


def test_a_feature_page_has_every_part_of_the_dashboard(client):
    page = client.feature(_first_live_feature(client))
    assert page.label and page.density > 0 and page.max_activation > 0 and page.statistics_tokens >= 1_000_000 * 0.99
    assert len(page.histogram.counts) + 1 == len(page.histogram.log10_edges) and sum(page.histogram.counts) > 0
    assert page.top_examples and page.quantile_examples and page.logit_up and page.logit_down and page.neighbours


def test_top_examples_are_in_descending_order_and_peak_at_their_centre(client):
    page = client.feature(_first_live_feature(client))
    values = [e.value for e in page.top_examples]
    assert values == sorted(values, reverse=True) and values[0] == pytest.approx(page.max_activation, rel=1e-6)
    for example in page.top_examples:
        assert len(example.tokens) == len(example.token_ids) == len(example.activations)
        assert example.activations[example.centre] == pytest.approx(example.value, rel=2e-3)  # stored as fp16


def test_a_top_example_replays_to_the_same_activation_through_the_service(client):
    page = client.feature(_first_live_feature(client))
    example = page.top_examples[0]
    # The window alone has less context than the original, but the feature must still fire on the centre token.
    replay = client.activations(token_ids=[0, *example.token_ids[: example.centre + 1]], top_k=0, feature_ids=[page.feature])
    assert replay.tokens[-1].values[0] > 0


def test_search_by_token_finds_features_that_peak_on_it(client):
    hits = client.search_features("def", by="token", page_size=5)
    assert hits.total >= len(hits.results) > 0
    page = client.feature(hits.results[0].feature)
    assert sum(e.tokens[e.centre] == "def" for e in page.top_examples) * 2 >= len(page.top_examples)


def test_search_by_snippet_ranks_by_activation_relative_to_the_features_max(client):
    hits = client.search_features("import os\nimport sys", by="snippet", page_size=3)
    best = hits.results[0]
    values = client.activations(text="import os\nimport sys", top_k=0, feature_ids=[best.feature]).tokens[1:]
    peak = max(t.values[0] for t in values)
    assert best.score == pytest.approx(peak / best.max_activation, rel=2e-2)  # the readout multiplies in bf16
    assert [h.score for h in hits.results] == sorted((h.score for h in hits.results), reverse=True)


def test_search_pages_do_not_overlap(client):
    first = client.search_features("the", by="snippet", page=1, page_size=4)
    second = client.search_features("the", by="snippet", page=2, page_size=4)
    assert not {h.feature for h in first.results} & {h.feature for h in second.results}


def test_an_unknown_feature_is_not_found_naming_the_id_and_the_size(client):
    with pytest.raises(ServiceCallError) as caught:
        client.feature(4096)
    assert caught.value.status in (404, "NOT_FOUND")
    assert "4096" in caught.value.message and "feature" in caught.value.message


def test_a_page_size_over_the_limit_is_refused(client):
    with pytest.raises(ServiceCallError) as caught:
        client.search_features("x", page_size=101)
    assert caught.value.status in (422, "INVALID_ARGUMENT") and "MONOSEMANTIC_MAX_PAGE_SIZE" in caught.value.message


def test_a_dictionary_without_statistics_says_how_to_compute_them(registry):
    from conftest import RunningServer
    from monosemantic.client import RestClient

    running = RunningServer(registry=registry, dictionary="reference:2")  # published without statistics
    try:
        with RestClient(running.http_url) as client:
            with pytest.raises(ServiceCallError) as caught:
                client.feature(1)
            assert caught.value.status == 409 and "monosemantic-train features" in caught.value.message
            assert client.activations(text="still serves").tokens  # everything else works
    finally:
        running.stop()
