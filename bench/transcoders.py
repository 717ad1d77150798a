"""Benchmark: our transcoders against sparsify's on the same paired rows — FVU of the output at equal k after the
same tokens, and the training step's tokens/s.

    python bench/transcoders.py --harvest runs/mlp [--tokens 2000000] [--d-sae 2048] [--k 16] [--steps 10]
    python bench/transcoders.py --d-in 768 --d-sae 16384 --k 32 --steps 5 --tokens 0   # GPT-2's width, speed only

Rows: a paired harvest of the shipped model (``monosemantic-train harvest --out runs/mlp --hook-in
blocks.0.ln2.hook_normalized --hook-out blocks.0.hook_mlp_out``), or planted pairs (trainer/synthetic.py's
make_paired_data) at ``--d-in``. Ours: the trainer with its defaults (bf16 autocast, the support step) for
``transcoder`` and ``skip-transcoder`` at k, and the ReLU and JumpReLU transcoders steered to a target L0 of k (no
peer trains those: SAELens 6.54's transcoders are inference-only). sparsify 1.3.3: ``SparseCoder(transcode=True[,
skip_connection=True])``, its Trainer's step mirrored (bench/peers.py), its default schedule-free signum optimizer at
its default learning rate, the averaged weights evaluated. FVU = Σ‖y − ŷ‖² / Σ‖y − ȳ‖² over held-out rows (the last
10%, never trained on), from each tool's own prediction. The speed rows compare the best of fp32 / bf16 autocast on
each side (and for sparsify of its two optimizers, signum and Adam). Prints ratios; nothing here is a bound.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import peers  # noqa: E402  (bench/peers.py: sparsify's step)

from monosemantic.sae import SAE_REGISTRY  # noqa: E402
from trainer.activations import ActivationSource  # noqa: E402
from trainer.allocator import keep_freed_memory  # noqa: E402
from trainer.paired import PairedSource  # noqa: E402
from trainer.train import TrainConfig, Trainer  # noqa: E402

BATCH = 4096
WARMUP = 3
DEAD_WINDOW = 10_000_000  # sparsify's dead_feature_threshold, so both run AuxK over the same (no) dead latents in a timed row


def paired_rows(args) -> tuple[PairedSource, PairedSource, str]:
    """(training rows, held-out rows, what they are)."""
    if args.harvest:
        from trainer.paired import open_paired

        source = open_paired(args.harvest)
        x, y = source.split(torch.cat(list(source.in_order())))
        what = f"{x.shape[0]:,} paired rows of {args.harvest} ({x.shape[1]} → {y.shape[1]})"
    else:
        from trainer.synthetic import make_paired_data

        data = make_paired_data(max(20 * BATCH, args.tokens // 8), d_in=args.d_in, d_out=args.d_in, n_features=4 * args.d_in,
                                mean_active=args.k / 2, seed=0)
        x, y = data.inputs, data.targets
        what = f"{x.shape[0]:,} planted pairs ({args.d_in} → {args.d_in}, {4 * args.d_in} features)"
    held = x.shape[0] // 10
    as_source = lambda a, b: PairedSource(ActivationSource([a.numpy()], "float32"), ActivationSource([b.numpy()], "float32"), {})  # noqa: E731
    return as_source(x[:-held], y[:-held]), as_source(x[-held:], y[-held:]), what


def fvu(predict, held: PairedSource) -> float:
    x, y = held.split(held.sample(held.rows, seed=0))
    with torch.no_grad():
        error = (y - predict(x)).pow(2).sum()
    return float(error / (y - y.mean(0)).pow(2).sum())


def options(arch: str, k: int) -> dict:
    """k for the TopK transcoders; the ReLU and JumpReLU ones steered to an L0 of k."""
    return {"k": k} if SAE_REGISTRY[arch].takes_k else {"target_l0": float(k)}


def sparsify_peer(arch: str) -> bool | None:
    """Which sparsify transcoder ours is compared with (skip_connection or not); None where sparsify has none."""
    cls = SAE_REGISTRY[arch]
    return "W_skip" in cls.tensor_names if cls.takes_k else None


def ours_quality(arch: str, train: PairedSource, held: PairedSource, d_sae: int, k: int, tokens: int,
                 lr: float | None) -> tuple[float, float, float, float]:
    """(held-out FVU, held-out mean L0, seconds, the learning rate it ran at) of our trainer's defaults (but ``lr``,
    where given) after ``tokens``."""
    start = time.perf_counter()
    result = Trainer(TrainConfig.build(architecture=arch, d_sae=d_sae, tokens=tokens, batch_size=BATCH, **options(arch, k),
                                       **({"lr": lr} if lr else {})), train).run(progress=False)
    seconds = time.perf_counter() - start
    sae = result.sae.eval()
    fired: list[float] = []

    def predict(x: torch.Tensor) -> torch.Tensor:  # the held-out L0 from the same encoding the FVU uses
        features = sae.encode(x)
        fired.append(float((features > 0).sum(-1).float().mean()))
        return sae.reconstruct(x, features)

    return fvu(predict, held), fired[0], seconds, result.config.lr


def sparsify_quality(skip: bool, train: PairedSource, held: PairedSource, d_sae: int, k: int, tokens: int) -> tuple[float, float]:
    """(held-out FVU, seconds) of sparsify's default transcoder training after ``tokens``."""
    steps = tokens // BATCH
    run = peers.sparsify_run(train.d_in, d_sae, k, steps, autocast=False, optimizer="signum", transcode=True, skip=skip)
    batches = train.batches(BATCH, seed=0)
    start = time.perf_counter()
    for _ in range(steps):
        x, y = train.split(next(batches))
        run.step(x, y)
    seconds = time.perf_counter() - start
    run.finish()
    return fvu(lambda x: run.sae(x).sae_out, held), seconds


def ours_rate(arch: str, train: PairedSource, d_sae: int, k: int, steps: int, bf16: bool) -> float:
    trainer = Trainer(TrainConfig.build(architecture=arch, d_sae=d_sae, k=k, tokens=(WARMUP + steps + 1) * BATCH, batch_size=BATCH,
                                        bf16=bf16, dead_window_tokens=DEAD_WINDOW), train)
    batches = train.batches(BATCH, seed=0)
    for _ in range(WARMUP):
        trainer.train_step(next(batches))
    start = time.perf_counter()
    for _ in range(steps):
        trainer.train_step(next(batches))
    return steps * BATCH / (time.perf_counter() - start)


def main() -> None:
    keep_freed_memory()  # as `monosemantic-train train` does; process-wide, so sparsify's step gets it too
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--harvest", type=Path, help="a paired harvest directory (else planted pairs)")
    parser.add_argument("--d-in", type=int, default=768, help="planted pairs' width (a harvest sets its own)")
    parser.add_argument("--d-sae", type=int, default=2048)
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=2_000_000, help="training budget of the quality rows (0: speed only)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps of the speed rows (0: quality only)")
    parser.add_argument("--archs", default="transcoder,skip-transcoder,relu-transcoder,jumprelu-transcoder")
    parser.add_argument("--lrs", default="default", help="our learning rates for the quality rows, comma-separated "
                        "(default: the trainer's)")
    args = parser.parse_args()
    train, held, what = paired_rows(args)
    archs = args.archs.split(",")
    print(f"data: {what}; d_sae {args.d_sae}, k {args.k}, batch {BATCH}")
    if args.tokens:
        print(f"held-out FVU of the output after {args.tokens:,} tokens ({args.tokens // BATCH} steps):")
        theirs = {}
        for skip in (False, True):
            theirs[skip] = sparsify_quality(skip, train, held, args.d_sae, args.k, args.tokens)
            print(f"  sparsify {'skip ' if skip else ''}transcoder k={args.k} (signum, schedule-free): FVU {theirs[skip][0]:.4f} "
                  f"({theirs[skip][1]:.0f} s)")
        for lr in (None if text == "default" else float(text) for text in args.lrs.split(",")):
            for arch in archs:
                value, l0, seconds, ran_at = ours_quality(arch, train, held, args.d_sae, args.k, args.tokens, lr)
                peer = sparsify_peer(arch)
                versus = f", ours/sparsify FVU {value / theirs[peer][0]:.2f}x" if peer is not None else " (no peer trains it)"
                print(f"  ours {arch}, lr {ran_at:g}{'' if lr else ' (default)'}: FVU {value:.4f} at L0 {l0:.1f} "
                      f"({seconds:.0f} s){versus}")
    if args.steps:
        print(f"training step, tokens/s ({WARMUP} warm-up steps, then {args.steps} timed):")
        for arch in (a for a in archs if sparsify_peer(a) is not None):
            skip = sparsify_peer(arch)
            mine = {bf16: ours_rate(arch, train, args.d_sae, args.k, args.steps, bf16) for bf16 in (False, True)}
            rates = {(optimizer, autocast): peers.sparsify_rate(train, args.d_sae, args.k, BATCH, args.steps, autocast, optimizer, skip=skip)
                     for optimizer in ("signum", "adam") for autocast in (False, True)}
            best_mine, best_theirs = max(mine.values()), max(rates.values())
            theirs_text = ", ".join(f"{o} {'bf16-autocast' if a else 'fp32'} {r:,.0f}" for (o, a), r in rates.items())
            print(f"  ours {arch}: fp32 {mine[False]:,.0f}, bf16-autocast {mine[True]:,.0f}; sparsify: {theirs_text}; "
                  f"ours/sparsify (best of each) {best_mine / best_theirs:.2f}x")


if __name__ == "__main__":
    main()
