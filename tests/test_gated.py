"""Specifications of the gated SAE (monosemantic/gated.py): the gate decides, the magnitude path sizes — the loss as
SAELens computes it, the gate trained only through its own terms, trained to a target L0, published, steered."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from sae_lens import GatedTrainingSAE, GatedTrainingSAEConfig
from sae_lens.saes.sae import TrainStepInput

from monosemantic.artifact import load_dictionary, publish
from monosemantic.gated import GatedSAE
from monosemantic.sae import SAEConfig, build_sae
from monosemantic.shipped import REFERENCE_DICTIONARY, reference_registry_path
from monosemantic.steering import SteeringSpec, apply_steering
from trainer.activations import ActivationSource
from trainer.synthetic import make_sparse_data, mean_max_cosine
from trainer.train import TrainConfig, Trainer


def _sae(d_in: int = 16, d_sae: int = 64, seed: int = 0, input_scale: float = 1.0) -> GatedSAE:
    """Every bias and the magnitude's scale away from their starts, so that a path mixed up with another shows."""
    sae = build_sae(SAEConfig.build(architecture="gated", d_in=d_in, d_sae=d_sae, input_scale=input_scale), seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p, spread in ((sae.b_enc, 0.3), (sae.b_dec, 0.3), (sae.r_mag, 0.5), (sae.b_mag, 0.3)):
            p.normal_(0, spread, generator=g)
    return sae.train()


def test_a_feature_fires_where_its_gate_opens_with_the_magnitude_paths_value():
    sae, x = _sae(), torch.randn(32, 16)
    z = (x - sae.b_dec) @ sae.W_enc
    gate = z + sae.b_enc > 0
    magnitude = F.relu(z * sae.r_mag.exp() + sae.b_mag)
    assert torch.allclose(sae.encode(x), gate * magnitude, atol=1e-6)
    assert bool(((z + sae.b_enc > 0) & (magnitude == 0)).any())  # an open gate with a magnitude of 0 reads 0


def test_the_loss_terms_equal_saelenss_own_gated_on_the_same_weights_and_batch():
    sae, x = _sae(), torch.randn(32, 16)
    theirs = GatedTrainingSAE(GatedTrainingSAEConfig(d_in=16, d_sae=64, l1_coefficient=0.7, dtype="float32", device="cpu"))
    with torch.no_grad():
        for ours_name, their_name in (("W_enc", "W_enc"), ("b_enc", "b_gate"), ("r_mag", "r_mag"), ("b_mag", "b_mag"),
                                      ("W_dec", "W_dec"), ("b_dec", "b_dec")):
            getattr(theirs, their_name).copy_(getattr(sae, ours_name))
    step = theirs.training_forward_pass(TrainStepInput(sae_in=x, coefficients={"l1": 0.7}, dead_neuron_mask=None,
                                                       n_training_steps=0, is_logging_step=False))
    ours = sae(x)
    assert torch.allclose(ours.features, step.feature_acts, atol=1e-6)
    assert float(ours.mse.detach()) == pytest.approx(float(step.losses["mse_loss"].detach()), rel=1e-5)
    assert 0.7 * float(ours.sparsity.detach()) == pytest.approx(float(step.losses["l1_loss"].detach()), rel=1e-5)  # unit rows
    assert float(ours.aux.detach()) == pytest.approx(float(step.losses["auxiliary_reconstruction_loss"].detach()), rel=1e-5)


def test_the_reconstruction_does_not_train_the_gate_and_the_gates_reconstruction_does_not_train_the_decoder():
    sae, x = _sae(), torch.randn(64, 16)
    out = sae(x)
    out.mse.backward(retain_graph=True)
    # b_enc is the gate's bias: the Heaviside passes no gradient, and the magnitude path reads z = π_gate − b_gate.
    assert float(sae.b_enc.grad.abs().max()) <= 1e-6 * float(sae.b_mag.grad.abs().max())
    assert float(sae.r_mag.grad.abs().max()) > 0
    sae.zero_grad()
    out.aux.backward()
    assert sae.W_dec.grad is None or float(sae.W_dec.grad.abs().max()) == 0  # the paper's frozen decoder copy
    assert sae.b_dec.grad is not None and float(sae.b_enc.grad.abs().max()) > 0  # through the encoder's input and the gate
    assert sae.r_mag.grad is None or float(sae.r_mag.grad.abs().max()) == 0


def test_the_support_step_matches_the_dense_step_with_the_magnitude_path_off_its_start():
    sae, x = _sae(d_in=32, d_sae=512, input_scale=1.7), torch.randn(64, 32)
    results = []
    for forward in (sae.forward, sae.forward_sparse):
        sae.zero_grad()
        out = forward(x)
        (out.mse + 0.7 * out.sparsity + out.aux).backward()
        results.append((out, {name: p.grad.clone() for name, p in sae.named_parameters()}))
    (dense, dense_grads), (support, support_grads) = results
    for term in ("mse", "sparsity", "aux", "l0"):
        assert torch.allclose(getattr(dense, term), getattr(support, term), rtol=1e-5), term
    for name, grad in dense_grads.items():
        assert torch.allclose(grad, support_grads[name], rtol=1e-4, atol=1e-5 * float(grad.abs().max()) + 1e-6), name


def test_a_clamp_pins_a_gated_feature_at_its_value_through_the_magnitude_path():
    sae = _sae().eval()
    x = torch.randn(8, 16)
    result = apply_steering(sae, x, [SteeringSpec(feature=5, mode="clamp", value=3.0)])
    assert torch.allclose(result.after[:, 0], torch.full((8,), 3.0), atol=1e-4)


def test_resampling_starts_a_revived_latents_magnitude_path_at_its_gates():
    data = make_sparse_data(20_000, d=16, n_features=32, mean_active=3.0, seed=0)
    trainer = Trainer(TrainConfig.build(architecture="gated", d_sae=64, tokens=40_000, batch_size=512, seed=0),
                      ActivationSource(parts=[data.activations.numpy()], dtype="float32"))
    dead = torch.arange(0, 64, 4)
    with torch.no_grad():
        trainer.sae.r_mag.fill_(0.4)
        trainer.sae.b_mag.fill_(0.2)
    trainer.tokens_since_fired[dead] = trainer.dead_window
    assert trainer.resample_dead_features() == len(dead)
    assert float(trainer.sae.r_mag[dead].abs().max()) == 0 and float(trainer.sae.b_mag[dead].abs().max()) == 0
    assert float(trainer.sae.r_mag[1]) == pytest.approx(0.4)


@pytest.fixture(scope="module")
def trained(planted):
    source = ActivationSource(parts=[planted.activations.numpy()], dtype="float32")
    cfg = TrainConfig.build(architecture="gated", d_sae=256, target_l0=4.0, tokens=400 * 1024, batch_size=1024, lr=3e-3,
                            seed=0, bf16=False)
    return Trainer(cfg, source).run(progress=False)


def test_a_trained_gated_dictionary_reaches_its_target_l0_and_recovers_the_planted_directions(trained, planted):
    features = trained.sae.encode(planted.activations[:8192])
    assert abs(float((features != 0).sum(-1).float().mean()) - 4) <= 0.8  # within 20%
    assert mean_max_cosine(planted.directions, trained.sae.W_dec.detach()) >= 0.9


def test_publish_and_load_give_the_same_dictionary(trained, tmp_path):
    shipped = load_dictionary(reference_registry_path(), REFERENCE_DICTIONARY)
    publish(tmp_path, "gate", trained.sae, model=shipped.manifest.model, hook=shipped.manifest.hook)
    loaded = load_dictionary(tmp_path, "gate")
    assert isinstance(loaded.sae, GatedSAE)
    x = torch.randn(40, 32)
    assert torch.equal(loaded.sae.encode(x), trained.sae.encode(x))
    assert torch.equal(loaded.sae.r_mag, trained.sae.r_mag) and torch.equal(loaded.sae.b_mag, trained.sae.b_mag)
