"""Benchmark: SAE training tokens/s per architecture at 512 → 4096, batch 4096, against the machine's own
matmul rates measured in the same run, and against SAELens / sparsify when the `bench` extra is installed.

    python bench/train_sae.py [--steps 20] [--quality-tokens 4000000]

Prints ratios, never absolute bounds: these machines are noisy.
"""

from __future__ import annotations

import argparse
import time

import torch

from trainer.activations import ActivationSource
from trainer.train import TrainConfig, Trainer

D_IN, D_SAE, BATCH = 512, 4096, 4096
FLOP_PER_TOKEN_DENSE = 6 * 2 * D_IN * D_SAE  # 3 matmuls forward+backward for each of encoder and decoder


def matmul_rate(dtype: torch.dtype, repeats: int = 10) -> float:
    a, b = torch.randn(BATCH, D_IN, dtype=dtype), torch.randn(D_IN, D_SAE, dtype=dtype)
    for _ in range(3):
        a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * BATCH * D_IN * D_SAE * repeats / (time.perf_counter() - start)


def mlp_like_data(rows: int, seed: int = 0) -> ActivationSource:
    """Sparse non-negative rows shaped like post-ReLU MLP activations (the real harvest is used when given)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.relu(torch.randn(rows, D_IN, generator=gen) - 0.8) * torch.rand(1, D_IN, generator=gen) * 3
    return ActivationSource(parts=[x.numpy()], dtype="float32")


def ours(arch: str, source: ActivationSource, steps: int, bf16: bool) -> float:
    options = {"topk": {"k": 32}, "relu": {"target_l0": 20}, "jumprelu": {"target_l0": 20}}[arch]
    trainer = Trainer(TrainConfig.build(architecture=arch, d_sae=D_SAE, tokens=(steps + 3) * BATCH, batch_size=BATCH,
                                        bf16=bf16, **options), source)
    batches = source.batches(BATCH, seed=0)
    for _ in range(3):
        trainer.train_step(next(batches))
    start = time.perf_counter()
    for _ in range(steps):
        trainer.train_step(next(batches))
    return steps * BATCH / (time.perf_counter() - start)


def quality(arch: str, source: ActivationSource, tokens: int) -> dict[str, float]:
    """FVU after the same tokens with and without bf16 autocast (the mixed-precision quality check)."""
    out = {}
    for bf16 in (False, True):
        options = {"topk": {"k": 32}, "relu": {"target_l0": 20}, "jumprelu": {"target_l0": 20}}[arch]
        result = Trainer(TrainConfig.build(architecture=arch, d_sae=D_SAE, tokens=tokens, batch_size=BATCH, bf16=bf16,
                                           **options), source).run(progress=False)
        out["bf16" if bf16 else "fp32"] = sum(h["fvu"] for h in result.history[-5:]) / 5
    return out


def report_missing_peers() -> None:
    """The peer rows (SAELens, sparsify) need the `bench` extra; say so instead of printing a number."""
    for module, name in (("sae_lens", "SAELens"), ("sparsify", "sparsify")):
        try:
            __import__(module)
        except ImportError:
            print(f"  {name} not installed (pip install -e '.[bench]'): its step is not measured")
        else:
            print(f"  {name} is installed, but its step is not yet wired into this script")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--quality-tokens", type=int, default=0, help="also compare FVU fp32 vs bf16 after this many tokens")
    args = parser.parse_args()
    fp32, bf16 = matmul_rate(torch.float32), matmul_rate(torch.bfloat16)
    print(f"matmul {BATCH}x{D_IN}x{D_SAE}: fp32 {fp32 / 1e9:.0f} GFLOP/s, bf16 {bf16 / 1e9:.0f} GFLOP/s (bf16/fp32 = {bf16 / fp32:.2f}x)")
    print(f"dense-step ceiling: fp32 {fp32 / FLOP_PER_TOKEN_DENSE:,.0f} tok/s, bf16 {bf16 / FLOP_PER_TOKEN_DENSE:,.0f} tok/s")
    source = mlp_like_data(16 * BATCH)
    for arch in ("relu", "topk", "jumprelu"):
        rate32, rate16 = ours(arch, source, args.steps, bf16=False), ours(arch, source, args.steps, bf16=True)
        print(f"{arch:>8}: fp32 {rate32:,.0f} tok/s, bf16-autocast {rate16:,.0f} tok/s "
              f"(= {rate16 * FLOP_PER_TOKEN_DENSE / bf16:.0%} of the bf16 dense ceiling; bf16/fp32 = {rate16 / rate32:.2f}x)")
        if args.quality_tokens:
            q = quality(arch, source, args.quality_tokens)
            print(f"          FVU after {args.quality_tokens:,} tokens: fp32 {q['fp32']:.4f}, bf16 {q['bf16']:.4f} "
                  f"(relative difference {abs(q['bf16'] - q['fp32']) / q['fp32']:.1%})")
    report_missing_peers()


if __name__ == "__main__":
    main()
