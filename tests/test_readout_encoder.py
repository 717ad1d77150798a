"""The readout's sparse path: L0, reconstruction and top-k from the active entries equal the dense computations."""

import pytest
import torch

from monosemantic.sae import SAEConfig, build_sae
from monosemantic.encoder import FastEncoder
from monosemantic.support import Support


def readout_of_random_features(seed: int = 0):
    sae = build_sae(SAEConfig.build(architecture="relu", d_in=16, d_sae=64, input_scale=2.0), seed=seed)
    gen = torch.Generator().manual_seed(seed)
    features = torch.relu(torch.randn(40, 64, generator=gen) - 1.0)  # ~16% active, varying per token
    features[3] = 0  # a token with nothing active
    return sae, features, FastEncoder(sae, torch.float32).sparse_readout(features)


def test_l0_and_reconstruction_equal_the_dense_ones():
    sae, features, active = readout_of_random_features()
    assert torch.equal(active.l0, torch.count_nonzero(features, dim=-1))
    assert torch.allclose(active.reconstruction, sae.decode(features), atol=1e-5)


def test_top_k_from_the_active_entries_equals_the_dense_top_k():
    _, features, active = readout_of_random_features()
    values, ids = active.top_k(5)
    dense_values, dense_ids = features.topk(5, dim=-1)
    assert torch.equal(values, dense_values)
    present = dense_values > 0  # where fewer than 5 are active, both pad with zeros (ids then mean nothing)
    assert torch.equal(ids[present], dense_ids[present])


def test_top_k_is_capped_at_the_largest_l0_and_empty_when_nothing_fires():
    _, features, active = readout_of_random_features()
    values, _ = active.top_k(1000)
    assert values.shape == (40, int(active.l0.max()))
    nothing = FastEncoder(build_sae(SAEConfig.build(architecture="relu", d_in=16, d_sae=64), seed=0), torch.float32)
    values, ids = nothing.sparse_readout(torch.zeros(4, 64)).top_k(10)
    assert values.shape == (4, 0) and ids.shape == (4, 0)


def test_a_later_encode_leaves_the_readouts_taken_from_an_earlier_one_intact():
    sae = build_sae(SAEConfig.build(architecture="relu", d_in=16, d_sae=64), seed=0)
    with torch.no_grad():
        sae.b_enc.fill_(0.1)
    encoder = FastEncoder(sae, torch.bfloat16)
    first, second = torch.randn(70, 16), torch.randn(300, 16)
    active = encoder.sparse_readout(encoder.encode(first))
    kept = (active.l0.clone(), active.values.clone(), active.reconstruction.clone(), *(t.clone() for t in active.top_k(5)))

    encoder.encode(second)  # a larger batch: the encoder's output buffer grows and is written over

    assert all(torch.equal(a, b) for a, b in zip(kept, (active.l0, active.values, active.reconstruction, *active.top_k(5))))
    assert torch.equal(encoder.encode(first), sae.activate(torch.addmm(encoder.b_enc, (first * sae.cfg.input_scale - sae.b_dec).bfloat16(), encoder.W_enc)))


@pytest.mark.slow
def test_auto_serves_in_the_dtype_this_machine_multiplies_faster_and_a_forced_one_as_given():
    from monosemantic.bound import load_bound
    from monosemantic.model import load_model
    from monosemantic.shipped import reference_lm_path, reference_registry_path
    from monosemantic.precision import fastest_dtype

    lm = load_model(str(reference_lm_path()))
    auto = load_bound(lm, reference_registry_path(), "reference", 1, "cpu", check_width=False, sae_dtype="auto")
    assert auto.encoder.dtype == fastest_dtype(512, 4096, "cpu") and auto.encoder.W_enc.dtype == auto.encoder.dtype
    for forced in ("bfloat16", "float32"):
        assert load_bound(lm, reference_registry_path(), "reference", 1, "cpu", check_width=False, sae_dtype=forced).encoder.dtype == getattr(torch, forced)


@pytest.mark.parametrize("slow, expected", [(torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16)])
def test_the_dtype_measurement_picks_the_faster_of_two_matmuls(monkeypatch, slow, expected):
    import monosemantic.precision as encoder_module

    fastest_dtype = encoder_module.fastest_dtype.__wrapped__  # without the per-shape cache
    clock = iter(range(100_000))
    real_matmul = torch.Tensor.__matmul__

    def timed_matmul(a, b):  # a matmul in the slow dtype lasts 30 ticks of the clock, in the other 1
        for _ in range(29 if a.dtype == slow else 0):
            next(clock)
        return real_matmul(a, b)

    monkeypatch.setattr(encoder_module.time, "perf_counter", lambda: next(clock))
    monkeypatch.setattr(torch.Tensor, "__matmul__", timed_matmul)
    assert fastest_dtype(16, 64, "cpu") == expected
    assert fastest_dtype(16, 64, "cuda") == torch.bfloat16


def _sparse(rows: int, cols: int, dtype: torch.dtype, density: float = 0.01) -> torch.Tensor:
    generator = torch.Generator().manual_seed(rows * cols)
    values = torch.rand(rows, cols, generator=generator)
    return torch.where(torch.rand(rows, cols, generator=generator) < density, values, torch.zeros(())).to(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_the_word_at_a_time_scan_finds_exactly_nonzeros_entries_in_its_order(dtype):
    values = _sparse(37, 4096, dtype)
    values[3, 5], values[4, 7], values[5, 9], values[6, 11] = -0.0, float("nan"), float("inf"), -2.5  # nonzero: all but -0.0
    values[7, :] = -0.0  # a row of negative zeros: words with bits set, and no feature in them
    support, rows, cols = Support.from_values(values), *values.nonzero(as_tuple=True)
    assert torch.equal(support.rows, rows) and torch.equal(support.cols, cols)
    assert (support.batch, support.d_sae) == (37, 4096)


@pytest.mark.parametrize("shape", [(0, 4096), (5, 3), (5, 4098), (1, 8)])
def test_the_scan_handles_empty_batches_and_widths_that_are_not_whole_words(shape):
    values = _sparse(*shape, torch.bfloat16, density=0.3)
    support, rows, cols = Support.from_values(values), *values.nonzero(as_tuple=True)
    assert torch.equal(support.rows, rows) and torch.equal(support.cols, cols)


def test_the_scan_reads_a_strided_view_as_it_is():
    values = _sparse(16, 4096, torch.bfloat16, density=0.05)[:, 1:4001]  # not contiguous: rows start mid-word
    support, rows, cols = Support.from_values(values), *values.nonzero(as_tuple=True)
    assert torch.equal(support.rows, rows) and torch.equal(support.cols, cols)
