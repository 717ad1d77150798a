"""Specifications of transcoders and skip transcoders (monosemantic/transcoder.py): read one activation, predict another
— the maths as sparsify computes it, paired rows that stay paired, a planted map recovered, published and reloaded,
and a paired harvest trained from the command line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from monosemantic.artifact import load_dictionary, publish
from monosemantic.errors import ConfigError
from monosemantic.sae import SAE_REGISTRY, SAEConfig, build_sae
from trainer.activations import ActivationSource
from trainer.cli import app
from trainer.evaluate import reconstruction_metrics
from trainer.paired import PairedSource
from trainer.synthetic import code_recovery, make_paired_data, mean_max_cosine
from trainer.train import TrainConfig, Trainer

runner = CliRunner()


def _transcoder(arch: str = "skip-transcoder", d_in: int = 12, d_out: int = 8, d_sae: int = 48, k: int = 5,
                input_scale: float = 1.0, output_scale: float = 1.0):
    """Every tensor away from its start (b_dec, W_skip and thresholds too), so that a term left out or mixed up shows."""
    sae = build_sae(SAEConfig.build(architecture=arch, d_in=d_in, d_sae=d_sae, k=k if SAE_REGISTRY[arch].takes_k else None,
                                    d_out=d_out, input_scale=input_scale, output_scale=output_scale), seed=0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.3, generator=g)
        sae.b_dec.normal_(0, 0.3, generator=g)
        if hasattr(sae, "W_skip"):
            sae.W_skip.normal_(0, 0.2, generator=g)
        if hasattr(sae, "log_threshold"):  # thresholds of a JumpReLU transcoder between e^-2 and e^0.5
            sae.log_threshold.uniform_(-2, 0.5, generator=g)
    return sae


def _paired(data) -> PairedSource:
    return PairedSource(ActivationSource([data.inputs.numpy()], "float32"), ActivationSource([data.targets.numpy()], "float32"), {})


def test_the_encoder_reads_the_input_without_the_decoder_bias_and_the_decoder_writes_the_output_width():
    sae, x = _transcoder(), torch.randn(20, 12)
    features = sae.encode(x)
    with torch.no_grad():
        sae.b_dec.add_(5.0)  # b_dec lives in the output's space: the features do not move
    assert torch.equal(sae.encode(x), features)
    assert sae.decode(features).shape == (20, 8) and ((features > 0).sum(-1) <= 5).all()


def test_the_prediction_is_the_decoded_features_plus_the_skip_path_in_raw_units():
    sae, x = _transcoder(input_scale=2.0, output_scale=0.5), torch.randn(20, 12)
    f = sae.encode(x)
    expected = (f @ sae.W_dec + sae.b_dec + (2.0 * x) @ sae.W_skip.T) / 0.5
    assert torch.allclose(sae.reconstruct(x), expected, atol=1e-5)
    assert torch.allclose(sae(x, target=torch.zeros(20, 8)).x_hat, expected, atol=1e-5)


@pytest.mark.parametrize("arch, skip", [("transcoder", False), ("skip-transcoder", True)])
def test_the_prediction_and_loss_equal_sparsifys_own_transcoder_on_the_same_weights(arch, skip):
    from sparsify import SparseCoder, SparseCoderConfig

    sae, x = _transcoder(arch, d_in=12, d_out=12), torch.randn(32, 12)
    y = torch.randn(32, 12)
    theirs = SparseCoder(12, SparseCoderConfig(num_latents=48, k=5, transcode=True, skip_connection=skip), "cpu", torch.float32)
    with torch.no_grad():
        theirs.encoder.weight.copy_(sae.W_enc.T)
        theirs.encoder.bias.copy_(sae.b_enc)
        theirs.W_dec.copy_(sae.W_dec)
        theirs.b_dec.copy_(sae.b_dec)
        if skip:
            theirs.W_skip.copy_(sae.W_skip)
        out = theirs(x, y)
        ours = sae(x, target=y)
    assert torch.allclose(ours.x_hat, out.sae_out, atol=1e-5)
    # sparsify's fvu divides the summed squared error by the batch's total variance; ours is the per-row sum.
    total_variance = float((y - y.mean(0)).pow(2).sum())
    assert float(ours.mse) * 32 / total_variance == pytest.approx(float(out.fvu), rel=1e-5)


def test_a_transcoder_needs_its_target_and_a_dictionary_takes_no_output_width():
    with pytest.raises(ConfigError, match="pass its target"):
        _transcoder()(torch.randn(4, 12))
    with pytest.raises(ConfigError, match=r"d_out \(8\) differs from d_in \(12\): only a transcoder \(transcoder or skip-transcoder or relu-transcoder or relu-skip-transcoder or jumprelu-transcoder or jumprelu-skip-transcoder\)"):
        SAEConfig.build(architecture="topk", d_in=12, d_sae=48, k=4, d_out=8)


def test_paired_rows_stay_paired_through_the_shuffle():
    inputs = np.arange(6000 * 3, dtype=np.float32).reshape(6000, 3)
    targets = inputs[:, :1] * 2 + 1  # each target row a function of its input row
    source = PairedSource(ActivationSource([inputs[:4000], inputs[4000:]], "float32"),
                          ActivationSource([targets[:4000], targets[4000:]], "float32"), {})
    batches = source.batches(512, seed=3, chunk_rows=1024)
    for _ in range(12):
        x, y = source.split(next(batches))
        assert torch.equal(y, x[:, :1] * 2 + 1)
    x, y = source.split(source.sample(100, seed=1))
    assert torch.equal(y, x[:, :1] * 2 + 1)


def test_shard_sets_of_different_rows_are_refused_as_a_pair():
    with pytest.raises(ConfigError, match="hold different rows"):
        PairedSource(ActivationSource([np.zeros((10, 3), np.float32)], "float32"),
                     ActivationSource([np.zeros((9, 3), np.float32)], "float32"), {})


def test_the_trainer_refuses_a_transcoder_on_single_rows_and_a_dictionary_on_pairs():
    data = make_paired_data(4096, d_in=12, d_out=8, n_features=32)
    cfg = dict(d_sae=64, k=4, tokens=4096, batch_size=512, bf16=False)
    with pytest.raises(ConfigError, match=r"train it on a paired harvest \(harvest --hook-in HOOK --hook-out HOOK\)"):
        Trainer(TrainConfig.build(architecture="transcoder", **cfg), ActivationSource([data.inputs.numpy()], "float32"))
    with pytest.raises(ConfigError, match="they train a transcoder"):
        Trainer(TrainConfig.build(architecture="topk", **cfg), _paired(data))


def _train(data, arch: str):
    sparsity = {"k": 5} if SAE_REGISTRY[arch].takes_k else {"target_l0": 5}  # a ReLU's or JumpReLU's L0 is steered there
    cfg = TrainConfig.build(architecture=arch, d_sae=128, tokens=500_000, batch_size=512, lr=3e-3, seed=0, **sparsity)
    return Trainer(cfg, _paired(data)).run(progress=False)


@pytest.mark.slow
@pytest.mark.parametrize("arch, floor", [("transcoder", 0.95), ("relu-transcoder", 0.9), ("jumprelu-transcoder", 0.9)])
def test_a_transcoder_recovers_the_directions_its_planted_features_write(arch, floor):
    # Measured (planted pairs, 64 features read in 40 dimensions and written in 24): MMCS 0.996 (TopK k 5), 0.967
    # (ReLU, L0 3.7 for a target of 5), 0.934 (JumpReLU, L0 3.8).
    data = make_paired_data(300_000, d_in=40, d_out=24, n_features=64, mean_active=5.0)
    result = _train(data, arch)
    assert mean_max_cosine(data.writes, result.sae.W_dec.detach()) >= floor


@pytest.mark.slow
def test_on_a_map_with_a_linear_path_the_skip_transcoder_recovers_the_features_a_transcoder_spends_on_it():
    # Measured on 8 dense input dimensions mapped linearly into the output: code recovery 0.825 against the
    # transcoder's 0.386, FVU 0.027 against 0.199 (the transcoder's latents go to the dense part).
    data = make_paired_data(300_000, d_in=40, d_out=24, n_features=64, mean_active=5.0, skip_dims=8)
    held = slice(-20_000, None)
    scores = {}
    for arch in ("transcoder", "skip-transcoder"):
        sae = _train(data, arch).sae
        metrics, _ = reconstruction_metrics(sae, [torch.cat([data.inputs[held], data.targets[held]], 1)])
        with torch.no_grad():
            scores[arch] = (code_recovery(data.codes[held], sae.encode(data.inputs[held])), metrics["fvu"])
    (plain_codes, plain_fvu), (skip_codes, skip_fvu) = scores["transcoder"], scores["skip-transcoder"]
    assert skip_codes >= 0.75 and skip_codes > plain_codes + 0.2
    assert skip_fvu < 0.5 * plain_fvu


@pytest.mark.parametrize("arch", sorted(a for a, cls in SAE_REGISTRY.items() if cls.reads_pairs))
def test_a_published_transcoder_loads_with_its_output_width_scales_threshold_and_skip_path(tmp_path, arch):
    from monosemantic.artifact import HookRef, ModelRef

    sae = _transcoder(arch, input_scale=2.0, output_scale=0.5).eval()
    path = publish(tmp_path, "tc", sae, model=ModelRef(name="m", checksum="c"), hook=HookRef(name="a", module_path="a"),
                   extra={"hook_out": HookRef(name="b", module_path="b")})
    loaded = load_dictionary(tmp_path, "tc")
    assert loaded.manifest.hook_out.name == "b" and loaded.sae.cfg == sae.cfg
    for name, tensor in sae.tensors().items():
        assert torch.equal(loaded.sae.tensors()[name], tensor), name
    x = torch.randn(7, 12)
    assert torch.equal(loaded.sae.reconstruct(x), sae.reconstruct(x))
    assert json.loads((path / "manifest.json").read_text())["sae"]["d_out"] == 8


@pytest.mark.slow
def test_a_paired_harvest_trains_a_transcoder_whose_manifest_names_both_hooks(tmp_path):
    hooks = ["--hook-in", "blocks.0.ln2.hook_normalized", "--hook-out", "blocks.0.hook_mlp_out"]
    harvested = runner.invoke(app, ["harvest", "--out", str(tmp_path / "h"), *hooks, "--contexts", "64",
                                    "--context-length", "64", "--max-chars", "400000"])
    assert harvested.exit_code == 0, harvested.output
    trained = runner.invoke(app, ["train", "--harvest", str(tmp_path / "h"), "--arch", "skip-transcoder", "--k", "8",
                                  "--d-sae", "256", "--tokens", "40000", "--batch-size", "512",
                                  "--registry", str(tmp_path / "reg"), "--name", "tc"])
    assert trained.exit_code == 0, trained.output
    m = load_dictionary(tmp_path / "reg", "tc").manifest
    # One module, its input read and its output written: the harvest records each hook's kind.
    assert (m.hook.name, m.hook.module_path, m.hook.kind) == ("blocks.0.ln2.hook_normalized", "transformer.h.0.mlp", "input")
    assert (m.hook_out.name, m.hook_out.module_path, m.hook_out.kind) == ("blocks.0.hook_mlp_out", "transformer.h.0.mlp", "output")
    assert m.sae.d_out == m.sae.d_in == 128 and 0 < m.metrics["fvu"] < 1
    # Loss recovered with the transcoder standing in for the MLP (its zero-ablation: the MLP's output set to 0).
    evaluated = runner.invoke(app, ["evaluate", "--registry", str(tmp_path / "reg"), "--dictionary", "tc", "--tokens", "4000"])
    assert evaluated.exit_code == 0, evaluated.output
    recovered = float(evaluated.output.split("loss_recovered:")[1].split()[0])
    assert 0.3 < recovered <= 1.0
    # Dashboards from the paired harvest's input side, logit effects from where it writes; the new version keeps hook_out.
    pages = runner.invoke(app, ["features", "--registry", str(tmp_path / "reg"), "--dictionary", "tc", "--tokens", "4000",
                                "--harvest", str(tmp_path / "h")])
    assert pages.exit_code == 0, pages.output
    paged = load_dictionary(tmp_path / "reg", "tc")
    assert paged.manifest.hook_out == m.hook_out and paged.statistics is not None and "logit_up_ids" in paged.features
    refused = runner.invoke(app, ["train", "--harvest", str(tmp_path / "h"), "--arch", "topk", "--k", "8",
                                  "--d-sae", "256", "--tokens", "40000", "--batch-size", "512"])
    assert refused.exit_code == 2 and "they train a transcoder" in refused.output


@pytest.mark.parametrize("flags, words", [
    (["--hook-in", "blocks.0.ln2.hook_normalized"], "--hook-in and --hook-out go together"),
    (["--hook-in", "blocks.0.hook_mlp_out", "--hook-out", "blocks.0.hook_mlp_out"], "a transcoder reads one hook and writes another"),
    (["--hook", "blocks.0.mlp.hook_post", "--hook-in", "blocks.0.ln2.hook_normalized", "--hook-out", "blocks.0.hook_mlp_out"],
     "--hook cannot go with --hook-in/--hook-out"),
])
def test_a_paired_harvest_is_refused_without_exactly_two_different_hooks(tmp_path, flags, words):
    result = runner.invoke(app, ["harvest", "--out", str(tmp_path / "h"), *flags, "--contexts", "4", "--context-length", "16"])
    assert result.exit_code == 2 and words in result.output, result.output
    assert not (tmp_path / "h").exists()


def test_a_transcoder_that_records_no_output_hook_is_refused_when_bound(tmp_path):
    from monosemantic.artifact import HookRef, ModelRef
    from monosemantic.bound import bind
    from monosemantic.errors import ArtifactMismatch
    from monosemantic.model import load_model
    from monosemantic.shipped import reference_lm_path

    sae = _transcoder("transcoder", d_in=128, d_out=128).eval()
    publish(tmp_path, "tc", sae, model=ModelRef(name="m", checksum="c"),
            hook=HookRef(name="blocks.0.ln2.hook_normalized", module_path="transformer.h.0.mlp", kind="input"))
    with pytest.raises(ArtifactMismatch, match="records no output hook"):
        bind(load_model(str(reference_lm_path())), load_dictionary(tmp_path, "tc"))


@pytest.mark.parametrize("arch", ["transcoder", "skip-transcoder"])
def test_an_exported_transcoder_predicts_in_sparsify_as_it_does_here(tmp_path, arch):
    from sparsify import SparseCoder

    from monosemantic.interop import ExportAbout, get_format

    sae, x = _transcoder(arch, d_in=12, d_out=12, input_scale=2.0, output_scale=0.5).eval(), torch.randn(32, 12)
    about = ExportAbout("tc:v1", "tiny", None, "transformer.h.0.mlp", "input", None, 64, None)
    get_format("sparsify", writing=True).write(sae, tmp_path / "h.0.mlp", about)
    theirs = SparseCoder.load_from_disk(tmp_path / "h.0.mlp", "cpu")
    assert theirs.cfg.transcode and theirs.cfg.skip_connection == (arch == "skip-transcoder")
    with torch.no_grad():
        ours = sae.reconstruct(x)
        out = theirs(x)
        encoded = theirs.encode(x)
    assert float((out.sae_out - ours).abs().max() / ours.abs().max()) <= 1e-4
    dense = torch.zeros(32, 48).scatter_(1, encoded.top_indices, encoded.top_acts)
    assert float((dense - sae.encode(x)).abs().max() / sae.encode(x).abs().max()) <= 1e-4


def test_a_transcoder_is_refused_where_its_format_cannot_hold_it(tmp_path):
    from monosemantic.errors import InteropError
    from monosemantic.interop import ExportAbout, get_format

    about = ExportAbout("tc:v1", "tiny", None, "transformer.h.0.mlp", "input", None, 64, None)
    with pytest.raises(InteropError, match="SAELens's transcoders are ReLU or JumpReLU"):
        get_format("saelens", writing=True).write(_transcoder(d_in=12, d_out=12), tmp_path / "a", about)
    with pytest.raises(InteropError, match="sparsify's transcoders keep one width"):
        get_format("sparsify", writing=True).write(_transcoder(d_in=12, d_out=8), tmp_path / "b", about)
