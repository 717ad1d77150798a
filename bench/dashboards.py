"""Feature dashboards at real shapes: this tree from the model and from a harvest, against another checkout.

    python bench/dashboards.py --tree OLD_CHECKOUT [--tokens 25500] [--d-sae 24576] [--hook blocks.8.hook_resid_pre]
    python bench/dashboards.py --shape gemma [--tokens 4080]     # Gemma-2-2B's shape, 16,384 features, this tree only

The model is GPT-2 small's shape with random weights (bench/gpt2_shape.py; its compute equals the real model's),
the dictionary a random TopK one (k 32, so as sparse as a trained dictionary), the contexts random token ids of
256. Each run is a fresh process: trainer/features.py's feature_statistics over the same contexts, timed, with its
peak RSS. "harvest" times the harvest of those contexts at the hook (bf16 shards) and, apart, the dashboards read
from its shards. Prints seconds, tokens/s, peak RSS and the ratios, as JSON lines then a table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gemma_shape import gemma_shaped  # noqa: E402
from gpt2_shape import add_arguments, gpt2_shaped  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

_ONE_RUN = """
import json, resource, sys, time
import torch
torch.set_num_threads(2)
from monosemantic.lm import load_lm
from monosemantic.sae import SAEConfig, build_sae
from trainer.features import feature_statistics
model_dir, hook, d_sae, tokens, way, work = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5], sys.argv[6]
lm = load_lm(model_dir, dtype="auto")
torch.manual_seed(0)
sae = build_sae(SAEConfig.build(architecture="topk", d_in=lm.model.config.hidden_size, d_sae=d_sae, k=32))
n = max(1, tokens // 255)
# ids the tokenizer can decode (the labels decode them): the Gemma shape's 256k rows outnumber the reference tokenizer's
contexts = torch.randint(1, min(lm.model.config.vocab_size, len(lm.tokenizer)), (n, 256), generator=torch.Generator().manual_seed(1))
contexts[:, 0] = lm.tokenizer.bos_token_id
extra = {}
if way == "harvest":
    from trainer.feature_activations import HarvestActivations
    from trainer.harvest import harvest
    started = time.perf_counter()
    harvest(lm, contexts, hook, work, dtype="bfloat16", progress=False)
    extra["harvest_s"] = time.perf_counter() - started
    started = time.perf_counter()
    tensors, labels = feature_statistics(lm, sae, hook, cfg=None, progress=False, activations=HarvestActivations(work, progress=False))
else:
    started = time.perf_counter()
    tensors, labels = feature_statistics(lm, sae, hook, contexts, progress=False)
seconds = time.perf_counter() - started
print(json.dumps({"way": way, "seconds": seconds, "tokens": int(tensors["stats_tokens"]),
                  "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, **extra}))
"""


def run(tree: Path, model: Path, args: argparse.Namespace, way: str) -> dict:
    with tempfile.TemporaryDirectory() as work:
        env = {**os.environ, "PYTHONPATH": str(tree), "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
        out = subprocess.run([sys.executable, "-c", _ONE_RUN, str(model), args.hook, str(args.d_sae), str(args.tokens), way, work],
                             cwd=tree, env=env, capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    print(json.dumps({"tree": str(tree), **result}), flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tree", type=Path, help="the other checkout (git worktree add /tmp/old HEAD~1)")
    parser.add_argument("--shape", choices=("gpt2", "gemma"), default="gpt2")
    parser.add_argument("--tokens", type=int)
    parser.add_argument("--d-sae", type=int)
    parser.add_argument("--hook")
    add_arguments(parser)
    args = parser.parse_args()
    if args.shape == "gemma":
        args.tokens, args.d_sae, args.hook = args.tokens or 4080, args.d_sae or 16_384, args.hook or "blocks.13.hook_resid_pre"
        gemma(gemma_shaped(), args)
        return
    if args.tree is None:
        parser.error("--tree is needed at GPT-2's shape (the before/after)")
    args.tokens, args.d_sae, args.hook = args.tokens or 25_500, args.d_sae or 24_576, args.hook or "blocks.8.hook_resid_pre"
    model = gpt2_shaped(args)
    old = run(args.tree.resolve(), model, args, "model")
    new = run(ROOT, model, args, "model")
    shards = run(ROOT, model, args, "harvest")
    rate = lambda r: r["tokens"] / r["seconds"]  # noqa: E731
    print(f"\n| {args.d_sae:,} features, {new['tokens']:,} tokens, {args.hook} | seconds | tokens/s | peak RSS MiB | speed vs the other tree |")
    print("| --- | --- | --- | --- | --- |")
    for label, r in (("other tree (three model passes)", old), ("this tree, from the model (one pass)", new),
                     ("this tree, from a harvest's shards", shards)):
        print(f"| {label} | {r['seconds']:.1f} | {rate(r):,.0f} | {r['peak_mib']:,.0f} | {rate(r) / rate(old):.2f}× |")
    print(f"| (the harvest itself, bf16 shards) | {shards['harvest_s']:.1f} | {shards['tokens'] / shards['harvest_s']:,.0f} | | |")
    # A run is a fixed part (logit effects, neighbours, labels: independent of the tokens) plus a part linear in them;
    # the shards' path at four times the tokens separates the two.
    args.tokens *= 4
    larger = run(ROOT, model, args, "harvest")
    per_token = (larger["seconds"] - shards["seconds"]) / (larger["tokens"] - shards["tokens"])
    fixed = shards["seconds"] - per_token * shards["tokens"]
    forward = shards["harvest_s"] / shards["tokens"]  # a model forward per token, as the harvest ran it
    print(f"\nfrom shards at {larger['tokens']:,} tokens: {larger['seconds']:.1f} s; fixed part {fixed:.1f} s, "
          f"{per_token * 1e3:.2f} ms per token")
    print(f"1M tokens from shards: {(fixed + per_token * 1e6) / 60:.1f} min; from the model (one forward more): "
          f"{(fixed + (per_token + forward) * 1e6) / 60:.1f} min")


def gemma(model: Path, args: argparse.Namespace) -> None:
    """The Gemma shape: the dashboards from the model, in the checkpoint's bf16, with their peak RSS against the
    checkpoint's bytes (the old code could not allocate the [16,384, 256,000] logit-effects matrix at all)."""
    checkpoint = sum(p.stat().st_size for p in model.glob("*.safetensors"))
    r = run(ROOT, model, args, "model")
    print(f"\n| Gemma-2-2B shape (bf16, {checkpoint / 2**30:.2f} GiB), {args.d_sae:,} features, {r['tokens']:,} tokens, "
          f"{args.hook} | seconds | peak RSS | peak RSS − checkpoint |")
    print("| --- | --- | --- | --- |")
    print(f"| this tree, from the model | {r['seconds']:.1f} | {r['peak_mib'] / 1024:.2f} GiB | {(r['peak_mib'] * 2**20 - checkpoint) / 2**30:.2f} GiB |")


if __name__ == "__main__":
    main()
