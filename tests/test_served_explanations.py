"""Explanations served: a feature page lists every run's explanation of the feature best-scoring first, feature
lists and search hits carry the best one, search finds features by explanation text, and /v1/dictionaries counts
the explained features and their median score — over REST and gRPC alike, from run records written beside a copy
of the reference (as `monosemantic-train explain` writes them: monosemantic/explanations.py)."""

from __future__ import annotations

import shutil

import pytest

from conftest import RunningServer, write_explanation_run
from monosemantic.client import RestClient, ServiceCallError
from monosemantic.explanations import run_path
from monosemantic.shipped import REFERENCE_DICTIONARY, reference_registry_path


def write_run(registry, run: str, explanations: dict, digest: str | None = None) -> None:
    write_explanation_run(registry, REFERENCE_DICTIONARY, run, explanations, digest)


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    root = tmp_path_factory.mktemp("explained")
    shutil.copytree(reference_registry_path() / REFERENCE_DICTIONARY, root / REFERENCE_DICTIONARY)
    write_run(root, "first", {3: ("the word cat", 0.9), 5: ("cat tails in comments", None), 8: (None, None)})
    write_run(root, "second", {3: ("dogs and cats", 0.6), 9: ("numbers", 0.7)})
    write_run(root, "stale", {4: ("written for another version of the same name", 1.0)}, digest="0" * 64)
    return root


# `server`: conftest.py's `client` fixture runs every test on it over REST and gRPC alike.
@pytest.fixture(scope="module")
def server(registry):
    running = RunningServer(registry=registry, dictionary=REFERENCE_DICTIONARY)
    yield running
    running.stop()


def test_a_feature_page_lists_every_runs_explanation_best_scoring_first(client):
    page = client.feature(3)
    assert [(e.explanation, e.score, e.run) for e in page.explanations] == [("the word cat", 0.9, "first"), ("dogs and cats", 0.6, "second")]
    best = page.explanations[0]
    assert best.explainer_model == "first-explainer" and best.prompt_version == "delphi-1"
    assert best.detection.balanced_accuracy == 0.9 and best.detection.examples == 20


def test_an_unscored_explanation_is_shown_without_a_score_and_an_unparsed_one_not_at_all(client):
    assert [(e.explanation, e.score) for e in client.feature(5).explanations] == [("cat tails in comments", None)]
    assert client.feature(8).explanations == []


def test_a_run_of_another_version_under_the_same_name_is_not_shown(client):
    assert client.feature(4).explanations == []


def test_feature_lists_carry_each_features_best_explanation(client):
    listed = {r.feature: r.explanation for r in client.list_features(order="id", page_size=10).results}
    assert (listed[3], listed[5], listed[9], listed[0]) == ("the word cat", "cat tails in comments", "numbers", "")


def test_search_by_explanation_finds_every_word_best_scoring_first(client):
    found = client.search_features("CAT", by="explanation")
    assert [(r.feature, r.explanation) for r in found.results] == [(3, "the word cat"), (5, "cat tails in comments")]
    assert [r.score for r in found.results] == [pytest.approx(0.9), pytest.approx(0.0)]
    assert [r.feature for r in client.search_features("cats dogs", by="explanation").results] == [3]  # its second run's
    assert client.search_features("giraffe", by="explanation").total == 0


def test_search_by_explanation_refuses_an_empty_query_naming_q(client):
    with pytest.raises(ServiceCallError) as caught:
        client.search_features("   ", by="explanation")
    assert caught.value.status in (422, "INVALID_ARGUMENT") and caught.value.field == "q"


def test_the_dictionary_listing_counts_explained_features_and_their_median_best_score(client):
    info = client.dictionaries().dictionaries[0]
    assert info.explained == 3  # 3, 5 and 9 (8's answer did not parse; 4's run is of another version)
    assert info.explanation_median_score == pytest.approx(0.8)  # the median of 0.9 and 0.7 (5 is unscored)


def test_a_run_written_while_serving_shows_on_the_next_request(server, registry):
    write_run(registry, "later", {11: ("a later explanation", 0.75)})
    with RestClient(server.http_url) as rest:
        assert [e.explanation for e in rest.feature(11).explanations] == ["a later explanation"]


def test_a_damaged_run_hides_the_explanations_not_the_feature_page(tmp_path):
    root = tmp_path / "registry"
    shutil.copytree(reference_registry_path() / REFERENCE_DICTIONARY, root / REFERENCE_DICTIONARY)
    write_run(root, "first", {3: ("the word cat", 0.9)})
    path = run_path(root, REFERENCE_DICTIONARY, 1, "first")
    path.write_bytes(path.read_bytes() + b'{"feature": "not a number", "explanation": 1}\n{}\n')
    running = RunningServer(registry=root, dictionary=REFERENCE_DICTIONARY)
    try:
        with RestClient(running.http_url) as rest:
            page = rest.feature(3)
            assert page.feature == 3 and page.explanations == [] and page.top_examples
            assert rest.dictionaries().dictionaries[0].explained == 0
    finally:
        running.stop()
