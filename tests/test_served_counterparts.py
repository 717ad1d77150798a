"""A feature page lists its counterparts in the other loaded dictionaries at its hook, and search starts from a
feature of another dictionary — over REST and gRPC alike, on the reference beside a copy whose features are in
reverse order (feature i is the copy's d_sae - 1 - i) and a dictionary for another model's space."""

from __future__ import annotations

import shutil

import pytest
import torch

from monosemantic.artifact import load_dictionary, publish
from monosemantic.client import ServiceCallError
from monosemantic.shipped import REFERENCE_DICTIONARY, reference_registry_path

from conftest import RunningServer

D_SAE = 4096


# `server`: conftest.py's `client` fixture runs every test on it over REST and gRPC alike.
@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("counterparts")
    shutil.copytree(reference_registry_path() / REFERENCE_DICTIONARY, root / REFERENCE_DICTIONARY)
    shipped = load_dictionary(root, REFERENCE_DICTIONARY, 1)
    sae, m = shipped.sae, shipped.manifest
    with torch.no_grad():
        sae.W_enc.copy_(sae.W_enc.flip(1))
        sae.b_enc.copy_(sae.b_enc.flip(0))
        sae.W_dec.copy_(sae.W_dec.flip(0))
    publish(root, "reversed", sae, model=m.model, hook=m.hook, labels=shipped.labels[::-1])
    running = RunningServer(registry=root, dictionaries=["reference:1", "reversed"], max_text_chars=2000, max_new_tokens=16)
    yield running
    running.stop()


def test_a_feature_page_names_its_counterpart_in_the_other_dictionary_first(client):
    page = client.feature(100, dictionary="reference")
    best = page.counterparts[0]
    assert (best.dictionary, best.feature) == ("reversed:v1", D_SAE - 1 - 100)
    assert best.cosine == pytest.approx(1.0, abs=1e-5) and best.label == page.label
    assert len(page.counterparts) == 3 and all(c.cosine < best.cosine for c in page.counterparts[1:])


def test_search_from_a_feature_of_another_dictionary_ranks_its_counterpart_first(client):
    found = client.search_features(str(D_SAE - 1 - 7), by="feature", dictionary="reference", of="reversed")
    assert found.by == "feature" and found.results[0].feature == 7
    assert found.results[0].score == pytest.approx(1.0, abs=1e-5)
    assert [r.score for r in found.results] == sorted((r.score for r in found.results), reverse=True)


@pytest.mark.parametrize("q, of, field", [("x", "reversed", "q"), ("4096", "reversed", "q"), ("3", "missing", "of")])
def test_search_by_feature_refuses_a_bad_feature_or_dictionary_naming_the_field(client, q, of, field):
    with pytest.raises(ServiceCallError) as caught:
        client.search_features(q, by="feature", dictionary="reference", of=of)
    assert caught.value.field == field and caught.value.status in (400, 404, 422, "INVALID_ARGUMENT", "NOT_FOUND")
