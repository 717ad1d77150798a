"""Exact folds between other tools' encoders and monosemantic's one layout.

monosemantic encodes ``f = σ((s·x − b_dec) W_enc + b_enc)`` and decodes ``x̂ = (f W_dec + b_dec) / s`` with the input
scale ``s`` (monosemantic/sae.py). Every affine difference of another tool is a change of variables that leaves
the pre-activations, and so σ's decisions (which features fire, which k are kept), unchanged:

- no ``b_dec`` subtracted before encoding (SAELens ``apply_b_dec_to_input: false``, Gemma Scope):
  ``x W_enc + b_enc = (x − b_dec) W_enc + (b_enc + b_dec W_enc)``;
- TopK selecting on pre-activations times decoder row norms ``n`` (SAELens ``rescale_acts_by_decoder_norm``) and
  decoding ``(f / n) W_dec``: ``W_enc·n, b_enc·n`` and ``W_dec / n`` give the same f and x̂ with unit decoder rows;
- a gated dictionary's z shifted by δ: its gate's bias takes δ and its magnitude's bias exp(r_mag)·δ (each class's
  ``shift_pre_activations``);
- the input scale, on export: ``(s·x − b_dec) W_enc = (x − b_dec/s)(s·W_enc)`` and ``(f W_dec + b_dec)/s =
  f (W_dec/s) + b_dec/s``, so the exported decoder rows have norm 1/s where monosemantic's are unit.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from monosemantic.errors import InteropError
from monosemantic.sae import SAEConfig, SparseAutoencoder, architecture_class, sae_from_tensors


class AffineSAE(NamedTuple):
    """A dictionary as plain tensors in SAELens orientation (``W_enc [d_in, d_sae]``, ``W_dec [d_sae, d_in]``),
    encoding ``σ((x − b_dec) W_enc + b_enc)`` and decoding ``f W_dec + b_dec`` on raw activations; a transcoder
    encodes ``σ(x W_enc + b_enc)`` and decodes ``f W_dec + b_dec (+ x W_skipᵀ)`` into its own width (``W_dec [d_sae,
    d_out]``, ``W_skip [d_out, d_in]``)."""

    architecture: str  # monosemantic's registered name: relu | topk | jumprelu | gated | a transcoder
    W_enc: Tensor
    b_enc: Tensor
    W_dec: Tensor
    b_dec: Tensor
    threshold: Tensor | None = None
    k: int | None = None
    # The architecture's further tensors, acting on the pre-activations (gated's r_mag, b_mag): the input scale leaves
    # them as they are; a shift of the pre-activations goes through the class's shift_pre_activations. A skip
    # transcoder's W_skip travels here too.
    extra: dict[str, Tensor] | None = None


SHARED = ("W_enc", "b_enc", "W_dec", "b_dec", "threshold")  # AffineSAE's own fields; the rest travel in ``extra``


def build(source: AffineSAE, *, subtract_b_dec: bool = True, selection_scale: Tensor | None = None) -> tuple[SparseAutoencoder, bool]:
    """A monosemantic dictionary that encodes and decodes exactly as ``source`` read with these options; returns it
    and whether any weight was changed by a fold (then only float32 storage keeps it exact).

    The matrices stay float32 (a half source widens exactly); the one product a fold needs, ``b_dec W_enc``, is
    accumulated in float64 a block of columns at a time, so a 2304 × 65536 import holds no float64 copy of W_enc."""
    t = {name: getattr(source, name).detach().to(torch.float32) for name in ("W_enc", "b_enc", "W_dec", "b_dec")}
    arch = architecture_class(source.architecture)
    d_in, d_sae = t["W_enc"].shape
    # A transcoder's decoder writes its own width (W_dec [d_sae, d_out]); a dictionary's, its input's.
    d_out = t["W_dec"].shape[-1] if arch.reads_pairs and t["W_dec"].dim() == 2 else d_in
    for name, shape in (("b_enc", (d_sae,)), ("W_dec", (d_sae, d_out)), ("b_dec", (d_out,))):
        if tuple(t[name].shape) != shape:
            raise InteropError(f"{name} has shape {tuple(t[name].shape)}; with W_enc {tuple(t['W_enc'].shape)} it must be {shape}")
    own = {"W_skip": (d_out, d_in)}  # the one further tensor that is not one value per feature (a skip transcoder's)
    for name, value in (source.extra or {}).items():
        t[name] = value.detach().to(torch.float32)
        if tuple(t[name].shape) != own.get(name, (d_sae,)):
            raise InteropError(f"{name} has shape {tuple(value.shape)}, expected {own.get(name, (d_sae,))}")
    for name, value in t.items():
        if not bool(torch.isfinite(value).all()):
            raise InteropError(f"{name} holds NaN or inf")
    folded = False
    if not subtract_b_dec and not arch.reads_pairs and bool(t["b_dec"].any()):  # a transcoder's encoder subtracts nothing
        arch.shift_pre_activations(t, _times_columns(t["b_dec"], t["W_enc"]))
        folded = True
    if selection_scale is not None:
        n = selection_scale.detach().to(torch.float64)
        if bool((n <= 0).any()):
            raise InteropError(f"W_dec row {int((n <= 0).nonzero()[0])} has zero norm; rescale_acts_by_decoder_norm divides by it")
        n32 = n.float()
        t["W_enc"], t["b_enc"], t["W_dec"] = t["W_enc"] * n32, (t["b_enc"].double() * n).float(), t["W_dec"] / n32[:, None]
        folded = True
    tensors = dict(t)
    if arch.learned_threshold:
        if source.threshold is None:
            raise InteropError(f"a {source.architecture} dictionary needs a threshold")
        threshold = source.threshold.detach().to(torch.float32).reshape(-1)
        if threshold.numel() == 1:
            threshold = threshold.expand(d_sae).clone()  # one threshold for every feature (Llama Scope's form)
        if tuple(threshold.shape) != (d_sae,):
            raise InteropError(f"threshold has shape {tuple(source.threshold.shape)}, expected ({d_sae},)")
        # relu(z)·1{z > θ} (SAELens, Gemma Scope) is z·1{z > max(θ, 0)}: a threshold below 0 acts as 0.
        tensors["threshold"] = threshold.clamp_min(0)
    cfg = SAEConfig.build(architecture=source.architecture, d_in=d_in, d_sae=d_sae, k=source.k,
                          d_out=d_out if arch.reads_pairs else None)
    return sae_from_tensors(cfg, tensors), folded


def _times_columns(v: Tensor, w: Tensor, block: int = 8192) -> Tensor:
    """``v @ w`` in float64, a block of w's columns at a time."""
    return torch.cat([v.double() @ w[:, j:j + block].double() for j in range(0, w.shape[1], block)])


def export_tensors(sae: SparseAutoencoder) -> AffineSAE:
    """``sae`` with its input scale folded in (float32; each element one correctly rounded product): what a tool
    without an input scale encodes and decodes exactly as monosemantic does on raw activations. A transcoder's
    decoder takes its output scale, and its skip path ``(s_in·x) W_skipᵀ / s_out`` becomes ``x (W_skip·s_in/s_out)ᵀ``."""
    s, s_out = float(sae.cfg.input_scale), float(sae.output_scale)
    t = {name: value.detach().float() for name, value in sae.tensors().items()}
    # Under the name of the maths it is served with (BatchTopK as the JumpReLU at its threshold), k only where that takes one.
    architecture = sae.exports_as or sae.cfg.architecture
    k = sae.cfg.k if architecture_class(architecture).takes_k else None
    extra = {name: t[name] for name in t if name not in SHARED} or None
    if s == 1.0 and s_out == 1.0:
        return AffineSAE(architecture, t["W_enc"], t["b_enc"], t["W_dec"], t["b_dec"], t.get("threshold"), k, extra)
    if extra and "W_skip" in extra:
        extra = {**extra, "W_skip": (extra["W_skip"].double() * (s / s_out)).float()}
    return AffineSAE(
        architecture=architecture,
        W_enc=t["W_enc"] * s, b_enc=t["b_enc"], W_dec=t["W_dec"] / s_out, b_dec=t["b_dec"] / s_out,
        threshold=t.get("threshold"), k=k, extra=extra,
    )


def rows_are_unit_norm(W_dec: Tensor, tolerance: float = 1e-5) -> bool:
    return bool(((W_dec.float().norm(dim=1) - 1).abs() <= tolerance).all())


# Hooks whose TransformerLens value moves with center_writing_weights: every write into the residual stream is
# made zero-mean over d_model, so there TL's activation is x − mean(x) where the HF model's is x.
RESIDUAL_WRITES = ("hook_resid_pre", "hook_resid_post", "hook_mlp_out", "hook_attn_out")


def centre_inputs(sae: SparseAutoencoder) -> SparseAutoencoder:
    """``sae`` reading ``x − mean(x)`` from ``x`` (a dictionary trained on a TransformerLens model loaded with
    ``center_writing_weights``, served on the HF model): with P = I − 11ᵀ/d, ``(Px − b_dec) W_enc + b_enc =
    (x − b_dec)(P W_enc) + b_enc − mean(b_dec)·1ᵀW_enc``. The reconstruction is of the centred activation; every
    read of the residual stream goes through a norm that removes the mean, so the model's outputs are unchanged."""
    if sae.cfg.input_scale != 1.0:
        raise InteropError("centring is folded into an imported dictionary, before any input scale")
    if sae.reads_pairs:
        raise InteropError(f"a {sae.cfg.architecture} from a release loaded with center_writing_weights reads centred "
                           "residual activations; monosemantic folds that centring into dictionaries only")
    t = {name: value.detach().float() for name, value in sae.tensors().items()}
    w = t["W_enc"]
    column_sums = w.sum(0, dtype=torch.float64)
    type(sae).shift_pre_activations(t, -t["b_dec"].double().mean() * column_sums)
    t["W_enc"] = w - (column_sums / w.shape[0]).float()
    return sae_from_tensors(sae.cfg, t)
