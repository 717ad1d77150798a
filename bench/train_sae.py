"""Benchmark: SAE training tokens/s per architecture (512 → 4096 by default, batch 4096), against the machine's own
matmul rates measured in the same run, and against SAELens / sparsify when the `bench` extra is installed.

    python bench/train_sae.py [--steps 20] [--quality-tokens 4000000] [--harvest runs/reference/harvest]
    python bench/train_sae.py --d-in 768 --d-sae 24576 --k 32      # GPT-2 small's width (OpenAI's / SAELens's)
    python bench/train_sae.py --d-in 2304 --d-sae 16384 --k 32     # Gemma-2-2B's (Gemma Scope's 16k)

With --harvest the rows are real MLP activations from a `monosemantic-train harvest` directory (the reference's),
else a synthetic MLP-like matrix. On the synthetic one a ReLU SAE's L0 falls slowly (it has no sparse structure to
find), so the settled rows mean most on real data.

Prints ratios, never absolute bounds: these machines are noisy.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import peers  # noqa: E402  (bench/peers.py: the SAELens and sparsify steps; imports neither until asked)

from trainer.activations import ActivationSource  # noqa: E402
from trainer.allocator import keep_freed_memory  # noqa: E402
from trainer.train import TrainConfig, Trainer  # noqa: E402

# The shape under test; main() sets them from the command line (a harvest's rows fix D_IN).
D_IN, D_SAE, BATCH = 512, 4096, 4096
ARCH_OPTIONS = {"topk": {"k": 32}, "batchtopk": {"k": 32}, "matryoshka": {"k": 32}, "relu": {"target_l0": 20}, "jumprelu": {"target_l0": 20},
                "gated": {"target_l0": 20}}


def flop_per_token_dense() -> int:
    return 6 * 2 * D_IN * D_SAE  # 3 matmuls forward+backward for each of encoder and decoder


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


# A latent is dead after 10M tokens unfired, sparsify's default (and Gao et al.'s): a short timed run otherwise gets
# our default of a tenth of its tokens, so our TopK rows would run AuxK over dead latents while sparsify's do not.
DEAD_WINDOW = 10_000_000

# Steps allowed for L0 to settle before timing (else it is timed as it is). ReLU needs ~200 on the reference harvest
# to take the support step (b_enc moves at Adam's pace); JumpReLU starts calibrated near its target.
# Settled means the support step is taken and L0 is within 2x its target (at 24,576 latents ReLU crosses the support
# step's density, L0 983, long before its target of 20, and a step at L0 900 costs 2.6x one at L0 20).
SETTLE_CAP = {"relu": 1000, "topk": 0, "batchtopk": 0, "matryoshka": 0, "jumprelu": 400, "gated": 1000}
SETTLE_SHRINK = 8
LAST_L0: dict[str, float | None] = {}  # each architecture's running L0 at the end of its last timed row


def ours(arch: str, source: ActivationSource, steps: int, bf16: bool, settle: bool = True) -> tuple[float, int]:
    """Our training step's tokens/s, and the steps it took to settle. With ``settle``, timing starts once the run has
    reached the regime most of a run is spent in (L0 near its target, so the support step is taken), with the
    sparsity coefficient at full strength from the first step so that this takes tens of steps, not hundreds.
    Settling steps take batches of BATCH / SETTLE_SHRINK rows: L0 falls with steps (the biases move at Adam's pace),
    not with tokens, and at 24,576 latents 400 dense steps of 4,096 rows would take over 20 minutes here."""
    trainer = Trainer(TrainConfig.build(architecture=arch, d_sae=D_SAE, tokens=(SETTLE_CAP[arch] + steps + 3) * BATCH,
                                        batch_size=BATCH, bf16=bf16, sparsity_warmup_fraction=0.0,
                                        sparse_step_density=0.04 if settle else 0.0, dead_window_tokens=DEAD_WINDOW,
                                        **ARCH_OPTIONS[arch]), source)
    batches, small = source.batches(BATCH, seed=0), source.batches(BATCH // SETTLE_SHRINK, seed=1)
    settled = 0
    target = ARCH_OPTIONS[arch].get("target_l0")
    near_target = lambda: target is None or (trainer.l0_ema is not None and trainer.l0_ema <= 2 * target)  # noqa: E731
    while settle and not (trainer.sparse_step() and near_target()) and settled < SETTLE_CAP[arch]:
        trainer.train_step(next(small))
        settled += 1
    for _ in range(3):
        trainer.train_step(next(batches))
    start = time.perf_counter()
    for _ in range(steps):
        trainer.train_step(next(batches))
    rate = steps * BATCH / (time.perf_counter() - start)
    LAST_L0[arch] = trainer.l0_ema
    return rate, settled


def quality(arch: str, source: ActivationSource, tokens: int) -> dict[str, float]:
    """FVU after the same tokens with and without bf16 autocast (the mixed-precision quality check)."""
    out = {}
    for bf16 in (False, True):
        result = Trainer(TrainConfig.build(architecture=arch, d_sae=D_SAE, tokens=tokens, batch_size=BATCH, bf16=bf16,
                                           **ARCH_OPTIONS[arch]), source).run(progress=False)
        out["bf16" if bf16 else "fp32"] = sum(h["fvu"] for h in result.history[-5:]) / 5
    return out


def report_peers(source: ActivationSource, steps: int, ours_best: dict[str, tuple[str, float]], archs: set[str]) -> None:
    """The peer rows (SAELens standard and JumpReLU, sparsify TopK) on the same data, then ours/peer per architecture.

    A ratio compares the best of fp32 / bf16 autocast on each side (and, for sparsify, the best of its optimizers):
    each tool at its fastest setting here. A package that is not installed is named instead of measured.
    """
    rows, notes = peers.measure(source, D_SAE, BATCH, steps, k=ARCH_OPTIONS["topk"]["k"], archs=archs)
    print(f"peers, same data and shapes ({peers.WARMUP_STEPS} warm-up steps, then {steps} timed):")
    for row in rows:
        print(f"  {row.package} {row.label}, {'bf16-autocast' if row.autocast else 'fp32'}: {row.tokens_per_s:,.0f} tok/s")
    for note in notes:
        print(f"  {note}")
    print(f"ours/peer at {D_IN} -> {D_SAE}, k {ARCH_OPTIONS['topk']['k']}, batch {BATCH}:")
    for arch, package in (("relu", "SAELens"), ("jumprelu", "SAELens"), ("batchtopk", "SAELens"),
                          ("matryoshka", "SAELens"), ("gated", "SAELens"), ("topk", "sparsify")):
        candidates = [row for row in rows if row.ours == arch]
        if arch not in ours_best:
            continue
        if not candidates:
            print(f"  ours/peer {arch:>10}: not measured ({package} row missing)")
            continue
        best = max(candidates, key=lambda row: row.tokens_per_s)
        label, rate = ours_best[arch]
        print(f"  ours/peer {arch:>10}: {rate / best.tokens_per_s:.2f}x (ours {label} {rate:,.0f} tok/s vs {best.package} {best.label}, {'bf16-autocast' if best.autocast else 'fp32'} "
              f"{best.tokens_per_s:,.0f} tok/s)")


def main() -> None:
    global D_IN, D_SAE
    keep_freed_memory()  # as `monosemantic-train train` does; process-wide, so the peers' steps get it too
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--quality-tokens", type=int, default=0, help="also compare FVU fp32 vs bf16 after this many tokens")
    parser.add_argument("--harvest", type=Path, help="real activations: a harvest directory")
    parser.add_argument("--archs", default="relu,topk,jumprelu", help="which of our architectures to time")
    parser.add_argument("--no-peers", action="store_true", help="skip the SAELens / sparsify rows")
    parser.add_argument("--d-in", type=int, default=D_IN, help="activation width (synthetic rows; a harvest sets its own)")
    parser.add_argument("--d-sae", type=int, default=D_SAE, help="dictionary width")
    parser.add_argument("--k", type=int, default=32, help="the k of TopK, BatchTopK and Matryoshka (ReLU and JumpReLU target L0 20)")
    parser.add_argument("--peer-archs", default="relu,topk,jumprelu,batchtopk,matryoshka,gated", help="which peer rows to time")
    args = parser.parse_args()
    D_SAE = args.d_sae
    ARCH_OPTIONS["topk"]["k"] = ARCH_OPTIONS["batchtopk"]["k"] = ARCH_OPTIONS["matryoshka"]["k"] = args.k
    if args.harvest:
        from trainer.activations import open_harvest

        rows = open_harvest(args.harvest).sample(16 * BATCH, seed=0)
        D_IN = rows.shape[1]
        source = ActivationSource(parts=[rows.numpy()], dtype="float32")
        described = f"{source.rows:,} rows of {args.harvest}"
    else:
        D_IN = args.d_in
        source = mlp_like_data(16 * BATCH)
        described = f"{source.rows:,} synthetic MLP-like rows"
    fp32, bf16 = matmul_rate(torch.float32), matmul_rate(torch.bfloat16)
    print(f"matmul {BATCH}x{D_IN}x{D_SAE}: fp32 {fp32 / 1e9:.0f} GFLOP/s, bf16 {bf16 / 1e9:.0f} GFLOP/s (bf16/fp32 = {bf16 / fp32:.2f}x)")
    print(f"dense-step ceiling: fp32 {fp32 / flop_per_token_dense():,.0f} tok/s, bf16 {bf16 / flop_per_token_dense():,.0f} tok/s")
    print(f"data: {described}")
    ours_best: dict[str, tuple[str, float]] = {}  # architecture → (setting, tok/s) of our fastest row
    for arch in args.archs.split(","):
        dense32, _ = ours(arch, source, args.steps, bf16=False, settle=False)
        dense16, _ = ours(arch, source, args.steps, bf16=True, settle=False)
        print(f"{arch:>8} dense step: fp32 {dense32:,.0f} tok/s, bf16-autocast {dense16:,.0f} tok/s "
              f"(= {dense16 * flop_per_token_dense() / bf16:.0%} of the bf16 dense ceiling; bf16/fp32 = {dense16 / dense32:.2f}x)")
        # Settled, only in bf16 (the trainer's default): settling costs up to SETTLE_CAP dense steps per row.
        rate16, settled16 = ours(arch, source, args.steps, bf16=True)
        ours_best[arch] = max([("fp32 dense", dense32), ("bf16-autocast dense", dense16), ("bf16-autocast settled", rate16)],
                              key=lambda row: row[1])
        cap = SETTLE_CAP[arch]
        settled_l0 = LAST_L0.get(arch)
        when = (f"support step after {settled16} steps of {BATCH // SETTLE_SHRINK} rows" if settled16 < cap or cap == 0
                else f"not settled after {cap} steps") + (f", L0 {settled_l0:.0f}" if settled_l0 is not None else "")
        print(f"{arch:>8} settled ({when}): bf16-autocast {rate16:,.0f} tok/s (= {rate16 / dense16:.2f}x the dense bf16 step)")
        if args.quality_tokens:
            q = quality(arch, source, args.quality_tokens)
            print(f"          FVU after {args.quality_tokens:,} tokens: fp32 {q['fp32']:.4f}, bf16 {q['bf16']:.4f} "
                  f"(relative difference {abs(q['bf16'] - q['fp32']) / q['fp32']:.1%})")
    if not args.no_peers:
        report_peers(source, args.steps, ours_best, set(args.peer_archs.split(",")))


if __name__ == "__main__":
    main()
