"""The service keeps a model in its checkpoint's dtype (MONOSEMANTIC_DTYPE=auto): a bf16 checkpoint is served in bf16,
not widened to fp32 at twice its size, and reads, steers and attributes within bf16's tolerance of fp32."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from conftest import RunningServer
from monosemantic.artifact import ModelRef, load_dictionary, publish
from monosemantic.client import RestClient
from monosemantic.lm import load_lm, resolve_dtype
from monosemantic.shipped import REFERENCE_DICTIONARY, reference_lm_path, reference_registry_path

TEXT = "import os\nfor name in os.listdir(path):\n    print(name)\n"


@pytest.fixture(scope="module")
def bf16_model(tmp_path_factory):
    """The reference LM saved in bfloat16, and a registry binding the shipped dictionary to it."""
    root = tmp_path_factory.mktemp("bf16")
    lm = load_lm(reference_lm_path())
    lm.model.to(torch.bfloat16).save_pretrained(root / "model")
    lm.tokenizer.save_pretrained(root / "model")
    bf16 = load_lm(root / "model", dtype=torch.bfloat16)
    shipped = load_dictionary(reference_registry_path(), REFERENCE_DICTIONARY, None)
    m = shipped.manifest
    publish(root / "registry", REFERENCE_DICTIONARY, shipped.sae, model=ModelRef(name="reference-bf16", checksum=bf16.checksum), hook=m.hook)
    return root / "model", root / "registry"


def test_auto_is_the_checkpoint_s_dtype(bf16_model, tmp_path):
    model_dir, _ = bf16_model
    assert resolve_dtype(model_dir, "auto") is torch.bfloat16
    assert resolve_dtype(reference_lm_path(), "auto") is torch.float32
    assert resolve_dtype(model_dir, "float32") is torch.float32
    half = tmp_path / "half"
    shutil.copytree(model_dir, half)
    config = json.loads((half / "config.json").read_text())
    config["dtype"] = "float16"
    (half / "config.json").write_text(json.dumps(config))
    assert resolve_dtype(half, "auto") is torch.float32  # fp16 on CPU is unusable: widened
    assert resolve_dtype(half, "auto", device="cuda") is torch.float16


@pytest.fixture(scope="module")
def served(bf16_model):
    model_dir, registry = bf16_model
    in_bf16 = RunningServer(model=str(model_dir), registry=registry, dictionary=REFERENCE_DICTIONARY, sae_dtype="float32", max_new_tokens=16)
    widened = RunningServer(model=str(model_dir), registry=registry, dictionary=REFERENCE_DICTIONARY, sae_dtype="float32", max_new_tokens=16,
                            dtype="float32")
    yield in_bf16, widened
    in_bf16.stop()
    widened.stop()


def test_a_bf16_checkpoint_is_served_in_bf16_at_half_the_bytes(served):
    in_bf16, widened = served
    def weight_bytes(running):
        return sum(p.numel() * p.element_size() for p in running.engine.repository.model.lm.model.parameters())
    assert {p.dtype for p in in_bf16.engine.repository.model.lm.model.parameters()} == {torch.bfloat16}
    assert weight_bytes(in_bf16) * 2 == weight_bytes(widened)


def test_the_checksum_does_not_depend_on_the_dtype_it_is_served_in(served):
    in_bf16, widened = served
    assert in_bf16.engine.repository.model.checksum == widened.engine.repository.model.checksum  # one dictionary binds both


def test_activations_in_bf16_agree_with_the_widened_model(served):
    in_bf16, widened = served
    with RestClient(in_bf16.http_url) as a, RestClient(widened.http_url) as b:
        ids = list(range(0, 4096, 97))
        x = torch.tensor([t.values for t in a.activations(text=TEXT, top_k=0, feature_ids=ids).tokens])
        y = torch.tensor([t.values for t in b.activations(text=TEXT, top_k=0, feature_ids=ids).tokens])
    assert torch.allclose(x, y, atol=0.1 * float(y.abs().max()))  # bf16 keeps 8 bits of mantissa
    assert torch.nn.functional.cosine_similarity(x.flatten(), y.flatten(), dim=0) > 0.98


def test_steered_generation_and_attribution_run_on_the_bf16_model(served):
    in_bf16, _ = served
    with RestClient(in_bf16.http_url) as client:
        steered = client.generate(prompt="def ", max_new_tokens=8, seed=0, steering=[{"feature": 7, "mode": "clamp", "value": 5.0}])
        assert len(steered.tokens) >= 1
        assert all(s.after == pytest.approx(5.0, rel=0.1) for t in steered.tokens for s in t.steered)
        attribution = client.attributions(text="import os", target=" os")
        assert attribution.features and abs(attribution.value) > 0
