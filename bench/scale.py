"""Every stage at the real shapes, one command: harvest → train → features → serve → generate on GPT-2 small's and
Gemma-2-2B's shapes, each figure beside its baseline from the same run (issue 24's table).

    python bench/scale.py --tree OLD_CHECKOUT [--shapes gpt2,gemma] [--stages harvest,train,features,serve,generate] [--quick]

The models are built from transformers config classes with random weights (bench/gpt2_shape.py,
bench/gemma_shape.py; cached under /tmp; never in the test suite): their compute and bytes equal the real ones'.
Each stage is its own bench script, run here in a fresh process with the shape's widths, its full output kept in
the log (--log); the summary at the end repeats each stage's table rows and ratio lines:

- harvest: bench/harvest.py (tok/s against a full forward with output_hidden_states), and `monosemantic-train
  harvest` itself, its peak RSS against the checkpoint plus one shard;
- train: bench/train_sae.py at the shape's widths, TopK against sparsify, ReLU and JumpReLU against SAELens;
- features: bench/dashboards.py (GPT-2: from the model and from shards against --tree, another checkout, e.g.
  `git worktree add /tmp/old <commit>`; Gemma: within memory);
- serve: bench/serve_scale.py (memory, start, overload with and without the wait bound), and at GPT-2's shape
  bench/serve.py --shape gpt2 at 32 clients against the naive server;
- generate: bench/generation.py, steered and unsteered against HF `generate` (at Gemma's shape 32 tokens, 3 rounds).

A full run takes over an hour on two cores; --quick shortens every stage (fewer steps, tokens and seconds).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
SHAPES = {  # d_in, d_sae, the hook the dictionaries read (a middle layer's residual stream)
    "gpt2": {"d_in": 768, "d_sae": 24_576, "hook": "blocks.8.hook_resid_pre"},
    "gemma": {"d_in": 2304, "d_sae": 16_384, "hook": "blocks.12.hook_resid_post"},
}

_HARVEST_PEAK = """
import resource, runpy, sys
sys.argv = ["monosemantic-train", "harvest", *sys.argv[1:]]
try:
    runpy.run_module("trainer.cli", run_name="__main__")
except SystemExit as exit:
    if exit.code:
        raise
print("peak_rss_bytes", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""


# The harvest's baseline: a bare process that loads the same checkpoint with transformers, in the same dtype, and
# runs one forward of the model's body on one harvest batch (trainer/harvest.py's 32 contexts of the CLI's default
# 256 tokens). At GPT-2's shape that forward's activations, not the model or a shard, set the high-water mark.
_BARE_FORWARD = """
import resource, sys, torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16)
with torch.inference_mode():
    model.base_model(torch.randint(0, model.config.vocab_size, (32, 256)))
print("bare_peak_rss_bytes", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""


def model_dir(shape: str) -> Path:
    sys.path.insert(0, str(BENCH))
    if shape == "gemma":
        from gemma_shape import gemma_shaped

        return gemma_shaped()
    import argparse as _argparse

    from gpt2_shape import gpt2_shaped

    return gpt2_shaped(_argparse.Namespace(layers=12, d_model=768, vocab=50257), "bfloat16")


def stages(shape: str, quick: bool, tree: Path | None) -> list[tuple[str, list[str], dict[str, str]]]:
    """(stage, argv, extra environment) for one shape."""
    s, py = SHAPES[shape], sys.executable
    model = str(model_dir(shape))
    runs = [
        ("harvest", [py, str(BENCH / "harvest.py"), "--model", model, "--hook", s["hook"], "--contexts", "16" if quick else "64",
                     "--batch", "8"], {}),
        ("harvest", [py, "-c", _BARE_FORWARD, model], {}),
        ("harvest", [py, "-c", _HARVEST_PEAK, "--model", model, "--hook", s["hook"], "--out", HARVEST_OUT[shape],
                     "--contexts", "16" if quick else "64", "--dtype", "bfloat16"], {}),
        ("train", [py, str(BENCH / "train_sae.py"), "--d-in", str(s["d_in"]), "--d-sae", str(s["d_sae"]), "--k", "32",
                   "--steps", "3" if quick else "5"], {}),
        *([("features", [py, str(BENCH / "dashboards.py"), "--shape", "gemma"], {})] if shape == "gemma" else
          [("features", [py, str(BENCH / "dashboards.py"), "--tree", str(tree), "--tokens", "4080" if quick else "25500"], {})]
          if tree else []),
        ("serve", [py, str(BENCH / "serve_scale.py"), "--shape", shape, "--seconds", "8" if quick else "20"], {}),
    ]
    if shape == "gpt2":
        runs.append(("serve", [py, str(BENCH / "serve.py"), "--shape", "gpt2", "--clients", "32", "--seconds", "4" if quick else "10"], {}))
        runs.append(("generate", [py, str(BENCH / "generation.py"), "--rounds", "2" if quick else "5", "--dtype", "bfloat16"], {}))
    else:  # a 2.6B model on two cores: fewer, shorter rounds
        runs.append(("generate", [py, str(BENCH / "generation.py"), "--shape", "gemma", "--tokens", "16" if quick else "32",
                                  "--rounds", "2" if quick else "3"], {}))
    return runs


SUMMARY = re.compile(r"^\|(?! ---)|ours/peer|->|tok/s|peak_rss_bytes|min;|1M tokens")
HARVEST_OUT = {shape: tempfile.mkdtemp(prefix=f"scale-harvest-{shape}-") for shape in SHAPES}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", default="gpt2,gemma")
    parser.add_argument("--stages", default="harvest,train,features,serve,generate")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--tree", type=Path, help="another checkout, for the dashboards' before/after at GPT-2's shape")
    parser.add_argument("--log", type=Path, default=Path(tempfile.gettempdir()) / "monosemantic-bench-scale.log")
    args = parser.parse_args()
    wanted = set(args.stages.split(","))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    summary: list[str] = []
    bare = float('nan')
    with args.log.open("w") as log:
        for shape in args.shapes.split(","):
            checkpoint = sum(p.stat().st_size for p in model_dir(shape).glob("*.safetensors"))
            if shape == "gpt2" and "features" in wanted and args.tree is None:
                summary.append("gpt2 features: not run (give --tree OLD_CHECKOUT for its before/after)")
            for stage, argv, extra in stages(shape, args.quick, args.tree):
                if stage not in wanted:
                    continue
                started = time.perf_counter()
                header = f"== {shape} {stage}: {' '.join(a if len(a) < 80 else '<script>' for a in argv[1:])}"
                print(header, flush=True)
                log.write(header + "\n")
                done = subprocess.run(argv, cwd=ROOT, env={**env, **extra}, capture_output=True, text=True)
                log.write(done.stdout + done.stderr)
                log.flush()
                lines = [line for line in done.stdout.splitlines() if SUMMARY.search(line)]
                for line in lines:
                    if line.startswith("bare_peak_rss_bytes"):
                        bare = int(line.split()[1])
                        line = f"a bare transformers load + one forward of a harvest batch: peak RSS {bare / 2**30:.2f} GiB"
                    elif line.startswith("peak_rss_bytes"):
                        peak = int(line.split()[1])
                        shards = sum(f.stat().st_size for f in Path(HARVEST_OUT[shape]).rglob("shard_*.npy"))
                        line = (f"harvest peak RSS {peak / 2**30:.2f} GiB = {peak / (checkpoint + shards):.2f}× the checkpoint "
                                f"plus its shards ({(checkpoint + shards) / 2**30:.2f} GiB; goal ≤ 1.3×), "
                                f"{peak / bare:.2f}× the bare load + forward above")
                    summary.append(f"{shape} {stage}: {line}")
                if done.returncode:
                    summary.append(f"{shape} {stage}: FAILED (exit {done.returncode}): {done.stderr.strip().splitlines()[-1:]}")
                print(f"   {time.perf_counter() - started:.0f} s", flush=True)
    print(f"\nsummary (full output: {args.log})")
    print("\n".join(summary))
    print(json.dumps({"shapes": args.shapes, "stages": sorted(wanted), "quick": args.quick}))


if __name__ == "__main__":
    main()
