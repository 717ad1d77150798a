"""Specifications of BatchTopK (monosemantic/batchtopk.py): k·batch activations across a training batch, a running
threshold, served as the JumpReLU at that threshold — trained, checkpointed, published and read by SAELens
(served: tests/test_served_architectures.py)."""

from __future__ import annotations

import json

import pytest
import torch
from sae_lens import JumpReLUSAE as SAELensJumpReLU
from sae_lens.saes.batchtopk_sae import BatchTopK as SAELensBatchTopK

from conftest import exported_to_saelens
from monosemantic.artifact import load_dictionary, publish
from monosemantic.batchtopk import BatchTopKSAE
from monosemantic.errors import ConfigError
from monosemantic.sae import SAEConfig, build_sae, sae_from_tensors
from monosemantic.shipped import REFERENCE_DICTIONARY, reference_registry_path
from trainer.activations import ActivationSource
from trainer.synthetic import mean_max_cosine
from trainer.train import TrainConfig, Trainer


def _sae(d_in: int = 16, d_sae: int = 64, k: int = 4, seed: int = 0) -> BatchTopKSAE:
    sae = build_sae(SAEConfig.build(architecture="batchtopk", d_in=d_in, d_sae=d_sae, k=k), seed=seed)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.3, generator=torch.Generator().manual_seed(seed + 1))
    return sae


@pytest.fixture(scope="module")
def trained(planted):
    source = ActivationSource(parts=[planted.activations.numpy()], dtype="float32")
    cfg = TrainConfig.build(architecture="batchtopk", d_sae=256, k=4, tokens=200 * 1024, batch_size=1024, lr=3e-3,
                            seed=0, bf16=False)
    return Trainer(cfg, source).run(progress=False)


def test_training_keeps_k_times_batch_activations_across_the_batch_not_k_per_row():
    sae = _sae().train()
    pre = torch.randn(32, 64) + torch.linspace(-1, 1, 32)[:, None]  # later rows larger: they take more of the budget
    features = sae.activate(pre)
    per_row = (features != 0).sum(-1)
    assert int(per_row.sum()) == 4 * 32 and per_row[-1] > 4 > per_row[0]
    assert torch.equal(features, SAELensBatchTopK(4)(pre))  # SAELens's own activation on the same batch


def test_the_first_batch_sets_the_threshold_and_later_ones_move_it_at_the_running_rate():
    sae = _sae().train()
    first = sae.activate(torch.randn(32, 64))
    assert torch.all(sae.threshold == float(first[first > 0].min()))
    second = sae.activate(torch.randn(32, 64) + 0.5)
    rate = BatchTopKSAE.THRESHOLD_RATE
    expected = (1 - rate) * float(first[first > 0].min()) + rate * float(second[second > 0].min())
    assert float(sae.threshold[0]) == pytest.approx(expected, rel=1e-6) and torch.all(sae.threshold == sae.threshold[0])
    sae.eval()
    sae.activate(torch.randn(32, 64) + 5)
    assert float(sae.threshold[0]) == pytest.approx(expected, rel=1e-6)  # serving never moves it


def test_served_it_is_exactly_the_jumprelu_at_its_shared_threshold():
    sae = _sae().train()
    sae.activate(torch.randn(64, 64))
    sae.eval()
    jumprelu = sae_from_tensors(SAEConfig.build(architecture="jumprelu", d_in=16, d_sae=64), sae.tensors())
    x = torch.randn(100, 16)
    assert torch.equal(sae.encode(x), jumprelu.encode(x))
    assert len({int(n) for n in (sae.encode(x) != 0).sum(-1)}) > 1  # per-token L0 varies


def test_a_trained_batchtopk_serves_about_k_features_per_token_and_recovers_the_planted_directions(trained, planted):
    x = planted.activations[:8192]
    l0 = (trained.sae.encode(x) != 0).sum(-1).float()
    assert abs(float(l0.mean()) - 4) <= 0.4 and float(l0.std()) > 0.5
    assert mean_max_cosine(planted.directions, trained.sae.W_dec.detach()) >= 0.95


def test_a_resumed_run_ends_with_the_same_threshold_as_an_uninterrupted_run(planted, tmp_path):
    source = ActivationSource(parts=[planted.activations[:30_000].numpy()], dtype="float32")
    cfg = TrainConfig.build(architecture="batchtopk", d_sae=64, k=4, tokens=60 * 256, batch_size=256, lr=3e-3, seed=0,
                            checkpoint_every=20)
    straight = Trainer(cfg, source).run(progress=False)
    Trainer(cfg, source, tmp_path / "ckpt").run(progress=False, stop_after_steps=33)
    resumed = Trainer(cfg, source, tmp_path / "ckpt").run(resume=True, progress=False)
    assert torch.equal(resumed.sae.threshold, straight.sae.threshold) and float(straight.sae.threshold[0]) > 0
    assert torch.equal(resumed.sae.W_dec, straight.sae.W_dec)


def test_publish_and_load_give_the_same_dictionary(trained, tmp_path):
    shipped = load_dictionary(reference_registry_path(), REFERENCE_DICTIONARY)
    publish(tmp_path, "batch", trained.sae, model=shipped.manifest.model, hook=shipped.manifest.hook)
    loaded = load_dictionary(tmp_path, "batch")
    assert isinstance(loaded.sae, BatchTopKSAE) and loaded.manifest.architecture == "batchtopk"
    assert torch.equal(loaded.sae.threshold, trained.sae.threshold)
    x = torch.randn(50, 32)
    assert torch.equal(loaded.sae.encode(x), trained.sae.encode(x))


def test_thresholds_that_differ_between_features_are_refused_naming_jumprelu():
    tensors = _sae().tensors()
    tensors["threshold"] = torch.linspace(0, 1, 64)
    with pytest.raises(ConfigError, match="one threshold shared by every feature.*jumprelu"):
        sae_from_tensors(SAEConfig.build(architecture="batchtopk", d_in=16, d_sae=64, k=4), tensors)


def test_it_exports_as_a_saelens_jumprelu_that_encodes_and_decodes_as_it_serves(trained, planted, tmp_path):
    theirs = exported_to_saelens(trained.sae, planted.activations[:2048], tmp_path / "out")
    assert isinstance(theirs, SAELensJumpReLU)
    assert json.loads((tmp_path / "out" / "cfg.json").read_text())["architecture"] == "jumprelu"