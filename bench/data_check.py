"""What checking activation data costs before training: one pass computing each shard's sha256 and refusing
non-finite rows, against reading the same file and against hashing it alone, in the same run.

    python bench/data_check.py [--gib 2] [--width 768]

Prints GB/s for each and the ratios; the check should run at the speed of hashing (it reads once) and within a
small factor of a plain read. The file is written fresh and read twice before timing, so all three read the page
cache: the ratios are of CPU work, the part a user's disk does not hide.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from monosemantic.artifact import sha256_file  # noqa: E402
from trainer.activations import SCAN_BYTES, scan_npy  # noqa: E402


def best_of(runs: int, fn) -> float:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


def plain_read(path: Path) -> None:
    with open(path, "rb") as fh:
        while fh.read(SCAN_BYTES):
            pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gib", type=float, default=1.0)
    parser.add_argument("--width", type=int, default=768)
    args = parser.parse_args()
    rows = int(args.gib * 2**30 / (2 * args.width))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "shard.npy"
        array = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(rows, args.width))
        rng = np.random.default_rng(0)
        for start in range(0, rows, 65536):
            array[start : start + 65536] = rng.standard_normal((min(65536, rows - start), args.width)).astype(np.float16)
        array.flush()
        del array
        mapped = np.load(path, mmap_mode="r")
        size = os.path.getsize(path) / 1e9
        for _ in range(2):
            plain_read(path)
        read = best_of(3, lambda: plain_read(path))
        sha = best_of(3, lambda: sha256_file(path))
        check = best_of(3, lambda: scan_npy(path, mapped, "float16"))
    print(f"{size:.2f} GB float16 [{rows:,} x {args.width}]")
    print(f"read {size / read:.2f} GB/s | sha256 {size / sha:.2f} GB/s | sha256 + finite rows {size / check:.2f} GB/s")
    print(f"check / sha256 time: {check / sha:.2f}x   check / read time: {check / read:.2f}x")


if __name__ == "__main__":
    main()
