"""Feature steering: edit an activation so that chosen features are pinned (clamp) or pushed (add).

`add` moves the activation along the feature's decoder direction d = W_dec[i] (in raw units): x' = x + v·d.
`clamp` sets the feature's activation to v while keeping the SAE's error, i.e. x' = x + α·d. The usual form
α = v − f (Templeton et al. 2024) pins the feature exactly only when the encoder reads its own decoder row with
gain 1 (W_enc[:, i]·W_dec[i] = 1) and the feature was already active. We solve for α instead: with several
clamped features C, the pre-activations move by G α, where G[i, j] = W_enc[:, i]·W_dec[j], so α = G⁻¹ (target −
pre), after which every clamped feature's *pre-activation* is exactly the one its activation maps to v (up to
rounding). A clamp to v ≤ 0 only
switches an active feature off (target pre-activation 0) and leaves an inactive one alone.

What re-encoding x' then reports depends on the architecture's activation (tests/test_steering.py checks each):
- ReLU: v itself, for every v > 0: the activation of a positive pre-activation is the pre-activation.
- JumpReLU: v when v is at or above the feature's threshold; below it the feature reads 0 (it has no values
  between 0 and its threshold), though the activation still moved along its direction.
- TopK: v when v is among the token's k largest pre-activations after the edit; otherwise 0 (the feature is not
  selected), and a large v can push the token's weakest selected feature out of its top k.
- Gated: the target is the gate's pre-activation at which the magnitude path gives v (the class's
  ``pre_activation_for``); v when that opens the gate, 0 where it would have to stay shut.
`after` in the result is always the re-encoded value, so a caller sees which case it met.

A transcoder reads at one hook and writes at another: its steering edits the output (``apply_transcoder_steering``).

Direction edits (DirectionEdit) steer along a raw-space direction instead of a feature, as Neuronpedia's steer
methods do: add, orthogonal decomposition, projection cap.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Sequence

import torch
from torch import Tensor

from monosemantic.sae import SparseAutoencoder


@dataclass(frozen=True)
class SteeringSpec:
    feature: int
    mode: str  # "clamp" | "add"
    value: float


@dataclass
class SteeringResult:
    activation: Tensor  # x' [..., d_in]
    before: Tensor  # [..., n_specs] feature activations of x
    after: Tensor  # [..., n_specs] feature activations of x' (re-encoded)
    features_after: Tensor  # [..., d_sae] the full re-encoding of x'


def encode_pre(sae: SparseAutoencoder, x: Tensor) -> Tensor:
    return sae.pre_activations(x * sae.cfg.input_scale)


def features_at(sae: SparseAutoencoder, x: Tensor, ids: Tensor) -> Tensor:
    """The features `ids` of raw activations x [..., d_in] → [..., len(ids)]: from their own encoder columns where the
    activation allows (a full encode is a 75 MB matvec per generated token at 768 x 24,576), else from every
    pre-activation (TopK's k-th largest)."""
    values = sae.activate_at(sae.pre_activations_at(x * sae.cfg.input_scale, ids), ids)
    return values if values is not None else sae.activate(encode_pre(sae, x))[..., ids]


def apply_steering(sae: SparseAutoencoder, x: Tensor, specs: list[SteeringSpec]) -> SteeringResult:
    """x [..., d_in] raw activations → the steered activation and the steered features before/after."""
    ids = torch.tensor([s.feature for s in specs], dtype=torch.long, device=x.device)
    scale = sae.cfg.input_scale
    before = features_at(sae, x, ids)
    directions = sae.W_dec[ids] / scale  # [n, d_in] raw units
    x_new = x.clone()
    adds = [i for i, s in enumerate(specs) if s.mode == "add"]
    clamps = [i for i, s in enumerate(specs) if s.mode == "clamp"]
    if adds:
        amounts = torch.tensor([specs[i].value for i in adds], dtype=x.dtype, device=x.device)
        x_new = x_new + amounts @ directions[adds]
    if clamps:
        clamp_ids = ids[clamps]
        # gains[i, j]: change of clamped feature i's pre-activation per unit of α along clamped direction j.
        gains = sae.W_enc[:, clamp_ids].T @ sae.W_dec[clamp_ids].T  # [c, c]
        pre_now = sae.pre_activations_at(x_new * scale, clamp_ids)  # the clamped columns only, not all d_sae
        values = torch.tensor([specs[i].value for i in clamps], dtype=x.dtype, device=x.device)
        active = before[..., clamps] > 0
        # v > 0: reach pre-activation v. v <= 0: an active feature goes to 0, an inactive one stays put.
        wanted = sae.pre_activation_for(values, clamp_ids)  # v itself but where the activation reshapes it (gated)
        target = torch.where(values > 0, wanted.expand_as(pre_now), torch.where(active, torch.zeros_like(pre_now), pre_now))
        # Δpre = α Gᵀ, so α = Δpre (Gᵀ)⁻¹; pinv keeps a dead feature (gain ≈ 0) from blowing up the solve.
        alpha = (target - pre_now) @ torch.linalg.pinv(gains).T
        x_new = x_new + (alpha @ directions[clamps]).reshape(x_new.shape)
    features_after = sae.activate(encode_pre(sae, x_new))
    return SteeringResult(x_new, before, features_after[..., ids], features_after)


def apply_transcoder_steering(sae: SparseAutoencoder, x: Tensor, y: Tensor, specs: list[SteeringSpec]) -> SteeringResult:
    """A transcoder's steering: it reads x [..., d_in] at its input hook and edits the output y [..., d_out] at its
    output hook (monosemantic/transcoder.py). With d the feature's decoder row in raw units:
    - add moves the output along d: y' = y + v·d;
    - clamp replaces the output by the transcoder's prediction with the feature pinned, y' = ŷ(x) + (v⁺ − f)·d (the
      MLP replaced by the transcoder: the transcoder's error is dropped, so even a clamp to the feature's own value
      changes y to ŷ). With several specs the clamps share the one replacement, and adds apply on top.
    Nothing re-encodes at the input (the edit is downstream of it), so ``after`` is the value the output now
    carries along each feature: v⁺ = max(v, 0) for clamp, f + v for add; ``features_after`` is f with those values."""
    ids = torch.tensor([s.feature for s in specs], dtype=torch.long, device=x.device)
    features = sae.encode(x)
    before = features[..., ids]
    directions = sae.W_dec[ids] / sae.output_scale  # [n, d_out] raw units
    values = torch.tensor([s.value for s in specs], dtype=y.dtype, device=y.device)
    clamp = torch.tensor([s.mode == "clamp" for s in specs], device=y.device)
    after = torch.where(clamp, values.clamp_min(0).expand_as(before), before + values)
    y_new = sae.reconstruct(x, features).to(y.dtype) if bool(clamp.any()) else y.clone()
    y_new = y_new + torch.where(clamp, after - before, values.expand_as(before)) @ directions
    features_after = features.clone()
    features_after[..., ids] = after
    return SteeringResult(y_new, before, after, features_after)


class Steer(NamedTuple):
    """One dictionary's steering entries (its features, at its hook)."""

    sae: SparseAutoencoder
    specs: list[SteeringSpec]


@dataclass
class HookSteering:
    activation: Tensor  # x' after every dictionary's edit at this hook
    before: list[Tensor]  # per Steer: [..., n_specs] its features in x
    after: list[Tensor]  # per Steer: [..., n_specs] its features in the final x'
    features_after: list[Tensor]  # per Steer: [..., d_sae] all its features in the final x' (a reader needs no re-encode)


def steer_at_hook(x: Tensor, steers: Sequence[Steer]) -> HookSteering:
    """Several dictionaries' steering at one hook, applied in order; `before` is read on the activation as it
    arrived and `after` on the one the model runs on (after every edit, so a later dictionary's edit that moves an
    earlier one's feature shows in the earlier one's `after`)."""
    if len(steers) == 1:
        only = apply_steering(steers[0].sae, x, steers[0].specs)
        return HookSteering(only.activation, [only.before], [only.after], [only.features_after])
    before = [steer.sae.encode(x)[..., [s.feature for s in steer.specs]] for steer in steers]
    for steer in steers:
        x = apply_steering(steer.sae, x, steer.specs).activation
    features_after = [steer.sae.encode(x) for steer in steers]
    after = [f[..., [s.feature for s in steer.specs]] for f, steer in zip(features_after, steers)]
    return HookSteering(x, before, after, features_after)


class DirectionEdit(NamedTuple):
    """One edit of the activation along a raw-space direction v [d_in], at every position it runs on."""

    direction: Tensor  # [d_in], raw units
    method: str  # "add" | "orthogonal" | "cap"
    coefficient: float
    normalize: bool = False  # "add" only: make v unit length first


def apply_direction_edits(x: Tensor, edits: Sequence[DirectionEdit]) -> Tensor:
    """x [..., d_in] → x with each edit applied in order (Neuronpedia apps/inference, inference_utils/steering.py,
    and its engine's AddSpec / OrthogonalDecompSpec / ProjectionCapSpec), with v̂ = v/|v|:
    - add: x + c·v (x + c·v̂ with normalize);
    - orthogonal: (I − P)x + c·Px with P = v̂v̂ᵀ, i.e. x + (c − 1)(x·v̂)v̂: the component along v scaled by c;
    - cap: x + (min(x·v̂, c) − x·v̂)v̂: the projection onto v̂ capped above at c.
    A zero direction has no v̂: refused for orthogonal, cap and a normalised add (ValueError)."""
    for edit in edits:
        v = edit.direction.to(device=x.device, dtype=x.dtype)
        if edit.method == "add" and not edit.normalize:
            x = x + edit.coefficient * v
            continue
        norm = v.norm()
        if float(norm) == 0.0:
            raise ValueError(f"a {edit.method} edit along the zero vector: it has no direction")
        unit = v / norm
        if edit.method == "add":
            x = x + edit.coefficient * unit
        elif edit.method == "orthogonal":
            x = x + ((edit.coefficient - 1.0) * (x @ unit))[..., None] * unit
        elif edit.method == "cap":
            along = x @ unit
            x = x + (along.clamp(max=edit.coefficient) - along)[..., None] * unit
        else:
            raise ValueError(f"unknown direction edit {edit.method!r}; expected add, orthogonal or cap")
    return x
