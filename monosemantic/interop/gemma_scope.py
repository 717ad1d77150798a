"""Gemma Scope releases (Google DeepMind): one ``params.npz`` (Gemma 2) or ``params.safetensors`` (Gemma Scope 2,
Gemma 3) per dictionary, JumpReLU, read only.

The arrays are ``W_enc [d_in, d_sae]``, ``W_dec [d_sae, d_in]``, ``b_enc``, ``b_dec`` and ``threshold`` (Gemma Scope 2
spells the weights ``w_enc``/``w_dec``); the encoder does not subtract ``b_dec`` (folded into ``b_enc``,
monosemantic/interop/folding.py) and fires where ``z > threshold``, as the release's reference code and SAELens's
loaders do. The hook is read from the release's path, as SAELens does: Gemma Scope's repository ``…-res`` →
``blocks.L.hook_resid_post`` and ``…-mlp`` → ``blocks.L.hook_mlp_out`` with a ``layer_L`` folder; Gemma Scope 2's
folders ``resid_post/layer_L…`` and ``mlp_out/layer_L…``. Attention dictionaries read ``hook_z`` per head, and
transcoders map one activation to another: both are refused. ``numpy.load`` runs with ``allow_pickle=False``: an
object array is refused, never unpickled.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

from monosemantic.errors import InteropError
from monosemantic.interop import Format, Imported, refuse_pickles, register, require
from monosemantic.interop.folding import AffineSAE, build

PARAMS_FILE, PARAMS_SAFETENSORS = "params.npz", "params.safetensors"
ARRAYS = {"W_enc", "W_dec", "b_enc", "b_dec", "threshold"}


def hook_from_path(path: str) -> str | None:
    """SAELens's rules (get_gemma_2_config_from_hf, get_gemma_3_config_from_hf), applied to the whole path (a hub
    cache keeps the repository's name in it): Gemma Scope's repository ``…-res`` / ``…-mlp`` / ``…-att`` with a
    ``layer_L`` folder; Gemma Scope 2's ``resid_post/`` / ``mlp_out/`` / ``attn_out/`` folders."""
    layer = re.search(r"layer_(\d+)", path)
    if layer is None:
        return None
    if re.search(r"transcoder|clt", path):
        raise InteropError("Gemma Scope transcoders map one activation to another: not a dictionary of one hook")
    if re.search(r"/attn_out/|-att(-|/|$)", path):
        raise InteropError("Gemma Scope attention dictionaries read hook_z per head: a head-indexed hook cannot be represented")
    if re.search(r"/resid_post/|-res(-|/|$)", path):
        return f"blocks.{layer.group(1)}.hook_resid_post"
    if re.search(r"/mlp_out/|-mlp(-|/|$)", path):
        return f"blocks.{layer.group(1)}.hook_mlp_out"
    return None


def _read_arrays(params: Path, what: str) -> dict[str, np.ndarray]:
    try:
        if params.suffix == ".safetensors":
            from safetensors.numpy import load_file

            return load_file(str(params))
        with np.load(params, allow_pickle=False) as data:
            return {key: np.asarray(data[key]) for key in data.files}
    except Exception as exc:  # numpy and safetensors raise their own types for a damaged file
        raise InteropError(f"{what}: {params.name} cannot be read ({type(exc).__name__}: {exc})") from None


@register
class GemmaScopeFormat(Format):
    name = "gemma-scope"

    def read(self, location: Path) -> Imported:
        refuse_pickles(location)
        params = location if location.is_file() else next(
            (location / f for f in (PARAMS_FILE, PARAMS_SAFETENSORS) if (location / f).is_file()), location / PARAMS_FILE)
        what = f"Gemma Scope dictionary {params.parent.name}"
        if not params.is_file():
            raise InteropError(f"{what}: neither {PARAMS_FILE} nor {PARAMS_SAFETENSORS} is there")
        if "embedding" in str(params.parent):
            raise InteropError(f"{what}: embedding dictionaries read hook_embed, which monosemantic does not resolve")
        arrays = {("W_" + key[2:]) if key.startswith("w_") else key: value for key, value in _read_arrays(params, what).items()}
        require("affine_skip_connection" not in arrays, f"{what}: affine_skip_connection: a skip path cannot be represented")
        scaling = arrays.pop("scaling_factor", None)
        require(scaling is None or bool(np.all(scaling == 1)), f"{what}: scaling_factor is not 1: a learned per-feature "
                "decoder scale cannot be represented")
        unknown, missing = sorted(set(arrays) - ARRAYS), sorted(ARRAYS - set(arrays))
        require(not unknown, f"{what}: arrays {', '.join(unknown)} cannot be represented")
        require(not missing, f"{what}: arrays {', '.join(missing)} are missing from {params.name}")
        dtypes = {str(a.dtype) for a in arrays.values()}
        tensors = {k: torch.from_numpy(a.astype(np.float32, copy=False)) for k, a in arrays.items()}
        sae, folded = build(AffineSAE("jumprelu", tensors["W_enc"], tensors["b_enc"], tensors["W_dec"], tensors["b_dec"],
                                      tensors["threshold"]), subtract_b_dec=False)
        stored = dtypes.pop() if len(dtypes) == 1 else "float32"
        return Imported(
            sae=sae, dtype="float32" if folded or stored not in ("float32", "float16") else stored,
            hook=hook_from_path(str(params.parent.resolve())), hook_relative_to_base_model=False, model_name=None,
            source={"format": self.name, "config": {"d_in": sae.cfg.d_in, "d_sae": sae.cfg.d_sae, "dtype": stored},
                    "dtype": stored, "folded": ["b_dec not subtracted before encoding"]},
        )
