"""Specifications of the trainer's budget rules (trainer/train.py): the default learning rate and L0 controller gain
follow the run's width and length, are recorded resolved, and at a few hundred steps every architecture's defaults
recover a planted dictionary."""

import pytest
import torch

from monosemantic.sae import SAE_REGISTRY
from trainer.activations import ActivationSource
from trainer.synthetic import make_sparse_data, mean_max_cosine
from trainer.train import CONTROLLER_FLOOR_GAIN, LR_CAP, TrainConfig, Trainer, default_lr


def test_the_default_learning_rate_halves_for_four_times_the_latents_and_for_four_times_the_steps():
    base = default_lr(16_384, 16_000)
    assert default_lr(65_536, 16_000) == pytest.approx(base / 2)
    assert default_lr(16_384, 64_000) == pytest.approx(base / 2)


def test_the_default_learning_rate_is_capped_for_a_small_dictionary_and_a_short_run():
    assert default_lr(64, 10) == LR_CAP


def test_a_config_without_lr_records_the_rules_value_and_marks_it_a_default():
    cfg = TrainConfig(architecture="topk", k=24, d_sae=24_576, tokens=2_000_000)
    assert cfg.lr == pytest.approx(default_lr(24_576, cfg.steps))
    assert cfg.model_dump(mode="json")["lr"] == cfg.lr  # what the manifest and a checkpoint record
    assert TrainConfig.model_validate(cfg.model_dump(mode="json")) == cfg  # a resume rebuilds the same config
    assert "lr" not in cfg.model_fields_set and f"lr {cfg.lr:.3g} (default)" in cfg.summary()


def test_a_given_learning_rate_and_controller_gain_are_kept():
    cfg = TrainConfig(d_sae=512, tokens=2_000_000, lr=4e-4, controller_gain=0.005)
    assert (cfg.lr, cfg.controller_gain) == (4e-4, 0.005)
    assert "lr 0.0004," in cfg.summary() and "lr 0.0004 (default)" not in cfg.summary()


def test_a_short_run_steers_its_sparsity_faster_than_a_long_one_which_keeps_the_floor_gain():
    short, long = (TrainConfig(d_sae=4096, tokens=tokens, target_l0=20).controller_gain for tokens in (1_000_000, 40_000_000))
    assert short > 5 * CONTROLLER_FLOOR_GAIN and long == CONTROLLER_FLOOR_GAIN


@pytest.fixture(scope="module")
def planted():
    return make_sparse_data(120_000, d=24, n_features=48, mean_active=4.0, seed=4)


# Matryoshka's nested losses make its wide latents learn what its first prefixes leave over, not the planted
# directions themselves: 0.869 here, and 0.85 whatever the lr (1.6e-3 to 6.4e-3) or the steps (300 or 1,200) on a
# 2x-overcomplete shape. Strict: the day it passes, this mark must go (issue 25 holds Matryoshka's quality open).
_MATRYOSHKA = pytest.mark.xfail(strict=True, reason="Matryoshka recovers 0.87 of flat planted directions (issue 25)")


# 300 steps at the default batch of 4,096: the budget issue 18 asks the defaults to be good at, on a small shape.
# Each architecture at its defaults (no lr, no gain); TopK-like ones at k 4, the others at a target L0 of 4.
@pytest.mark.parametrize("arch", [pytest.param(a, marks=_MATRYOSHKA) if SAE_REGISTRY[a].nested_prefixes else a
                                  for a in sorted(a for a, cls in SAE_REGISTRY.items() if not cls.reads_pairs)])
@pytest.mark.slow
def test_each_architectures_defaults_recover_a_planted_dictionary_in_300_steps(planted, arch):
    held = planted.activations[-8192:]
    source = ActivationSource(parts=[planted.activations[:-8192].numpy()], dtype="float32")
    sparsity = {"k": 4} if SAE_REGISTRY[arch].takes_k else {"target_l0": 4.0}
    result = Trainer(TrainConfig.build(architecture=arch, d_sae=192, tokens=300 * 4096, seed=0, **sparsity),
                     source).run(progress=False)
    with torch.no_grad():
        l0 = float((result.sae.encode(held) != 0).sum(-1).float().mean())
    assert mean_max_cosine(planted.directions, result.sae.W_dec.detach()) >= 0.9
    assert 0.8 * 4 <= l0 <= 1.2 * 4
