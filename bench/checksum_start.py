"""A start's model load with the weights checksum hashed, then remembered (monosemantic/checksum_cache.py).

    python bench/checksum_start.py [--layers 12 --d-model 768 --vocab 50257]   # GPT-2 small's shape, random weights

Builds the model once under /tmp (its files then aged past the racy window), then loads it three times in this
process with an empty cache: the first load hashes every weight, the next two find the checksum remembered.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--d-model", type=int, default=768)
    parser.add_argument("--vocab", type=int, default=50257)
    args = parser.parse_args()
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    from monosemantic import checksum_cache
    from monosemantic.shipped import reference_lm_path

    where = Path(tempfile.gettempdir()) / f"monosemantic-bench-gpt2-{args.layers}x{args.d_model}x{args.vocab}"
    if not (where / "model.safetensors").exists():
        torch.manual_seed(0)
        config = GPT2Config(n_layer=args.layers, n_embd=args.d_model, n_head=max(1, args.d_model // 64), vocab_size=args.vocab)
        GPT2LMHeadModel(config).save_pretrained(where)
        AutoTokenizer.from_pretrained(reference_lm_path()).save_pretrained(where)
        time.sleep(checksum_cache.RACY_S + 0.2)
    cache = Path(tempfile.mkdtemp())
    os.environ["MONOSEMANTIC_CACHE_DIR"] = str(cache)
    from monosemantic.lm import load_lm, weights_checksum

    times = []
    for _ in range(3):
        started = time.perf_counter()
        lm = load_lm(where)
        times.append(time.perf_counter() - started)
    started = time.perf_counter()
    weights_checksum(lm.model)
    alone = time.perf_counter() - started
    shutil.rmtree(cache)
    params = sum(p.numel() for p in lm.model.parameters())
    print(f"| {params / 1e6:.0f}M parameters | first load (hashes) {times[0]:.2f} s | remembered {times[1]:.2f} s, {times[2]:.2f} s | "
          f"the hash alone {alone:.2f} s |")


if __name__ == "__main__":
    main()
