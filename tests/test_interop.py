"""Specifications of interop: other tools' dictionaries imported, ours exported, proven against the real SAELens
(6.54) and sparsify (1.3) — each library writes and reads its own files, and encodes and decodes the same
activations as monosemantic to max |a − b| / max |b| ≤ 1e-4."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from sae_lens import (SAE, GatedSAE, GatedSAEConfig, JumpReLUSAE, JumpReLUSAEConfig, StandardSAE, StandardSAEConfig, TopKSAE,
                      TopKSAEConfig)
from sae_lens.saes.sae import SAEMetadata
from sparsify import SparseCoder, SparseCoderConfig

from monosemantic.artifact import HookRef, ModelRef, load_dictionary, publish
from monosemantic.errors import InteropError
from monosemantic.interop import ExportAbout, get_format
from monosemantic.sae import SAEConfig, build_sae
from monosemantic.shipped import reference_registry_path

D_IN, D_SAE, K = 48, 192, 12
TOLERANCE = 1e-4


def close(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    """max |a − b| / max |b|: the issue's measure of agreement."""
    ours, theirs = ours.detach().double(), theirs.detach().double()
    return float((ours - theirs).abs().max() / theirs.abs().max().clamp_min(1e-30))


@pytest.fixture(scope="module")
def activations() -> torch.Tensor:
    return torch.randn(256, D_IN, generator=torch.Generator().manual_seed(7)) * 3 + 0.5


def _fill(module: torch.nn.Module, seed: int, *, threshold: float | None = None) -> None:
    """Non-zero weights and biases everywhere (and positive thresholds): a convention mishandled must show."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            value = torch.randn(p.shape, generator=g) * (0.3 if "b_" in name or "bias" in name else 1.0)
            if name == "threshold":
                value = torch.rand(p.shape, generator=g) * (threshold or 1.0)
            p.copy_(value.to(p.dtype))


def saelens_sae(architecture: str, dtype: str, **cfg) -> SAE:
    metadata = SAEMetadata(hook_name="blocks.0.hook_resid_post", model_name="tiny")
    classes = {"standard": (StandardSAE, StandardSAEConfig), "topk": (TopKSAE, TopKSAEConfig),
               "jumprelu": (JumpReLUSAE, JumpReLUSAEConfig), "gated": (GatedSAE, GatedSAEConfig)}
    sae_cls, cfg_cls = classes[architecture]
    sae = sae_cls(cfg_cls(d_in=D_IN, d_sae=D_SAE, dtype=dtype, metadata=metadata, **cfg))
    _fill(sae, seed=len(architecture) + len(cfg), threshold=1.5)
    return sae


SAELENS_CASES = {
    "standard": ("standard", {}),
    "standard-no-b_dec-subtraction": ("standard", {"apply_b_dec_to_input": False}),
    "topk": ("topk", {"k": K}),
    "topk-rescaled-by-decoder-norm": ("topk", {"k": K, "rescale_acts_by_decoder_norm": True}),
    "jumprelu": ("jumprelu", {}),
    "jumprelu-no-b_dec-subtraction": ("jumprelu", {"apply_b_dec_to_input": False}),
    "gated": ("gated", {}),
    "gated-no-b_dec-subtraction": ("gated", {"apply_b_dec_to_input": False}),
    "expected-average-only-in": ("standard", {"normalize_activations": "expected_average_only_in"}),
}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("case", sorted(SAELENS_CASES))
def test_a_saelens_dictionary_imports_encoding_and_decoding_as_saelens_does(tmp_path, activations, case, dtype):
    architecture, cfg = SAELENS_CASES[case]
    saelens_sae(architecture, dtype, **cfg).save_model(tmp_path / "sae")
    theirs = SAE.load_from_disk(tmp_path / "sae", dtype="float32")  # the file's values, computed in fp32
    imported = get_format("saelens").read(tmp_path / "sae")

    ours = imported.sae
    assert close(ours.encode(activations), theirs.encode(activations)) <= TOLERANCE
    features = theirs.encode(activations)
    assert close(ours.decode(features), theirs.decode(features)) <= TOLERANCE
    assert (ours.encode(activations) > 0).sum() > 0.02 * features.numel()  # features fire: the comparison means something
    assert imported.hook == "blocks.0.hook_resid_post" and imported.model_name == "tiny"
    assert imported.dtype == ("float32" if imported.source["folded"] else dtype)


def test_a_rescaled_topk_import_has_unit_norm_decoder_rows(tmp_path):
    # SAELens's TopK training default leaves rows far from unit norm; the fold makes them unit, features unchanged.
    saelens_sae("topk", "float32", k=K, rescale_acts_by_decoder_norm=True).save_model(tmp_path / "sae")
    norms = get_format("saelens").read(tmp_path / "sae").sae.W_dec.norm(dim=1)
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-5)


def test_a_jumprelu_import_keeps_its_thresholds_to_the_bit(tmp_path):
    # exp(log θ) is θ only to within a bit or two, and at the threshold one bit decides whether a feature fires.
    saelens_sae("jumprelu", "float32").save_model(tmp_path / "sae")
    ours = get_format("saelens").read(tmp_path / "sae").sae
    assert torch.equal(ours.threshold, SAE.load_from_disk(tmp_path / "sae").threshold.detach())
    assert not torch.equal(ours.threshold, ours.log_threshold.exp())  # the bits the log form would have lost
    assert torch.equal(ours.train().threshold, ours.log_threshold.exp())  # training moves log θ


def test_an_older_jumprelu_file_with_log_thresholds_imports(tmp_path, activations):
    sae = saelens_sae("jumprelu", "float32")
    sae.save_model(tmp_path / "sae")
    from safetensors.torch import load_file, save_file

    # SAELens's training class reads log_threshold as exp(log_threshold) (process_state_dict_for_loading); its
    # inference class wants threshold: the reference is the same file with that threshold written out.
    tensors = load_file(tmp_path / "sae" / "sae_weights.safetensors")
    log_threshold = tensors.pop("threshold").clamp_min(1e-3).log()
    save_file({**tensors, "threshold": log_threshold.exp()}, tmp_path / "sae" / "sae_weights.safetensors")
    theirs = SAE.load_from_disk(tmp_path / "sae")
    save_file({**tensors, "log_threshold": log_threshold}, tmp_path / "sae" / "sae_weights.safetensors")
    ours = get_format("saelens").read(tmp_path / "sae").sae
    assert close(ours.encode(activations), theirs.encode(activations)) <= TOLERANCE


@pytest.mark.parametrize("field, value, named", [
    ("normalize_activations", "layer_norm", "normalize_activations"),
    ("normalize_activations", "constant_norm_rescale", "normalize_activations"),
    ("reshape_activations", "hook_z", "hook_z"),
    ("hook_head_index", 3, "hook_head_index"),
    ("architecture", "quantum", "architecture 'quantum'"),
    ("architecture", "transcoder", "apply_b_dec_to_input is true for a transcoder"),
])
def test_what_saelens_files_say_that_cannot_be_represented_is_refused_by_name(tmp_path, field, value, named):
    saelens_sae("standard", "float32").save_model(tmp_path / "sae")
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    (cfg["metadata"] if field == "hook_head_index" else cfg)[field] = value
    (tmp_path / "sae" / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(InteropError, match=named):
        get_format("saelens").read(tmp_path / "sae")


def test_a_pickled_release_is_refused_and_never_unpickled(tmp_path):
    (tmp_path / "ae").mkdir()
    (tmp_path / "ae" / "ae.pt").write_bytes(b"\x80\x04 not even read")
    for fmt in ("saelens", "sparsify", "gemma-scope"):
        with pytest.raises(InteropError, match="ae.pt: a pickle"):
            get_format(fmt).read(tmp_path / "ae")


# ---- sparsify -----------------------------------------------------------------------------------------------------


def sparsify_sae(dtype: torch.dtype, **cfg) -> SparseCoder:
    sae = SparseCoder(D_IN, SparseCoderConfig(num_latents=D_SAE, k=K, **cfg), dtype=dtype)
    _fill(sae, seed=3)
    return sae


def sparsify_dense(sae: SparseCoder, x: torch.Tensor) -> torch.Tensor:
    out = sae.encode(x)
    return torch.zeros(x.shape[0], sae.num_latents, dtype=out.top_acts.dtype).scatter_(-1, out.top_indices, out.top_acts)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_a_sparsify_dictionary_imports_encoding_and_decoding_as_sparsify_does(tmp_path, activations, dtype):
    sparsify_sae(dtype).save_to_disk(tmp_path / "h.0.mlp.act")
    theirs = SparseCoder.load_from_disk(tmp_path / "h.0.mlp.act").float()  # the file's values, computed in fp32
    imported = get_format("sparsify").read(tmp_path / "h.0.mlp.act")

    assert close(imported.sae.encode(activations), sparsify_dense(theirs, activations)) <= TOLERANCE
    out = theirs.encode(activations)
    assert close(imported.sae.decode(sparsify_dense(theirs, activations)), theirs.decode(out.top_acts, out.top_indices)) <= TOLERANCE
    assert (imported.hook, imported.hook_relative_to_base_model) == ("h.0.mlp.act", True)
    assert imported.dtype == str(dtype).removeprefix("torch.")


@pytest.mark.parametrize("cfg, named", [({"skip_connection": True}, "skip_connection is set without transcode"),
                                        ({"activation": "groupmax"}, "groupmax")])
def test_what_sparsify_files_say_that_cannot_be_represented_is_refused_by_name(tmp_path, cfg, named):
    sparsify_sae(torch.float32, **cfg).save_to_disk(tmp_path / "layers.0")
    with pytest.raises(InteropError, match=named):
        get_format("sparsify").read(tmp_path / "layers.0")


# ---- Gemma Scope --------------------------------------------------------------------------------------------------


def write_gemma_scope(folder: Path, *, lower_case: bool = False) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(5)
    params = {"W_enc": rng.normal(size=(D_IN, D_SAE)), "W_dec": rng.normal(size=(D_SAE, D_IN)) * 0.2,
              "b_enc": rng.normal(size=D_SAE) * 0.3, "b_dec": rng.normal(size=D_IN) * 0.3, "threshold": rng.uniform(0, 3, D_SAE)}
    params = {("w_" + k[2:] if lower_case and k.startswith("W_") else k): v.astype(np.float32) for k, v in params.items()}
    folder.mkdir(parents=True)
    np.savez(folder / "params.npz", **params)
    return params


def populate_hub_cache(cache: Path, repo: str, files: dict[str, bytes]) -> None:
    """A Hugging Face hub cache holding ``files`` of ``repo`` at main, as huggingface_hub lays it out: offline,
    hf_hub_download and snapshot_download read it as if it had been downloaded."""
    commit = "0" * 40
    root = cache / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(commit)
    for name, data in files.items():
        path = root / "snapshots" / commit / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def test_a_gemma_scope_dictionary_imports_encoding_and_decoding_as_saelenss_loader_reads_it(tmp_path, activations, monkeypatch):
    from sae_lens.loading.pretrained_sae_loaders import gemma_2_sae_huggingface_loader, handle_config_defaulting

    folder = "layer_3/width_16k/average_l0_50"
    write_gemma_scope(tmp_path / "release" / folder)
    populate_hub_cache(tmp_path / "hub", "google/gemma-scope-2b-pt-res",
                       {f"{folder}/params.npz": (tmp_path / "release" / folder / "params.npz").read_bytes()})
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    cfg, state, _ = gemma_2_sae_huggingface_loader("google/gemma-scope-2b-pt-res", folder, cfg_overrides={"d_in": D_IN, "d_sae": D_SAE})
    theirs = JumpReLUSAE(JumpReLUSAEConfig.from_dict(handle_config_defaulting(cfg)))  # as SAE.from_pretrained does
    theirs.load_state_dict(state)

    imported = get_format("gemma-scope").read(tmp_path / "release" / folder)
    assert close(imported.sae.encode(activations), theirs.encode(activations)) <= TOLERANCE
    features = theirs.encode(activations)
    assert close(imported.sae.decode(features), theirs.decode(features)) <= TOLERANCE
    assert imported.hook is None  # a folder without the repository's name: --hook says it


def test_a_gemma_scope_path_names_its_hook_as_saelens_does(tmp_path):
    write_gemma_scope(tmp_path / "gemma-scope-2b-pt-res" / "layer_12" / "width_16k" / "average_l0_82")
    write_gemma_scope(tmp_path / "gemma-scope-2b-pt-mlp" / "layer_4" / "width_16k" / "average_l0_82", lower_case=True)
    read = get_format("gemma-scope").read
    assert read(tmp_path / "gemma-scope-2b-pt-res" / "layer_12" / "width_16k" / "average_l0_82").hook == "blocks.12.hook_resid_post"
    assert read(tmp_path / "gemma-scope-2b-pt-mlp" / "layer_4" / "width_16k" / "average_l0_82" / "params.npz").hook == "blocks.4.hook_mlp_out"
    write_gemma_scope(tmp_path / "gemma-scope-2b-pt-att" / "layer_1" / "width_16k" / "x")
    with pytest.raises(InteropError, match="hook_z"):
        read(tmp_path / "gemma-scope-2b-pt-att" / "layer_1" / "width_16k" / "x")


# ---- export: every architecture, the shipped reference included ---------------------------------------------------


def ours(architecture: str, *, input_scale: float = 2.7):
    cfg = SAEConfig.build(architecture=architecture, d_in=D_IN, d_sae=D_SAE, input_scale=input_scale,
                          k=K if architecture == "topk" else None)
    sae = build_sae(cfg, seed=1)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.3, generator=torch.Generator().manual_seed(2))
        sae.b_dec.normal_(0, 0.3, generator=torch.Generator().manual_seed(3))
        if architecture == "jumprelu":
            sae.log_threshold.uniform_(-2, 0.5, generator=torch.Generator().manual_seed(4))
        if architecture == "gated":  # a magnitude path unlike the gate's, so a mixed-up one shows
            sae.r_mag.normal_(0, 0.7, generator=torch.Generator().manual_seed(5))
            sae.b_mag.normal_(0, 0.3, generator=torch.Generator().manual_seed(6))
    return sae.eval()


def about(density=None) -> ExportAbout:
    return ExportAbout("d:v1", "tiny", "blocks.0.hook_resid_post", "transformer.h.0", "output", density, 64, None)


@pytest.mark.parametrize("architecture", ["relu", "topk", "jumprelu", "gated"])
def test_an_export_loads_in_saelens_and_encodes_and_decodes_as_monosemantic_does(tmp_path, activations, architecture):
    sae = ours(architecture)
    get_format("saelens", writing=True).write(sae, tmp_path / "out", about(torch.rand(D_SAE)))
    theirs = SAE.load_from_disk(tmp_path / "out")

    assert close(theirs.encode(activations), sae.encode(activations)) <= TOLERANCE
    features = sae.encode(activations)
    assert close(theirs.decode(features), sae.decode(features)) <= TOLERANCE
    assert theirs.cfg.metadata.hook_name == "blocks.0.hook_resid_post" and theirs.cfg.metadata.model_name == "tiny"
    assert (tmp_path / "out" / "sparsity.safetensors").exists()


def test_a_topk_export_loads_in_sparsify_and_encodes_and_decodes_as_monosemantic_does(tmp_path, activations):
    sae = ours("topk")
    written = get_format("sparsify", writing=True).write(sae, tmp_path / "out", about())
    theirs = SparseCoder.load_from_disk(tmp_path / "out")

    assert close(sparsify_dense(theirs, activations), sae.encode(activations)) <= TOLERANCE
    out = theirs.encode(activations)
    assert close(theirs.decode(out.top_acts, out.top_indices), sae.decode(sparsify_dense(theirs, activations))) <= TOLERANCE
    assert theirs.cfg.normalize_decoder is False  # rows have norm 1 / input_scale once the scale is folded
    assert any("h.0" in note for note in written.notes)


def test_sparsify_export_of_a_dictionary_it_cannot_hold_is_refused(tmp_path):
    with pytest.raises(InteropError, match="only TopK"):
        get_format("sparsify", writing=True).write(ours("relu"), tmp_path / "out", about())


def test_the_shipped_reference_exports_to_saelens_within_tolerance_on_its_own_activations(tmp_path):
    from monosemantic.lm import load_lm, read_activations_at
    from monosemantic.shipped import reference_lm_path

    dictionary = load_dictionary(reference_registry_path(), "reference")
    lm = load_lm(reference_lm_path())
    ids = lm.tokenizer("def main():\n    return sorted(items, key=len)\n" * 4, return_tensors="pt").input_ids
    x = read_activations_at(lm, ids, [dictionary.manifest.hook.name])[0].reshape(-1, 512)
    m = dictionary.manifest
    get_format("saelens", writing=True).write(dictionary.sae, tmp_path / "out", ExportAbout(
        "reference:v1", m.model.name, m.hook.alias, m.hook.module_path, m.hook.kind, dictionary.features.get("density"), 256, None))
    theirs = SAE.load_from_disk(tmp_path / "out")
    assert close(theirs.encode(x), dictionary.sae.encode(x)) <= TOLERANCE
    assert close(theirs.decode(dictionary.sae.encode(x)), dictionary.sae.decode(dictionary.sae.encode(x))) <= TOLERANCE


# ---- round trips: the library's file → monosemantic → the library -------------------------------------------------


@pytest.mark.parametrize("case", ["standard-no-b_dec-subtraction", "topk-rescaled-by-decoder-norm", "jumprelu",
                                  "gated-no-b_dec-subtraction"])
def test_a_saelens_dictionary_round_trips_through_monosemantic_to_saelens(tmp_path, activations, case):
    architecture, cfg = SAELENS_CASES[case]
    saelens_sae(architecture, "float32", **cfg).save_model(tmp_path / "in")
    original = SAE.load_from_disk(tmp_path / "in")
    imported = get_format("saelens").read(tmp_path / "in")
    get_format("saelens", writing=True).write(imported.sae, tmp_path / "out", about())
    again = SAE.load_from_disk(tmp_path / "out")
    assert close(again.encode(activations), original.encode(activations)) <= TOLERANCE
    features = original.encode(activations)
    assert close(again.decode(features), original.decode(features)) <= TOLERANCE


def test_a_sparsify_dictionary_round_trips_through_monosemantic_to_sparsify(tmp_path, activations):
    sparsify_sae(torch.float32).save_to_disk(tmp_path / "in")
    original = SparseCoder.load_from_disk(tmp_path / "in")
    get_format("sparsify", writing=True).write(get_format("sparsify").read(tmp_path / "in").sae, tmp_path / "out", about())
    again = SparseCoder.load_from_disk(tmp_path / "out")
    assert close(sparsify_dense(again, activations), sparsify_dense(original, activations)) <= TOLERANCE


def test_a_gemma_scope_2_safetensors_release_imports_as_saelens_reads_it(tmp_path, activations):
    # SAELens's gemma_3 loader asks the hub for tensor shapes (no offline path), so the reference is what it builds:
    # a JumpReLUSAE, apply_b_dec_to_input false, from w_enc / w_dec / b_enc / b_dec / threshold.
    from safetensors.numpy import save_file

    folder = tmp_path / "gemma-scope-2-270m-pt" / "resid_post" / "layer_5_width_16k_l0_small"
    params = write_gemma_scope(tmp_path / "npz", lower_case=True)
    folder.mkdir(parents=True)
    save_file(params, str(folder / "params.safetensors"))
    theirs = JumpReLUSAE(JumpReLUSAEConfig(d_in=D_IN, d_sae=D_SAE, apply_b_dec_to_input=False))
    theirs.load_state_dict({"W_enc": torch.from_numpy(params["w_enc"]), "W_dec": torch.from_numpy(params["w_dec"]),
                            **{k: torch.from_numpy(params[k]) for k in ("b_enc", "b_dec", "threshold")}})

    imported = get_format("gemma-scope").read(folder)
    assert close(imported.sae.encode(activations), theirs.encode(activations)) <= TOLERANCE
    features = theirs.encode(activations)
    assert close(imported.sae.decode(features), theirs.decode(features)) <= TOLERANCE
    assert imported.hook == "blocks.5.hook_resid_post"  # SAELens's get_gemma_3_config_from_hf rule for resid_post/
    (tmp_path / "gemma-scope-2-270m-pt" / "attn_out" / "layer_5_width_16k_l0_small").mkdir(parents=True)
    save_file(params, str(tmp_path / "gemma-scope-2-270m-pt" / "attn_out" / "layer_5_width_16k_l0_small" / "params.safetensors"))
    with pytest.raises(InteropError, match="hook_z"):
        get_format("gemma-scope").read(tmp_path / "gemma-scope-2-270m-pt" / "attn_out" / "layer_5_width_16k_l0_small")
