"""Feature monitoring: watched features' Prometheus series, drift baselines, and the fire-and-forget observe."""

import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydantic import ValidationError

from conftest import RunningServer
from monosemantic.client import GrpcClient, RestClient, ServiceCallError
from monosemantic.shipped import reference_registry_path
from service.settings import ServiceSettings

TEXT = "import os\nimport sys\n\ndef main():\n    return 0\n\ndef other():\n    pass\n"


@pytest.fixture(scope="module")
def watching():
    running = RunningServer(registry=reference_registry_path(), watch_features="3329:def,2508:imports,7")
    yield running
    running.stop()


def samples(server, series):
    text = httpx.get(f"{server.http_url}/metrics").text
    return [s for family in text_string_to_metric_families(text) for s in family.samples if s.name == series]


def value(server, series, **labels):
    found = [s.value for s in samples(server, series) if all(s.labels.get(k) == v for k, v in labels.items())]
    return found[0] if found else 0.0


def wait_until(predicate, timeout=20.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def expected_firings(client, feature):
    tokens = client.activations(text=TEXT, top_k=0, feature_ids=[feature]).tokens[1:]  # BOS is not counted
    return sum(t.values[0] > 0 for t in tokens), len(tokens)


def test_observe_answers_202_at_once_and_counts_watched_firings_in_the_background(watching):
    with RestClient(watching.http_url) as client:
        fires, tokens = expected_firings(client, 3329)  # this activations call is counted too
        assert fires >= 2  # two `def`s
        before_fires = value(watching, "monosemantic_watched_feature_fires_total", feature="3329", name="def", dictionary_version="1")
        before_tokens = value(watching, "monosemantic_observed_tokens_total", dictionary_version="1")
        response = httpx.post(f"{watching.http_url}/v1/observe", json={"texts": [TEXT, TEXT]})
        assert response.status_code == 202 and response.json() == {"accepted": 2, "tokens": 2 * tokens}
    assert wait_until(lambda: value(watching, "monosemantic_observed_tokens_total", dictionary_version="1") == before_tokens + 2 * tokens)
    assert value(watching, "monosemantic_watched_feature_fires_total", feature="3329", name="def", dictionary_version="1") == before_fires + 2 * fires


def test_activation_histograms_hold_one_observation_per_firing(watching):
    count = value(watching, "monosemantic_watched_feature_activation_count", feature="2508", name="imports", dictionary_version="1")
    fires = value(watching, "monosemantic_watched_feature_fires_total", feature="2508", name="imports", dictionary_version="1")
    assert count == fires > 0


def test_each_watched_feature_carries_its_training_density_beside_its_live_count(watching):
    from monosemantic.artifact import load_dictionary

    density = load_dictionary(reference_registry_path(), "reference").features["density"]
    for feature in (3329, 2508, 7):
        assert value(watching, "monosemantic_watched_feature_training_density", feature=str(feature)) == pytest.approx(float(density[feature]))


def test_the_manifests_evaluation_is_exported_as_the_drift_baseline(watching):
    with RestClient(watching.http_url) as client:
        metrics = client.dictionaries().dictionaries[0].metrics
    assert value(watching, "monosemantic_dictionary_evaluation", metric="fvu", dictionary_version="1") == pytest.approx(metrics["fvu"])
    assert value(watching, "monosemantic_dictionary_evaluation", metric="l0", dictionary_version="1") == pytest.approx(metrics["l0"])
    assert value(watching, "monosemantic_reconstruction_relative_error_count") > 0
    assert value(watching, "monosemantic_reconstruction_squared_error_total") < value(watching, "monosemantic_activation_squared_norm_total")


def test_watched_series_never_take_labels_from_user_input(watching):
    httpx.post(f"{watching.http_url}/v1/observe", json={"texts": ["feature 999 name=evil"]})
    features = {s.labels["feature"] for s in samples(watching, "monosemantic_watched_feature_fires_total")}
    assert features == {"3329", "2508", "7"}


def test_observe_over_grpc_is_accepted_too(watching):
    with GrpcClient(watching.grpc_target) as client:
        assert client.observe([TEXT]).accepted == 1


def test_observe_limits_name_the_field(watching):
    with RestClient(watching.http_url) as client:
        with pytest.raises(ServiceCallError) as too_many:
            client.observe(["x"] * 65)
        with pytest.raises(ServiceCallError) as none:
            client.observe([])
    assert too_many.value.status == 422 and "MONOSEMANTIC_MAX_OBSERVE_TEXTS" in too_many.value.message
    assert none.value.status == 422 and "texts" in none.value.message


def test_a_malformed_watch_list_is_refused_naming_the_setting():
    with pytest.raises(ValidationError, match="watch_features"):
        ServiceSettings(watch_features="12,abc")
    with pytest.raises(ValidationError, match="at most 64"):
        ServiceSettings(watch_features=",".join(str(i) for i in range(65)))


def test_a_watched_feature_beyond_the_dictionary_stops_the_server_with_the_setting_named():
    with pytest.raises(RuntimeError, match="MONOSEMANTIC_WATCH_FEATURES"):
        RunningServer(registry=reference_registry_path(), watch_features="5000")


def test_a_fresh_server_has_counted_nothing_though_it_warmed_up_on_reads():
    running = RunningServer(registry=reference_registry_path())
    try:
        assert value(running, "monosemantic_tokens_processed_total") == 0
        assert value(running, "monosemantic_active_features_per_token_count") == 0
    finally:
        running.stop()


def test_requests_read_in_one_batch_are_counted_each_as_alone(watching):
    """The worker counts a batch's reads together: the totals are the sum of what each request read, its BOS left out."""
    import asyncio

    from monosemantic import api as schemas

    texts = [TEXT, "x = 1\n", "def f(a, b):\n    return a + b\n", TEXT[:20]]
    with RestClient(watching.http_url) as client:
        alone = [client.activations(text=t, top_k=0, feature_ids=[3329]).tokens for t in texts]
    before = {name: value(watching, name, **labels) for name, labels in [
        ("monosemantic_tokens_processed_total", {}), ("monosemantic_active_features_per_token_count", {}),
        ("monosemantic_active_features_per_token_sum", {}),
        ("monosemantic_watched_feature_fires_total", {"feature": "3329", "name": "def", "dictionary_version": "1"})]}
    batches = value(watching, "monosemantic_batch_requests_count")

    async def together():
        return await asyncio.gather(*(watching.engine.activations(schemas.ActivationsRequest(text=t, top_k=0)) for t in texts))

    asyncio.run_coroutine_threadsafe(together(), watching.loop).result(60)
    assert value(watching, "monosemantic_batch_requests_count") - batches < len(texts)  # some were read together
    assert value(watching, "monosemantic_tokens_processed_total") - before["monosemantic_tokens_processed_total"] == sum(len(t) for t in alone)
    assert value(watching, "monosemantic_active_features_per_token_count") - before["monosemantic_active_features_per_token_count"] == sum(len(t) - 1 for t in alone)
    assert value(watching, "monosemantic_active_features_per_token_sum") - before["monosemantic_active_features_per_token_sum"] == sum(x.l0 for t in alone for x in t[1:])
    fires = sum(x.values[0] > 0 for t in alone for x in t[1:])
    assert value(watching, "monosemantic_watched_feature_fires_total", feature="3329", name="def", dictionary_version="1") - before["monosemantic_watched_feature_fires_total"] == fires
