"""monosemantic/top_products.py: each row's extreme products, screened in bf16 and reported exactly in float32."""

import torch

from monosemantic.top_products import extreme_products, top_products


def dense_top(a, b, k, largest=True):
    return (a @ b.T).topk(k, dim=-1, largest=largest)


def test_float32_is_the_dense_top_k_of_the_product_chunk_by_chunk():
    a, b = torch.randn(50, 16, generator=torch.Generator().manual_seed(0)), torch.randn(300, 16, generator=torch.Generator().manual_seed(1))
    got = top_products(a, b, 5, chunk_bytes=4 * 300 * 7)  # 7 rows a chunk
    want = dense_top(a, b, 5)
    assert torch.equal(got.indices, want.indices) and torch.allclose(got.values, want.values)


def test_screened_in_bf16_the_ids_and_values_are_the_float32_ones():
    a, b = torch.randn(64, 32, generator=torch.Generator().manual_seed(2)), torch.randn(2000, 32, generator=torch.Generator().manual_seed(3))
    up, down = extreme_products(a, b, 10, screen_dtype=torch.bfloat16, chunk_bytes=1 << 16)
    for got, largest in ((up, True), (down, False)):
        want = dense_top(a, b, 10, largest)
        assert torch.equal(got.indices, want.indices)
        assert torch.allclose(got.values, want.values, atol=1e-5)  # recomputed in float32, not bf16's rounding


def test_a_bf16_screen_alone_would_misrank_near_ties_which_the_exact_pass_puts_right():
    a = torch.ones(1, 8)
    b = torch.ones(40, 8) + torch.arange(40)[:, None] * 1e-3  # products 8.000 … 8.312: bf16 rounds them to a few values
    rough = (a.bfloat16() @ b.bfloat16().T).float().topk(3).indices
    got = top_products(a, b, 3, screen_dtype=torch.bfloat16)
    assert got.indices.tolist() == [[39, 38, 37]] and rough.tolist() != [[39, 38, 37]]


def test_excluding_self_gives_each_rows_nearest_other_row():
    rows = torch.nn.functional.normalize(torch.randn(100, 12, generator=torch.Generator().manual_seed(4)), dim=-1)
    for dtype in (torch.float32, torch.bfloat16):
        got = top_products(rows, rows, 4, screen_dtype=dtype, exclude_self=True, chunk_bytes=4 * 100 * 9)
        sims = rows @ rows.T
        sims.fill_diagonal_(-2.0)
        want = sims.topk(4, dim=-1)
        assert torch.equal(got.indices, want.indices) and torch.allclose(got.values, want.values, atol=1e-6)
        assert not (got.indices == torch.arange(100)[:, None]).any()
