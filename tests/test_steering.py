"""What a clamp re-encodes to, per architecture (monosemantic/steering.py's docstring states each case), and
several dictionaries steering at one hook."""

from __future__ import annotations

import pytest
import torch

from monosemantic.sae import SAEConfig, build_sae
from monosemantic.steering import Steer, SteeringSpec, apply_steering, steer_at_hook


def _sae(architecture: str, **extra):
    sae = build_sae(SAEConfig.build(architecture=architecture, d_in=16, d_sae=32, **extra), seed=0).eval()
    return sae.requires_grad_(False)


X = torch.randn(3, 16, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("value", [0.3, 2.0, 50.0])
def test_a_relu_clamp_re_encodes_to_its_value(value):
    result = apply_steering(_sae("relu"), X, [SteeringSpec(4, "clamp", value)])
    assert torch.allclose(result.after[:, 0], torch.full((3,), value), atol=1e-4)


def test_a_jumprelu_clamp_re_encodes_to_its_value_at_or_above_the_threshold_and_to_zero_below():
    sae = _sae("jumprelu")
    with torch.no_grad():
        sae.log_threshold[4] = torch.log(torch.tensor(1.5))
    above = apply_steering(sae, X, [SteeringSpec(4, "clamp", 2.0)])
    assert torch.allclose(above.after[:, 0], torch.full((3,), 2.0), atol=1e-4)
    below = apply_steering(sae, X, [SteeringSpec(4, "clamp", 1.0)])
    assert torch.equal(below.after[:, 0], torch.zeros(3))  # no value between 0 and the threshold exists
    assert not torch.allclose(below.activation, X)  # the activation still moved along the direction


def test_a_topk_clamp_re_encodes_to_its_value_only_when_it_is_among_the_k_largest():
    sae = _sae("topk", k=2)
    pre = sae.pre_activations(X * sae.cfg.input_scale)
    large = float(pre.max()) + 5.0
    chosen = apply_steering(sae, X, [SteeringSpec(4, "clamp", large)])
    assert torch.allclose(chosen.after[:, 0], torch.full((3,), large), atol=1e-3)
    small = float(pre.topk(2, dim=-1).values[:, -1].min()) / 4  # below every token's second-largest pre-activation
    assert small > 0
    passed_over = apply_steering(sae, X, [SteeringSpec(4, "clamp", small)])
    assert torch.equal(passed_over.after[:, 0], torch.zeros(3))


def test_two_dictionaries_at_one_hook_report_after_on_the_activation_the_model_runs_on():
    first, second = _sae("relu"), build_sae(SAEConfig.build(architecture="relu", d_in=16, d_sae=32), seed=7).eval().requires_grad_(False)
    result = steer_at_hook(X, [Steer(first, [SteeringSpec(4, "clamp", 3.0)]), Steer(second, [SteeringSpec(9, "add", 2.0)])])
    assert torch.allclose(result.before[0][:, 0], first.encode(X)[:, 4])
    assert torch.allclose(result.after[0][:, 0], first.encode(result.activation)[:, 4])
    assert torch.allclose(result.after[1][:, 0], second.encode(result.activation)[:, 9])
    alone = apply_steering(first, X, [SteeringSpec(4, "clamp", 3.0)]).activation
    assert torch.allclose(result.activation, alone + 2.0 * second.W_dec[9] / second.cfg.input_scale, atol=1e-5)
