"""Specifications of serving a transcoder at its two hooks: a skip transcoder trained on the shipped reference's MLP
(it reads the MLP's input, blocks.0.ln2.hook_normalized, and predicts its output, blocks.0.hook_mlp_out) is read
where it reads, steered and spliced in where it writes, over REST, gRPC and the Neuronpedia and OpenAI clients."""

from __future__ import annotations

import inspect
import json

import neuronpedia_inference_client as npc
import openai
import pytest
import torch

from conftest import RunningServer
from monosemantic.artifact import HookRef, load_dictionary, publish
from monosemantic.client import GrpcClient, RestClient
from monosemantic.lm import read_activations_at, resolve_hook
from monosemantic.model import load_model
from monosemantic.shipped import REFERENCE_DICTIONARY, reference_lm_path, reference_registry_path
from trainer.activations import ActivationSource
from trainer.paired import PairedSource
from trainer.train import TrainConfig, Trainer

TEXT = "import os\nfor name in sorted(os.listdir(path)):\n    print(name)\n"
IN, OUT = "blocks.0.ln2.hook_normalized", "blocks.0.hook_mlp_out"
SECRET = "a-neuronpedia-secret"


def _ref(point) -> HookRef:
    return HookRef(name=point.name, module_path=point.module_path, alias=point.alias, kind=point.kind)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A skip transcoder trained briefly on paired rows read from the reference over text it trained on (the
    standard library's source), published beside the shipped dictionary."""
    model = load_model(str(reference_lm_path()))
    points = [resolve_hook(model.lm, IN), resolve_hook(model.lm, OUT)]
    text = "".join(inspect.getsource(module) for module in (json.decoder, json.encoder, inspect))
    ids = model.lm.tokenizer(text, return_tensors="pt").input_ids[0]
    contexts = ids[: (ids.numel() // 128) * 128].reshape(-1, 128)
    reads = [read_activations_at(model.lm, contexts[i:i + 16], points) for i in range(0, len(contexts), 16)]
    inputs, outputs = (torch.cat([r[j].reshape(-1, 128) for r in reads]).numpy() for j in (0, 1))
    cfg = TrainConfig.build(architecture="skip-transcoder", d_sae=1024, k=16, tokens=80 * 512, batch_size=512, lr=1e-3, seed=0)
    sae = Trainer(cfg, PairedSource(ActivationSource([inputs], "float32"), ActivationSource([outputs], "float32"), {})).run(progress=False).sae
    registry = tmp_path_factory.mktemp("transcoders")
    shipped = load_dictionary(reference_registry_path(), REFERENCE_DICTIONARY)
    publish(registry, "tc", sae, model=shipped.manifest.model, hook=_ref(points[0]), extra={"hook_out": _ref(points[1])})
    return registry, model, points


@pytest.fixture(scope="module")
def served(trained):
    registry = trained[0]
    running = RunningServer(registry=registry, dictionaries=["tc"], sae_dtype="float32", max_new_tokens=8, neuronpedia_secret=SECRET)
    yield running, load_dictionary(registry, "tc").sae, *trained[1:]
    running.stop()


def _acts(model, points, ids):
    x, y = read_activations_at(model.lm, torch.tensor([ids]), points)
    return x[0].float(), y[0].float()


@pytest.mark.parametrize("transport", ["rest", "grpc"])
def test_the_service_names_both_hooks_and_the_output_width(served, transport):
    running, *_ = served
    with (RestClient(running.http_url) if transport == "rest" else GrpcClient(running.grpc_target)) as client:
        info = client.dictionaries().dictionaries[0]
    assert (info.architecture, info.hook, info.hook_out, info.d_in, info.d_out) == ("skip-transcoder", IN, OUT, 128, 128)


def test_features_are_read_at_the_input_and_the_error_is_of_the_predicted_output(served):
    running, sae, model, points = served
    with RestClient(running.http_url) as client:
        result = client.activations(text=TEXT, top_k=5)
    x, y = _acts(model, points, [t.id for t in result.tokens])
    expected = sae.encode(x)
    relative = ((y - sae.reconstruct(x)).pow(2).sum(-1) / y.pow(2).sum(-1)).sqrt()
    for t, token in enumerate(result.tokens):
        assert token.l0 == int((expected[t] != 0).sum())
        assert token.recon_error == pytest.approx(float(relative[t]), rel=1e-3, abs=1e-5)
        for entry in token.top:
            assert entry.value == pytest.approx(float(expected[t, entry.feature]), abs=1e-4)


def _steered_features(client, feature, mode, value):
    return client.generate(prompt="import", max_new_tokens=6, temperature=0, steering=[{"feature": feature, "mode": mode, "value": value}])


@pytest.mark.parametrize("transport", ["rest", "grpc"])
def test_clamp_pins_the_written_value_and_add_moves_the_output_along_the_feature(served, transport):
    running, *_ = served
    with (RestClient(running.http_url) if transport == "rest" else GrpcClient(running.grpc_target)) as client:
        feature = client.activations(text=TEXT, top_k=1).tokens[3].top[0].feature
        plain = client.generate(prompt="import", max_new_tokens=6, temperature=0)
        clamped = _steered_features(client, feature, "clamp", 30.0)
        added = _steered_features(client, feature, "add", 60.0)
    assert all(t.steered[0].after == pytest.approx(30.0, abs=1e-4) for t in clamped.tokens)
    assert all(t.steered[0].after == pytest.approx(t.steered[0].before + 60.0, abs=1e-3) for t in added.tokens)
    assert clamped.text != plain.text and added.text != plain.text


def test_an_add_of_zero_leaves_the_model_as_it_is_and_a_clamp_replaces_the_mlp_by_the_transcoder(served):
    running, sae, model, points = served
    with RestClient(running.http_url) as client:
        plain = client.generate(prompt="import", max_new_tokens=6, temperature=0)
        zero = _steered_features(client, 3, "add", 0.0)
    assert zero.text == plain.text
    # The clamp's replacement, computed here: the MLP's output is the transcoder's prediction plus the pinned change.
    ids = model.lm.tokenizer("import os", return_tensors="pt").input_ids
    x, y = _acts(model, points, ids[0].tolist())
    from monosemantic.steering import SteeringSpec, apply_transcoder_steering

    steered = apply_transcoder_steering(sae, x, y, [SteeringSpec(3, "clamp", 2.0)])
    f = sae.encode(x)[:, 3]
    assert torch.allclose(steered.activation, sae.reconstruct(x) + (2.0 - f)[:, None] * sae.W_dec[3] / sae.output_scale, atol=1e-5)


def test_an_attribution_splices_the_transcoder_in_for_the_mlp_and_is_exact_at_the_last_blocks_output(served):
    running, *_ = served
    with RestClient(running.http_url) as client:
        result = client.attributions(text=TEXT, target=" self", top_k=10)
    assert result.exact  # the reference has one block: from its MLP's output to the logits is linear
    assert result.value == pytest.approx(result.features_total + result.error + result.rest, abs=1e-3)
    assert abs(result.remainder) < 1e-3 and result.features


def test_neuronpedia_and_openai_clients_steer_a_transcoder_feature(served):
    running, *_ = served
    config = npc.Configuration(host=f"{running.http_url}/neuronpedia/v1")
    config.api_key["SimpleSecretAuth"] = SECRET
    request = {"prompt": "import os\n", "model": "reference-lm", "steer_method": npc.NPSteerMethod.SIMPLE_ADDITIVE,
               "normalize_steering": False, "types": [npc.NPSteerType.STEERED, npc.NPSteerType.DEFAULT],
               "n_completion_tokens": 8, "temperature": 0, "strength_multiplier": 1, "freq_penalty": 0, "seed": 1,
               "features": [npc.NPSteerFeature(model="reference-lm", source="0-tc", index=3, strength=60.0)]}
    with npc.ApiClient(config) as made:
        outputs = {o.type.value: o.output for o in npc.DefaultApi(made).steer_completion_post(npc.SteerCompletionRequest(**request)).outputs}
    with RestClient(running.http_url) as ours:
        mine = ours.generate(prompt="import os\n", max_new_tokens=8, temperature=0, steer_prompt=True,
                             steering=[{"feature": 3, "mode": "add", "value": 60.0}])
    assert outputs["STEERED"] == mine.text != outputs["DEFAULT"]
    with openai.OpenAI(base_url=f"{running.http_url}/openai/v1", api_key="x", max_retries=0) as client:
        answer = client.completions.create(model="reference-lm", prompt="import os\n", max_tokens=8, temperature=0,
                                           extra_body={"steering": [{"feature": 3, "mode": "clamp", "value": 20.0}]})
    extra = answer.choices[0].model_extra["monosemantic"]
    assert all(t["steered"][0]["after"] == pytest.approx(20.0, abs=1e-4) for t in extra["tokens"])
