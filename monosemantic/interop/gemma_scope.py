"""Gemma Scope releases (Google DeepMind 2024): one ``params.npz`` per dictionary, JumpReLU, read only.

The arrays are ``W_enc [d_in, d_sae]``, ``W_dec [d_sae, d_in]``, ``b_enc``, ``b_dec`` and ``threshold`` (Gemma Scope 2
spells the weights ``w_enc``/``w_dec``); the encoder does not subtract ``b_dec`` (folded into ``b_enc``,
monosemantic/interop/folding.py) and fires where ``z > threshold``, as the release's reference code and SAELens's
loader do. The hook is read from the release's path, as SAELens does: ``…-res`` → ``blocks.L.hook_resid_post``,
``…-mlp`` → ``blocks.L.hook_mlp_out``; attention releases read ``hook_z`` per head and are refused. ``numpy.load``
runs with ``allow_pickle=False``: an object array is refused, never unpickled.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

from monosemantic.errors import InteropError
from monosemantic.interop import Format, Imported, refuse_pickles, register, require
from monosemantic.interop.folding import AffineSAE, build

PARAMS_FILE = "params.npz"
ARRAYS = {"W_enc", "W_dec", "b_enc", "b_dec", "threshold"}


def hook_from_path(path: str) -> str | None:
    """SAELens's rule for Gemma Scope 2B/9B/27B repositories (repo ``…-res`` / ``…-mlp`` / ``…-att``, folder
    ``layer_L/width_…``), applied to the whole path (a hub cache keeps the repository in it)."""
    layer = re.search(r"layer_(\d+)", path)
    if layer is None:
        return None
    if re.search(r"-att(-|/|$)|-att-", path):
        raise InteropError("Gemma Scope attention dictionaries read hook_z per head: a head-indexed hook cannot be represented")
    if re.search(r"-res(-|/|$)", path):
        return f"blocks.{layer.group(1)}.hook_resid_post"
    if re.search(r"-mlp(-|/|$)", path):
        return f"blocks.{layer.group(1)}.hook_mlp_out"
    return None


@register
class GemmaScopeFormat(Format):
    name = "gemma-scope"

    def read(self, location: Path) -> Imported:
        refuse_pickles(location)
        params = location if location.is_file() else location / PARAMS_FILE
        what = f"Gemma Scope dictionary {params.parent.name}"
        if not params.is_file():
            raise InteropError(f"{what}: {PARAMS_FILE} is missing")
        if "embedding" in str(params.parent):
            raise InteropError(f"{what}: embedding dictionaries read hook_embed, which monosemantic does not resolve")
        try:
            with np.load(params, allow_pickle=False) as data:
                arrays = {("W_" + key[2:]) if key.startswith("w_") else key: np.asarray(data[key]) for key in data.files}
        except (OSError, ValueError) as exc:
            raise InteropError(f"{what}: {PARAMS_FILE} cannot be read ({exc})") from None
        scaling = arrays.pop("scaling_factor", None)
        require(scaling is None or bool(np.all(scaling == 1)), f"{what}: scaling_factor is not 1: a learned per-feature "
                "decoder scale cannot be represented")
        unknown, missing = sorted(set(arrays) - ARRAYS), sorted(ARRAYS - set(arrays))
        require(not unknown, f"{what}: arrays {', '.join(unknown)} cannot be represented")
        require(not missing, f"{what}: arrays {', '.join(missing)} are missing from {PARAMS_FILE}")
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
