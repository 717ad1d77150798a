"""A dictionary bound to a loaded model: its hook resolved there, its width checked against it, its encoder cast for
serving — the unit every readout, steering, attribution and generation call takes, one or many at a time."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from monosemantic.artifact import Dictionary, load_dictionary
from monosemantic.encoder import FastEncoder
from monosemantic.errors import ArtifactMismatch
from monosemantic.feature_stats import FeatureStatistics
from monosemantic.lm import HookPoint, LoadedLM, hook_dim, resolve_hook
from monosemantic.model import Model
from monosemantic.precision import fastest_dtype
from monosemantic.sae import SparseAutoencoder


def width_mismatch(lm: LoadedLM, hook: HookPoint | str, d_in: int, what: str) -> str | None:
    """The one check that a model's activation at `hook` is `d_in` wide (a one-token forward that stops at the
    hook: call it from the thread that owns the model); the reason when it is not, naming `what` reads it."""
    width = hook_dim(lm, hook)
    if width == d_in:
        return None
    name = hook.name if isinstance(hook, HookPoint) else hook
    return f"the model's activation at {name!r} has width {width}, not the d_in {d_in} of {what}"


def require_width(lm: LoadedLM, hook: HookPoint | str, d_in: int, what: str) -> None:
    if (problem := width_mismatch(lm, hook, d_in, what)) is not None:
        raise ArtifactMismatch(problem)


@dataclass(frozen=True, eq=False)
class BoundDictionary:
    """Immutable once built: a reload builds a new one beside it and swaps the reference."""

    dictionary: Dictionary
    hook: HookPoint
    encoder: FastEncoder
    statistics: FeatureStatistics | None = None  # checked against the layout when bound; None without them
    loaded_at: float = field(default_factory=time.time)
    hook_out: HookPoint | None = None  # a transcoder's: it reads at `hook` and writes (steers, is spliced) here

    @property
    def name(self) -> str:
        return self.dictionary.manifest.name

    @property
    def version(self) -> int:
        return self.dictionary.manifest.version

    @property
    def ref(self) -> str:
        """``name:vN``, as errors and logs show it."""
        return self.dictionary.ref

    @property
    def sae(self) -> SparseAutoencoder:
        return self.dictionary.sae

    @property
    def d_sae(self) -> int:
        return self.dictionary.sae.cfg.d_sae

    @property
    def labels(self) -> list[str]:
        return self.dictionary.labels


def bind(model: Model, dictionary: Dictionary, device: str = "cpu", sae_dtype: str = "float32", check_width: bool = True) -> BoundDictionary:
    """`dictionary` made ready to read `model`: eval mode and float32 for steering and attribution, the readout's
    encoder in `sae_dtype` (``auto``: bfloat16 where this machine runs it faster, monosemantic/precision.py).

    check_width runs a one-token forward: only from the thread that owns the model (a service's worker)."""
    m = dictionary.manifest
    if dictionary.sae.reads_pairs and m.hook_out is None:
        raise ArtifactMismatch(f"transcoder {dictionary.ref} records no output hook (manifest hook_out): it cannot be "
                               "served where it writes")
    hook = resolve_hook(model.lm, m.hook.module_path + ":" + m.hook.kind)
    hook_out = resolve_hook(model.lm, m.hook_out.module_path + ":" + m.hook_out.kind) if m.hook_out is not None else None
    if check_width:
        require_width(model.lm, hook, dictionary.sae.cfg.d_in, f"dictionary {dictionary.ref}")
        if hook_out is not None:
            require_width(model.lm, hook_out, dictionary.sae.d_out, f"the output of transcoder {dictionary.ref}")
    statistics = dictionary.statistics  # a file off the layout is refused here, at load, not on a feature page
    dictionary.sae.eval().requires_grad_(False)
    with torch.no_grad():
        dictionary.sae.float()
    cfg = dictionary.sae.cfg
    dtype = fastest_dtype(cfg.d_in, cfg.d_sae, device) if sae_dtype == "auto" else getattr(torch, sae_dtype)
    return BoundDictionary(dictionary=dictionary, hook=hook, encoder=FastEncoder(dictionary.sae, dtype), statistics=statistics,
                           hook_out=hook_out)


def load_bound(model: Model, registry: Path, name: str, version: int | None, device: str = "cpu", sae_dtype: str = "float32",
               check_width: bool = True) -> BoundDictionary:
    """Load, verify (checksums, the model's weights checksum) and bind one version; refuses one made for another
    model or width."""
    dictionary = load_dictionary(registry, name, version, expected_model_checksum=model.checksum, device=device)
    return bind(model, dictionary, device, sae_dtype, check_width)
