"""Specifications of the ground-truth data (trainer/synthetic.py): the planted hierarchy and the absorption measure."""

from __future__ import annotations

import pytest
import torch

from trainer.activations import ActivationSource
from trainer.synthetic import absorption, make_hierarchical_data
from trainer.train import TrainConfig, Trainer


@pytest.fixture(scope="module")
def hierarchy():
    return make_hierarchical_data(60_000, d=32, independent=64, families=4, children=3, mean_active=3.0,
                                  parent_rate=0.1, child_share=0.75, seed=0)


def test_a_child_fires_only_with_its_parent_and_a_parent_at_its_rate(hierarchy):
    for parent, children in zip(hierarchy.parents, hierarchy.children):
        parent_on = hierarchy.codes[:, parent] > 0
        child_on = hierarchy.codes[:, children] > 0
        assert not bool((child_on.any(1) & ~parent_on).any())
        assert int(child_on.sum(1).max()) == 1  # at most one child at a time
        assert float(parent_on.float().mean()) == pytest.approx(0.1, abs=0.01)
        assert float(child_on.any(1)[parent_on].float().mean()) == pytest.approx(0.75, abs=0.02)
    assert torch.allclose(hierarchy.codes @ hierarchy.directions, hierarchy.activations)


def test_the_true_dictionary_absorbs_nothing_and_one_whose_parent_latent_skips_child_tokens_absorbs_everything(hierarchy):
    true_features = hierarchy.codes
    assert absorption(hierarchy, true_features, hierarchy.directions) == 0.0
    absorbed = true_features.clone()
    for parent, children in zip(hierarchy.parents, hierarchy.children):
        absorbed[(absorbed[:, children] > 0).any(1), parent] = 0
    assert absorption(hierarchy, absorbed, hierarchy.directions) == 1.0


@pytest.mark.slow
def test_matryoshka_absorbs_less_of_a_planted_hierarchy_than_topk_at_the_same_l0():
    # bench/quality.py's hierarchy case at its budget (2M rows, ~490 steps): TopK absorbed 0.62, Matryoshka 0.08
    data = make_hierarchical_data(216_384, d=64, independent=128, families=8, children=4, mean_active=4.0, seed=3)
    source = ActivationSource(parts=[data.activations[:-16_384].numpy()], dtype="float32")
    held = data.activations[-16_384:]
    held_data = type(data)(held, data.directions, data.codes[-16_384:], data.parents, data.children)
    measured = {}
    for arch in ("topk", "matryoshka"):
        cfg = TrainConfig.build(architecture=arch, d_sae=512, k=5, tokens=2_000_000, batch_size=4096, seed=0)
        sae = Trainer(cfg, source).run(progress=False).sae
        measured[arch] = absorption(held_data, sae.encode(held), sae.W_dec.detach())
    assert measured["matryoshka"] < 0.5 * measured["topk"], measured
