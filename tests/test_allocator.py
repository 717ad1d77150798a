"""trainer/allocator.py: with freed memory kept, a training loop at real width stops page-faulting its temporaries."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

# 768 → 12,288 at 2,048 rows: gradients of 38 MB and a 50 MB encoder product, over glibc's 32 MB mmap ceiling. The
# dead window is out of reach so every step has the same shapes: with the default (a tenth of the tokens: 4 steps),
# AuxK could start inside the measured steps and fault in its first blocks (seen once in CI: 4,608 faults a step).
# With freed memory kept, the heap still grows now and then over the first ten steps while its free blocks settle
# (9,216 or 18,432 faults in one step, zero in the others: measured over 10 steps, 4 runs), so the test compares the
# median step of 8 after 4 of warm-up, not a mean a single growth step can swing (seen in CI: 6,144 a step).
_STEPS = """
import json, resource, sys
import numpy as np
from trainer.activations import ActivationSource
from trainer.train import TrainConfig, Trainer
if sys.argv[1] == "keep":
    from trainer.allocator import keep_freed_memory
    assert keep_freed_memory()
rows = np.maximum(np.random.default_rng(0).standard_normal((4 * 2048, 768)).astype(np.float32), 0)
trainer = Trainer(TrainConfig.build(architecture="topk", k=32, d_sae=12288, tokens=40 * 2048, batch_size=2048,
                                    bf16=True, dead_window_tokens=10**9), ActivationSource([rows], "float32"))
batches = trainer.source.batches(2048, seed=0)
for _ in range(4):
    trainer.train_step(next(batches))
faults = []
for _ in range(8):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    trainer.train_step(next(batches))
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps(float(np.median(faults))))
"""


def faults_per_step(mode: str) -> float:
    out = subprocess.run([sys.executable, "-c", _STEPS, mode], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_training_steps_reuse_their_memory_once_freed_memory_is_kept():
    default, kept = faults_per_step("default"), faults_per_step("keep")
    assert default > 10_000  # each step maps its large blocks afresh: every page faults in again
    assert kept < default / 10
