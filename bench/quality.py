"""Benchmark: what each architecture recovers of a known ground truth, at the same budget and the same mean L0.

    python bench/quality.py [--tokens 1000000,2000000,8000000] [--archs topk,batchtopk,matryoshka] [--cases all]
                            [--lr 4e-4 --controller-gain 0.005]  # the fixed defaults before the budget rules

Every case is data of our own making (trainer/synthetic.py), trained with the trainer's defaults at batch 4,096 (so
~490 steps at 2M rows), k = the data's mean number of active features:

* ``gt-*``: independent features with power-law firing frequencies in superposition (Sharkey et al. 2022's
  generator), at several widths and overcompleteness; MMCS = mean over true directions of the best cosine with a
  decoder row.
* ``hierarchy``: families whose parent always fires with (at most) one of its children (Chanin et al. 2024); absorption
  = the share of child tokens on which the parent's latent is silent (Bussmann et al. 2025 show Matryoshka lowers it).

For each run: MMCS, the served mean L0 (the threshold architectures vary it per token), FVU on held-out rows.
With ``--peers``, sparsify's own TopK training (bench/peers.py's mirror of its Trainer step: schedule-free signum at
its default lr, its averaged weights evaluated) runs beside ours on the same rows in the same order. Prints the
table; nothing here is a pass/fail bound.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from typing import Callable

import torch

from monosemantic.sae import SAE_REGISTRY
from trainer.activations import ActivationSource
from trainer.synthetic import absorption, make_hierarchical_data, make_sparse_data, mean_max_cosine
from trainer.train import TrainConfig, Trainer


@dataclass(frozen=True)
class Case:
    name: str
    d_sae: int
    k: int
    make: Callable[[int], object]  # rows -> data with .activations, .directions (and the hierarchy's families)


CASES = [
    Case("gt-64x256-8x", 512, 5, lambda n: make_sparse_data(n, d=64, n_features=256, mean_active=5.0, seed=0)),
    Case("gt-128x512-16x", 2048, 8, lambda n: make_sparse_data(n, d=128, n_features=512, mean_active=8.0, decay=0.995, seed=1)),
    Case("gt-256x1024-4x", 1024, 10, lambda n: make_sparse_data(n, d=256, n_features=1024, mean_active=10.0, decay=0.998, seed=2)),
    Case("hierarchy", 512, 5, lambda n: make_hierarchical_data(n, d=64, independent=128, families=8, children=4,
                                                               mean_active=4.0, seed=3)),
]
HELD_OUT = 16_384


def held_out_fvu(predicted: torch.Tensor, held: torch.Tensor) -> float:
    return float((predicted - held).pow(2).sum() / (held - held.mean(0)).pow(2).sum())


def run(case: Case, arch: str, data, tokens: int, lr: float | None = None, controller_gain: float | None = None) -> dict:
    train_rows = data.activations[:-HELD_OUT]
    source = ActivationSource(parts=[train_rows.numpy()], dtype="float32")
    cfg = TrainConfig.build(architecture=arch, d_sae=case.d_sae, tokens=tokens, batch_size=4096, seed=0, lr=lr,
                            controller_gain=controller_gain,
                            **({"k": case.k} if SAE_REGISTRY[arch].takes_k else {"target_l0": float(case.k)}))
    started = time.perf_counter()
    result = Trainer(cfg, source).run(progress=False)
    seconds = time.perf_counter() - started
    held = data.activations[-HELD_OUT:]
    with torch.no_grad():
        features = result.sae.encode(held)
        predicted = result.sae.decode(features)
    row = {
        "mmcs": mean_max_cosine(data.directions, result.sae.W_dec.detach()),
        "l0": float((features != 0).sum(-1).float().mean()),
        "fvu": held_out_fvu(predicted, held),
        "seconds": seconds,
    }
    if hasattr(data, "parents"):
        held_data = type(data)(activations=held, directions=data.directions, codes=data.codes[-HELD_OUT:],
                               parents=data.parents, children=data.children)
        row["absorption"] = absorption(held_data, features, result.sae.W_dec.detach())
    return row


def sparsify_topk(case: Case, data, tokens: int) -> dict:
    """sparsify's TopK at its defaults on the rows ours trains on, scored as ours is."""
    import peers  # bench/peers.py: imports sparsify only when called

    train_rows = data.activations[:-HELD_OUT]
    source = ActivationSource(parts=[train_rows.numpy()], dtype="float32")
    steps = max(1, tokens // 4096)
    run_ = peers.sparsify_run(source.d_in, case.d_sae, case.k, steps, autocast=False, optimizer="signum")
    batches = source.batches(4096, seed=0)
    started = time.perf_counter()
    for _ in range(steps):
        x = next(batches)
        run_.step(x, x)
    run_.finish()
    seconds = time.perf_counter() - started
    held = data.activations[-HELD_OUT:]
    with torch.no_grad():
        predicted = run_.sae(held).sae_out
    return {"mmcs": mean_max_cosine(data.directions, run_.sae.W_dec.detach()), "l0": float(case.k),
            "fvu": held_out_fvu(predicted, held), "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", default="2000000", help="training rows per run (batch 4,096); several, comma-separated")
    parser.add_argument("--rows", type=int, default=400_000, help="distinct rows generated per case (cycled)")
    parser.add_argument("--archs", default="topk,batchtopk,matryoshka")
    parser.add_argument("--cases", default="all", help="comma-separated case names, or all")
    parser.add_argument("--lr", type=float, default=None, help="Adam's learning rate (default: the trainer's rule)")
    parser.add_argument("--peers", action="store_true", help="also sparsify's own TopK training (the bench extra)")
    parser.add_argument("--controller-gain", type=float, default=None, help="the L0 controller's gain (default: the trainer's rule)")
    args = parser.parse_args()
    cases = CASES if args.cases == "all" else [c for c in CASES if c.name in args.cases.split(",")]
    budgets = [int(t) for t in args.tokens.split(",")]
    print(f"batch 4096, lr {args.lr or 'by rule'}, controller gain {args.controller_gain or 'by rule'}, defaults otherwise")
    print("| case | arch | rows (steps) | MMCS | served L0 (k) | held-out FVU | absorption | train s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for case in cases:
        data = case.make(args.rows + HELD_OUT)
        for tokens in budgets:
            for arch in args.archs.split(","):
                r = run(case, arch, data, tokens, args.lr, args.controller_gain)
                absorbed = f"{r['absorption']:.3f}" if "absorption" in r else "–"
                print(f"| {case.name} | {arch} | {tokens:,} ({tokens // 4096}) | {r['mmcs']:.3f} | {r['l0']:.2f} ({case.k}) | "
                      f"{r['fvu']:.4f} | {absorbed} | {r['seconds']:.0f} |", flush=True)
            if args.peers:
                r = sparsify_topk(case, data, tokens)
                print(f"| {case.name} | sparsify topk | {tokens:,} ({tokens // 4096}) | {r['mmcs']:.3f} | {r['l0']:.2f} ({case.k}) | "
                      f"{r['fvu']:.4f} | – | {r['seconds']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
