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

from gpt2_shape import add_arguments, gpt2_shaped


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_arguments(parser)
    where = gpt2_shaped(parser.parse_args())
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
