"""SAELens v6 directories: ``cfg.json`` + ``sae_weights.safetensors`` (+ ``sparsity.safetensors``), read and written.

Read as SAELens 6.54 reads them (``SAE.load_from_disk``): a cfg without ``metadata.sae_lens_version`` is a pre-6 one
(flat, ``hook_point`` for ``hook_name``); ``standard`` encodes ``relu((x − b_dec·[apply_b_dec_to_input]) W_enc +
b_enc)``, ``topk`` keeps the k largest (of the pre-activations times the decoder row norms when
``rescale_acts_by_decoder_norm``, decoding ``(f / ‖W_dec‖) W_dec``), ``jumprelu`` is ``relu(z)·1{z > threshold}``
(older files store ``log_threshold``), ``gated`` is monosemantic/gated.py's (``b_gate`` there is our ``b_enc``), and
``transcoder``, ``skip_transcoder``, ``jumprelu_transcoder`` and ``jumprelu_skip_transcoder`` are monosemantic/
transcoder.py's ReLU and JumpReLU forms (``d_out`` wide, no b_dec subtracted, the output hook in
``metadata.hook_name_out``). ``normalize_activations: expected_average_only_in`` is the identity in an inference SAE
(SAELens folds the scale into the weights when training ends); per-token normalisations are refused.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from monosemantic.errors import InteropError
from monosemantic.interop import (
    ExportAbout, Format, Imported, Written, dtype_name, read_json, read_safetensors, refuse_pickles, register, require,
)
from monosemantic.interop.folding import SHARED, AffineSAE, build, export_tensors
from monosemantic.sae import SparseAutoencoder, architecture_class

CFG_FILE, WEIGHTS_FILE, SPARSITY_FILE = "cfg.json", "sae_weights.safetensors", "sparsity.safetensors"
# The SAELens release these files are proven against (tests/test_interop.py); written as metadata.sae_lens_version,
# without which SAELens reads a v6 cfg as a pre-6 one and drops its hook and model names.
SAELENS_VERSION = "6.54.12"
# SAELens's architecture name → monosemantic's registered one (whose class lists the tensors, monosemantic/sae.py).
ARCHITECTURES = {"standard": "relu", "topk": "topk", "jumprelu": "jumprelu", "gated": "gated",
                 "transcoder": "relu-transcoder", "skip_transcoder": "relu-skip-transcoder",
                 "jumprelu_transcoder": "jumprelu-transcoder", "jumprelu_skip_transcoder": "jumprelu-skip-transcoder"}
IDENTITY_NORMALISATIONS = (None, "none", "expected_average_only_in")
# SAELens's name for a tensor where it is not ours: a gated SAE's gate bias is our b_enc (monosemantic/gated.py).
RENAMED = {"gated": {"b_gate": "b_enc"}}


def _their_tensors(ours: str) -> set[str]:
    """The tensors a SAELens file of this architecture holds: the class's, under SAELens's names."""
    theirs = {mine: their for their, mine in RENAMED.get(ours, {}).items()}
    return {theirs.get(name, name) for name in architecture_class(ours).tensor_names}


def _pre_6(cfg: dict[str, Any]) -> bool:
    version = cfg.get("sae_lens_version") or (cfg.get("metadata") or {}).get("sae_lens_version")
    if not version:
        return True
    try:
        return int(str(version).split(".")[0]) < 6
    except ValueError:
        return True


@register
class SAELensFormat(Format):
    name = "saelens"
    writes = True

    def read(self, location: Path) -> Imported:
        refuse_pickles(location)
        what = f"SAELens dictionary {location.name}"
        cfg = read_json(location / CFG_FILE, what)
        old = _pre_6(cfg)
        meta = {**cfg, **(cfg.get("metadata") or {})} if not old else cfg
        architecture = cfg.get("architecture", "standard") if not old else _pre_6_architecture(cfg)
        require(architecture in ARCHITECTURES, f"{what}: architecture {architecture!r} cannot be represented (monosemantic "
                f"reads {', '.join(sorted(ARCHITECTURES))})")
        ours = ARCHITECTURES[architecture]
        pairs = architecture_class(ours).reads_pairs
        normalisation = cfg.get("normalize_activations")
        require(normalisation in IDENTITY_NORMALISATIONS, f"{what}: normalize_activations {normalisation!r} is a per-token "
                "transform (or needs statistics the files do not hold); monosemantic folds only constants into the weights")
        reshape = cfg.get("reshape_activations", "none")
        hook = meta.get("hook_name") or meta.get("hook_point")
        require(reshape in (None, "none") and not str(hook or "").endswith("hook_z"),
                f"{what}: reshape_activations {reshape!r} / hook {hook!r}: hook_z's per-head reshape cannot be represented")
        head = meta.get("hook_head_index", meta.get("hook_point_head_index"))
        require(head is None, f"{what}: hook_head_index {head!r}: a head-indexed hook cannot be represented")
        require(not cfg.get("finetuning_scaling_factor"), f"{what}: finetuning_scaling_factor is set: a learned per-feature "
                "decoder scale cannot be represented")
        tensors = read_safetensors(location / WEIGHTS_FILE, what)
        dtype = dtype_name(tensors)
        log_stored = "log_threshold" in tensors and "threshold" not in tensors
        if log_stored:  # older JumpReLU files, as SAELens's process_state_dict_for_loading reads them
            tensors["threshold"] = tensors.pop("log_threshold").float().exp()
        unknown = sorted(set(tensors) - _their_tensors(ours))
        require(not unknown, f"{what}: tensors {', '.join(unknown)} cannot be represented by a {architecture} dictionary "
                "(a skip connection?)")
        missing = sorted(_their_tensors(ours) - set(tensors))
        require(not missing, f"{what}: tensors {', '.join(missing)} are missing from {WEIGHTS_FILE}")
        d_in, d_sae = tuple(tensors["W_enc"].shape)
        require((cfg.get("d_in"), cfg.get("d_sae")) in ((d_in, d_sae), (None, None)),
                f"{what}: cfg.json says d_in {cfg.get('d_in')}, d_sae {cfg.get('d_sae')}; W_enc is [{d_in}, {d_sae}]")
        if pairs:
            d_out = tuple(tensors["W_dec"].shape)[-1]
            require(cfg.get("d_out") in (None, d_out), f"{what}: cfg.json says d_out {cfg.get('d_out')}; W_dec is "
                    f"{list(tensors['W_dec'].shape)}")
        k = cfg.get("k") if ours == "topk" else None
        if ours == "topk":
            k = k if k is not None else (cfg.get("activation_fn_kwargs") or {}).get("k")
            require(isinstance(k, int) and 0 < k <= d_sae, f"{what}: k {k!r} must be an integer in 1..{d_sae}")
        rescale = ours == "topk" and bool(cfg.get("rescale_acts_by_decoder_norm", False))
        apply_b_dec = bool(cfg.get("apply_b_dec_to_input", not pairs))
        require(not (pairs and apply_b_dec), f"{what}: apply_b_dec_to_input is true for a {architecture}: its b_dec is in "
                "the output's space (SAELens itself refuses it)")
        for theirs, mine in RENAMED.get(ours, {}).items():
            tensors[mine] = tensors.pop(theirs)
        extra = {name: tensors[name] for name in tensors if name not in SHARED} or None
        source = AffineSAE(ours, tensors["W_enc"], tensors["b_enc"], tensors["W_dec"], tensors["b_dec"],
                           tensors.get("threshold"), k, extra)
        sae, folded = build(source, subtract_b_dec=apply_b_dec,
                            selection_scale=tensors["W_dec"].float().norm(dim=1) if rescale else None)  # as SAELens computes it
        return Imported(
            sae=sae, dtype="float32" if folded or log_stored else dtype,
            hook=hook, hook_relative_to_base_model=False, model_name=meta.get("model_name"),
            source={"format": self.name, "config": cfg, "dtype": dtype,
                    "folded": [name for name, on in (("apply_b_dec_to_input: false", not apply_b_dec and not pairs),
                                                     ("rescale_acts_by_decoder_norm", rescale)) if on]},
            hook_out=meta.get("hook_name_out") if pairs else None,
        )

    def write(self, sae: SparseAutoencoder, out: Path, about: ExportAbout) -> Written:
        affine = export_tensors(sae)
        if affine.architecture not in ARCHITECTURES.values():
            raise InteropError(f"{about.reference} is a TopK {sae.cfg.architecture}; SAELens's transcoders are ReLU or "
                               "JumpReLU, so it has no SAELens architecture: export it --to sparsify")
        tensors = {"W_enc": affine.W_enc, "b_enc": affine.b_enc, "W_dec": affine.W_dec, "b_dec": affine.b_dec,
                   **(affine.extra or {})}
        if affine.threshold is not None:
            tensors["threshold"] = affine.threshold
        for theirs, mine in RENAMED.get(affine.architecture, {}).items():
            tensors[theirs] = tensors.pop(mine)
        architecture = {v: k for k, v in ARCHITECTURES.items()}[affine.architecture]
        hook_name = about.hook_alias or about.hook_module_path
        cfg: dict[str, Any] = {
            "architecture": architecture, "d_in": sae.cfg.d_in, "d_sae": sae.cfg.d_sae, "dtype": "float32", "device": "cpu",
            "apply_b_dec_to_input": not sae.reads_pairs, "normalize_activations": "none", "reshape_activations": "none",
            "metadata": {
                "sae_lens_version": SAELENS_VERSION, "model_name": about.model_name, "hook_name": hook_name,
                "hf_hook_name": _hf_hook_name(about.hook_module_path, about.hook_kind),
                "hook_head_index": None, "prepend_bos": True, "context_size": about.context_length,
                "dataset_path": about.dataset, "neuronpedia_id": None, "exported_from": f"monosemantic {about.reference}",
            },
        }
        if architecture == "topk":
            cfg.update(k=affine.k, rescale_acts_by_decoder_norm=False)
        if sae.reads_pairs:  # SAELens's transcoders: TranscoderConfig.d_out, the output hook in the metadata
            cfg["d_out"] = sae.d_out
            out_hook = about.hook_out
            cfg["metadata"].update(
                hook_name_out=None if out_hook is None else out_hook.alias or out_hook.module_path,
                hf_hook_name_out=None if out_hook is None else _hf_hook_name(out_hook.module_path, out_hook.kind))
        out.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / WEIGHTS_FILE))
        (out / CFG_FILE).write_text(json.dumps(cfg, indent=2))
        files = [CFG_FILE, WEIGHTS_FILE]
        if about.density is not None:
            # SAELens's training runner writes log10(density + 1e-10) as "sparsity".
            save_file({"sparsity": torch.log10(about.density.double() + 1e-10).float()}, str(out / SPARSITY_FILE))
            files.append(SPARSITY_FILE)
        notes = []
        if sae.cfg.input_scale != 1.0:
            notes.append(f"the input scale {sae.cfg.input_scale:.6g} is folded into the weights: decoder rows have norm "
                         f"{1 / sae.cfg.input_scale:.6g}, not 1")
        if about.hook_alias is None:
            notes.append(f"hook {about.hook_module_path} has no TransformerLens name; metadata.hook_name holds the HF module path")
        return Written(out, files, notes)


def _hf_hook_name(module_path: str, kind: str) -> str:
    """The HF module path as monosemantic resolves it: suffixed ``:input`` where the module's input is read."""
    return module_path if kind == "output" else f"{module_path}:input"


def _pre_6_architecture(cfg: dict[str, Any]) -> str:
    """A pre-6 cfg names its activation, not its architecture (SAELens's handle_pre_6_0_config)."""
    activation = cfg.get("activation_fn", cfg.get("activation_fn_str", "relu"))
    if cfg.get("architecture") not in (None, "standard"):
        return cfg["architecture"]
    if activation == "topk":
        return "topk"
    require(activation == "relu", f"activation_fn {activation!r} cannot be represented (relu or topk)")
    return "standard"
