"""Gated SAE (Rajamanoharan et al. 2024, arXiv 2404.16014): which features fire and how strongly, decided apart.

With the encoder's product z = (x − b_dec) W_enc, the gate π_gate = z + b_gate opens a feature and the magnitude
path π_mag = exp(r_mag) ⊙ z + b_mag sizes it: ``f = 1{π_gate > 0} · ReLU(π_mag)`` (the paper's weight tying:
W_mag = exp(r_mag) ⊙ W_gate, so one matrix serves both). The loss (the paper's eq. 8) is the reconstruction's
MSE, λ·‖ReLU(π_gate)‖₁ (unit decoder rows, so no norm weighting) and the auxiliary reconstruction from ReLU(π_gate)
through a frozen copy of the decoder, which is what trains the gate: its Heaviside passes no gradient.

Here the gate's bias is ``b_enc``, so every architecture's pre-activation is what ``W_enc``/``b_enc`` give (the
serving encoder, monosemantic/encoder.py, computes only those) and the magnitude path is recovered from it per
feature, ``exp(r_mag)·(π_gate − b_enc) + b_mag``: the activation acts on each feature alone. SAELens names the gate's
bias ``b_gate`` (monosemantic/interop/saelens.py renames it both ways); its ``GatedTrainingSAE`` computes the same
loss terms but does not freeze the decoder in the auxiliary one. ``r_mag`` and ``b_mag`` are stored beside the four
shared tensors (``tensor_names``, which the base class stores and loads).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from monosemantic.sae import ReluSAE, SAEConfig, register
from monosemantic.support import Support, decode_support


@register("gated")
class GatedSAE(ReluSAE):
    tensor_names = ("W_enc", "b_enc", "W_dec", "b_dec", "r_mag", "b_mag")  # SAELens's, b_enc as its b_gate
    # λ and resampling as ReLU's: the L1 of ReLU(π_gate) has the scale of ReLU's L1 at the start (r_mag = b_mag = 0
    # makes both paths the ReLU's), and the target-L0 controller steers λ from there. Not ReLU's calibrated start:
    # measured with it, on the reference harvest FVU 0.24 at L0 31 for a target of 28 (0.41 at L0 103 without), but
    # on planted data (tests/test_gated.py) L0 1.9 for a target of 4; left for the sample-efficiency work.
    calibrated_start = False

    def __init__(self, cfg: SAEConfig, seed: int | None = None) -> None:
        super().__init__(cfg, seed)
        self.r_mag = nn.Parameter(torch.zeros(cfg.d_sae))
        self.b_mag = nn.Parameter(torch.zeros(cfg.d_sae))

    # ---- the activation: the gate's decision, the magnitude's value ----------------------------
    def _paths(self, dtype: torch.dtype, ids: Tensor | slice = slice(None)) -> tuple[Tensor, Tensor, Tensor]:
        """(b_gate, r_mag, b_mag) of features ``ids`` in ``dtype``: what maps a gate pre-activation to a magnitude."""
        return tuple(p[ids].to(dtype) for p in (self.b_enc, self.r_mag, self.b_mag))  # type: ignore[return-value]

    def _gated(self, pre: Tensor, ids: Tensor | slice = slice(None)) -> Tensor:
        b_gate, r_mag, b_mag = self._paths(pre.dtype, ids)
        magnitude = F.relu((pre - b_gate) * r_mag.exp() + b_mag)
        return magnitude.masked_fill(pre <= 0, 0)

    def activate(self, pre: Tensor) -> Tensor:
        return self._gated(pre)

    def activate_(self, pre: Tensor) -> Tensor:
        closed = pre <= 0
        b_gate, r_mag, b_mag = self._paths(pre.dtype)
        return pre.sub_(b_gate).mul_(r_mag.exp()).add_(b_mag).relu_().masked_fill_(closed, 0)

    def activate_at(self, pre_at: Tensor, ids: Tensor) -> Tensor:
        return self._gated(pre_at, ids)

    def pre_activation_for(self, values: Tensor, ids: Tensor) -> Tensor:
        """The gate's pre-activation whose magnitude is ``values``: π_gate = b_gate + (v − b_mag)·exp(−r_mag)."""
        b_gate, r_mag, b_mag = (p.detach() for p in self._paths(values.dtype, ids))
        return b_gate + (values - b_mag) * (-r_mag).exp()

    def sparsity_penalty(self, pre: Tensor, features: Tensor) -> Tensor:
        return F.relu(pre).sum(-1, dtype=torch.float32).mean()

    # ---- the auxiliary reconstruction through the gate, the decoder frozen ---------------------
    def _via_gate(self, x_n: Tensor, decoded: Tensor) -> Tensor:
        return (x_n - (decoded + self.b_dec.detach()).float()).pow(2).sum(-1).mean()

    def extra_loss_dense(self, pre: Tensor, features: Tensor, x_n: Tensor) -> Tensor:
        if not self.training:
            return torch.zeros((), device=pre.device)
        return self._via_gate(x_n, F.relu(pre) @ self.W_dec.detach())

    def activate_support(self, pre_values: Tensor, support: Support) -> Tensor:
        return self._gated(pre_values, support.cols)

    def support_sparsity(self, pre_values: Tensor, values: Tensor, support: Support) -> Tensor:
        return F.relu(pre_values).sum() / support.batch

    def extra_loss_support(self, pre_values: Tensor, values: Tensor, support: Support, x_n: Tensor) -> Tensor:
        if not self.training:
            return torch.zeros((), device=values.device)
        # The support is π_gate > 0: it holds every gate value that is not 0.
        return self._via_gate(x_n, decode_support(F.relu(pre_values), support, self.W_dec.detach()))

    # ---- training bookkeeping --------------------------------------------------------------------
    @torch.no_grad()
    def revive(self, dead: Tensor) -> list[tuple[nn.Parameter, tuple]]:
        """A resampled latent's magnitude path starts as its gate's again (r_mag = b_mag = 0)."""
        self.r_mag[dead] = 0.0
        self.b_mag[dead] = 0.0
        return [(self.r_mag, (dead,)), (self.b_mag, (dead,))]

    @staticmethod
    def shift_pre_activations(tensors: dict[str, Tensor], delta: Tensor) -> None:
        """z gains δ in a change of variables (monosemantic/interop/folding.py): the gate's bias takes it, and the
        magnitude path exp(r_mag)·δ (SAELens's fold_activation_whitening shifts b_mag so too)."""
        tensors["b_enc"] = (tensors["b_enc"].double() + delta).float()
        tensors["b_mag"] = (tensors["b_mag"].double() + tensors["r_mag"].double().exp() * delta).float()
