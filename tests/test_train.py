"""Specifications of SAE training: determinism, exact resume, the target-L0 controller, user-supplied data."""

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from monosemantic.errors import ConfigError
from trainer.activations import ActivationSource, open_activation_file, split_tail
from trainer.synthetic import make_sparse_data
from trainer.train import TrainConfig, Trainer, clip_gradients


@pytest.fixture(scope="module")
def source():
    data = make_sparse_data(60_000, d=16, n_features=32, mean_active=4.0, seed=1)
    return ActivationSource(parts=[data.activations.numpy()], dtype="float32")


def _config(**overrides):
    # sparse_step_density 0.2 (L0 < 9.6): these runs switch from the dense to the support step part-way.
    fields = dict(architecture="relu", d_sae=48, tokens=80_000, batch_size=256, lr=3e-3, seed=3, target_l0=4.0,
                  checkpoint_every=50, log_every=10, sparse_step_density=0.2)
    return TrainConfig.build(**{**fields, **overrides})


def _arch(arch: str) -> dict:
    """TopK's sparsity is k (target_l0 would be refused beside it); the others steer towards target_l0."""
    return {"architecture": arch, "k": 4, "target_l0": None} if arch == "topk" else {"architecture": arch}


@pytest.mark.parametrize("arch", ["relu", "topk", "jumprelu"])
def test_a_fixed_seed_gives_the_same_dictionary_twice(source, arch):
    first = Trainer(_config(**_arch(arch)), source).run(progress=False)
    second = Trainer(_config(**_arch(arch)), source).run(progress=False)
    assert torch.equal(first.sae.W_dec, second.sae.W_dec) and torch.equal(first.sae.W_enc, second.sae.W_enc)


@pytest.mark.parametrize("arch", ["relu", "topk"])
def test_a_resumed_run_ends_exactly_where_an_uninterrupted_run_ends(source, arch, tmp_path):
    cfg = _config(**_arch(arch))
    straight = Trainer(cfg, source).run(progress=False)
    Trainer(cfg, source, tmp_path / "ckpt").run(progress=False, stop_after_steps=137)  # "killed" after step 137
    resumed = Trainer(cfg, source, tmp_path / "ckpt").run(resume=True, progress=False)
    assert resumed.tokens == straight.tokens
    assert torch.equal(resumed.sae.W_dec, straight.sae.W_dec)
    assert torch.equal(resumed.sae.b_enc, straight.sae.b_enc)


def test_resume_refuses_a_checkpoint_written_with_another_config(source, tmp_path):
    Trainer(_config(), source, tmp_path / "ckpt").run(progress=False, stop_after_steps=10)
    with pytest.raises(ConfigError, match="different training config"):
        Trainer(_config(lr=1e-3), source, tmp_path / "ckpt").run(resume=True, progress=False)


@pytest.mark.parametrize("arch, target", [("relu", 2.0), ("relu", 8.0), ("jumprelu", 8.0)])
@pytest.mark.slow
def test_target_l0_steers_the_sparsity_coefficient_towards_the_requested_l0(source, arch, target):
    cfg = _config(architecture=arch, target_l0=target, tokens=400_000, controller_gain=0.05)
    result = Trainer(cfg, source).run(progress=False)
    final_l0 = np.mean([h["l0"] for h in result.history[-5:]])
    assert target * 0.6 <= final_l0 <= target * 1.4


@pytest.mark.parametrize("rate", [0.05, 0.25])
def test_a_jumprelu_run_starts_with_each_feature_firing_on_the_initial_firing_rate(source, rate):
    trainer = Trainer(_config(architecture="jumprelu", initial_firing_rate=rate), source)
    firing = (trainer.sae.encode(source.sample(source.rows)) > 0).float().mean(0)  # calibrated on 8,192 of these rows
    assert torch.allclose(firing, torch.full_like(firing, rate), atol=0.015)


def test_the_initial_firing_rate_defaults_to_twice_the_target_density(source):
    trainer = Trainer(_config(architecture="jumprelu", target_l0=6.0), source)
    l0 = (trainer.sae.encode(source.sample(source.rows)) > 0).sum(1).float().mean()
    assert l0.item() == pytest.approx(12.0, rel=0.05)


def test_an_initial_firing_rate_outside_zero_to_one_is_refused_by_name():
    with pytest.raises(ConfigError, match="initial_firing_rate"):
        _config(architecture="jumprelu", initial_firing_rate=1.5)


def test_training_reads_a_users_npy_and_safetensors_matrix(tmp_path):
    matrix = make_sparse_data(5_000, d=8, n_features=16, seed=2).activations
    np.save(tmp_path / "acts.npy", matrix.numpy())
    save_file({"activations": matrix}, str(tmp_path / "acts.safetensors"))
    for name in ("acts.npy", "acts.safetensors"):
        src = open_activation_file(tmp_path / name)
        assert (src.rows, src.d_in) == (5_000, 8)
        assert torch.allclose(src.sample(5_000).sort(0).values, matrix.sort(0).values)


@pytest.mark.parametrize("content, message", [
    (np.zeros(5, dtype=np.float32), "2-D"),
    (np.zeros((4, 3), dtype=np.int64), "dtype"),
])
def test_a_malformed_activation_file_is_refused_with_a_clear_error(tmp_path, content, message):
    np.save(tmp_path / "bad.npy", content)
    with pytest.raises(ConfigError, match=message):
        open_activation_file(tmp_path / "bad.npy")


def test_the_held_out_tail_is_never_trained_on():
    src = ActivationSource(parts=[np.arange(40, dtype=np.float32).reshape(20, 2)], dtype="float32")
    train, held = split_tail(src, fraction=0.25)
    assert (train.rows, held.rows) == (15, 5)
    assert float(held.parts[0][0, 0]) == 30.0


def test_a_batch_larger_than_the_data_is_refused(source):
    with pytest.raises(ConfigError, match="batch_size"):
        Trainer(_config(batch_size=10_000_000), source)


@pytest.mark.parametrize("field, value", [("tokens", 0), ("architecture", "quantum"), ("lr", -1.0)])
def test_an_invalid_training_option_names_its_field(field, value):
    with pytest.raises(ConfigError, match=field):
        _config(**{field: value})


def test_training_switches_to_the_support_step_once_the_running_l0_is_sparse(source):
    history = Trainer(_config(log_every=1), source).run(progress=False).history
    assert not history[0]["sparse_step"]  # the first step has no L0 yet; a fresh SAE fires about half its latents
    assert history[-1]["sparse_step"] and history[-1]["l0"] < 0.2 * 48


def test_a_zero_sparse_step_density_always_takes_the_dense_step(source):
    history = Trainer(_config(log_every=1, sparse_step_density=0.0), source).run(progress=False).history
    assert not any(h["sparse_step"] for h in history)



def test_bf16_left_unset_is_on_only_where_this_machine_multiplies_it_faster_and_a_given_value_is_kept():
    from monosemantic.precision import fastest_dtype

    assert TrainConfig.build(d_sae=64).bf16 == (fastest_dtype(512, 4096, "cpu") == torch.bfloat16)
    assert TrainConfig.build(d_sae=64, bf16=False).bf16 is False and TrainConfig.build(d_sae=64, bf16=True).bf16 is True


@pytest.mark.parametrize("scale", [1e-3, 1e3], ids=["under-the-clip", "clipped"])
def test_gradient_clipping_scales_and_reports_exactly_as_clip_grad_norm(scale):
    torch.manual_seed(0)
    ours, theirs = ([torch.nn.Parameter(torch.zeros(s)) for s in ((30, 7), (7,))] for _ in range(2))
    for a, b in zip(ours, theirs):
        a.grad = torch.randn(a.shape) * scale
        b.grad = a.grad.clone()
    norm = clip_gradients(ours, 1.0)
    expected = torch.nn.utils.clip_grad_norm_(theirs, 1.0)
    assert norm == pytest.approx(float(expected), rel=1e-6)
    for a, b in zip(ours, theirs):
        assert torch.equal(a.grad, b.grad)
