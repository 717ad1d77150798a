"""Specifications of transcoders moving between monosemantic, SAELens and sparsify: SAELens's four transcoder kinds
and sparsify's (skip) transcoders import predicting as the library does, ours export to both and load there, files
round-trip, and `import` binds a transcoder at both of its hooks on the shipped model."""

from __future__ import annotations

import json

import pytest
import torch
from sae_lens import SAE
from sae_lens.saes.sae import SAEMetadata
from sae_lens.saes.transcoder import (JumpReLUSkipTranscoder, JumpReLUSkipTranscoderConfig, JumpReLUTranscoder,
                                      JumpReLUTranscoderConfig, SkipTranscoder, SkipTranscoderConfig, Transcoder,
                                      TranscoderConfig)
from sparsify import SparseCoder, SparseCoderConfig
from typer.testing import CliRunner

from monosemantic.artifact import HookRef, load_dictionary
from monosemantic.errors import InteropError
from monosemantic.interop import ExportAbout, get_format
from test_interop import TOLERANCE, close
from test_transcoder import _transcoder
from trainer.cli import app

D_IN, D_OUT, D_SAE, K = 40, 24, 160, 10
IN, OUT = "blocks.0.ln2.hook_normalized", "blocks.0.hook_mlp_out"
runner = CliRunner()

# SAELens's architecture → (its class, its config class, ours).
SAELENS = {
    "transcoder": (Transcoder, TranscoderConfig, "relu-transcoder"),
    "skip_transcoder": (SkipTranscoder, SkipTranscoderConfig, "relu-skip-transcoder"),
    "jumprelu_transcoder": (JumpReLUTranscoder, JumpReLUTranscoderConfig, "jumprelu-transcoder"),
    "jumprelu_skip_transcoder": (JumpReLUSkipTranscoder, JumpReLUSkipTranscoderConfig, "jumprelu-skip-transcoder"),
}


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return torch.randn(256, D_IN, generator=torch.Generator().manual_seed(7)) * 3 + 0.5


def saelens_transcoder(architecture: str, d_out: int = D_OUT):
    """A SAELens transcoder with every tensor non-zero (thresholds positive, around the pre-activations' scale)."""
    sae_cls, cfg_cls, _ = SAELENS[architecture]
    sae = sae_cls(cfg_cls(d_in=D_IN, d_sae=D_SAE, d_out=d_out, apply_b_dec_to_input=False,
                          metadata=SAEMetadata(hook_name=IN, hook_name_out=OUT, model_name="tiny")))
    g = torch.Generator().manual_seed(len(architecture))
    with torch.no_grad():
        for name, p in sae.named_parameters():
            p.copy_(torch.rand(p.shape, generator=g) * 4 if name == "threshold" else
                    torch.randn(p.shape, generator=g) * (0.3 if name.startswith("b_") or name == "W_skip" else 1.0))
    return sae


def ours(architecture: str):
    """One of our transcoders with every tensor away from its start and input and output scales other than 1."""
    return _transcoder(architecture, d_in=D_IN, d_out=D_OUT, d_sae=D_SAE, k=K, input_scale=2.7, output_scale=0.6).eval()


def about(hook_out: bool = True) -> ExportAbout:
    return ExportAbout("tc:v1", "tiny", IN, "transformer.h.0.mlp", "input", None, 64, None,
                       hook_out=HookRef(name=OUT, module_path="transformer.h.0.mlp", alias=OUT) if hook_out else None)


@pytest.mark.parametrize("architecture", sorted(SAELENS))
def test_a_saelens_transcoder_imports_encoding_and_predicting_as_saelens_does(tmp_path, x, architecture):
    saelens_transcoder(architecture).save_model(tmp_path / "tc")
    theirs = SAE.load_from_disk(tmp_path / "tc")
    imported = get_format("saelens").read(tmp_path / "tc")

    assert imported.sae.cfg.architecture == SAELENS[architecture][2]
    assert close(imported.sae.encode(x), theirs.encode(x)) <= TOLERANCE
    assert close(imported.sae.reconstruct(x), theirs(x)) <= TOLERANCE  # with the skip path, where there is one
    assert (imported.hook, imported.hook_out) == (IN, OUT)


@pytest.mark.parametrize("architecture", [ours_name for *_, ours_name in SAELENS.values()])
def test_our_relu_and_jumprelu_transcoders_export_to_saelens_and_predict_there_as_here(tmp_path, x, architecture):
    sae = ours(architecture)
    get_format("saelens", writing=True).write(sae, tmp_path / "out", about())
    theirs = SAE.load_from_disk(tmp_path / "out")

    assert type(theirs) is SAELENS[theirs.cfg.architecture()][0] and SAELENS[theirs.cfg.architecture()][2] == architecture
    assert close(theirs.encode(x), sae.encode(x)) <= TOLERANCE
    assert close(theirs(x), sae.reconstruct(x)) <= TOLERANCE
    assert (theirs.cfg.d_out, theirs.cfg.metadata.hook_name, theirs.cfg.metadata.hook_name_out) == (D_OUT, IN, OUT)


def test_a_saelens_transcoder_round_trips_through_monosemantic(tmp_path, x):
    saelens_transcoder("jumprelu_skip_transcoder").save_model(tmp_path / "in")
    original = SAE.load_from_disk(tmp_path / "in")
    get_format("saelens", writing=True).write(get_format("saelens").read(tmp_path / "in").sae, tmp_path / "out", about())
    assert close(SAE.load_from_disk(tmp_path / "out")(x), original(x)) <= TOLERANCE


def test_a_saelens_transcoder_that_subtracts_b_dec_is_refused_by_name(tmp_path):
    saelens_transcoder("transcoder").save_model(tmp_path / "tc")
    cfg = json.loads((tmp_path / "tc" / "cfg.json").read_text())
    (tmp_path / "tc" / "cfg.json").write_text(json.dumps({**cfg, "apply_b_dec_to_input": True}))
    with pytest.raises(InteropError, match="apply_b_dec_to_input is true for a transcoder"):
        get_format("saelens").read(tmp_path / "tc")


def sparsify_transcoder(skip: bool) -> SparseCoder:
    sae = SparseCoder(D_IN, SparseCoderConfig(num_latents=D_SAE, k=K, transcode=True, skip_connection=skip))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.2 if name in ("b_dec", "encoder.bias", "W_skip") else 1.0))
    return sae


@pytest.mark.parametrize("skip", [False, True], ids=["transcode", "skip_connection"])
def test_a_sparsify_transcoder_imports_predicting_as_sparsify_does_at_its_hookpoints_input_and_output(tmp_path, x, skip):
    sparsify_transcoder(skip).save_to_disk(tmp_path / "h.0.mlp")
    theirs = SparseCoder.load_from_disk(tmp_path / "h.0.mlp")
    imported = get_format("sparsify").read(tmp_path / "h.0.mlp")

    assert imported.sae.cfg.architecture == ("skip-transcoder" if skip else "transcoder")
    out = theirs(x, x.flip(0))  # any target: the prediction does not depend on it
    assert close(imported.sae.reconstruct(x), out.sae_out) <= TOLERANCE
    encoded = theirs.encode(x)
    dense = torch.zeros(x.shape[0], D_SAE).scatter_(-1, encoded.top_indices, encoded.top_acts)
    assert close(imported.sae.encode(x), dense) <= TOLERANCE
    assert (imported.hook, imported.hook_out, imported.hook_relative_to_base_model) == ("h.0.mlp:input", "h.0.mlp", True)


def test_a_sparsify_skip_transcoder_round_trips_through_monosemantic(tmp_path, x):
    sparsify_transcoder(True).save_to_disk(tmp_path / "in")
    original = SparseCoder.load_from_disk(tmp_path / "in")
    get_format("sparsify", writing=True).write(get_format("sparsify").read(tmp_path / "in").sae, tmp_path / "out",
                                               about())
    again = SparseCoder.load_from_disk(tmp_path / "out")
    assert again.cfg.transcode and again.cfg.skip_connection
    assert close(again(x).sae_out, original(x).sae_out) <= TOLERANCE


def test_a_sparsify_skip_connection_without_transcode_is_refused_by_name(tmp_path):
    SparseCoder(D_IN, SparseCoderConfig(num_latents=D_SAE, k=K, skip_connection=True)).save_to_disk(tmp_path / "h.0")
    with pytest.raises(InteropError, match="skip_connection is set without transcode"):
        get_format("sparsify").read(tmp_path / "h.0")


# ---- `import` onto the shipped model (128-wide MLP input and output) ---------------------------------------------


def _import(tmp_path, source, fmt: str, *flags: str):
    return runner.invoke(app, ["import", "--from", fmt, str(source), "--registry", str(tmp_path / "r"), "--name", "tc", *flags])


def _saelens_on_reference(tmp_path, hook_name_out: str | None = OUT):
    sae_cls, cfg_cls, _ = SAELENS["skip_transcoder"]
    sae = sae_cls(cfg_cls(d_in=128, d_sae=256, d_out=128, apply_b_dec_to_input=False,
                          metadata=SAEMetadata(hook_name=IN, hook_name_out=hook_name_out)))
    sae.save_model(tmp_path / "saelens")
    return tmp_path / "saelens"


def test_an_imported_saelens_transcoder_is_bound_at_the_hooks_its_metadata_names(tmp_path):
    result = _import(tmp_path, _saelens_on_reference(tmp_path), "saelens")
    assert result.exit_code == 0, result.output
    assert (json.loads(result.stdout)["hook_out"], json.loads(result.stdout)["d_out"]) == (OUT, 128)
    m = load_dictionary(tmp_path / "r", "tc").manifest
    assert (m.hook.module_path, m.hook.kind) == ("transformer.h.0.mlp", "input")
    assert (m.hook_out.name, m.hook_out.module_path, m.hook_out.kind) == (OUT, "transformer.h.0.mlp", "output")


def test_a_sparsify_transcoder_is_bound_at_its_hookpoints_input_and_output_under_the_base_model(tmp_path):
    SparseCoder(128, SparseCoderConfig(num_latents=256, k=8, transcode=True)).save_to_disk(tmp_path / "h.0.mlp")
    result = _import(tmp_path, tmp_path / "h.0.mlp", "sparsify")
    assert result.exit_code == 0, result.output
    m = load_dictionary(tmp_path / "r", "tc").manifest
    assert (m.hook.module_path, m.hook.kind, m.hook_out.module_path, m.hook_out.kind) == (
        "transformer.h.0.mlp", "input", "transformer.h.0.mlp", "output")
    assert m.hook.alias == IN and m.hook_out.alias == OUT  # the TransformerLens names of those two points


def test_a_transcoder_that_records_no_output_hook_needs_hook_out_and_a_dictionary_refuses_one(tmp_path):
    source = _saelens_on_reference(tmp_path, hook_name_out=None)
    refused = _import(tmp_path, source, "saelens")
    assert refused.exit_code != 0 and "give --hook-out" in refused.output
    given = _import(tmp_path, source, "saelens", "--hook-out", "transformer.h.0.mlp")
    assert given.exit_code == 0, given.output
    assert load_dictionary(tmp_path / "r", "tc").manifest.hook_out.alias == OUT
    SparseCoder(128, SparseCoderConfig(num_latents=256, k=8)).save_to_disk(tmp_path / "h.0.mlp")
    dictionary = _import(tmp_path, tmp_path / "h.0.mlp", "sparsify", "--hook-out", OUT)
    assert dictionary.exit_code != 0 and "--hook-out is a transcoder's output hook" in dictionary.output


def test_an_output_hook_of_another_width_is_refused_naming_hook_out(tmp_path):
    result = _import(tmp_path, _saelens_on_reference(tmp_path), "saelens", "--hook-out", "blocks.0.mlp.hook_post")
    assert result.exit_code != 0 and "--hook-out blocks.0.mlp.hook_post" in result.output


def test_an_imported_transcoder_exports_back_with_both_hooks(tmp_path):
    assert _import(tmp_path, _saelens_on_reference(tmp_path), "saelens").exit_code == 0
    exported = runner.invoke(app, ["export", "--to", "saelens", "--registry", str(tmp_path / "r"), "--dictionary", "tc",
                                   "--out", str(tmp_path / "out")])
    assert exported.exit_code == 0, exported.output
    metadata = json.loads((tmp_path / "out" / "cfg.json").read_text())["metadata"]
    assert (metadata["hook_name"], metadata["hook_name_out"], metadata["hf_hook_name_out"]) == (IN, OUT, "transformer.h.0.mlp")


def test_an_imported_jumprelu_skip_transcoder_is_served_reading_at_its_input_and_steered_at_its_output(tmp_path):
    from conftest import RunningServer
    from monosemantic.client import RestClient
    from monosemantic.lm import load_lm, read_activations_at
    from monosemantic.shipped import reference_lm_path

    sae_cls, cfg_cls, _ = SAELENS["jumprelu_skip_transcoder"]
    theirs = sae_cls(cfg_cls(d_in=128, d_sae=256, d_out=128, apply_b_dec_to_input=False,
                             metadata=SAEMetadata(hook_name=IN, hook_name_out=OUT)))
    with torch.no_grad():
        theirs.threshold.fill_(0.5)
        theirs.W_skip.normal_(0, 0.05, generator=torch.Generator().manual_seed(0))
    theirs.save_model(tmp_path / "saelens")
    assert _import(tmp_path, tmp_path / "saelens", "saelens").exit_code == 0
    running = RunningServer(registry=tmp_path / "r", dictionaries=["tc"], sae_dtype="float32", max_new_tokens=4)
    try:
        with RestClient(running.http_url) as client:
            read = client.activations(text="import os\n", top_k=3)
            feature = next(t.top[0].feature for t in read.tokens if t.top)
            clamped = client.generate(prompt="import", max_new_tokens=4, temperature=0,
                                      steering=[{"feature": feature, "mode": "clamp", "value": 9.0}])
    finally:
        running.stop()
    lm = load_lm(reference_lm_path())
    x = read_activations_at(lm, torch.tensor([[t.id for t in read.tokens]]), [IN])[0][0].float()
    with torch.no_grad():
        expected = theirs.encode(x)  # SAELens's own encoding of the activations the service read
    for t, token in enumerate(read.tokens):
        for entry in token.top:
            assert entry.value == pytest.approx(float(expected[t, entry.feature]), abs=1e-4)
    assert all(t.steered[0].after == pytest.approx(9.0, abs=1e-4) for t in clamped.tokens)
