"""sparsify (EleutherAI, 1.3) directories: ``cfg.json`` + ``sae.safetensors``, one folder per hookpoint, read and written.

sparsify encodes ``topk(relu((x − b_dec) Eᵀ + e))`` with ``encoder.weight`` E ``[d_sae, d_in]`` (the transpose of
SAELens's ``W_enc``) and decodes ``f W_dec + b_dec``; a training run is laid out as ``<run>/<hookpoint>/``, the
hookpoint a module path under the model's ``base_model`` (GPT-2: ``h.0.mlp.act``) whose output is read; a transcoder
(``transcode``, with ``skip_connection`` its ``W_skip [d_in, d_in]``) reads the hookpoint's input and predicts its output. ReLU before
the top-k equals monosemantic's top-k then ReLU (both keep max(z, 0) of the k largest). SAELens's own sparsify loader
transposes ``W_dec`` for these files, so it is not a reference for them; sparsify itself is.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors.torch import save_file

from monosemantic.errors import InteropError
from monosemantic.interop import (
    ExportAbout, Format, Imported, Written, dtype_name, read_json, read_safetensors, refuse_pickles, register, require,
)
from monosemantic.interop.folding import AffineSAE, build, export_tensors, rows_are_unit_norm
from monosemantic.sae import SparseAutoencoder, TopKSAE

CFG_FILE, WEIGHTS_FILE = "cfg.json", "sae.safetensors"
TENSORS = {"encoder.weight", "encoder.bias", "W_dec", "b_dec"}


@register
class SparsifyFormat(Format):
    name = "sparsify"
    writes = True

    def read(self, location: Path) -> Imported:
        refuse_pickles(location)
        what = f"sparsify dictionary {location.name}"
        cfg = read_json(location / CFG_FILE, what)
        transcode, skip = bool(cfg.get("transcode")), bool(cfg.get("skip_connection"))
        require(transcode or not skip, f"{what}: skip_connection is set without transcode: a dictionary of one hook with a "
                "linear skip path cannot be represented")
        activation = cfg.get("activation", "topk")
        require(activation == "topk", f"{what}: activation {activation!r} cannot be represented (monosemantic reads topk)")
        tensors = read_safetensors(location / WEIGHTS_FILE, what)
        expected = TENSORS | ({"W_skip"} if skip else set())
        unknown, missing = sorted(set(tensors) - expected), sorted(expected - set(tensors))
        require(not unknown, f"{what}: tensors {', '.join(unknown)} cannot be represented"
                f"{' (W_skip without skip_connection)' if 'W_skip' in unknown else ''}")
        require(not missing, f"{what}: tensors {', '.join(missing)} are missing from {WEIGHTS_FILE} (saved without a decoder?)")
        d_sae, d_in = tuple(tensors["encoder.weight"].shape)
        require(cfg.get("d_in") in (None, d_in), f"{what}: cfg.json says d_in {cfg.get('d_in')}; encoder.weight is [{d_sae}, {d_in}]")
        latents = cfg.get("num_latents") or d_in * int(cfg.get("expansion_factor", 32))
        require(latents == d_sae, f"{what}: cfg.json gives {latents} latents (num_latents / expansion_factor); encoder.weight has {d_sae}")
        k = cfg.get("k", 32)
        require(isinstance(k, int) and 0 < k <= d_sae, f"{what}: k {k!r} must be an integer in 1..{d_sae}")
        # A transcoder at hookpoint H reads H's input and predicts H's output (sparsify's trainer hooks both); its
        # encoder subtracts no b_dec, as ours (monosemantic/transcoder.py).
        architecture = "skip-transcoder" if skip else "transcoder" if transcode else "topk"
        extra = {"W_skip": tensors["W_skip"]} if skip else None
        sae, _ = build(AffineSAE(architecture, tensors["encoder.weight"].T, tensors["encoder.bias"], tensors["W_dec"],
                                 tensors["b_dec"], k=k, extra=extra))
        return Imported(
            sae=sae, dtype=dtype_name(tensors), hook=f"{location.name}:input" if transcode else location.name,
            hook_relative_to_base_model=True, model_name=None,
            source={"format": self.name, "config": cfg, "dtype": dtype_name(tensors), "hookpoint": location.name},
            hook_out=location.name if transcode else None,
        )

    def write(self, sae: SparseAutoencoder, out: Path, about: ExportAbout) -> Written:
        if not isinstance(sae, TopKSAE) or sae.exports_as is not None:  # TopK and its transcoders, not BatchTopK
            raise InteropError(f"sparsify has only TopK dictionaries and transcoders; {about.reference} is {sae.cfg.architecture}")
        if sae.reads_pairs and sae.d_out != sae.cfg.d_in:
            raise InteropError(f"{about.reference} writes {sae.d_out} dimensions from {sae.cfg.d_in}; sparsify's transcoders "
                               "keep one width (their b_dec and W_skip are d_in wide)")
        affine = export_tensors(sae)
        unit = rows_are_unit_norm(affine.W_dec)
        skip = "W_skip" in (affine.extra or {})
        cfg: dict[str, Any] = {
            "activation": "topk", "expansion_factor": max(1, sae.cfg.d_sae // sae.cfg.d_in), "normalize_decoder": unit,
            "num_latents": sae.cfg.d_sae, "k": sae.cfg.k, "multi_topk": False, "skip_connection": skip,
            "transcode": sae.reads_pairs, "d_in": sae.cfg.d_in,
        }
        out.mkdir(parents=True, exist_ok=True)
        save_file({"encoder.weight": affine.W_enc.T.contiguous(), "encoder.bias": affine.b_enc.contiguous(),
                   "W_dec": affine.W_dec.contiguous(), "b_dec": affine.b_dec.contiguous(),
                   **({"W_skip": affine.extra["W_skip"].contiguous()} if skip else {})}, str(out / WEIGHTS_FILE))
        (out / CFG_FILE).write_text(json.dumps(cfg, indent=2))
        hookpoint = _hookpoint(about.hook_module_path)
        notes = [f"sparsify names a dictionary's folder after its hookpoint: {hookpoint} (a module path under the "
                 "model's base_model)"]
        if sae.reads_pairs:
            notes.append(f"a sparsify transcoder at {hookpoint} reads that module's input and predicts its output; this one "
                         f"reads the {about.hook_kind} of {about.hook_module_path} (and writes where its manifest's hook_out says)")
        elif about.hook_kind != "output":
            notes.append(f"this dictionary reads the input of {about.hook_module_path}; sparsify hooks read module outputs")
        if not unit:
            notes.append(f"the scales are folded into the weights: decoder rows have norm {1 / sae.output_scale:.6g}, "
                         "so normalize_decoder is false (training on would rescale them)")
        return Written(out, [CFG_FILE, WEIGHTS_FILE], notes)


def _hookpoint(module_path: str) -> str:
    """The module path under the base model: transformers' families keep it one level down (transformer., model.,
    gpt_neox.)."""
    head, _, rest = module_path.partition(".")
    return rest if head in ("transformer", "model", "gpt_neox") and rest else module_path
