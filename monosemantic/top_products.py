"""The k largest (or smallest) entries of each row of a matrix product, found in a fast dtype, reported exactly.

The dashboards rank, for every feature, the tokens its direction raises most (a [d_sae, vocab] product: 1.9 TFLOP at
GPT-2's shape) and its nearest features by decoder cosine (a [d_sae, d_sae] one). In float32 on two cores those
took 20 s and 8 s of a dashboard run whatever its token count. bf16 multiplies 2-4x faster but rounds products to 8
bits of mantissa, enough to reorder near-ties. So the product is screened in the fast dtype, each row keeps
`margin` more candidates than asked, and the candidates' products are recomputed in float32: the values are exact,
and the ids are the float32 ranking's unless more than `margin` entries sit within bf16's rounding of the k-th.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

CHUNK_BYTES = 256 << 20  # the [rows, columns] block of products (and the candidates' gathered rows) held at once
MARGIN = 32


class TopProducts(NamedTuple):
    values: Tensor  # [n, k] float32, exact, largest (or smallest) first
    indices: Tensor  # [n, k] long: columns of the product, i.e. rows of b


@torch.no_grad()
def top_products(a: Tensor, b: Tensor, k: int, *, largest: bool = True, screen_dtype: torch.dtype = torch.float32,
                 exclude_self: bool = False, chunk_bytes: int = CHUNK_BYTES, margin: int = MARGIN) -> TopProducts:
    """For each row i of a [n, d], the k rows j of b [m, d] with the largest (or smallest) a_i · b_j, with those
    products in float32. `exclude_self` leaves j = i out (a and b the same rows: nearest neighbours). Memory holds
    one chunk of rows' products (`chunk_bytes`), whatever n and m."""
    return extreme_products(a, b, k, ends=(largest,), screen_dtype=screen_dtype, exclude_self=exclude_self,
                            chunk_bytes=chunk_bytes, margin=margin)[0]


@torch.no_grad()
def extreme_products(a: Tensor, b: Tensor, k: int, *, ends: tuple[bool, ...] = (True, False),
                     screen_dtype: torch.dtype = torch.float32, exclude_self: bool = False, chunk_bytes: int = CHUNK_BYTES,
                     margin: int = MARGIN) -> list[TopProducts]:
    """top_products for each end asked (True: the largest, False: the smallest) from one product of each chunk."""
    a = a.float()
    n, m = a.shape[0], b.shape[0]
    k = max(0, min(k, m - int(exclude_self)))
    screened = screen_dtype != torch.float32
    # b as it is where it is already in the screening dtype (a bf16 model's unembedding: no copy of vocab x d)
    screen = b if b.dtype == screen_dtype else b.to(screen_dtype)
    take = min(m, k + margin + int(exclude_self)) if screened else k
    per_row = max(screen.element_size() * m, 4 * take * b.shape[1] if screened else 0)
    rows = max(1, chunk_bytes // max(1, per_row))
    found: list[tuple[list[Tensor], list[Tensor]]] = [([], []) for _ in ends]
    for start in range(0, n, rows):
        block = a[start : start + rows]
        here = torch.arange(block.shape[0])
        products = block.to(screen.dtype) @ screen.T
        for largest, (values, indices) in zip(ends, found):
            fill = float("-inf") if largest else float("inf")
            if exclude_self:
                products[here, here + start] = fill
            top = products.topk(take, dim=-1, largest=largest)
            if not screened:
                values.append(top.values.float())
                indices.append(top.indices)
                continue
            candidates = top.indices
            exact = torch.bmm(b[candidates].float(), block[:, :, None]).squeeze(-1)  # [rows, take] in float32
            if exclude_self:
                exact = exact.masked_fill(candidates == (here + start)[:, None], fill)
            best = exact.topk(k, dim=-1, largest=largest)
            values.append(best.values)
            indices.append(candidates.gather(1, best.indices))
    if n == 0:
        return [TopProducts(torch.zeros(0, k), torch.zeros(0, k, dtype=torch.long)) for _ in ends]
    return [TopProducts(torch.cat(values), torch.cat(indices)) for values, indices in found]
