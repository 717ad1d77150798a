"""The training side's red-team cases (issue 26), run as a user would, with the ``monosemantic-train`` of a tree.

    python bench/training_red_team.py [--tree OLD_CHECKOUT]

Each case builds its own small data and registry with that tree's own commands, does the damage, and prints what
the tree did: the exit code (0 success, 2 refused, 1 a traceback), whether a version got published, and the last
line it printed. Run it on an older checkout and on this one to get RELIABILITY.md's training-side table.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


class Tree:
    def __init__(self, tree: Path, work: Path) -> None:
        self.tree, self.work = tree, work
        self.data = work / "acts.npy"
        rows = np.random.default_rng(0).standard_normal((20_000, 16)).astype(np.float32) * np.linspace(0.5, 2, 16, dtype=np.float32)
        np.save(self.data, np.maximum(rows, 0))

    def run(self, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
        env = {**os.environ, "PYTHONPATH": str(self.tree), "HF_HUB_OFFLINE": "1"}
        started = time.perf_counter()
        result = subprocess.run([sys.executable, "-m", "trainer.cli", *args], capture_output=True, text=True, env=env,
                                cwd=cwd or self.tree, timeout=600)
        result.seconds = time.perf_counter() - started
        return result

    def train(self, data: Path, registry: Path | None, *extra: str) -> subprocess.CompletedProcess:
        args = ["train", "--activations", str(data), "--d-sae", "64", "--tokens", "40960", "--batch-size", "512", *extra]
        if registry is not None:
            args += ["--registry", str(registry), "--name", "toy"]
        return self.run(*args)

    def harvest(self, out: Path, *extra: str) -> subprocess.CompletedProcess:
        return self.run("harvest", "--out", str(out), "--contexts", "8", "--max-chars", "200000", *extra)


def said(result: subprocess.CompletedProcess, registry: Path | None = None) -> str:
    """Exit code, published versions, and the line that says why (an error line or typer's usage error if any)."""
    lines = [line.strip(" │╭╮╰╯─") for line in (result.stderr + result.stdout).splitlines()]
    lines = [line for line in lines if line]
    reasons = [line for line in lines if line.startswith(("error:", "Invalid value", "Error", "ZeroDivisionError", "ValueError",
                                                          "RuntimeError", "JSONDecodeError", "FileNotFoundError", "KeyError"))]
    last = (reasons or lines or [""])[-1]
    published = ""
    if registry is not None and (registry / "toy").exists():
        published = f", versions {sorted(p.name for p in (registry / 'toy').iterdir() if re.fullmatch(r'v[0-9]+', p.name))}"
    return f"exit {result.returncode} after {result.seconds:.1f} s{published}: {last[:150]}"


def rows_the_scale_sample_misses(t: Tree, count: int) -> Path:
    """200,000 rows with NaN in ``count`` rows that the input-scale sample (32,768 rows drawn with the seed-0
    generator from the 190,000 training rows, as trainer/train.py draws them) does not contain."""
    rows = np.maximum(np.random.default_rng(2).standard_normal((200_000, 16)).astype(np.float32), 0)
    sampled = set(np.random.default_rng(0).choice(190_000, size=32_768, replace=False).tolist())
    bad = [r for r in range(150_000, 190_000) if r not in sampled][:count]
    rows[bad, 3] = np.nan
    path = t.work / "nan-unsampled.npy"
    np.save(path, rows)
    return path


def with_bad_rows(t: Tree, rows: list[int], value: float) -> Path:
    data = np.load(t.data)
    data[rows, 3] = value
    path = t.work / f"bad-{len(rows)}-{value}.npy"
    np.save(path, data)
    return path


def cases(t: Tree) -> dict[str, str]:
    w, out = t.work, {}
    unsampled = rows_the_scale_sample_misses(t, 5)
    out["1 five NaN rows of 200,000 (none in the input-scale sample), topk"] = said(t.train(unsampled, w / "r1", "--arch", "topk", "--k", "4"), w / "r1")
    out["1 the same, jumprelu"] = said(t.train(unsampled, w / "r1a", "--arch", "jumprelu"), w / "r1a")
    out["1 the same, relu"] = said(t.train(unsampled, w / "r1b"), w / "r1b")
    out["1 one NaN in the held-out tail"] = said(t.train(with_bad_rows(t, [19999], np.nan), w / "r1c"), w / "r1c")
    out["1 --lr 1e6"] = said(t.train(t.data, w / "r1d", "--arch", "topk", "--k", "4", "--lr", "1e6"), w / "r1d")

    reg = w / "r2"
    t.train(t.data, reg)
    manifest_path = reg / "toy" / "v1" / "manifest.json"
    original = manifest_path.read_text()
    m = json.loads(original)
    m["input_scale"] *= 10
    m["sae"]["input_scale"] *= 10
    manifest_path.write_text(json.dumps(m, indent=2))
    out["2 manifest edited: input scale x10"] = said(t.run("evaluate", "--registry", str(reg), "--dictionary", "toy:1", "--activations", str(t.data)))
    m = json.loads(original)
    m["files"].pop("features.safetensors", None)
    manifest_path.write_text(json.dumps(m, indent=2))
    out["2 manifest edited: a file dropped from files"] = said(t.run("evaluate", "--registry", str(reg), "--dictionary", "toy:1", "--activations", str(t.data)))
    manifest_path.write_text(original)
    shutil.copytree(reg / "toy" / "v1", reg / "toy" / "v3")
    r = t.run("evaluate", "--registry", str(reg), "--dictionary", "toy:3", "--activations", str(t.data), "--json")
    out["2 a copy of v1 at v3"] = said(r)

    h = w / "h3"
    t.harvest(h)
    shard = np.load(h / "shard_00000.npy", mmap_mode="r+")
    shard[100:104, :512] = 0.5
    shard.flush()
    del shard
    out["3 2,048 values overwritten in a shard"] = said(t.run("train", "--harvest", str(h), "--d-sae", "64", "--tokens", "4096", "--batch-size", "512", "--registry", str(w / "r3"), "--name", "toy"), w / "r3")
    path = h / "shard_00000.npy"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    out["3 a truncated shard"] = said(t.run("train", "--harvest", str(h), "--d-sae", "64", "--tokens", "4096", "--batch-size", "512"))

    t.train(t.data, None, "--checkpoint-dir", str(w / "c4"))
    other = w / "other.npy"
    np.save(other, np.load(t.data)[::-1].copy())
    out["4 --resume on another file of the same width"] = said(t.train(other, None, "--checkpoint-dir", str(w / "c4"), "--resume"))
    wide = w / "wide.npy"
    np.save(wide, np.abs(np.random.default_rng(1).standard_normal((20_000, 24)).astype(np.float32)))
    out["4 --resume on data of another width"] = said(t.train(wide, None, "--checkpoint-dir", str(w / "c4"), "--resume"))

    t.train(t.data, None, "--checkpoint-dir", str(w / "c5"))
    (w / "c5" / "state.json").write_text(json.dumps({"step": 1}))
    out["5 a state.json beside the checkpoint's weights (torn)"] = said(t.train(t.data, None, "--checkpoint-dir", str(w / "c5"), "--resume"))

    reg = w / "r6"
    t.train(t.data, reg)
    t.train(t.data, reg)
    shutil.rmtree(reg / "toy" / "v2")
    out["6 rm -rf v2, then publish"] = said(t.train(t.data, reg), reg)

    digests = set()
    for i in range(4):
        reg = w / f"r7-{i}"
        t.train(t.data, reg, "--seed", "3", "--arch", "jumprelu")
        digests.add(__import__("hashlib").sha256((reg / "toy" / "v1" / "sae.safetensors").read_bytes()).hexdigest())
    out["7 four identical --seed 3 runs"] = f"{len(digests)} distinct sae.safetensors sha256"

    return out | more_cases(t)


def more_cases(t: Tree) -> dict[str, str]:
    w, out = t.work, {}
    code = ("import sys\nfrom trainer.activations import open_activation_file\nfrom trainer.train import TrainConfig, Trainer\n"
            "cfg = TrainConfig.build(d_sae=64, tokens=80 * 512, batch_size=512, checkpoint_every=10, target_l0=4)\n"
            "Trainer(cfg, open_activation_file(sys.argv[1]), sys.argv[2]).run(progress=False, stop_after_steps=10)\n")
    subprocess.run([sys.executable, "-c", code, str(t.data), str(w / "c8")], env={**os.environ, "PYTHONPATH": str(t.tree)}, cwd=t.tree, check=True, capture_output=True)
    out["8 publish --checkpoint-dir of a run stopped at step 10 of 80"] = said(t.run("publish", "--checkpoint-dir", str(w / "c8"), "--registry", str(w / "r8"), "--name", "toy"), w / "r8")
    h = w / "h8"
    t.harvest(h)
    manifest = json.loads((h / "harvest.json").read_text())
    manifest.update(complete=False, contexts=manifest["contexts"] * 2)
    (h / "harvest.json").write_text(json.dumps(manifest))
    out["8 train on a harvest marked complete: false"] = said(t.run("train", "--harvest", str(h), "--d-sae", "64", "--tokens", "4096", "--batch-size", "512", "--registry", str(w / "r8b"), "--name", "toy"), w / "r8b")
    out["9 harvest --contexts 0"] = said(t.run("harvest", "--out", str(w / "h9"), "--contexts", "0", "--max-chars", "200000"))
    out["9 harvest --contexts -3"] = said(t.run("harvest", "--out", str(w / "h9b"), "--contexts", "-3", "--max-chars", "200000"))
    r = t.run("harvest", "--out", str(w / "h9c"), "--contexts", "100000", "--max-chars", "60000")
    out["9 harvest --contexts 100000 on a small corpus"] = f"exit {r.returncode}: {' '.join(r.stdout.split())[:120]} / stderr: {r.stderr.strip().splitlines()[-1][:120] if r.stderr.strip() else ''}"
    lm = str(t.tree / "artifacts" / "reference-lm")
    out["10 train --model M --hook bogus.hook"] = said(t.train(t.data, w / "r10", "--model", lm, "--hook", "bogus.hook"), w / "r10")
    out["11 --k 8 with relu"] = said(t.train(t.data, w / "r11", "--arch", "relu", "--k", "8"), w / "r11")
    out["11 --target-l0 500 with --d-sae 64"] = said(t.train(t.data, w / "r11b", "--target-l0", "500"), w / "r11b")
    t.harvest(w / "h11")
    t.run("train", "--harvest", str(w / "h11"), "--d-sae", "64", "--tokens", "4096", "--batch-size", "512", "--registry", str(w / "r11c"), "--name", "toy")
    out["11 evaluate --tokens -100"] = said(t.run("evaluate", "--registry", str(w / "r11c"), "--dictionary", "toy", "--tokens", "-100"))
    out["11 --dtype int8 (4M training tokens)"] = said(t.train(t.data, w / "r11d", "--dtype", "int8", "--tokens", "4000000"), w / "r11d")
    out["14 --seed -1"] = said(t.train(t.data, None, "--seed", "-1"))
    flat = w / "flat.npy"
    np.save(flat, np.ones((4000, 16), dtype=np.float32))
    out["14 constant rows"] = said(t.train(flat, None))
    out["14 features --top-k 0"] = said(t.run("features", "--registry", str(w / "r11c"), "--dictionary", "toy", "--top-k", "0"))
    h = w / "h14"
    t.harvest(h)
    (h / "harvest.json").write_text('{"shards": [')
    out["14 a truncated harvest.json"] = said(t.run("train", "--harvest", str(h), "--d-sae", "64", "--tokens", "4096", "--batch-size", "512"))
    t.train(t.data, None, "--checkpoint-dir", str(w / "c14"))
    (w / "c14" / "state.safetensors").unlink()
    out["14 a missing state.safetensors"] = said(t.run("publish", "--checkpoint-dir", str(w / "c14"), "--registry", str(w / "r14"), "--name", "toy"))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tree", type=Path, default=ROOT)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        results = cases(Tree(args.tree.resolve(), Path(tmp)))
    print(f"tree: {args.tree.resolve()}\n\n| case | result |\n| --- | --- |")
    for case, result in results.items():
        print(f"| {case} | {result.replace('|', '/')} |")


if __name__ == "__main__":
    main()
