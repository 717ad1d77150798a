"""Transcoders (Dunefsky, Chlenski & Nanda 2024) and skip transcoders (Paulo, Shabalin & Belrose 2025): dictionaries
that read one activation (an MLP's input) and reconstruct another (its output), with a TopK, ReLU+L1 or JumpReLU
activation.

``f = σ(x W_enc + b_enc)``, ``ŷ = f W_dec + b_dec`` (+ ``x W_skipᵀ`` for the skip form), with ``W_dec [d_sae, d_out]``,
``b_dec [d_out]`` and ``W_skip [d_out, d_in]``: SAELens's and sparsify's names and orientations. The encoder subtracts
no decoder bias (b_dec is in the output's space; SAELens refuses ``apply_b_dec_to_input`` for transcoders, sparsify
skips it under ``transcode``). Inputs are normalised by ``input_scale`` and targets by their own ``output_scale``
(each E‖·‖ = √width), so the loss is the FVU's numerator in the output's units whatever the two scales are. TopK's
AuxK works on the output's residual, with k_aux = d_out / 2 as sparsify takes it.

Each form is its activation's class with two mixins in front: ``Transcoding`` (paired rows, the two spaces' own
start, no input bias) and ``Skipping`` (the linear path). The TopK ones are sparsify's ``transcode`` (±
``skip_connection``); the ReLU and JumpReLU ones are SAELens's ``transcoder``, ``skip_transcoder``,
``jumprelu_transcoder`` and ``jumprelu_skip_transcoder`` (monosemantic/interop/saelens.py).

The skip path starts at zero, as in both libraries: the transcoder first learns what the features explain, and
W_skip the linear remainder.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from monosemantic.sae import JumpReLUSAE, ReluSAE, SAEConfig, TopKSAE, register


class Transcoding:
    """In front of an activation's class: it reads pairs, starts in two spaces, and its encoder subtracts nothing."""

    reads_pairs = True

    def __init__(self, cfg: SAEConfig, seed: int | None = None) -> None:
        super().__init__(cfg, seed)  # type: ignore[call-arg]
        generator = torch.Generator().manual_seed(seed + 1) if seed is not None else None
        # Decoder rows in random unit directions of the output space and encoder columns in random unit directions of
        # the input space, drawn apart: the two spaces are different activations even when they have one width
        # (the SAE's tied start W_enc = W_decᵀ would pair unrelated directions).
        w_dec = torch.randn(cfg.d_sae, self.d_out, generator=generator)
        self.W_dec = nn.Parameter(w_dec / w_dec.norm(dim=1, keepdim=True))
        w_enc = torch.randn(cfg.d_in, cfg.d_sae, generator=generator)
        self.W_enc = nn.Parameter(w_enc / w_enc.norm(dim=0, keepdim=True))
        self.b_dec = nn.Parameter(torch.zeros(self.d_out))
        self.register_buffer("no_input_bias", torch.zeros(cfg.d_in), persistent=False)

    @property
    def input_bias(self) -> Tensor:
        return self.no_input_bias


class Skipping:
    """In front of a transcoder: the linear path x W_skipᵀ, added to every prediction."""

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if "W_skip" not in cls.tensor_names:  # type: ignore[attr-defined]
            cls.tensor_names = (*cls.tensor_names, "W_skip")  # type: ignore[attr-defined]

    def __init__(self, cfg: SAEConfig, seed: int | None = None) -> None:
        super().__init__(cfg, seed)  # type: ignore[call-arg]
        self.W_skip = nn.Parameter(torch.zeros(self.d_out, cfg.d_in))  # type: ignore[attr-defined]

    def skip(self, x_normalised: Tensor) -> Tensor:
        return x_normalised @ self.W_skip.T.to(x_normalised.dtype)

    def own_shapes(self) -> dict[str, tuple[int, ...]]:
        return {"W_skip": (self.d_out, self.cfg.d_in)}  # type: ignore[attr-defined]


@register("transcoder")
class TopKTranscoder(Transcoding, TopKSAE):
    pass


@register("skip-transcoder")
class SkipTranscoder(Skipping, TopKTranscoder):
    pass


@register("relu-transcoder")
class ReluTranscoder(Transcoding, ReluSAE):
    pass


@register("relu-skip-transcoder")
class ReluSkipTranscoder(Skipping, ReluTranscoder):
    pass


@register("jumprelu-transcoder")
class JumpReLUTranscoder(Transcoding, JumpReLUSAE):
    pass


@register("jumprelu-skip-transcoder")
class JumpReLUSkipTranscoder(Skipping, JumpReLUTranscoder):
    pass
