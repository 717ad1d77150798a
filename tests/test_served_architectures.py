"""Specifications of serving the architectures added after ReLU, TopK and JumpReLU: each trained on the shipped
reference's MLP activations, published, then read and steered over the running service as the dictionary encodes."""

from __future__ import annotations

import inspect
import json

import pytest
import torch

from conftest import RunningServer
from monosemantic.artifact import load_dictionary, publish
from monosemantic.client import GrpcClient, RestClient, ServiceCallError
from monosemantic.lm import read_activations, resolve_hook
from monosemantic.model import load_model
from monosemantic.sae import SAE_REGISTRY
from monosemantic.shipped import REFERENCE_DICTIONARY, reference_lm_path, reference_registry_path
from trainer.activations import ActivationSource
from trainer.train import TrainConfig, Trainer

TEXT = "import os\nfor name in sorted(os.listdir(path)):\n    print(name)\n"


def publish_trained_on_reference(registry, name: str, architecture: str, *, statistics: bool = False, **options):
    """A dictionary of ``architecture`` trained briefly on the shipped reference's MLP activations over real text it
    read in training (its corpus is the standard library's source), published as ``name`` in ``registry``, with
    feature statistics (pages, lists, search) when asked. Returns (model, hook)."""
    model = load_model(str(reference_lm_path()))
    shipped = load_dictionary(reference_registry_path(), REFERENCE_DICTIONARY)
    hook = resolve_hook(model.lm, shipped.manifest.hook.alias)
    text = "".join(inspect.getsource(module) for module in (json.decoder, json.encoder, inspect))
    ids = model.lm.tokenizer(text, return_tensors="pt").input_ids[0]
    contexts = ids[: (ids.numel() // 128) * 128].reshape(-1, 128)
    rows = torch.cat([read_activations(model.lm, contexts[i:i + 16], hook).reshape(-1, 512) for i in range(0, len(contexts), 16)])
    sparsity = {"k": 16} if SAE_REGISTRY[architecture].takes_k else {"target_l0": 16.0}
    cfg = TrainConfig.build(architecture=architecture, d_sae=1024, tokens=80 * 512, batch_size=512, lr=1e-3, seed=0,
                            **sparsity, **options)
    sae = Trainer(cfg, ActivationSource(parts=[rows.numpy()], dtype="float32")).run(progress=False).sae
    features, labels = None, None
    if statistics:
        from trainer.features import FeatureStatsConfig, feature_statistics

        small = FeatureStatsConfig(top_k=4, quantile_bins=2, per_quantile=2, window_before=3, window_after=2)
        features, labels = feature_statistics(model.lm, sae, shipped.manifest.hook.name, contexts, small, progress=False)
    publish(registry, name, sae, model=shipped.manifest.model, hook=shipped.manifest.hook, features=features, labels=labels)
    return model, hook


@pytest.fixture(scope="module", params=["batchtopk", "matryoshka", "gated"])
def served(request, tmp_path_factory):
    """Each architecture whose per-token L0 varies and that no service test met before it: BatchTopK, Matryoshka
    (both served at one shared threshold) and gated (its gate decides, its magnitude path sizes)."""
    registry = tmp_path_factory.mktemp(request.param)
    model, hook = publish_trained_on_reference(registry, "batch", request.param)
    running = RunningServer(registry=registry, dictionaries=["batch"], sae_dtype="float32", max_new_tokens=8)
    yield running, load_dictionary(registry, "batch").sae, model, hook
    running.stop()


def test_the_service_reads_each_tokens_features_as_the_dictionary_encodes_them(served):
    running, sae, model, hook = served
    with RestClient(running.http_url) as client:
        result = client.activations(text=TEXT, top_k=5)
    expected = sae.encode(read_activations(model.lm, torch.tensor([[t.id for t in result.tokens]]), hook)[0])
    assert [t.l0 for t in result.tokens] == [int(n) for n in (expected != 0).sum(-1)]
    assert len({t.l0 for t in result.tokens}) > 1
    for t, token in enumerate(result.tokens):
        for entry in token.top:
            assert entry.value == pytest.approx(float(expected[t, entry.feature].detach()), abs=1e-4)


def test_the_service_steers_a_feature_by_clamp_and_add(served):
    running, *_ = served
    with RestClient(running.http_url) as client:
        feature = client.activations(text=TEXT, top_k=1).tokens[3].top[0].feature
        plain = client.generate(prompt="import", max_new_tokens=8, temperature=0)
        clamped = client.generate(prompt="import", max_new_tokens=8, temperature=0,
                                  steering=[{"feature": feature, "mode": "clamp", "value": 30.0}])
        added = client.generate(prompt="import", max_new_tokens=8, temperature=0,
                                steering=[{"feature": feature, "mode": "add", "value": 60.0}])
    assert all(token.steered[0].after == pytest.approx(30.0, abs=1e-3) for token in clamped.tokens)
    assert clamped.text != plain.text and added.text != plain.text


# ---- a Matryoshka dictionary's prefixes: named by the service, listed one at a time ------------------------------

@pytest.fixture(scope="module")
def nested_server(tmp_path_factory):
    registry = tmp_path_factory.mktemp("nested")
    publish_trained_on_reference(registry, "nested", "matryoshka", statistics=True, matryoshka_widths=(64, 256, 1024))
    running = RunningServer(registry=registry, dictionaries=["nested"])
    yield running
    running.stop()


@pytest.mark.parametrize("transport", ["rest", "grpc"])
def test_the_service_names_a_matryoshka_dictionarys_prefixes_and_lists_one_prefix(nested_server, transport):
    with (RestClient(nested_server.http_url) if transport == "rest" else GrpcClient(nested_server.grpc_target)) as client:
        assert client.dictionaries().dictionaries[0].matryoshka_widths == [64, 256, 1024]
        whole = client.list_features(dictionary="nested", order="id", page_size=100)
        prefix = client.list_features(dictionary="nested", order="id", page_size=100, below=64)
        densest = client.list_features(dictionary="nested", order="density", page_size=5, below=256)
    assert whole.total == 1024 and [f.feature for f in prefix.results] == list(range(64)) and prefix.total == 64
    assert all(f.feature < 256 for f in densest.results) and densest.total == 256
    assert [f.density for f in densest.results] == sorted((f.density for f in densest.results), reverse=True)


@pytest.mark.parametrize("transport", ["rest", "grpc"])
def test_a_prefix_wider_than_the_dictionary_is_refused_naming_below(nested_server, transport):
    with (RestClient(nested_server.http_url) if transport == "rest" else GrpcClient(nested_server.grpc_target)) as client:
        with pytest.raises(ServiceCallError) as refused:
            client.list_features(dictionary="nested", below=4096)
    assert refused.value.field == "below" and "1024 features" in str(refused.value)
