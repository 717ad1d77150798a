"""Sparse training maths: an SAE's encoder gradient and decoder restricted to each token's support.

A dense SAE training step costs six [batch × d_in × d_sae] matmuls, but once the code is sparse (L0 ≈ 20 of 4,096
latents) only the encoder's forward needs all of them. Every gradient of the loss flows through the *support*: the
(token, latent) pairs where the activation is non-zero, plus, for JumpReLU, the pairs inside the threshold's
pseudo-gradient window. Elsewhere ∂loss/∂pre is exactly zero (ReLU, TopK) or ignored by the estimator, so:

* the decoder is an ``embedding_bag`` over the support (sparsify does the same for TopK);
* ``W_enc``, ``b_enc`` and ``b_dec`` get their gradients from the support's entries alone
  (``support_pre_activations``), instead of two dense matmuls against a mostly-zero [batch, d_sae] gradient;
* the one dense matmul left, the pre-activations, runs in reused buffers with the bias folded in
  (``DenseEncoder``).

The results equal the dense autograd path up to float rounding; tests/test_sae.py checks the gradients.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

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
    _by_latent: tuple[Tensor, Tensor, Tensor] | None = field(default=None, repr=False)

    @classmethod
    def from_mask(cls, mask: Tensor) -> "Support":
        """The nonzero entries of `mask` [batch, d_sae]: a bool mask, or values whose zeros are the gaps."""
        rows, cols = mask.nonzero(as_tuple=True)
        return cls(rows=rows, cols=cols, batch=mask.shape[0], d_sae=mask.shape[1])

    @classmethod
    def from_values(cls, values: Tensor) -> "Support":
        """The nonzero entries of a dense float matrix [batch, d_sae] (−0.0 counts as zero and NaN as nonzero, as
        for torch.nonzero), in the same order as nonzero gives them.

        On CPU, nonzero tests one element at a time: for the server's readout (960 tokens × 4,096 bf16 features at L0
        ~30) it took 8.6 ms, as long as the encoder's matmul. Read as 64-bit words instead, the scan visits a quarter
        of the elements (bf16) and leaves only the ~3% of words holding an active feature, whose lanes are then
        tested bit by bit with the sign masked off: 4.6 ms (measured here)."""
        size = values.element_size()
        if (values.device.type != "cpu" or values.dim() != 2 or not values.is_floating_point() or not values.is_contiguous()
                or (values.shape[1] * size) % 8 or sys.byteorder != "little"):
            return cls.from_mask(values)
        lanes, bits = 8 // size, 8 * size
        words = values.view(torch.int64)  # [batch, d_sae / lanes]; lane j of a word is feature lanes·w + j
        word_rows, word_cols = words.nonzero(as_tuple=True)  # a word with any bit set: a candidate
        shifts = torch.arange(lanes, dtype=torch.int64) * bits
        magnitude = (1 << (bits - 1)) - 1  # every bit but the sign: −0.0 is zero
        keep = ((words[word_rows, word_cols].unsqueeze(1) >> shifts) & magnitude) != 0  # [candidates, lanes]
        lane = keep.view(-1).nonzero().squeeze(1)
        word = lane // lanes
        return cls(rows=word_rows[word], cols=word_cols[word] * lanes + lane % lanes, batch=values.shape[0], d_sae=values.shape[1])

    @classmethod
    def from_flat(cls, positions: Tensor, batch: int, d_sae: int) -> "Support":
        """Entries given by their positions in the flattened [batch, d_sae] matrix, in any order (BatchTopK's
        selection across a batch): sorted, a few hundred thousand integers, instead of a dense mask to scan."""
        ordered = positions.sort().values
        return cls(rows=ordered // d_sae, cols=ordered % d_sae, batch=batch, d_sae=d_sae)

    @classmethod
    def from_indices(cls, indices: Tensor, d_sae: int) -> "Support":
        """Fixed-width support, e.g. TopK's [batch, k] indices."""
        batch, width = indices.shape
        rows = torch.arange(batch, device=indices.device).repeat_interleave(width)
        return cls(rows=rows, cols=indices.reshape(-1), batch=batch, d_sae=d_sae)

    def row_offsets(self) -> Tensor:
        return _exclusive_cumsum(torch.bincount(self.rows, minlength=self.batch))

    def by_latent(self) -> tuple[Tensor, Tensor, Tensor]:
        """(order, rows in that order, bag offsets) with the entries grouped by latent: both weight gradients,
        ∂W_enc[:, c] and ∂W_dec[c], are one bag per latent. Sorted once per step, shared by the two backwards."""
        if self._by_latent is None:
            order = torch.argsort(self.cols, stable=True)
            self._by_latent = (order, self.rows[order],
                               _exclusive_cumsum(torch.bincount(self.cols, minlength=self.d_sae)))
        return self._by_latent

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
    def forward(ctx, pre: Tensor, centred: Tensor, support: Support,  # type: ignore[override]
                W_enc: Tensor, b_enc: Tensor, b_dec: Tensor) -> Tensor:
        ctx.save_for_backward(centred, W_enc)
        ctx.support = support
        return pre[support.rows, support.cols].float()

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        centred, W_enc = ctx.saved_tensors
        support: Support = ctx.support
        grad = grad.to(W_enc.dtype)
        grad_b_enc = torch.zeros(support.d_sae, dtype=W_enc.dtype, device=W_enc.device).index_add_(0, support.cols, grad)
        # ∂W_enc[:, c] = Σ_{(r,c) in support} g_rc · centred[r]: one bag per latent.
        order, rows, offsets = support.by_latent()
        grad_W_enc_t = F.embedding_bag(rows, centred.to(W_enc.dtype), offsets, per_sample_weights=grad[order], mode="sum")
        # centred = x − b_dec, so ∂b_dec = −Σ_r ∂pre[r]·W_encᵀ = −W_enc·∂b_enc.
        grad_b_dec = -(W_enc @ grad_b_enc)
        # Fused Adam needs the gradient in W_enc's contiguous layout, so storing W_enc by latent would only move
        # this transpose into the optimizer.
        return None, None, None, transposed(grad_W_enc_t), grad_b_enc, grad_b_dec


def transposed(matrix: Tensor, block: int = 96) -> Tensor:
    """``matrix.t().contiguous()``, copied a band of ``block`` source rows at a time. One strided copy of a
    [16,384, 768] fp32 matrix took 33 ms here (every write a cache miss a row apart); in bands of 96 rows each band's
    writes stay within cache lines still held, 9 ms (2304 × 16,384: 92 → 31 ms). Small matrices are copied whole:
    at 4,096 × 128 the loop's overhead is the larger cost (0.49 against 0.65 ms)."""
    rows = matrix.shape[0]
    if matrix.numel() < (1 << 22) or rows <= block:
        return matrix.t().contiguous()
    out = torch.empty((matrix.shape[1], rows), dtype=matrix.dtype, device=matrix.device)
    for start in range(0, rows, block):
        out[:, start:start + block].copy_(matrix[start:start + block].t())
    return out


class DenseEncoder:
    """The support step's dense pre-activations (x − b_dec)·W_enc + b_enc, without autograd, in reused buffers.

    At 4,096 tokens × 24,576 latents a fresh [batch, d_sae] result is 200 MB of new pages each step, and addmm's bias
    is first broadcast into it (a full write before the matmul): profiled at 768 → 24,576, the broadcast alone was 60
    ms a step beside the matmul's 200. Here the bias is a row of the weight, against a column of ones in the input,
    so one matmul writes the result once into the buffer the last step used. The weights are re-cast into the
    buffer each call (they change every step); the inner dimension is padded to a multiple of 32 with zeros (bf16
    matrix tiles), which adds nothing to the products.

    The result is valid until the next call: the support step reads it within its own forward.
    """

    PAD = 32

    def __init__(self) -> None:
        self._weight: Tensor | None = None
        self._rows: Tensor | None = None
        self._out: Tensor | None = None

    def __call__(self, centred: Tensor, W_enc: Tensor, b_enc: Tensor, dtype: torch.dtype) -> Tensor:
        n, d_in = centred.shape
        d_sae = W_enc.shape[1]
        inner = -(-(d_in + 1) // self.PAD) * self.PAD
        weight, _ = self._buffer("_weight", (inner, d_sae), dtype, W_enc.device)  # rows past d_in + 1 stay zero
        weight[:d_in].copy_(W_enc)
        weight[d_in].copy_(b_enc)
        rows, fresh = self._buffer("_rows", (n, inner), dtype, centred.device)
        if fresh:
            rows[:, d_in].fill_(1)
        rows[:, :d_in].copy_(centred)
        out, _ = self._buffer("_out", (n, d_sae), dtype, centred.device)
        return torch.mm(rows, weight, out=out)

    def _buffer(self, name: str, shape: tuple[int, int], dtype: torch.dtype, device: torch.device) -> tuple[Tensor, bool]:
        """The named buffer, and whether it was just made (zeros) for a new shape, dtype or device."""
        buffer = getattr(self, name)
        if buffer is not None and buffer.shape == shape and buffer.dtype == dtype and buffer.device == device:
            return buffer, False
        buffer = torch.zeros(shape, dtype=dtype, device=device)
        setattr(self, name, buffer)
        return buffer, True


def support_pre_activations(pre: Tensor, centred: Tensor, support: Support, W_enc: Tensor, b_enc: Tensor,
                            b_dec: Tensor) -> Tensor:
    """The pre-activations on the support [nnz] (fp32), differentiable w.r.t. the encoder and b_dec."""
    return _SupportPreActivations.apply(pre.detach(), centred.detach(), support, W_enc, b_enc, b_dec)


class _DecoderWeightGradient(torch.autograd.Function):
    """The identity on the decoder's output, whose backward gives ∂W_dec[c] = Σ_{(r,c) in support} v_rc · ∂out[r]
    as one bag per latent (the support's shared latent order). torch's own embedding_bag weight backward scatters
    entry by entry into a zeroed [d_sae, d_in] gradient: ~55 ms a step at 768 → 24,576 against ~40 for the bag."""

    @staticmethod
    def forward(ctx, out: Tensor, W_dec: Tensor, values: Tensor, support: Support) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(values)
        ctx.support = support
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        (values,) = ctx.saved_tensors
        order, rows, offsets = ctx.support.by_latent()
        grad_W_dec = F.embedding_bag(rows, grad, offsets, per_sample_weights=values[order].to(grad.dtype), mode="sum")
        return grad, grad_W_dec, None, None


def decode_support(values: Tensor, support: Support, W_dec: Tensor) -> Tensor:
    """Σ over each row's support of value · W_dec[latent]: [batch, d_in], without b_dec."""
    weights = values.to(W_dec.dtype)
    out = F.embedding_bag(support.cols, W_dec.detach(), support.row_offsets(), per_sample_weights=weights, mode="sum")
    if not (W_dec.requires_grad and torch.is_grad_enabled()):
        return out
    return _DecoderWeightGradient.apply(out, W_dec, weights.detach(), support)
