"""Matryoshka BatchTopK (Bussmann, Nabeshima, Karvonen & Nanda 2025, arXiv 2503.17547): BatchTopK whose nested
prefixes of the dictionary each reconstruct the input, so early latents stay general and absorb less.

With widths w_1 < … < w_M = d_sae (``SAEConfig.matryoshka_widths``) the loss is Σ_m ‖x − (f[:, :w_m] W_dec[:w_m] +
b_dec)‖², the full reconstruction once among them, as SAELens's ``MatryoshkaBatchTopKTrainingSAE`` sums its inner
losses onto the outer one. The outer term stays the step's ``mse`` (the trainer's FVU, its divergence check); the
inner ones travel in ``aux`` beside AuxK. Selection, threshold, serving (the JumpReLU at one shared threshold) and
export (SAELens ``jumprelu``, as SAELens saves it) are BatchTopK's; the manifest records the widths (SAEConfig), so
a prefix of the served dictionary is itself a dictionary of that width.
"""

from __future__ import annotations

import torch
from torch import Tensor

from monosemantic.batchtopk import BatchTopKSAE
from monosemantic.sae import SAEOutput, register
from monosemantic.support import Support, decode_support


@register("matryoshka")
class MatryoshkaSAE(BatchTopKSAE):
    nested_prefixes = True

    def inner_widths(self) -> tuple[int, ...]:
        """The prefixes short of the whole dictionary, whose reconstructions are the extra loss terms."""
        return tuple(self.cfg.matryoshka_widths or ())[:-1]

    def forward(self, x: Tensor, dead_mask: Tensor | None = None) -> SAEOutput:
        out = super().forward(x, dead_mask)
        if self.training:
            x_n = (x * self.cfg.input_scale).float()
            decoded, start, inner = self.b_dec, 0, torch.zeros((), device=x.device)
            for width in self.inner_widths():  # each prefix: the previous one plus its own block of rows
                decoded = decoded + out.features[:, start:width] @ self.W_dec[start:width]
                inner = inner + (x_n - decoded.float()).pow(2).sum(-1).mean()
                start = width
            out.aux = out.aux + inner
        return out

    def extra_loss_support(self, pre_values: Tensor, values: Tensor, support: Support, x_n: Tensor) -> Tensor:
        """The inner terms over the support: its entries split by prefix block, each block decoded once and the
        prefixes summed up block by block (the same entries as one full decode in all)."""
        inner = torch.zeros((), device=values.device)
        widths = self.inner_widths()
        if not self.training or not widths:
            return inner
        block = torch.bucketize(support.cols, torch.tensor(widths, device=support.cols.device), right=True)
        decoded = self.b_dec
        for index in range(len(widths)):
            mine = block == index
            part = Support(rows=support.rows[mine], cols=support.cols[mine], batch=support.batch, d_sae=support.d_sae)
            decoded = decoded + decode_support(values[mine], part, self.W_dec)
            inner = inner + (x_n - decoded.float()).pow(2).sum(-1).mean()
        return inner
