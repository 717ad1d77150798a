"""Sparse training maths: an SAE's encoder gradient and decoder restricted to each token's support.

A dense SAE training step costs six [batch × d_in × d_sae] matmuls, but once the code is sparse (L0 ≈ 20 of 4,096
latents) only the encoder's forward needs all of them. Every gradient of the loss flows through the *support*: the
(token, latent) pairs where the activation is non-zero, plus, for JumpReLU, the pairs inside the threshold's
pseudo-gradient window. Elsewhere ∂loss/∂pre is exactly zero (ReLU, TopK) or ignored by the estimator, so:

* the decoder is an ``embedding_bag`` over the support (sparsify does the same for TopK);
* ``W_enc``, ``b_enc`` and ``b_dec`` get their gradients from the support's entries alone
  (``support_pre_activations``), instead of two dense matmuls against a mostly-zero [batch, d_sae] gradient.

The results equal the dense autograd path up to float rounding; tests/test_sae.py checks the gradients.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class Support:
    """The (row, latent) pairs a sparse step works on, in row-major order (the decoder's bags are rows)."""

    rows: Tensor  # [nnz] token index, non-decreasing
    cols: Tensor  # [nnz] latent index
    batch: int
    d_sae: int

    @classmethod
    def from_mask(cls, mask: Tensor) -> "Support":
        """The nonzero entries of `mask` [batch, d_sae]: a bool mask, or values whose zeros are the gaps."""
        rows, cols = mask.nonzero(as_tuple=True)
        return cls(rows=rows, cols=cols, batch=mask.shape[0], d_sae=mask.shape[1])

    @classmethod
    def from_indices(cls, indices: Tensor, d_sae: int) -> "Support":
        """Fixed-width support, e.g. TopK's [batch, k] indices."""
        batch, width = indices.shape
        rows = torch.arange(batch, device=indices.device).repeat_interleave(width)
        return cls(rows=rows, cols=indices.reshape(-1), batch=batch, d_sae=d_sae)

    def row_offsets(self) -> Tensor:
        return _exclusive_cumsum(torch.bincount(self.rows, minlength=self.batch))

    def fired(self, values: Tensor) -> Tensor:
        """Latents with a positive value on at least one token (bool [d_sae])."""
        fired = torch.zeros(self.d_sae, dtype=torch.bool, device=self.cols.device)
        fired[self.cols[values > 0]] = True
        return fired


def _exclusive_cumsum(counts: Tensor) -> Tensor:
    return torch.cumsum(counts, 0) - counts


class _SupportPreActivations(torch.autograd.Function):
    """pre[rows, cols] for pre = (x − b_dec)·W_enc + b_enc, already computed densely without autograd; the
    backward builds ∂W_enc, ∂b_enc and ∂b_dec from the nnz incoming gradients alone."""

    @staticmethod
    def forward(ctx, pre: Tensor, centred: Tensor, rows: Tensor, cols: Tensor,  # type: ignore[override]
                W_enc: Tensor, b_enc: Tensor, b_dec: Tensor) -> Tensor:
        ctx.save_for_backward(centred, rows, cols, W_enc)
        return pre[rows, cols].float()

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        centred, rows, cols, W_enc = ctx.saved_tensors
        d_in, d_sae = W_enc.shape
        grad = grad.to(W_enc.dtype)
        grad_b_enc = torch.zeros(d_sae, dtype=W_enc.dtype, device=W_enc.device).index_add_(0, cols, grad)
        # ∂W_enc[:, c] = Σ_{(r,c) in support} g_rc · centred[r]: one bag per latent, so sort the support by latent.
        order = torch.argsort(cols, stable=True)
        offsets = _exclusive_cumsum(torch.bincount(cols, minlength=d_sae))
        grad_W_enc_t = F.embedding_bag(rows[order], centred.to(W_enc.dtype), offsets,
                                       per_sample_weights=grad[order], mode="sum")
        # centred = x − b_dec, so ∂b_dec = −Σ_r ∂pre[r]·W_encᵀ = −W_enc·∂b_enc.
        grad_b_dec = -(W_enc @ grad_b_enc)
        return None, None, None, None, grad_W_enc_t.t().contiguous(), grad_b_enc, grad_b_dec


def support_pre_activations(pre: Tensor, centred: Tensor, support: Support, W_enc: Tensor, b_enc: Tensor,
                            b_dec: Tensor) -> Tensor:
    """The pre-activations on the support [nnz] (fp32), differentiable w.r.t. the encoder and b_dec."""
    return _SupportPreActivations.apply(pre.detach(), centred.detach(), support.rows, support.cols, W_enc, b_enc, b_dec)


def decode_support(values: Tensor, support: Support, W_dec: Tensor) -> Tensor:
    """Σ over each row's support of value · W_dec[latent]: [batch, d_in], without b_dec."""
    return F.embedding_bag(support.cols, W_dec, support.row_offsets(), per_sample_weights=values.to(W_dec.dtype),
                           mode="sum")
