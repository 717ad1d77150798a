"""Specifications of `monosemantic-train import` and `export` as a user runs them: an imported dictionary is a
first-class one (evaluated, given dashboards, served, steered, reloaded, its source shown), bound to the model it
reads; exports load in the real SAELens and sparsify."""

from __future__ import annotations

import json

import pytest
import torch
from sae_lens import SAE, StandardSAE, StandardSAEConfig
from sae_lens.saes.sae import SAEMetadata
from sparsify import SparseCoder, SparseCoderConfig
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel, Gemma2Config, Gemma2ForCausalLM
from typer.testing import CliRunner

from conftest import RunningServer
from monosemantic.artifact import list_versions, load_dictionary
from monosemantic.client import RestClient
from monosemantic.lm import load_lm, read_activations_at
from monosemantic.shipped import reference_lm_path
from test_interop import close, populate_hub_cache, write_gemma_scope
from trainer.cli import app

runner = CliRunner()


def saelens_mlp_dictionary(path):
    """A SAELens dictionary for the shipped model's MLP neurons (512 wide), b_dec not subtracted."""
    sae = StandardSAE(StandardSAEConfig(d_in=512, d_sae=1024, apply_b_dec_to_input=False,
                                        metadata=SAEMetadata(hook_name="blocks.0.mlp.hook_post", model_name="reference-lm")))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        sae.W_dec.copy_(torch.nn.functional.normalize(torch.randn(1024, 512, generator=g), dim=1))
        sae.W_enc.copy_(sae.W_dec.T * 4)
        sae.b_enc.copy_(torch.randn(1024, generator=g) * 0.1 - 0.4)
        sae.b_dec.copy_(torch.randn(512, generator=g) * 0.05)
    sae.save_model(path)
    return sae


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    root = tmp_path_factory.mktemp("imported")
    saelens_mlp_dictionary(root / "saelens")
    result = runner.invoke(app, ["import", "--from", "saelens", str(root / "saelens"), "--registry", str(root / "r"), "--name", "jb"])
    assert result.exit_code == 0, result.output
    return root


def test_an_import_is_published_bound_to_the_model_with_its_source_recorded(imported):
    manifest = load_dictionary(imported / "r", "jb").manifest
    assert manifest.model.checksum == load_lm(reference_lm_path()).checksum  # the default model: the shipped reference
    assert (manifest.hook.name, manifest.hook.module_path) == ("blocks.0.mlp.hook_post", "transformer.h.0.mlp.act")
    source = manifest.model_extra["source"]
    assert source["format"] == "saelens" and source["location"] == str((imported / "saelens").resolve())
    assert source["config"]["apply_b_dec_to_input"] is False and source["folded"] == ["apply_b_dec_to_input: false"]


def test_an_import_is_evaluated_and_given_dashboards_like_a_trained_one(imported):
    evaluated = runner.invoke(app, ["evaluate", "--registry", str(imported / "r"), "--dictionary", "jb", "--tokens", "2000", "--json"])
    assert evaluated.exit_code == 0, evaluated.output
    assert {"l0", "fvu", "loss_recovered"} <= set(json.loads(evaluated.stdout))
    featured = runner.invoke(app, ["features", "--registry", str(imported / "r"), "--dictionary", "jb", "--tokens", "4000", "--max-chars", "200000"])
    assert featured.exit_code == 0, featured.output
    dictionary = load_dictionary(imported / "r", "jb")
    assert dictionary.manifest.version == 2 and "top_tokens" in dictionary.features
    assert dictionary.manifest.model_extra["source"]["format"] == "saelens"  # the source travels with the weights


def test_an_import_is_served_steered_and_reloaded_and_lists_its_source(imported):
    running = RunningServer(registry=imported / "r", dictionary="jb:1", admin_key="admin-key-for-tests")
    try:
        with RestClient(running.http_url, api_key="admin-key-for-tests") as client:
            listed = client.dictionaries().dictionaries[0]
            assert listed.source["format"] == "saelens" and listed.hook == "blocks.0.mlp.hook_post"
            result = client.activations(text="def main():\n    return 1\n", top_k=3)
            assert result.dictionary.name == "jb" and any(t.top for t in result.tokens)
            feature = next(t.top[0].feature for t in result.tokens if t.top)
            steered = client.generate(prompt="def ", max_new_tokens=4, steering=[{"feature": feature, "mode": "add", "value": 8}])
            assert steered.dictionary.name == "jb" and 1 <= len(steered.tokens) <= 4  # steered by the imported dictionary
            assert client.reload(name="jb").dictionary.version == list_versions(imported / "r", "jb")[-1]
    finally:
        running.stop()


def test_an_export_from_the_cli_loads_in_saelens_equal_to_the_original(imported, tmp_path):
    result = runner.invoke(app, ["export", "--to", "saelens", "--registry", str(imported / "r"), "--dictionary", "jb:1", "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    original, exported = SAE.load_from_disk(imported / "saelens"), SAE.load_from_disk(tmp_path / "out")
    lm = load_lm(reference_lm_path())
    x = read_activations_at(lm, lm.tokenizer("import os\nprint(os.sep)\n", return_tensors="pt").input_ids, ["blocks.0.mlp.hook_post"])[0][0]
    assert close(exported.encode(x), original.encode(x)) <= 1e-4
    assert exported.cfg.metadata.hook_name == "blocks.0.mlp.hook_post"


def test_an_export_never_overwrites(imported, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    result = runner.invoke(app, ["export", "--to", "saelens", "--registry", str(imported / "r"), "--dictionary", "jb", "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and "not an empty directory" in result.output
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]


def test_an_import_whose_width_is_not_the_hooks_is_refused_with_both_widths(imported, tmp_path):
    result = runner.invoke(app, ["import", "--from", "saelens", str(imported / "saelens"), "--hook", "blocks.0.hook_resid_post",
                                 "--registry", str(tmp_path / "r"), "--name", "x"])
    assert result.exit_code == 2 and "width 128" in result.output and "512" in result.output
    assert not (tmp_path / "r" / "x").exists() or not any((tmp_path / "r" / "x").glob("v*"))


def offline_hub(monkeypatch, cache, repo: str, folder: str, files) -> None:
    """``files`` (a directory's) as ``repo``'s ``folder`` in a hub cache that huggingface_hub reads offline."""
    populate_hub_cache(cache, repo, {f"{folder}/{p.name}": p.read_bytes() for p in files.iterdir()})
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)


def randomised(module: torch.nn.Module, seed: int) -> torch.Generator:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return g


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpt2")
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=4096, n_embd=32, n_layer=2, n_head=4, n_positions=128)).save_pretrained(root)
    AutoTokenizer.from_pretrained(reference_lm_path()).save_pretrained(root)
    return root


def test_a_sparsify_hookpoint_is_resolved_under_the_models_base_model(tiny_gpt2, tmp_path):
    SparseCoder(128, SparseCoderConfig(num_latents=256, k=8)).save_to_disk(tmp_path / "run" / "h.1.mlp.act")
    result = runner.invoke(app, ["import", "--from", "sparsify", str(tmp_path / "run" / "h.1.mlp.act"), "--model", str(tiny_gpt2),
                                 "--registry", str(tmp_path / "r"), "--name", "sp"])
    assert result.exit_code == 0, result.output
    hook = load_dictionary(tmp_path / "r", "sp").manifest.hook
    assert (hook.module_path, hook.alias) == ("transformer.h.1.mlp.act", "blocks.1.mlp.hook_post")


def test_a_hub_location_is_read_from_the_hub_cache_offline(tiny_gpt2, tmp_path, monkeypatch):
    SparseCoder(128, SparseCoderConfig(num_latents=256, k=8)).save_to_disk(tmp_path / "files" / "h.0.mlp.act")
    offline_hub(monkeypatch, tmp_path / "hub", "someone/tiny-saes", "h.0.mlp.act", tmp_path / "files" / "h.0.mlp.act")
    ok = runner.invoke(app, ["import", "--from", "sparsify", "someone/tiny-saes/h.0.mlp.act", "--model", str(tiny_gpt2),
                             "--registry", str(tmp_path / "r"), "--name", "hub"])
    assert ok.exit_code == 0, ok.output
    source = load_dictionary(tmp_path / "r", "hub").manifest.model_extra["source"]
    assert (source["hub_repo"], source["subfolder"], source["revision"]) == ("someone/tiny-saes", "h.0.mlp.act", "0" * 40)
    missing = runner.invoke(app, ["import", "--from", "sparsify", "someone/not-cached/h.0", "--model", str(tiny_gpt2),
                                  "--registry", str(tmp_path / "r"), "--name", "hub"])
    assert missing.exit_code == 2 and "not in the hub cache" in missing.output


def test_a_gemma_scope_release_imports_onto_a_gemma_2_model_at_the_hook_its_path_names(tmp_path):
    torch.manual_seed(0)
    Gemma2ForCausalLM(Gemma2Config(vocab_size=4096, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, head_dim=12)).save_pretrained(tmp_path / "gemma")
    AutoTokenizer.from_pretrained(reference_lm_path()).save_pretrained(tmp_path / "gemma")
    release = tmp_path / "gemma-scope-2b-pt-res" / "layer_1" / "width_16k" / "average_l0_20"
    write_gemma_scope(release)
    result = runner.invoke(app, ["import", "--from", "gemma-scope", str(release), "--model", str(tmp_path / "gemma"),
                                 "--registry", str(tmp_path / "r"), "--name", "gs"])
    assert result.exit_code == 0, result.output
    dictionary = load_dictionary(tmp_path / "r", "gs")
    assert (dictionary.manifest.hook.name, dictionary.manifest.hook.module_path) == ("blocks.1.hook_resid_post", "model.layers.1")
    assert dictionary.manifest.architecture == "jumprelu"


def test_an_unknown_format_is_refused_with_the_known_ones(tmp_path):
    result = runner.invoke(app, ["import", "--from", "dictionary-learning", str(tmp_path), "--registry", str(tmp_path / "r"), "--name", "x"])
    assert result.exit_code == 2 and "gemma-scope, saelens, sparsify" in result.output
    result = runner.invoke(app, ["export", "--to", "gemma-scope", "--registry", str(tmp_path / "r"), "--dictionary", "x", "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "saelens, sparsify" in result.output


def test_a_saelens_release_and_sae_id_are_found_through_saelenss_directory_and_centred_as_trained(tiny_gpt2, tmp_path, monkeypatch):
    # gpt2-small-res-jb was trained on TransformerLens's GPT-2 with center_writing_weights: there the residual stream
    # is x − mean(x). The hub cache holds our own small dictionary under that release's repository and folder.
    sae = StandardSAE(StandardSAEConfig(d_in=32, d_sae=96, metadata=SAEMetadata(hook_name="blocks.0.hook_resid_pre")))
    g = randomised(sae, seed=1)
    sae.save_model(tmp_path / "files")
    offline_hub(monkeypatch, tmp_path / "hub", "jbloom/GPT2-Small-SAEs-Reformatted", "blocks.0.hook_resid_pre", tmp_path / "files")
    result = runner.invoke(app, ["import", "--from", "saelens", "gpt2-small-res-jb", "--sae-id", "blocks.0.hook_resid_pre",
                                 "--model", str(tiny_gpt2), "--registry", str(tmp_path / "r"), "--name", "jb"])
    assert result.exit_code == 0, result.output
    dictionary = load_dictionary(tmp_path / "r", "jb")
    source = dictionary.manifest.model_extra["source"]
    assert (source["release"], source["sae_id"], source["hub_repo"]) == ("gpt2-small-res-jb", "blocks.0.hook_resid_pre", "jbloom/GPT2-Small-SAEs-Reformatted")
    x = torch.randn(64, 32, generator=g) * 2 + 1
    theirs = SAE.load_from_disk(tmp_path / "files")
    assert close(dictionary.sae.encode(x), theirs.encode(x - x.mean(-1, keepdim=True))) <= 1e-4
    unknown = runner.invoke(app, ["import", "--from", "saelens", "gpt2-small-res-jb", "--sae-id", "blocks.99.hook_z",
                                  "--model", str(tiny_gpt2), "--registry", str(tmp_path / "r"), "--name", "jb"])
    assert unknown.exit_code == 2 and "has no SAE id 'blocks.99.hook_z'" in unknown.output


def test_a_releases_norm_scaling_factor_becomes_the_input_scale_as_saelens_folds_it(tiny_gpt2, tmp_path, monkeypatch):
    # gpt2-small-mlp-tm's blocks.0.hook_mlp_out: normalize_activations expected_average_only_in, with a factor in
    # SAELens's directory that from_pretrained folds into the weights (W_enc·s, W_dec/s, b_dec/s); the release was
    # also trained with center_writing_weights, so SAELens saw the centred MLP output.
    from sae_lens.loading.pretrained_saes_directory import get_norm_scaling_factor

    sae = StandardSAE(StandardSAEConfig(d_in=32, d_sae=96, normalize_activations="expected_average_only_in",
                                        metadata=SAEMetadata(hook_name="blocks.0.hook_mlp_out")))
    g = randomised(sae, seed=2)
    sae.save_model(tmp_path / "files")
    offline_hub(monkeypatch, tmp_path / "hub", "tommmcgrath/gpt2-small-mlp-out-saes", "sae_group_gpt2_blocks.0.hook_mlp_out_24576:v1",
                tmp_path / "files")
    result = runner.invoke(app, ["import", "--from", "saelens", "gpt2-small-mlp-tm", "--sae-id", "blocks.0.hook_mlp_out",
                                 "--model", str(tiny_gpt2), "--registry", str(tmp_path / "r"), "--name", "tm"])
    assert result.exit_code == 0, result.output
    ours = load_dictionary(tmp_path / "r", "tm").sae
    theirs = SAE.load_from_disk(tmp_path / "files")
    theirs.fold_activation_norm_scaling_factor(get_norm_scaling_factor("gpt2-small-mlp-tm", "blocks.0.hook_mlp_out"))
    x = torch.randn(64, 32, generator=g)
    assert ours.cfg.input_scale == pytest.approx(1.049317316132615)
    features = theirs.encode(x - x.mean(-1, keepdim=True))
    assert close(ours.encode(x), features) <= 1e-4 and close(ours.decode(features), theirs.decode(features)) <= 1e-4
