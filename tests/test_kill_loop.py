"""Kill loops: harvest, train (with checkpoints) and publish SIGKILLed at random moments, again and again, then run
to the end. After every kill the state on disk is whole (every recorded shard verifies, the checkpoint loads,
every listed version verifies), and the finished result is exactly what an uninterrupted run gives: nothing lost."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from monosemantic.artifact import list_versions, load_dictionary, verify
from trainer.activations import open_harvest
from trainer.checkpoint import read_checkpoint
from trainer.synthetic import make_sparse_data

# kill loops: each restart re-imports torch (~5 s)
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
KILLS = 3  # kills at random moments, then a run to the end; each restart costs ~5 s of imports on 2 cores


def kill_loop(script: str, *args: str, seed: int, check) -> int:
    """Start ``script`` again and again, SIGKILLing it at a random moment once it has started working and calling
    ``check`` after each kill, until a run (the first after KILLS kills, or one that finished sooner) exits by
    itself; returns how many runs were killed."""
    rng = random.Random(seed)
    kills = 0
    while True:
        process = subprocess.Popen([sys.executable, "-c", textwrap.dedent(script), *args], cwd=REPO, stdout=subprocess.PIPE,
                                   stderr=subprocess.DEVNULL, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        try:
            assert process.stdout.readline().strip() == "ready"
            try:
                process.wait(timeout=rng.uniform(0.02, 0.4) if kills < KILLS else 300)
            except subprocess.TimeoutExpired:
                os.kill(process.pid, signal.SIGKILL)
                process.wait()
                kills += 1
                check()
                continue
        finally:
            process.stdout.close()
            if process.poll() is None:
                process.kill()
                process.wait()
        assert process.returncode == 0
        return kills


_HARVEST = """
import sys, torch
from monosemantic.lm import load_lm
from monosemantic.shipped import reference_lm_path
from trainer.harvest import harvest
lm = load_lm(reference_lm_path())
contexts = torch.randint(1, 500, (400, 64), generator=torch.Generator().manual_seed(0))
contexts[:, 0] = 0
print("ready", flush=True)
harvest(lm, contexts, "blocks.0.mlp.hook_post", sys.argv[1], contexts_per_shard=4, batch_size=4, progress=False)
"""


def test_a_harvest_killed_again_and_again_keeps_only_whole_shards_and_finishes_identical(tmp_path):
    out = tmp_path / "killed"

    def check():
        if (out / "harvest.json").exists():
            try:
                open_harvest(out)  # every recorded shard matches its sha256 and shape
            except Exception as exc:  # noqa: BLE001 - only "no completed shard yet" is allowed
                assert "no completed shard yet" in str(exc)

    assert kill_loop(_HARVEST, str(out), seed=1, check=check) >= 3
    uninterrupted = tmp_path / "whole"
    subprocess.run([sys.executable, "-c", textwrap.dedent(_HARVEST), str(uninterrupted)], cwd=REPO, check=True, capture_output=True)
    killed, whole = open_harvest(out), open_harvest(uninterrupted)
    assert killed.identity() == whole.identity()
    assert not list(out.glob("*.tmp"))


STEPS = 3000
_TRAIN = f"""
import sys
STEPS = {STEPS}
from trainer.activations import open_activation_file
from trainer.train import TrainConfig, Trainer
cfg = TrainConfig.build(architecture="relu", d_sae=64, tokens=STEPS * 256, batch_size=256, target_l0=4, checkpoint_every=7, seed=2)
source = open_activation_file(sys.argv[1])
print("ready", flush=True)
result = Trainer(cfg, source, sys.argv[2]).run(resume=True, progress=False)
"""


def test_training_killed_again_and_again_resumes_to_exactly_the_uninterrupted_dictionary(tmp_path):
    data = tmp_path / "acts.npy"
    np.save(data, make_sparse_data(30_000, d=16, n_features=32, seed=8).activations.numpy())
    checkpoint = tmp_path / "ckpt"

    def check():
        found = read_checkpoint(checkpoint)  # None before the first checkpoint; never torn
        assert found is None or found[0].step % 7 == 0

    assert kill_loop(_TRAIN, str(data), str(checkpoint), seed=2, check=check) >= 3
    uninterrupted = tmp_path / "whole"
    subprocess.run([sys.executable, "-c", textwrap.dedent(_TRAIN), str(data), str(uninterrupted)], cwd=REPO, check=True, capture_output=True)
    (killed_state, killed), (whole_state, whole) = read_checkpoint(checkpoint), read_checkpoint(uninterrupted)
    assert killed_state.step == whole_state.step == STEPS
    for name in whole:
        assert torch.equal(killed[name], whole[name]), name


_PUBLISH = """
import sys, torch
from monosemantic.artifact import HookRef, ModelRef, publish
from monosemantic.sae import SAEConfig, build_sae
sae = build_sae(SAEConfig.build(architecture="relu", d_in=64, d_sae=2048), seed=0)
features = {"density": torch.rand(2048), "max_activation": torch.rand(2048)}
print("ready", flush=True)
for i in range(int(sys.argv[2])):
    publish(sys.argv[1], "dict", sae, model=ModelRef(name="m", checksum="c"), hook=HookRef(name="h", module_path="h"),
            features=features, extra={"training": {"i": i}})
"""


def test_publishers_killed_again_and_again_leave_only_whole_versions_and_the_next_publish_cleans_up(tmp_path):
    registry = tmp_path / "registry"

    def check():
        for number in list_versions(registry, "dict"):
            verify(registry / "dict" / f"v{number}")

    assert kill_loop(_PUBLISH, str(registry), "40", seed=3, check=check) >= 3
    versions = list_versions(registry, "dict")
    assert len(versions) >= 40 and len(set(versions)) == len(versions)
    for number in versions:
        assert verify(registry / "dict" / f"v{number}").version == number
    assert not [p for p in (registry / "dict").iterdir() if p.name.startswith(".tmp-")]  # the last run cleaned them
    assert load_dictionary(registry, "dict").manifest.version == versions[-1]
