"""The training step of this tree against another checkout's, alternating, on the same synthetic data.

    python bench/train_step_ab.py --tree OLD_CHECKOUT [--d-in 768] [--d-sae 16384] [--rounds 3]

Each round runs each tree once, in its own process: the trainer is built, 5 steps warm it up, 20 are timed.
Prints tokens/s per round and the median ratio this/other: the per-step cost of a change (checks added to the
loop, say) measured in one run, so the machine's noise is shared. Both processes keep freed memory as
`monosemantic-train train` does (this tree's trainer/allocator.py, loaded by path so an older tree gets it too):
the ratio is the code's; `--allocator-as-tree` leaves each tree as its CLI ran.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

_ONE_RUN = """
import importlib.util, json, os, sys, time
import numpy as np, torch
torch.set_num_threads(2)
if os.environ.get("BENCH_ALLOCATOR"):
    spec = importlib.util.spec_from_file_location("bench_allocator", os.environ["BENCH_ALLOCATOR"])
    allocator = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(allocator)
    allocator.keep_freed_memory()
from trainer.activations import ActivationSource
from trainer.train import TrainConfig, Trainer
d_in, d_sae, batch, arch = int(sys.argv[1]), int(sys.argv[2]), 4096, sys.argv[3]
rows = np.maximum(np.random.default_rng(0).standard_normal((16 * batch, d_in)).astype(np.float32), 0)
options = {"k": 32} if arch == "topk" else {"target_l0": 32}
trainer = Trainer(TrainConfig.build(architecture=arch, d_sae=d_sae, tokens=100 * batch, batch_size=batch, sparsity_warmup_fraction=0.0,
                                    **options), ActivationSource([rows], "float32"))
batches = trainer.source.batches(batch, seed=0)
for _ in range(5):
    trainer.train_step(next(batches))
started = time.perf_counter()
for _ in range(20):
    trainer.train_step(next(batches))
print(json.dumps({"tokens_per_s": 20 * batch / (time.perf_counter() - started)}))
"""


def one(tree: Path, args: argparse.Namespace) -> float:
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "2"}
    allocator = (tree if args.allocator_as_tree else ROOT) / "trainer" / "allocator.py"
    if allocator.exists():
        env["BENCH_ALLOCATOR"] = str(allocator)
    out = subprocess.run([sys.executable, "-c", _ONE_RUN, str(args.d_in), str(args.d_sae), args.arch], cwd=tree, env=env,
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["tokens_per_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tree", type=Path, required=True)
    parser.add_argument("--d-in", type=int, default=768)
    parser.add_argument("--d-sae", type=int, default=16384)
    parser.add_argument("--arch", default="topk")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--allocator-as-tree", action="store_true",
                        help="keep freed memory only where the tree's own trainer/allocator.py exists")
    args = parser.parse_args()
    ratios = []
    for round_ in range(args.rounds):
        this, other = one(ROOT, args), one(args.tree.resolve(), args)
        ratios.append(this / other)
        print(f"round {round_ + 1}: this {this:,.0f} tok/s, other {other:,.0f} tok/s, ratio {this / other:.3f}")
    print(f"{args.arch} {args.d_in} -> {args.d_sae}, batch 4096: median ratio this/other {statistics.median(ratios):.3f}")


if __name__ == "__main__":
    main()
