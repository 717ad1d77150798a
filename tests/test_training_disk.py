"""Specifications of the trainer on a full or read-only disk: refused before the work when it can be known, a clear
error when it happens anyway, no temporary file left behind, and no trained weights lost.

Each test runs in a private mount namespace (``unshare``, from util-linux) with a real, tiny tmpfs, so ENOSPC and
EROFS come from a real file system and nothing outside the test sees the mount."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from trainer.synthetic import make_sparse_data

# training and harvests that fill a tmpfs (3-15 s each)
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]


def in_tiny_filesystem(mount: Path, size: str, script: str, *, read_only: bool = False) -> subprocess.CompletedProcess:
    """Run ``script`` (Python) with a fresh tmpfs of ``size`` mounted at ``mount``, seen by it alone."""
    if shutil.which("unshare") is None:
        pytest.fail("these tests need unshare (util-linux: apt-get install util-linux)")
    mount.mkdir(parents=True, exist_ok=True)
    options = f"size={size}" + (",ro" if read_only else "")
    shell = 'mount -t tmpfs -o "$1" tmpfs "$2" && cd "$3" && exec "$4" -c "$5"'
    return subprocess.run(["unshare", "-Urm", "sh", "-c", shell, "sh", options, str(mount), str(REPO), sys.executable,
                           textwrap.dedent(script)], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def activations(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "acts.npy"
    np.save(path, make_sparse_data(20_000, d=16, n_features=32, seed=7).activations.numpy())
    return path


_CLI = """
import subprocess, sys
result = subprocess.run([sys.executable, "-m", "trainer.cli", *{args!r}], capture_output=True, text=True,
                        env={{**os.environ, "PYTHONPATH": {repo!r}}})
print(json.dumps({{"rc": result.returncode, "stderr": result.stderr, "stdout": result.stdout}}))
"""


def cli_in_tiny_filesystem(mount: Path, size: str, args: list[str], read_only: bool = False, before: str = "") -> dict:
    out = in_tiny_filesystem(mount, size, "import json, os\n" + before + _CLI.format(args=args, repo=str(REPO)), read_only=read_only)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_registry_without_room_is_refused_before_training(tmp_path, activations):
    registry = tmp_path / "small"
    result = cli_in_tiny_filesystem(registry, "64k", ["train", "--activations", str(activations), "--d-sae", "4096",
                                                      "--tokens", "4096000", "--registry", str(registry), "--name", "x",
                                                      "--checkpoint-dir", str(tmp_path / "ckpt")])
    assert result["rc"] == 2 and "MiB free" in result["stderr"] and "Traceback" not in result["stderr"]
    assert not (tmp_path / "ckpt" / "state.safetensors").exists()  # refused before the (long) training started


def test_a_read_only_registry_is_refused_before_training(tmp_path, activations):
    registry = tmp_path / "ro"
    result = cli_in_tiny_filesystem(registry, "1m", ["train", "--activations", str(activations), "--d-sae", "64",
                                                     "--registry", str(registry / "reg"), "--name", "x",
                                                     "--checkpoint-dir", str(tmp_path / "ckpt")], read_only=True)
    assert result["rc"] == 2 and "Read-only file system" in result["stderr"] and "Traceback" not in result["stderr"]
    assert not (tmp_path / "ckpt" / "state.safetensors").exists()


_FILL_WHEN = """
import os, threading, time
def fill(trigger, target, delay=0.0):
    while not os.path.exists(trigger):
        time.sleep(0.005)
    time.sleep(delay)
    with open(target, "wb") as fh:
        try:
            while True:
                fh.write(b"\\0" * 65536)
                fh.flush()
        except OSError:
            pass
"""


def test_a_registry_that_fills_during_training_keeps_the_weights_so_publish_can_be_retried(tmp_path, activations):
    disk, run = tmp_path / "disk", tmp_path / "work"
    run.mkdir()
    # The registry directory appears when train checks it (before training); the disk fills right after.
    before = (f"os.chdir({str(run)!r})\n" + _FILL_WHEN +
              f"threading.Thread(target=fill, args=({str(disk / 'reg')!r}, {str(disk / 'filler')!r}, 0.2), daemon=True).start()\n")
    result = cli_in_tiny_filesystem(disk, "4m", ["train", "--activations", str(activations), "--d-sae", "64", "--tokens", "3000000",
                                                 "--batch-size", "512", "--registry", str(disk / "reg"), "--name", "x"], before=before)
    assert result["rc"] == 2, result
    assert "No space left on device" in result["stderr"] and "Traceback" not in result["stderr"]
    kept = [p for p in run.iterdir() if p.name.startswith("unpublished-x-")]
    assert len(kept) == 1 and str(kept[0]) in result["stderr"]

    from typer.testing import CliRunner

    from monosemantic.artifact import load_dictionary
    from trainer.cli import app

    retried = CliRunner().invoke(app, ["publish", "--checkpoint-dir", str(kept[0]), "--registry", str(tmp_path / "reg2"), "--name", "x"])
    assert retried.exit_code == 0, retried.output
    assert load_dictionary(tmp_path / "reg2", "x").manifest.progress["fraction"] == 1.0


_HARVEST_UNTIL_FULL = """
import json, os, threading, torch
from monosemantic.errors import WriteFailed
from monosemantic.lm import load_lm
from monosemantic.shipped import reference_lm_path
from trainer.harvest import harvest
out, disk = {out!r}, {disk!r}
threading.Thread(target=fill, args=(os.path.join(out, "shard_00000.npy"), os.path.join(disk, "filler")), daemon=True).start()
lm = load_lm(reference_lm_path())
contexts = torch.randint(1, 500, (64, 64), generator=torch.Generator().manual_seed(0))
contexts[:, 0] = 0
report = {{}}
try:
    harvest(lm, contexts, "blocks.0.mlp.hook_post", out, contexts_per_shard=2, progress=False)
    report["first"] = "completed"
except WriteFailed as exc:
    report["first"] = str(exc)
report["after_failure"] = sorted(os.listdir(out))
os.remove(os.path.join(disk, "filler"))
report["resumed"] = harvest(lm, contexts, "blocks.0.mlp.hook_post", out, contexts_per_shard=2, progress=False)["complete"]
report["after_resume"] = sorted(os.listdir(out))
print(json.dumps(report))
"""


def test_a_harvest_that_fills_the_disk_stops_clearly_leaves_no_temporary_file_and_resumes(tmp_path):
    disk = tmp_path / "disk"
    out = in_tiny_filesystem(disk, "10m", _FILL_WHEN + _HARVEST_UNTIL_FULL.format(out=str(disk / "h"), disk=str(disk)))
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert "No space left on device" in report["first"] and "resumes after them" in report["first"]
    assert not any(name.endswith(".tmp") for name in report["after_failure"])
    assert report["resumed"] is True
    assert [n for n in report["after_resume"] if n.startswith("shard_")] == [f"shard_{i:05d}.npy" for i in range(32)]
