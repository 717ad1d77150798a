"""Exact top-k along the last dimension through block maxima: TopK's selection at real widths on CPU.

torch.topk on CPU copies each row into (value, index) pairs and partially sorts them: at 4,096 tokens × 24,576
latents it cost as much as the encoder's bf16 matmul (bench/train_sae.py). Selecting through block maxima reads the
row once, with vectorised maxima, and sorts only a few hundred values per row:

* split the row's n values into B = n / s blocks of s and take each block's maximum;
* the k largest values lie in the k blocks with the largest maxima. Proof: if a value v of block b is among the
  k largest but b is not among the k largest blocks, k other blocks have maxima ≥ max(b) ≥ v: k values other than
  v that are ≥ v, so v is at best the (k+1)-th. (With ties the *values* selected equal torch.topk's; which of
  equal entries is picked may differ, as it may between torch.topk's own CPU and CUDA kernels.)
* so the candidates are those k blocks' k·s values; pick the k largest of them.

The blocks need not be contiguous: block j holds the entries j, j + B, j + 2B, …, so the maxima are an elementwise
max of s contiguous slices (vector loads, no inner-dimension reduction). Choosing the k best blocks is itself a
top-k over B values, taken the same way while B stays wide.
"""

from __future__ import annotations

from torch import Tensor

BLOCK = 8  # entries per block: 8 was fastest at 24,576 latents (4 and 16 were 20-40% slower)
MIN_WIDTH = 256  # below this many values per row torch.topk is as fast


def topk_indices(values: Tensor, k: int) -> Tensor:
    """Indices [..., k] of the k largest entries along the last dimension (unordered), as `values.topk(k)`."""
    width = values.shape[-1]
    if values.device.type != "cpu" or k > width:  # CUDA's radix select is already fast; k > width: topk's error
        return values.topk(k, dim=-1, sorted=False).indices
    rows = values.reshape(-1, width)
    return _block_topk(rows.contiguous(), k).reshape(*values.shape[:-1], k)


def _block_topk(rows: Tensor, k: int) -> Tensor:
    n_rows, width = rows.shape
    blocks = width // BLOCK
    if width % BLOCK or blocks < max(k, MIN_WIDTH):
        return rows.topk(k, dim=-1, sorted=False).indices
    strided = rows.view(n_rows, BLOCK, blocks)  # strided[r, m, j] = rows[r, j + m·blocks]: block j's m-th entry
    best_blocks = _block_topk(strided.amax(1), k)  # [rows, k]
    candidates = strided.gather(2, best_blocks.unsqueeze(1).expand(n_rows, BLOCK, k)).reshape(n_rows, BLOCK * k)
    chosen = candidates.topk(k, dim=-1, sorted=False).indices  # candidate m·k + i is block best_blocks[i], entry m
    return best_blocks.gather(1, chosen % k) + (chosen // k) * blocks
