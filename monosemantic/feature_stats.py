"""The layout of ``features.safetensors``, a dictionary version's per-feature statistics, defined once: every tensor's
name, shape, dtype and meaning, which are required, and the typed object it is written from and read back as.

Two writers fill it: training (trainer/evaluate.py: density, mean and max activation on the held-out rows) and the
dashboard statistics (trainer/features.py: everything below, the logit effects where the model's direct path is
readable). Readers (the artifact's ``Dictionary.statistics``, the service's feature pages) go through
``FeatureStatistics.from_tensors``, which checks every name, shape and dtype kind and says which tensor is wrong.

Shapes are written in named dimensions, bound from the file itself and checked for agreement across tensors:

==========  ======================================================================================================
d_sae       features of the dictionary
top_k       top activating examples kept per feature (FeatureStatsConfig.top_k)
samples     examples sampled across activation intervals per feature (quantile_bins × per_quantile)
window      tokens in each example's window (window_before + 1 + window_after), centred on the example's token
bins        activation histogram bins (log-spaced); ``bins+1`` edges
logit_k     tokens kept for each direction of the direct logit effect (FeatureStatsConfig.logit_k)
neighbours  nearest features kept by decoder cosine (FeatureStatsConfig.neighbours)
==========  ======================================================================================================
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch
from torch import Tensor

from monosemantic.errors import ArtifactError

FLOAT, INTEGER = "float", "integer"


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of features.safetensors."""

    name: str
    shape: tuple[str, ...]  # named dimensions (see the module docstring); "bins+1" is one more than bins
    dtype: str  # as the writers store it
    kind: str  # FLOAT or INTEGER: what a reader accepts (any dtype of that kind)
    meaning: str
    required: bool = False  # every features file holds it (both writers write it)
    group: str | None = None  # tensors of one group are present together or not at all

    def describe_shape(self, sizes: Mapping[str, int]) -> str:
        """The shape with the sizes known so far, e.g. ``[d_sae=4096, top_k=10, window]``."""
        def one(dim: str) -> str:
            size = _size(dim, sizes)
            return dim if size is None or dim.isdigit() else f"{dim}={size}"

        return "[" + ", ".join(one(dim) for dim in self.shape) + "]"


LAYOUT: tuple[TensorSpec, ...] = (
    TensorSpec("density", ("d_sae",), "float32", FLOAT,
               "share of the tokens counted (BOS excluded) on which the feature fires", required=True),
    TensorSpec("mean_activation", ("d_sae",), "float32", FLOAT,
               "mean activation over the tokens on which it fires (0 for a dead feature)", required=True),
    TensorSpec("max_activation", ("d_sae",), "float32", FLOAT,
               "largest activation seen (0 for a dead feature)", required=True),
    TensorSpec("histogram_counts", ("d_sae", "bins"), "int32", INTEGER,
               "count of firing tokens per log10-activation bin", group="histogram"),
    TensorSpec("histogram_log10_edges", ("bins+1",), "float32", FLOAT,
               "the bins' log10(activation) edges; the first and last bins also catch everything beyond them",
               group="histogram"),
    TensorSpec("top_values", ("d_sae", "top_k"), "float32", FLOAT,
               "activation of each top example, descending; 0 marks an empty slot (the feature fired on fewer tokens)",
               group="top"),
    TensorSpec("top_tokens", ("d_sae", "top_k", "window"), "int16 or int32", INTEGER,
               "token ids of each top example's window (int16 when the vocabulary fits); -1 outside its context",
               group="top"),
    TensorSpec("top_acts", ("d_sae", "top_k", "window"), "float16", FLOAT,
               "the feature's activation at each token of the top example's window", group="top"),
    TensorSpec("window_offsets", ("window",), "int32", INTEGER,
               "each window position's offset from the example's token: -window_before … window_after", group="top"),
    TensorSpec("quantile_values", ("d_sae", "samples"), "float32", FLOAT,
               "activation of each sampled example; 0 marks an empty slot", group="quantiles"),
    TensorSpec("quantile_bins", ("samples",), "int32", INTEGER,
               "the activation interval (a fraction of the feature's max, 0 lowest) each sample slot belongs to",
               group="quantiles"),
    TensorSpec("quantile_tokens", ("d_sae", "samples", "window"), "int16 or int32", INTEGER,
               "token ids of each sampled example's window; -1 outside its context", group="quantiles"),
    TensorSpec("quantile_acts", ("d_sae", "samples", "window"), "float16", FLOAT,
               "the feature's activation at each token of the sampled example's window", group="quantiles"),
    TensorSpec("logit_up_ids", ("d_sae", "logit_k"), "int32", INTEGER,
               "tokens whose logits the feature's decoder direction raises most through the direct path", group="logit_up"),
    TensorSpec("logit_up_values", ("d_sae", "logit_k"), "float32", FLOAT,
               "those direct logit effects, descending", group="logit_up"),
    TensorSpec("logit_down_ids", ("d_sae", "logit_k"), "int32", INTEGER,
               "tokens whose logits it lowers most", group="logit_down"),
    TensorSpec("logit_down_values", ("d_sae", "logit_k"), "float32", FLOAT,
               "those direct logit effects (negative), ascending", group="logit_down"),
    TensorSpec("neighbour_ids", ("d_sae", "neighbours"), "int32", INTEGER,
               "the features whose decoder directions are closest in cosine (the feature itself excluded)",
               group="neighbours"),
    TensorSpec("neighbour_cosines", ("d_sae", "neighbours"), "float32", FLOAT,
               "those cosines, descending", group="neighbours"),
    TensorSpec("stats_tokens", ("1",), "int64", INTEGER,
               "tokens the dashboard statistics were computed over (BOS excluded)", group="stats_tokens"),
)
SPECS: dict[str, TensorSpec] = {spec.name: spec for spec in LAYOUT}
REQUIRED: tuple[str, ...] = tuple(spec.name for spec in LAYOUT if spec.required)
# What a feature page cannot be drawn without (the other sections are shown empty when their tensors are absent).
REQUIRED_FOR_PAGES: tuple[str, ...] = ("density", "max_activation", "top_tokens", "top_acts", "top_values", "window_offsets")
FILE_NAME = "features.safetensors"  # artifact.FEATURES_FILE, named here for messages (artifact imports this module)


def _size(dim: str, sizes: Mapping[str, int]) -> int | None:
    if dim.isdigit():
        return int(dim)
    base, plus, extra = dim.partition("+")
    return None if base not in sizes else sizes[base] + (int(extra) if plus else 0)


def missing_for_pages(tensors: Mapping[str, Tensor]) -> list[str]:
    """The tensors a feature page needs that ``tensors`` lacks (empty: pages can be drawn)."""
    return [name for name in REQUIRED_FOR_PAGES if name not in tensors]


def check_layout(tensors: Mapping[str, Tensor], d_sae: int | None = None, where: str = FILE_NAME) -> dict[str, int]:
    """Check ``tensors`` against the layout: required tensors and whole groups present, every known tensor of the
    right dtype kind and of a shape agreeing with the others (and with ``d_sae`` when given). Returns the sizes of
    the named dimensions; raises ArtifactError naming the first tensor that is missing or wrong."""
    for name in REQUIRED:
        if name not in tensors:
            raise ArtifactError(f"{where}: tensor {name} is missing (every features file holds {', '.join(REQUIRED)})")
    for group in {spec.group for spec in LAYOUT if spec.group}:
        members = [spec.name for spec in LAYOUT if spec.group == group]
        present = [name for name in members if name in tensors]
        if present and len(present) < len(members):
            absent = [name for name in members if name not in tensors]
            raise ArtifactError(f"{where}: tensor {absent[0]} is missing ({', '.join(present)} "
                                f"{'is' if len(present) == 1 else 'are'} present, and {', '.join(members)} go together)")
    sizes: dict[str, int] = {} if d_sae is None else {"d_sae": int(d_sae)}
    for spec in LAYOUT:
        if spec.name not in tensors:
            continue
        tensor = tensors[spec.name]
        if not isinstance(tensor, Tensor):
            raise ArtifactError(f"{where}: {spec.name} is a {type(tensor).__name__}, not a tensor")
        kind = FLOAT if tensor.is_floating_point() else INTEGER if not tensor.is_complex() and tensor.dtype != torch.bool else "other"
        if kind != spec.kind:
            raise ArtifactError(f"{where}: tensor {spec.name} has dtype {str(tensor.dtype).removeprefix('torch.')}, "
                                f"expected {spec.kind} ({spec.dtype}): {spec.meaning}")
        shape = tuple(tensor.shape)
        if len(shape) != len(spec.shape):
            raise ArtifactError(f"{where}: tensor {spec.name} has shape {list(shape)}, expected "
                                f"{spec.describe_shape(sizes)} ({spec.meaning})")
        for dim, size in zip(spec.shape, shape):
            expected = _size(dim, sizes)
            if expected is None:
                base, plus, extra = dim.partition("+")
                sizes[base] = size - (int(extra) if plus else 0)
            elif size != expected:
                raise ArtifactError(f"{where}: tensor {spec.name} has shape {list(shape)}, expected "
                                    f"{spec.describe_shape(sizes)} ({spec.meaning})")
    return sizes


@dataclass(frozen=True, eq=False)
class FeatureStatistics:
    """A features.safetensors as a typed object: one attribute per tensor of ``LAYOUT``, None where the file has
    none. Constructing one checks the layout (``check_layout``), so a value of this type is always well formed."""

    density: Tensor
    mean_activation: Tensor
    max_activation: Tensor
    histogram_counts: Tensor | None = None
    histogram_log10_edges: Tensor | None = None
    top_values: Tensor | None = None
    top_tokens: Tensor | None = None
    top_acts: Tensor | None = None
    window_offsets: Tensor | None = None
    quantile_values: Tensor | None = None
    quantile_bins: Tensor | None = None
    quantile_tokens: Tensor | None = None
    quantile_acts: Tensor | None = None
    logit_up_ids: Tensor | None = None
    logit_up_values: Tensor | None = None
    logit_down_ids: Tensor | None = None
    logit_down_values: Tensor | None = None
    neighbour_ids: Tensor | None = None
    neighbour_cosines: Tensor | None = None
    stats_tokens: Tensor | None = None
    extra: dict[str, Tensor] = dataclasses.field(default_factory=dict)  # tensors not in LAYOUT, kept as they came
    where: str = dataclasses.field(default=FILE_NAME, compare=False)  # how messages name the file

    def __post_init__(self) -> None:
        object.__setattr__(self, "_sizes", check_layout(self._known(), where=self.where))

    # ---- reading ---------------------------------------------------------------------------------------
    @classmethod
    def from_tensors(cls, tensors: Mapping[str, Tensor], *, d_sae: int | None = None,
                     where: str = FILE_NAME) -> "FeatureStatistics":
        """The typed statistics from a loaded file's tensors (``Dictionary.features``); ArtifactError naming the
        tensor that is missing or misshapen. ``d_sae``, when given, must be the features' count."""
        check_layout(tensors, d_sae=d_sae, where=where)
        known = {name: tensors[name] for name in SPECS if name in tensors}
        return cls(**known, extra={k: v for k, v in tensors.items() if k not in SPECS}, where=where)

    @classmethod
    def from_file(cls, path: Path, *, d_sae: int | None = None) -> "FeatureStatistics":
        """Read and check a features.safetensors file."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            tensors = load_file(str(path))
        except (OSError, SafetensorError) as exc:
            raise ArtifactError(f"{path}: cannot read feature statistics ({exc})") from None
        return cls.from_tensors(tensors, d_sae=d_sae, where=str(path))

    # ---- writing ---------------------------------------------------------------------------------------
    def to_tensors(self) -> dict[str, Tensor]:
        """The tensors to store (``artifact.publish(features=…)``), in layout order, contiguous, on the CPU."""
        out = {name: tensor.detach().cpu().contiguous() for name, tensor in self._known().items()}
        out.update({name: tensor.detach().cpu().contiguous() for name, tensor in self.extra.items()})
        return out

    # ---- what readers ask ------------------------------------------------------------------------------
    def _known(self) -> dict[str, Tensor]:
        return {name: value for name in SPECS if (value := getattr(self, name)) is not None}

    def __contains__(self, name: str) -> bool:
        return getattr(self, name, None) is not None if name in SPECS else name in self.extra

    @property
    def sizes(self) -> dict[str, int]:
        """The named dimensions' sizes in this file: d_sae, top_k, window, samples, bins, logit_k, neighbours."""
        return dict(self._sizes)  # type: ignore[attr-defined]

    @property
    def d_sae(self) -> int:
        return int(self.density.shape[0])

    @property
    def has_pages(self) -> bool:
        """Whether it holds everything a feature page needs (``REQUIRED_FOR_PAGES``)."""
        return all(name in self for name in REQUIRED_FOR_PAGES)

    @property
    def centre(self) -> int | None:
        """The window index of each example's own token (the number of negative offsets); None without windows."""
        return None if self.window_offsets is None else int((self.window_offsets < 0).sum())

    @property
    def tokens(self) -> int | None:
        """Tokens the dashboard statistics were computed over; None where the file does not say."""
        return None if self.stats_tokens is None else int(self.stats_tokens[0])
