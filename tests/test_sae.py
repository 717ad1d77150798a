"""Specifications of the SAE architectures: recovery of known features, decoder geometry, resampling."""

import pytest
import torch

from monosemantic.errors import ConfigError
from monosemantic.sae import SAE_REGISTRY, SAEConfig, SparseAutoencoder, build_sae, geometric_median, sae_from_tensors
from trainer.activations import ActivationSource
from trainer.paired import PairedSource
from trainer.synthetic import make_sparse_data, mean_max_cosine
from trainer.train import TrainConfig, Trainer

def _sparsity(arch: str) -> dict:
    """L0 5 as each architecture takes it: its k, or the target of its L0 controller."""
    return {"k": 5} if SAE_REGISTRY[arch].takes_k else {"target_l0": 5}


def _k(arch: str, k: int) -> int | None:
    return k if SAE_REGISTRY[arch].takes_k else None


def _shape(arch: str, d_sae: int, k: int) -> dict:
    """The SAEConfig fields an architecture needs beyond its sizes: k, nested widths for Matryoshka, and a transcoder's
    output width (other than its input's, so that a mix-up of the two shows)."""
    widths = (d_sae // 8, d_sae // 2, d_sae) if SAE_REGISTRY[arch].nested_prefixes else None
    paired = {"d_out": D_OUT, "output_scale": 0.7} if SAE_REGISTRY[arch].reads_pairs else {}
    return {"k": _k(arch, k), "matryoshka_widths": widths, **paired}


D_OUT = 24  # a transcoder's output width in these tests


def _pairing(d_in: int) -> torch.Tensor:
    """A fixed map [D_OUT, d_in] from a transcoder's input to its output in these tests."""
    return torch.randn(D_OUT, d_in, generator=torch.Generator().manual_seed(5)) / d_in ** 0.5


def _target(arch: str, x: torch.Tensor) -> dict:
    """forward's target for a transcoder (the map of the input, then a ReLU, so it is not linear); {} for a
    dictionary, which reconstructs its input."""
    return {"target": torch.relu(x @ _pairing(x.shape[-1]).T)} if SAE_REGISTRY[arch].reads_pairs else {}


@pytest.fixture(scope="module")
def synthetic():
    return make_sparse_data(300_000, d=32, n_features=64, mean_active=5.0, seed=0)


def _train(data, arch, tokens=500_000, d_sae=128, **overrides):
    source = ActivationSource(parts=[data.activations.numpy()], dtype="float32")
    if SAE_REGISTRY[arch].reads_pairs:  # a transcoder's targets: the rows mapped linearly into another width
        targets = (data.activations @ _pairing(data.activations.shape[1]).T).numpy()
        source = PairedSource(source, ActivationSource(parts=[targets], dtype="float32"), {})
    options = {**_sparsity(arch), **overrides}
    cfg = TrainConfig.build(architecture=arch, d_sae=d_sae, tokens=tokens, batch_size=512, lr=3e-3, seed=0, **options)
    return Trainer(cfg, source).run(progress=False)


# Transcoders' recovery needs planted input-output pairs (its ground truth is what the features write, or for a skip
# transcoder what fires): tests/test_transcoder.py.
@pytest.mark.parametrize("arch", sorted(a for a, cls in SAE_REGISTRY.items() if not cls.reads_pairs))
@pytest.mark.slow
def test_each_architecture_recovers_the_true_directions_of_synthetic_sparse_data(synthetic, arch):
    result = _train(synthetic, arch)
    # Matryoshka's nested losses have its wide latents learn what its first prefixes leave over rather than the
    # planted directions themselves: 0.894-0.911 here with or without its calibrated start, 0.85 on a smaller shape
    # whatever the lr or the steps (tests/test_defaults.py); every other architecture reaches 0.99 on this data.
    floor = 0.85 if SAE_REGISTRY[arch].nested_prefixes else 0.9
    assert mean_max_cosine(synthetic.directions, result.sae.W_dec.detach()) >= floor


@pytest.mark.parametrize("arch", sorted(SAE_REGISTRY))
def test_decoder_rows_stay_unit_norm_through_training(synthetic, arch):
    result = _train(synthetic, arch, tokens=50_000)
    norms = result.sae.W_dec.detach().norm(dim=1)
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-5)


def test_the_gradient_along_each_decoder_row_is_removed_before_the_step():
    sae = build_sae(SAEConfig.build(architecture="relu", d_in=8, d_sae=16), seed=0)
    sae(torch.randn(64, 8).abs()).mse.backward()
    sae.remove_parallel_decoder_grad()
    parallel = (sae.W_dec.grad * sae.W_dec.data).sum(dim=1)
    assert parallel.abs().max() < 1e-6


def test_the_gradient_along_each_decoder_row_is_removed_in_every_block_of_rows():
    # 2,500 rows: the row dot products go 1,024 rows at a time, so the last block is partial.
    sae = build_sae(SAEConfig.build(architecture="relu", d_in=8, d_sae=2500), seed=0)
    sae(torch.randn(64, 8).abs()).mse.backward()
    grad = sae.W_dec.grad.clone()
    sae.remove_parallel_decoder_grad()
    expected = grad - (grad * sae.W_dec.data).sum(dim=1, keepdim=True) * sae.W_dec.data
    assert (sae.W_dec.grad - expected).abs().max() <= 1e-6 * grad.abs().max()  # fp32 rounding of a sum of 8


def test_topk_activates_exactly_k_features_per_token():
    sae = build_sae(SAEConfig.build(architecture="topk", d_in=8, d_sae=32, k=3), seed=0)
    with torch.no_grad():
        sae.b_enc.fill_(10.0)  # every pre-activation positive, so ReLU never drops a kept value
    features = sae.encode(torch.randn(20, 8))
    assert ((features > 0).sum(-1) == 3).all()


def test_topk_sparse_decoder_equals_the_dense_product():
    sae = build_sae(SAEConfig.build(architecture="topk", d_in=8, d_sae=32, k=4, input_scale=2.0), seed=0)
    x = torch.randn(10, 8)
    out = sae(x)
    assert torch.allclose(out.x_hat, sae.decode(out.features), atol=1e-5)


# 4,096 latents take TopK's block-maxima selection (monosemantic/block_topk.py); a third dead gathers the dead
# columns for AuxK, two thirds dead masks the live ones.
@pytest.mark.parametrize("d_sae,dead_third", [(128, True), (4096, True), (4096, False)])
@pytest.mark.parametrize("arch", sorted(SAE_REGISTRY))
def test_the_support_step_has_the_same_loss_and_gradients_as_the_dense_step(arch, d_sae, dead_third):
    cfg = SAEConfig.build(architecture=arch, d_in=32, d_sae=d_sae, k_aux=16, bandwidth=0.5, **_shape(arch, d_sae, 8))
    sae = build_sae(cfg, seed=1)
    with torch.no_grad():
        sae.b_enc.normal_(-0.3, 0.3)
        sae.b_dec.normal_()
    x = torch.randn(64, 32)
    dead = (torch.arange(d_sae) % 3 == 0) if dead_third else (torch.arange(d_sae) % 3 != 0)
    results = []
    for forward in (sae.forward, sae.forward_sparse):
        sae.zero_grad()
        out = forward(x, dead_mask=dead, **_target(arch, x))
        (out.mse + 0.7 * out.sparsity + out.aux).backward()
        results.append((out, {name: p.grad.clone() for name, p in sae.named_parameters()}))
    (dense, dense_grads), (support, support_grads) = results
    for term in ("mse", "sparsity", "aux", "l0"):
        assert torch.allclose(getattr(dense, term), getattr(support, term), rtol=1e-5), term
    assert torch.equal(dense.fired, support.fired)
    assert torch.allclose(dense.features, support.features.to_dense(), atol=1e-6)
    for name, grad in dense_grads.items():  # to float rounding: sums of up to 64 terms in another order
        assert torch.allclose(grad, support_grads[name], rtol=1e-4, atol=1e-6 * float(grad.abs().max()) + 1e-6), name


def _as_served(arch: str):
    """A dictionary in eval mode after one training batch (which sets a running state such as BatchTopK's threshold)."""
    sae = build_sae(SAEConfig.build(architecture=arch, d_in=8, d_sae=64, **_shape(arch, 64, 6)), seed=0)
    sae.train()
    with torch.no_grad():
        x = torch.randn(256, 8)
        sae(x, **_target(arch, x))
    return sae.eval()


@pytest.mark.parametrize("arch", sorted(SAE_REGISTRY))
def test_the_in_place_activation_equals_the_activation(arch):
    sae = _as_served(arch)
    pre = torch.randn(32, 64)
    with torch.inference_mode():
        expected = sae.activate(pre)
        assert torch.equal(sae.activate_(pre.clone()), expected)
        assert torch.equal(sae.activate_(pre.bfloat16()), sae.activate(pre.bfloat16()))


@pytest.mark.parametrize("arch", sorted(SAE_REGISTRY))
def test_a_features_activation_from_its_own_columns_equals_the_full_encodes_where_the_architecture_allows(arch):
    sae = _as_served(arch)
    x = torch.randn(5, 8)
    ids = torch.tensor([3, 17, 40])
    with torch.inference_mode():
        pre_at = sae.pre_activations_at(x, ids)
        assert torch.allclose(pre_at, sae.pre_activations(x)[:, ids], atol=1e-6)
        at = sae.activate_at(pre_at, ids)
        if SAE_REGISTRY[arch].activate_at is SparseAutoencoder.activate_at:  # TopK's and the transcoders' selection
            assert at is None  # the k-th largest needs every pre-activation (BatchTopK serves at a per-feature threshold)
        else:
            assert torch.allclose(at, sae.activate(sae.pre_activations(x))[:, ids], atol=1e-6)


def test_jumprelu_thresholds_receive_gradient_from_the_l0_penalty():
    sae = build_sae(SAEConfig.build(architecture="jumprelu", d_in=8, d_sae=16, bandwidth=10.0), seed=0)
    sae(torch.randn(64, 8)).sparsity.backward()
    assert sae.log_threshold.grad is not None and sae.log_threshold.grad.abs().sum() > 0


def test_jumprelu_threshold_gradient_is_the_rectangle_kernel_estimator_of_both_loss_terms():
    # Rajamanoharan et al. 2024: ∂f/∂θ = −(θ/ε)·K((z−θ)/ε), ∂H/∂θ = −(1/ε)·K((z−θ)/ε), K = 1{|u| < ½}; z gets 1{z > θ}.
    sae = build_sae(SAEConfig.build(architecture="jumprelu", d_in=8, d_sae=16, bandwidth=0.5), seed=0)
    with torch.no_grad():
        sae.log_threshold.copy_(torch.linspace(-2.0, 0.0, 16))
    pre = torch.randn(64, 16, requires_grad=True)
    features, l0 = sae.activate_with_sparsity(pre)
    upstream, lam = torch.randn(64, 16), 0.7
    ((features * upstream).sum() + lam * l0).backward()
    theta, eps = sae.threshold.detach(), 0.5
    kernel = ((pre.detach() - theta).abs() < eps / 2).float()
    expected_dtheta = (-(theta / eps) * kernel * upstream - (1 / eps) * kernel * lam / 64).sum(0)
    assert torch.allclose(sae.log_threshold.grad, expected_dtheta * theta, atol=1e-5)  # chain rule through θ = exp(t)
    assert torch.equal(pre.grad, upstream * (pre.detach() > theta))
    assert l0.item() == (pre.detach() > theta).sum().item() / 64


def test_input_scale_is_applied_inside_so_callers_pass_raw_activations():
    base = build_sae(SAEConfig.build(architecture="relu", d_in=8, d_sae=16), seed=0)
    scaled = sae_from_tensors(SAEConfig.build(architecture="relu", d_in=8, d_sae=16, input_scale=4.0), base.tensors())
    x = torch.randn(5, 8)
    assert torch.allclose(scaled.encode(x), base.encode(4.0 * x), atol=1e-5)
    assert torch.allclose(scaled.decode(base.encode(4.0 * x)) * 4.0, base.decode(base.encode(4.0 * x)), atol=1e-5)


def test_resampling_revives_dead_features(synthetic):
    source = ActivationSource(parts=[synthetic.activations.numpy()], dtype="float32")
    trainer = Trainer(TrainConfig.build(architecture="relu", d_sae=64, tokens=100_000, batch_size=512, seed=0), source)
    dead = torch.arange(0, 64, 2)
    with torch.no_grad():
        trainer.sae.b_enc[dead] = -1e4  # these features can never fire
    trainer.tokens_since_fired[dead] = trainer.dead_window
    x = synthetic.activations[:4096]
    assert (trainer.sae.encode(x)[:, dead] > 0).sum() == 0
    assert trainer.resample_dead_features() == len(dead)
    fired = (trainer.sae.encode(x)[:, dead] > 0).any(0)
    assert fired.float().mean() > 0.9


def test_resampled_features_fire_on_the_initial_rate_as_they_did_at_the_start(synthetic):
    # With b_enc 0 a revived ReLU latent fires on about half of all tokens: at each resample L0 spiked by
    # half the dead count, and the L0 controller wound λ up against spikes (bench/RESULTS.md).
    source = ActivationSource(parts=[synthetic.activations.numpy()], dtype="float32")
    trainer = Trainer(TrainConfig.build(architecture="relu", d_sae=64, tokens=100_000, batch_size=512, seed=0,
                                        target_l0=4.0), source)
    dead = torch.arange(0, 64, 2)
    with torch.no_grad():
        trainer.sae.b_enc[dead] = -1e4
    trainer.tokens_since_fired[dead] = trainer.dead_window
    trainer.resample_dead_features()
    rate = (trainer.sae.encode(synthetic.activations[:8192])[:, dead] > 0).float().mean(0)
    assert trainer.initial_firing_rate() == 0.125  # 2 × 4 / 64
    assert rate.min() > 0.06 and rate.max() < 0.25  # each near 0.125 of tokens, none near half


def test_geometric_median_resists_outliers():
    points = torch.cat([torch.zeros(99, 3), torch.full((1, 3), 1000.0)])
    assert geometric_median(points).norm() < 1.0 < points.mean(0).norm()


@pytest.mark.parametrize("fields, named", [
    ({"architecture": "topk", "d_in": 8, "d_sae": 16}, "k"),
    ({"architecture": "relu", "d_in": 0, "d_sae": 16}, "d_in"),
    ({"architecture": "quantum", "d_in": 8, "d_sae": 16}, "architecture"),
])
def test_a_bad_sae_config_is_refused_with_the_field_named(fields, named):
    with pytest.raises(ConfigError, match=named):
        SAEConfig.build(**fields)


@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_the_support_steps_dense_encoder_equals_the_encoder_matmul_each_step(dtype, tolerance):
    from monosemantic.sae import encoder_matmul
    from monosemantic.support import DenseEncoder

    encoder, generator = DenseEncoder(), torch.Generator().manual_seed(0)
    for step in range(3):  # the buffers are reused: each call reads the weights as they are now
        centred = torch.randn(48, 40, generator=generator)
        W_enc, b_enc = torch.randn(40, 96, generator=generator), torch.randn(96, generator=generator)
        expected = encoder_matmul(centred, W_enc, b_enc)
        got = encoder(centred, W_enc, b_enc, dtype)
        assert got.dtype == dtype and got.shape == (48, 96)
        assert torch.allclose(got.float(), expected, rtol=tolerance, atol=tolerance * float(expected.abs().max())), step


@pytest.mark.parametrize("shape", [(4_200, 1_000), (64, 48)], ids=["in-bands", "whole"])
def test_the_encoder_gradients_transpose_equals_torchs(shape):
    # 4,200 rows: 43 bands of 96 and a partial one; the small matrix is copied whole.
    from monosemantic.support import transposed

    matrix = torch.randn(shape)
    result = transposed(matrix)
    assert result.is_contiguous() and torch.equal(result, matrix.t())
