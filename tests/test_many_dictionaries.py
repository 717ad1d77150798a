"""Many dictionaries on one model: addressed by name on every operation, read together in one forward, loaded and
unloaded one at a time, labelled in the metrics."""

from __future__ import annotations

import asyncio
import shutil

import httpx
import pytest
import torch

from conftest import ADMIN_KEY, RunningServer
from monosemantic import api
from monosemantic.artifact import HookRef, ModelRef, load_dictionary, publish
from monosemantic.bound import load_bound
from monosemantic.client import GrpcClient, RestClient, ServiceCallError
from monosemantic.lm import read_activations, resolve_hook
from monosemantic.model import load_model
from monosemantic.sae import SAEConfig, build_sae
from monosemantic.shipped import REFERENCE_DICTIONARY, reference_lm_path, reference_registry_path

TEXT = "import os\nfor name in os.listdir(path):\n    print(name)\n"
# name -> (architecture, hook, extra config): three more dictionaries at three other hooks of the 1-layer reference
OTHERS = {
    "resid": ("relu", "blocks.0.hook_resid_post", {}),
    "attn": ("topk", "blocks.0.hook_attn_out", {"k": 8}),
    "pre": ("jumprelu", "blocks.0.hook_resid_pre", {}),
}


@pytest.fixture(scope="module")
def model():
    return load_model(str(reference_lm_path()))


@pytest.fixture(scope="module")
def many(tmp_path_factory, model):
    """The shipped `reference` (v1, and v2 with the same weights), three dictionaries at other hooks, and
    `stranger`, bound to another model."""
    root = tmp_path_factory.mktemp("many")
    shutil.copytree(reference_registry_path() / REFERENCE_DICTIONARY, root / REFERENCE_DICTIONARY)
    shipped = load_dictionary(root, REFERENCE_DICTIONARY, 1)
    m = shipped.manifest
    publish(root, REFERENCE_DICTIONARY, shipped.sae, model=m.model, hook=m.hook, dtype="float32")
    for seed, (name, (architecture, alias, extra)) in enumerate(OTHERS.items()):
        point = resolve_hook(model.lm, alias)
        sae = build_sae(SAEConfig.build(architecture=architecture, d_in=128, d_sae=256, **extra), seed=seed)
        with torch.no_grad():
            sae.b_enc.fill_(0.05)  # random directions: a positive bias keeps a readable number of features firing
        publish(root, name, sae, model=m.model, hook=HookRef(name=point.name, module_path=point.module_path, alias=point.alias, kind=point.kind))
    publish(root, "stranger", shipped.sae, model=ModelRef(name="another-model", checksum="0" * 64), hook=m.hook)
    return root


# `server`: conftest.py's `client` fixture runs every test on it over REST and gRPC alike.
@pytest.fixture(scope="module")
def server(many):
    running = RunningServer(registry=many, dictionaries=["reference:1", "resid", "attn", "pre"], watch_features="7,resid:3:three",
                            sae_dtype="float32", max_new_tokens=16)
    yield running
    running.stop()


def _direct(model, many, name, ids):
    """What a dictionary reads on its own, computed here: its SAE on the model's activation at its hook."""
    bound = load_bound(model, many, name, None)
    x = read_activations(model.lm, torch.tensor([ids]), bound.hook)[0]
    return bound.sae.encode(x)


def test_the_first_configured_dictionary_is_the_default_and_every_loaded_one_is_listed(client):
    listing = client.dictionaries()
    assert [(d.name, d.version, d.default) for d in listing.dictionaries] == [
        ("reference", 1, True), ("resid", 1, False), ("attn", 1, False), ("pre", 1, False)]
    assert [d.hook for d in listing.dictionaries] == ["blocks.0.mlp.hook_post", *[hook for _, hook, _ in OTHERS.values()]]
    assert [d.statistics for d in listing.dictionaries] == [True, False, False, False]
    assert client.activations(text=TEXT, top_k=3).dictionary.name == "reference"


@pytest.mark.parametrize("name", list(OTHERS))
def test_each_dictionary_reads_its_own_hook(client, model, many, name):
    result = client.activations(text=TEXT, top_k=5, dictionary=name)
    assert result.dictionary.name == name
    expected = _direct(model, many, name, [t.id for t in result.tokens])
    for t, token in enumerate(result.tokens):
        assert token.l0 == int((expected[t] > 0).sum())
        for entry in token.top:
            assert entry.value == pytest.approx(float(expected[t, entry.feature]), abs=1e-4)


def test_several_dictionaries_in_one_request_equal_each_read_alone(client):
    names = ["resid", "reference", "pre"]
    together = client.activations(text=TEXT, top_k=4, dictionaries=names)
    assert [r.dictionary.name for r in together.readouts] == names
    assert together.dictionary.name == "resid" and together.tokens == together.readouts[0].tokens
    for name, readout in zip(names, together.readouts):
        alone = client.activations(text=TEXT, top_k=4, dictionary=name)
        assert readout.tokens == alone.tokens


def test_a_single_dictionary_answer_has_no_readouts(client):
    assert client.activations(text=TEXT, dictionary="attn").readouts == []


def test_an_unknown_dictionary_is_not_found_and_the_message_lists_the_loaded_ones(client):
    for reference in ("nonesuch", "reference:2", "stranger"):
        with pytest.raises(ServiceCallError) as refused:
            client.activations(text=TEXT, dictionary=reference)
        assert refused.value.status in (404, "NOT_FOUND") and refused.value.field == "dictionary"
        assert "reference:v1, resid:v1, attn:v1, pre:v1" in str(refused.value)
    with pytest.raises(ServiceCallError) as refused:
        client.activations(text=TEXT, dictionaries=["resid", "nonesuch"])
    assert refused.value.field == "dictionaries[1]"


def test_dense_feature_values_take_one_dictionary(client):
    with pytest.raises(ServiceCallError) as refused:
        client.activations(text=TEXT, dictionaries=["resid", "attn"], feature_ids=[1])
    assert refused.value.field == "feature_ids"
    assert len(client.activations(text=TEXT, dictionary="resid", feature_ids=[1, 2]).tokens[0].values) == 2


def test_dictionary_and_dictionaries_together_are_refused(client):
    with pytest.raises(ServiceCallError) as refused:
        client.activations(text=TEXT, dictionary="resid", dictionaries=["attn"])
    assert refused.value.status in (422, "INVALID_ARGUMENT")


def test_generation_steers_features_of_two_dictionaries_at_two_hooks_in_one_request(client, model, many):
    plain = client.generate(prompt="import", max_new_tokens=6, temperature=0, features_top_k=3)
    steering = [{"feature": 5, "mode": "clamp", "value": 8.0}, {"feature": 3, "mode": "add", "value": 40.0, "dictionary": "resid"}]
    steered = client.generate(prompt="import", max_new_tokens=6, temperature=0, features_top_k=3, steering=steering)
    assert steered.dictionary.name == "reference"
    for token in steered.tokens:
        assert [(s.dictionary, s.feature) for s in token.steered] == [("reference", 5), ("resid", 3)]
        assert token.steered[0].after == pytest.approx(8.0, abs=1e-3)  # a ReLU clamp re-encodes to its value
    assert steered.text != plain.text


def test_a_steering_entry_of_an_unloaded_dictionary_names_its_field(client):
    with pytest.raises(ServiceCallError) as refused:
        client.generate(prompt="import", max_new_tokens=2, steering=[{"feature": 1, "mode": "add", "value": 1.0, "dictionary": "nonesuch"}])
    assert refused.value.field == "steering[0].dictionary"
    with pytest.raises(ServiceCallError) as refused:
        client.generate(prompt="import", max_new_tokens=2, steering=[{"feature": 300, "mode": "add", "value": 1.0, "dictionary": "resid"}])
    assert refused.value.field == "steering[0].feature" and "resid" in str(refused.value)


def test_attributions_decompose_through_the_named_dictionary(client):
    result = client.attributions(text=TEXT, target=" print", dictionary="resid")
    assert result.dictionary.name == "resid" and result.exact  # the last block's residual output: linear to the logits
    assert result.value == pytest.approx(result.features_total + result.error + result.rest, abs=1e-3)
    assert all(0 <= f.feature < 256 for f in result.features)


def test_feature_pages_and_lists_are_per_dictionary(client):
    assert client.feature(5).dictionary.name == "reference"
    with pytest.raises(ServiceCallError) as refused:
        client.feature(5, dictionary="resid")  # published without statistics
    assert refused.value.status in (409, "FAILED_PRECONDITION") and "resid" in str(refused.value)
    with pytest.raises(ServiceCallError) as refused:
        client.list_features(dictionary="attn")
    assert refused.value.status in (409, "FAILED_PRECONDITION")


def test_features_list_by_density_most_frequent_first(client):
    listing = client.list_features(order="density", page_size=50)
    densities = [r.density for r in listing.results]
    assert densities == sorted(densities, reverse=True) and listing.total == 4096
    second = client.list_features(order="density", page=2, page_size=50)
    assert second.results[0].density <= densities[-1]


def test_a_random_sample_of_features_is_live_and_the_same_for_the_same_seed(client):
    first = client.list_features(order="random", seed=11, page_size=5)
    assert [r.feature for r in first.results] == [r.feature for r in client.list_features(order="random", seed=11, page_size=5).results]
    assert [r.feature for r in first.results] != [r.feature for r in client.list_features(order="random", seed=12, page_size=5).results]
    assert all(r.density > 0 for r in first.results) and first.total < 4096


def test_search_reads_the_named_dictionary(client):
    with pytest.raises(ServiceCallError) as refused:
        client.search_features("import os", dictionary="pre")
    assert refused.value.status in (409, "FAILED_PRECONDITION")
    assert client.search_features("import os").dictionary.name == "reference"


def test_metrics_label_every_loaded_dictionary_and_the_watched_features_by_name(server):
    with RestClient(server.http_url) as rest:
        rest.activations(text=TEXT, dictionaries=["reference", "resid"])
        text = httpx.get(server.http_url + "/metrics").text
    info = [line for line in text.splitlines() if line.startswith("monosemantic_dictionary_info{")]
    assert len(info) == 4 and sum('default="true"' in line for line in info) == 1
    for name in ("reference", "resid"):
        assert f'monosemantic_active_features_per_token_count{{dictionary="{name}"}}' in text
        assert f'monosemantic_tokens_processed_total{{dictionary="{name}"}}' in text
    assert 'monosemantic_watched_feature_fires_total{dictionary="resid",dictionary_version="1",feature="3",name="three"}' in text
    assert 'monosemantic_watched_feature_fires_total{dictionary="reference",dictionary_version="1",feature="7",name=""}' in text


def test_several_dictionaries_share_one_forward_that_stops_after_the_deepest_hook(many):
    from service.engine import Engine
    from service.settings import ServiceSettings

    engine = Engine(ServiceSettings(registry=many, dictionaries=["reference:1", "resid", "attn", "pre"], sae_dtype="float32"))
    engine.load()
    engine.start()
    blocks, final_norm = engine.repository.model.lm.model.transformer.h, engine.repository.model.lm.model.transformer.ln_f
    calls = {"block": 0, "final_norm": 0}
    handles = [blocks[0].register_forward_pre_hook(lambda *_: calls.__setitem__("block", calls["block"] + 1)),
               final_norm.register_forward_pre_hook(lambda *_: calls.__setitem__("final_norm", calls["final_norm"] + 1))]
    try:
        result = asyncio.run(engine.activations(api.ActivationsRequest(text=TEXT, dictionaries=["reference", "resid", "attn", "pre"])))
    finally:
        for handle in handles:
            handle.remove()
        engine.stop()
    assert [r["dictionary"]["name"] for r in result["readouts"]] == ["reference", "resid", "attn", "pre"]
    assert calls == {"block": 1, "final_norm": 0}  # one pass through the block; the head after the deepest hook never runs


def test_all_serves_every_dictionary_bound_to_the_model(many):
    from service.engine import Engine
    from service.settings import ServiceSettings

    engine = Engine(ServiceSettings(registry=many, dictionaries=["resid", "all"]))
    engine.load()
    assert [d.ref for d in engine.repository] == ["resid:v1", "attn:v1", "pre:v1", "reference:v2"]  # never `stranger`


def test_the_dictionaries_setting_reads_a_comma_list_from_the_environment(monkeypatch):
    from service.settings import ServiceSettings

    monkeypatch.setenv("MONOSEMANTIC_DICTIONARIES", "reference, resid:3")
    assert ServiceSettings().configured_dictionaries() == ["reference", "resid:3"]
    monkeypatch.setenv("MONOSEMANTIC_WATCH_FEATURES", "12,resid:40:quotes")
    assert [(w.dictionary, w.id, w.name) for w in ServiceSettings().watch_features] == [(None, 12, ""), ("resid", 40, "quotes")]
    monkeypatch.setenv("MONOSEMANTIC_DICTIONARIES", "reference,reference:2")
    with pytest.raises(ValueError, match="named twice"):
        ServiceSettings()


def test_a_watched_feature_of_a_dictionary_not_loaded_stops_startup(many):
    from monosemantic.errors import ConfigError
    from service.engine import Engine
    from service.settings import ServiceSettings

    with pytest.raises(ConfigError, match="'attn' is not loaded"):
        Engine(ServiceSettings(registry=many, dictionaries=["reference:1"], watch_features="attn:3")).load()


@pytest.fixture()
def admin(many, tmp_path):
    root = tmp_path / "registry"
    shutil.copytree(many, root)
    running = RunningServer(registry=root, dictionaries=["reference:1", "resid"], admin_key=ADMIN_KEY)
    yield running
    running.stop()


@pytest.mark.parametrize("transport", ["rest", "grpc"])
def test_dictionaries_load_reload_and_unload_one_at_a_time(admin, transport):
    made = RestClient(admin.http_url, api_key=ADMIN_KEY) if transport == "rest" else GrpcClient(admin.grpc_target, api_key=ADMIN_KEY)
    with made as c:
        added = c.reload("attn")
        assert added.dictionary.name == "attn" and added.previous is None
        swapped = c.reload("reference", 2)
        assert (swapped.dictionary.version, swapped.previous.version) == (2, 1)
        assert [(d.name, d.version) for d in c.dictionaries().dictionaries] == [("reference", 2), ("resid", 1), ("attn", 1)]
        with pytest.raises(ServiceCallError) as refused:
            c.reload("stranger")  # another model's: refused, and everything serving stays
        assert refused.value.status in (409, "FAILED_PRECONDITION")
        assert c.activations(text=TEXT, dictionary="attn").dictionary.name == "attn"
        gone = c.unload("reference")
        assert gone.dictionary.name == "reference" and gone.default.name == "resid"
        assert c.activations(text=TEXT).dictionary.name == "resid"
        with pytest.raises(ServiceCallError) as refused:
            c.activations(text=TEXT, dictionary="reference")
        assert refused.value.status in (404, "NOT_FOUND")
        c.unload("attn")
        with pytest.raises(ServiceCallError) as refused:
            c.unload("resid")
        assert refused.value.status in (409, "FAILED_PRECONDITION") and "only loaded" in str(refused.value)
        with pytest.raises(ServiceCallError) as refused:
            c.unload("nonesuch")
        assert refused.value.status in (404, "NOT_FOUND")


def test_unload_needs_the_admin_scope(admin):
    response = httpx.post(admin.http_url + "/v1/admin/unload", json={"name": "resid"})
    assert response.status_code == 401
    assert [d.name for d in RestClient(admin.http_url, api_key=ADMIN_KEY).dictionaries().dictionaries] == ["reference", "resid"]


def test_a_dictionary_whose_statistics_are_off_the_layout_is_refused_at_load_and_the_others_serve_on(admin):
    registry = admin.server.settings.registry
    shipped = load_dictionary(registry, REFERENCE_DICTIONARY, 1)
    m = shipped.manifest
    wrong = {"density": torch.zeros(10), "mean_activation": torch.zeros(4096), "max_activation": torch.zeros(4096)}
    publish(registry, "misshapen", shipped.sae, model=m.model, hook=m.hook, features=wrong)
    with RestClient(admin.http_url, api_key=ADMIN_KEY) as c:
        with pytest.raises(ServiceCallError) as refused:
            c.reload("misshapen")
        assert refused.value.status == 409 and "density" in str(refused.value)
        assert [d.name for d in c.dictionaries().dictionaries] == ["reference", "resid"]
        assert c.feature(5).dictionary.name == "reference"


def _observed(server, name: str) -> float:
    for line in httpx.get(server.http_url + "/metrics").text.splitlines():
        if line.startswith(f'monosemantic_observed_tokens_total{{dictionary="{name}",'):
            return float(line.split()[-1])
    return 0.0


def test_observe_counts_the_texts_for_the_dictionaries_it_names(server):
    import time

    before = {name: _observed(server, name) for name in ("reference", "resid", "attn")}
    with RestClient(server.http_url) as rest:
        accepted = rest.observe([TEXT], dictionaries=["resid", "attn"])
    deadline = time.time() + 30
    while time.time() < deadline and _observed(server, "attn") < before["attn"] + accepted.tokens:
        time.sleep(0.05)
    assert _observed(server, "resid") == before["resid"] + accepted.tokens
    assert _observed(server, "attn") == before["attn"] + accepted.tokens
    assert _observed(server, "reference") == before["reference"]  # not named: not read


def test_an_engine_started_in_process_leaves_the_callers_grad_mode_alone(many):
    from service.engine import Engine
    from service.settings import ServiceSettings

    engine = Engine(ServiceSettings(registry=many, dictionaries=["resid"]))
    engine.load()
    engine.start()
    try:
        assert torch.is_grad_enabled()
    finally:
        engine.stop()
