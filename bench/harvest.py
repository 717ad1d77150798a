"""Benchmark: harvest tokens/s (forward stopped at the hook) against a full forward with
output_hidden_states, measured in the same run, on the shipped reference model or any other.

    python bench/harvest.py [--contexts 256] [--model DIR_OR_HUB_ID] [--hook H] [--model-dtype auto]
"""

from __future__ import annotations

import argparse
import time

import torch

from monosemantic.lm import load_lm, read_activations, resolve_hook
from monosemantic.shipped import REFERENCE_HOOK, reference_lm_path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--contexts", type=int, default=256)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--model", help="default: the shipped reference")
    parser.add_argument("--hook", default=REFERENCE_HOOK)
    parser.add_argument("--model-dtype", default="auto", choices=("auto", "bfloat16", "float32"))
    parser.add_argument("--context-length", type=int, default=256)
    args = parser.parse_args()
    lm = load_lm(args.model or reference_lm_path(), dtype=args.model_dtype)
    hook = resolve_hook(lm.model, args.hook)
    ids = torch.randint(0, lm.model.config.vocab_size, (args.contexts, args.context_length), generator=torch.Generator().manual_seed(0))

    def ours() -> None:
        for b in range(0, args.contexts, args.batch):
            read_activations(lm.model, ids[b : b + args.batch], hook, stop_at_hook=True)

    def baseline() -> None:
        with torch.no_grad():
            for b in range(0, args.contexts, args.batch):
                lm.model(input_ids=ids[b : b + args.batch], output_hidden_states=True, use_cache=False)

    rates = {}
    for name, fn in (("baseline", baseline), ("harvest", ours), ("baseline", baseline), ("harvest", ours)):
        start = time.perf_counter()
        fn()
        rates[name] = ids.numel() / (time.perf_counter() - start)  # second round kept: warm caches
    print(f"full forward + output_hidden_states: {rates['baseline']:,.0f} tok/s")
    print(f"harvest (stop at {hook.name}):  {rates['harvest']:,.0f} tok/s  -> {rates['harvest'] / rates['baseline']:.2f}x")


if __name__ == "__main__":
    main()
