"""The service on a user's own HF model and dictionaries: a tiny Llama built locally from its config class.

Llama-style models have a gated MLP and an RMSNorm before the unembedding; attribution must stay exact at the
last block's MLP neurons and say it is first-order elsewhere.
"""

import pytest
import torch

from conftest import RunningServer, tiny_llama
from monosemantic.artifact import HookRef, ModelRef, publish
from monosemantic.client import RestClient
from monosemantic.lm import load_lm, resolve_hook
from monosemantic.sae import SAEConfig, build_sae

TEXT = "def main():\n    return sorted(items)"


@pytest.fixture(scope="module")
def llama_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("llama")
    lm = load_lm(tiny_llama(root / "model"))
    registry = root / "registry"
    for name, hook, width in (("neurons", "blocks.1.mlp.hook_post", 128), ("residual", "blocks.0.hook_resid_post", 64)):
        point = resolve_hook(lm, hook)
        sae = build_sae(SAEConfig.build(architecture="relu", d_in=width, d_sae=256), seed=1)
        with torch.no_grad():
            sae.b_enc.fill_(0.05)  # an untrained dictionary with some features on, enough to exercise the maths
        publish(registry, name, sae, model=ModelRef(name="tiny-llama", checksum=lm.checksum),
                hook=HookRef(name=hook, module_path=point.module_path, alias=point.alias, kind=point.kind))
    return root / "model", registry, lm


@pytest.fixture(scope="module")
def llama_server(llama_setup):
    model, registry, _ = llama_setup
    running = RunningServer(model=str(model), registry=registry, dictionary="neurons", sae_dtype="float32")
    yield running
    running.stop()


def _plain_logit(lm, text, target):
    ids = [0] + lm.tokenizer(text, add_special_tokens=False).input_ids
    with torch.no_grad():
        return float(lm.model(input_ids=torch.tensor([ids])).logits[0, -1, target])


def test_activations_are_served_for_the_users_model(llama_server):
    with RestClient(llama_server.http_url) as client:
        result = client.activations(text=TEXT, top_k=5)
        (info,) = client.dictionaries().dictionaries
    assert len(result.tokens) > 5 and any(t.top for t in result.tokens)
    assert (info.hook, info.d_in, info.model_name) == ("blocks.1.mlp.hook_post", 128, "tiny-llama")


def test_attribution_through_a_gated_mlp_and_rmsnorm_is_exact_at_the_last_block(llama_server, llama_setup):
    _, _, lm = llama_setup
    with RestClient(llama_server.http_url) as client:
        result = client.attributions(text=TEXT, target=7, top_k=5)
    plain = _plain_logit(lm, TEXT, 7)
    assert result.exact
    assert result.value == pytest.approx(plain, rel=1e-5, abs=1e-6)
    assert result.features_total + result.error + result.rest == pytest.approx(plain, rel=1e-3, abs=1e-5)


def test_attribution_before_the_last_block_is_first_order_and_reports_its_remainder(llama_setup):
    model, registry, lm = llama_setup
    running = RunningServer(model=str(model), registry=registry, dictionary="residual", sae_dtype="float32")
    try:
        with RestClient(running.http_url) as client:
            result = client.attributions(text=TEXT, target=7)
    finally:
        running.stop()
    assert not result.exact
    assert result.value == pytest.approx(_plain_logit(lm, TEXT, 7), rel=1e-5, abs=1e-6)
    # Two blocks lie after the hook: the linear decomposition misses something, and the response says how much.
    assert abs(result.remainder) > 1e-3 * abs(result.value)


def test_steered_generation_pins_the_feature_on_the_users_model(llama_server):
    with RestClient(llama_server.http_url) as client:
        result = client.generate(prompt="def ", max_new_tokens=4, seed=0, steering=[{"feature": 3, "mode": "clamp", "value": 2.0}])
    assert [t.steered[0].after for t in result.tokens] == pytest.approx([2.0] * 4, abs=1e-3)
