"""Benchmark: harvesting several hooks in one pass against one harvest per hook, measured in the same run.

    python bench/harvest_hooks.py [--layers 6] [--d-model 512] [--contexts 96] [--rounds 2]

A GPT-2-shaped model built from its config (random weights: the cost is the same as trained ones), the residual
stream after every block as the hooks. "separate" runs ``harvest`` once per hook, each forward stopped at its
hook; "one pass" runs ``harvest_hooks`` with all of them, one forward per batch up to the deepest. Both write the
same shards (checked); the ratio separate / one pass is the speed-up, which for L evenly spaced hooks tends to
(L + 1) / 2 when the forward dominates.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from monosemantic.lm import LoadedLM, weights_checksum
from trainer.activations import open_harvest
from trainer.harvest import harvest, harvest_hooks, hook_directory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--contexts", type=int, default=96)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=4096, n_positions=256, n_embd=args.d_model, n_layer=args.layers, n_head=8)
    model = GPT2LMHeadModel(config).eval()
    lm = LoadedLM(model=model, tokenizer=None, source="bench-gpt2", checksum=weights_checksum(model))
    hooks = [f"blocks.{i}.hook_resid_post" for i in range(args.layers)]
    contexts = torch.randint(0, 4096, (args.contexts, 256), generator=torch.Generator().manual_seed(1))
    options = dict(contexts_per_shard=32, batch_size=16, progress=False)
    separate, together = [], []
    for _ in range(args.rounds):
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            started = time.perf_counter()
            for hook in hooks:
                harvest(lm, contexts, hook, root / "separate" / hook, **options)
            separate.append(time.perf_counter() - started)
            started = time.perf_counter()
            harvest_hooks(lm, contexts, hooks, root / "together", **options)
            together.append(time.perf_counter() - started)
            for hook in hooks:  # the same rows either way
                a, b = open_harvest(root / "separate" / hook), open_harvest(hook_directory(root / "together", hook))
                assert a.digest == b.digest, hook
    tokens = args.contexts * 255 * args.layers
    print(f"{args.layers} hooks, d_model {args.d_model}, {args.contexts} contexts of 256: "
          f"separate {min(separate):.1f} s ({tokens / min(separate):,.0f} rows/s), "
          f"one pass {min(together):.1f} s ({tokens / min(together):,.0f} rows/s); "
          f"ratio {min(separate) / min(together):.2f} (ideal {(args.layers + 1) / 2:.1f})")


if __name__ == "__main__":
    main()
