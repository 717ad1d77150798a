"""The activations readout's encoder: the SAE's encoder weights pre-cast to the serving dtype, and an exact
sparse reconstruction."""

from __future__ import annotations

import torch
from torch import Tensor

from monosemantic.sae import SparseAutoencoder


ROW_BUCKET = 256
SMALL_ROW_BUCKET = 64  # below ROW_BUCKET rows: a lone 64-token request pays for 64 rows, not 256


def bucketed_rows(rows: int) -> int:
    """The padded row count of a readout matmul: a multiple of 64 up to 256 rows, of 256 beyond."""
    bucket = SMALL_ROW_BUCKET if rows <= ROW_BUCKET else ROW_BUCKET
    return -(-rows // bucket) * bucket


class FastEncoder:
    """The dictionary's encoder with its weights pre-cast to the serving dtype.

    bf16 matmuls run 2-4× faster than fp32 on AVX-512-bf16 CPUs and on GPUs. Measured on the shipped reference
    (2,048 tokens of real activations): top-10 feature sets agree with fp32 on 99.9% of entries, L0 differs by
    0.02%, active values by 0.25% on average — so bf16 is the serving default for activations, and float32 is a
    setting away (MONOSEMANTIC_SAE_DTYPE). Attribution and steering always run in float32.
    """

    def __init__(self, sae: SparseAutoencoder, dtype: torch.dtype) -> None:
        self.sae, self.dtype = sae, dtype
        self.scale = sae.cfg.input_scale
        self.W_enc = sae.W_enc.detach().to(dtype).contiguous()
        self.b_enc = sae.b_enc.detach().to(dtype)
        self.b_dec = sae.b_dec.detach().float()

    def encode(self, x: Tensor) -> Tensor:
        centred = (x.float() * self.scale - self.b_dec).to(self.dtype)
        rows = centred.shape[0]
        # Pad the rows to a bucket. oneDNN caches a primitive (and its scratch memory) for every matmul shape it
        # meets, up to 1,024 of them. With dynamic batching every batch has another row count, and RSS grew 18%
        # over a 10-minute soak. Buckets bound the shapes (4 up to 256 rows, 31 more up to 8,192), at the cost
        # of at most 63 padded rows for a small batch and 255 for a large one.
        padded = bucketed_rows(rows)
        if padded != rows:
            centred = torch.nn.functional.pad(centred, (0, 0, 0, padded - rows))
        # Activated in the serving dtype: the values are the bf16 products either way, and every later dense pass
        # over [rows, d_sae] (top-k, the sparse index) moves half the bytes.
        return self.sae.activate(torch.addmm(self.b_enc, centred, self.W_enc)[:rows])

    def decode_and_count(self, features: Tensor) -> tuple[Tensor, Tensor]:
        """Exact fp32 reconstruction through only the active rows (an L0 of ~20 out of 4,096: a sparse × dense
        product, 3.5× faster than the dense one here), and the L0 of each row from the same sparse index."""
        if not features.is_cpu:
            return features.float() @ self.sae.W_dec / self.scale + self.sae.b_dec / self.scale, torch.count_nonzero(features, dim=-1)
        rows, cols = features.nonzero(as_tuple=True)
        l0 = torch.bincount(rows, minlength=features.shape[0])
        sparse = torch.sparse_coo_tensor(torch.stack([rows, cols]), features[rows, cols].float(), features.shape,
                                         is_coalesced=True, check_invariants=False)  # nonzero() yields row-major order: coalesced
        return torch.sparse.mm(sparse, self.sae.W_dec).add_(self.sae.b_dec) / self.scale, l0
