"""Which float type this machine multiplies faster, bfloat16 or float32: measured, because CPUs differ by 30x."""

from __future__ import annotations

import functools
import time

import torch


@functools.cache
def fastest_dtype(d_in: int, d_sae: int, device: str) -> torch.dtype:
    """bfloat16 where its matmul is faster than float32's at this dictionary's shape, else float32 (the serving
    setting ``auto``). On GPUs and CPUs with AVX-512-bf16 or AMX, bf16 runs 2-4× faster; on CPUs without native
    bf16 it is emulated and far slower: on an AMD EPYC without avx512_bf16, [3, 512] × [512, 4096] took 23.5 ms in
    bf16 against 0.74 ms in fp32, and a 3-token activations request 0.5 s. Measured once per shape at load, on 64
    rows (best of 3 after a warm-up), at most 1024 x 8192."""
    if device.startswith("cuda"):
        return torch.bfloat16
    # Capped: the ratio is the CPU's, and a 2304 x 65536 probe would allocate 600 MB at start-up for nothing.
    d_in, d_sae = min(d_in, 1024), min(d_sae, 8192)
    timings = {}
    for dtype in (torch.float32, torch.bfloat16):
        x, w = torch.randn(64, d_in).to(dtype), torch.randn(d_in, d_sae).to(dtype)
        x @ w
        best = float("inf")
        for _ in range(3):
            started = time.perf_counter()
            x @ w
            best = min(best, time.perf_counter() - started)
        timings[dtype] = best
    return torch.bfloat16 if timings[torch.bfloat16] < timings[torch.float32] else torch.float32
