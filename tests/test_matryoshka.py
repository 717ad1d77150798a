"""Specifications of Matryoshka BatchTopK (monosemantic/matryoshka.py): nested prefixes each reconstruct the input —
the loss as SAELens computes it, its widths checked, trained, recorded in the manifest, served and exported."""

from __future__ import annotations

import json

import pytest
import torch
from sae_lens import JumpReLUSAE as SAELensJumpReLU
from sae_lens.saes.matryoshka_batchtopk_sae import MatryoshkaBatchTopKTrainingSAE, MatryoshkaBatchTopKTrainingSAEConfig
from sae_lens.saes.sae import TrainStepInput

from conftest import exported_to_saelens
from monosemantic.artifact import load_dictionary, publish
from monosemantic.errors import ConfigError
from monosemantic.matryoshka import MatryoshkaSAE
from monosemantic.sae import SAEConfig, build_sae
from monosemantic.shipped import REFERENCE_DICTIONARY, reference_registry_path
from trainer.activations import ActivationSource
from trainer.synthetic import mean_max_cosine
from trainer.train import TrainConfig, Trainer

WIDTHS = (8, 24, 64)


def _sae(seed: int = 0) -> MatryoshkaSAE:
    sae = build_sae(SAEConfig.build(architecture="matryoshka", d_in=16, d_sae=64, k=4, matryoshka_widths=WIDTHS), seed=seed)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.3, generator=torch.Generator().manual_seed(seed + 1))
        sae.b_dec.normal_(0, 0.3, generator=torch.Generator().manual_seed(seed + 2))
    return sae.train()


def test_the_loss_adds_each_inner_prefixs_reconstruction_error_to_the_whole_ones():
    sae, x = _sae(), torch.randn(32, 16)
    out = sae(x)
    features = out.features.detach()
    W_dec, b_dec = sae.W_dec.detach(), sae.b_dec.detach()
    by_hand = sum(float((x - (features[:, :w] @ W_dec[:w] + b_dec)).pow(2).sum(-1).mean()) for w in WIDTHS[:-1])
    assert float(out.aux.detach()) == pytest.approx(by_hand, rel=1e-5)  # no dead mask: the inner terms alone
    assert float(out.mse.detach()) == pytest.approx(float((x - out.x_hat.detach()).pow(2).sum(-1).mean()), rel=1e-5)  # the whole one


def test_the_loss_terms_equal_saelenss_own_matryoshka_on_the_same_weights_and_batch():
    sae, x = _sae(), torch.randn(32, 16)
    theirs = MatryoshkaBatchTopKTrainingSAE(MatryoshkaBatchTopKTrainingSAEConfig(
        d_in=16, d_sae=64, k=4, matryoshka_widths=list(WIDTHS), rescale_acts_by_decoder_norm=False, dtype="float32", device="cpu"))
    with torch.no_grad():
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            getattr(theirs, name).copy_(getattr(sae, name))
    step = theirs.training_forward_pass(TrainStepInput(sae_in=x, coefficients={}, dead_neuron_mask=None, n_training_steps=0,
                                                       is_logging_step=False))
    ours = sae(x)
    assert torch.allclose(ours.features, step.feature_acts, atol=1e-6)
    assert float(ours.mse.detach()) == pytest.approx(float(step.losses["mse_loss"].detach()), rel=1e-5)
    inner = sum(float(step.losses[f"inner_mse_loss_{w}"].detach()) for w in WIDTHS[:-1])
    assert float(ours.aux.detach()) == pytest.approx(inner, rel=1e-5)


@pytest.mark.parametrize("widths, words", [
    ((24, 8, 64), "increasing"),
    ((8, 24, 32), r"end at d_sae \(64\)"),
    ((0, 64), "positive"),
])
def test_widths_that_are_not_nested_prefixes_of_the_dictionary_are_refused(widths, words):
    with pytest.raises(ConfigError, match=words):
        SAEConfig.build(architecture="matryoshka", d_in=16, d_sae=64, k=4, matryoshka_widths=widths)
    with pytest.raises(ConfigError, match=words):
        TrainConfig.build(architecture="matryoshka", d_sae=64, k=4, matryoshka_widths=widths)


def test_widths_are_refused_for_an_architecture_without_prefixes_and_defaulted_for_matryoshka():
    with pytest.raises(ConfigError, match="matryoshka_widths applies to matryoshka only, not topk"):
        TrainConfig.build(architecture="topk", d_sae=64, k=4, matryoshka_widths=(8, 64))
    assert TrainConfig.build(architecture="matryoshka", d_sae=4096, k=4).resolved_widths() == (256, 1024, 4096)
    with pytest.raises(ConfigError, match="matryoshka_widths is required"):
        SAEConfig.build(architecture="matryoshka", d_in=16, d_sae=64, k=4)


@pytest.fixture(scope="module")
def trained(planted):
    source = ActivationSource(parts=[planted.activations.numpy()], dtype="float32")
    cfg = TrainConfig.build(architecture="matryoshka", d_sae=256, k=4, matryoshka_widths=(32, 128, 256),
                            tokens=200 * 1024, batch_size=1024, lr=3e-3, seed=0, bf16=False)
    return Trainer(cfg, source).run(progress=False)


def test_a_trained_matryoshka_serves_about_k_features_per_token_and_its_first_prefix_holds_the_frequent_directions(trained, planted):
    x = planted.activations[:8192]
    features = trained.sae.encode(x)
    assert abs(float((features != 0).sum(-1).float().mean()) - 4) <= 0.4
    assert mean_max_cosine(planted.directions, trained.sae.W_dec.detach()) >= 0.95
    # The generator's firing probability falls with the feature's index: the first 32 latents find the most frequent.
    frequent = planted.directions[:16]
    assert mean_max_cosine(frequent, trained.sae.W_dec.detach()[:32]) >= 0.9
    assert mean_max_cosine(frequent, trained.sae.W_dec.detach()[:32]) > mean_max_cosine(planted.directions[-16:], trained.sae.W_dec.detach()[:32])


def test_the_manifest_records_the_widths_and_the_published_dictionary_loads_equal(trained, tmp_path):
    shipped = load_dictionary(reference_registry_path(), REFERENCE_DICTIONARY)
    publish(tmp_path, "nested", trained.sae, model=shipped.manifest.model, hook=shipped.manifest.hook)
    loaded = load_dictionary(tmp_path, "nested")
    assert isinstance(loaded.sae, MatryoshkaSAE) and loaded.manifest.sae.matryoshka_widths == (32, 128, 256)
    manifest = json.loads((loaded.path / "manifest.json").read_text())
    assert manifest["sae"]["matryoshka_widths"] == [32, 128, 256]
    x = torch.randn(40, 32)
    assert torch.equal(loaded.sae.encode(x), trained.sae.encode(x))


def test_it_exports_as_a_saelens_jumprelu_that_encodes_and_decodes_as_it_serves(trained, planted, tmp_path):
    theirs = exported_to_saelens(trained.sae, planted.activations[:2048], tmp_path / "out")
    assert isinstance(theirs, SAELensJumpReLU)