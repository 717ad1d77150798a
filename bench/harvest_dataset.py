"""Harvest from a user's dataset against the built-in corpus, and memory while reading a large dataset.

    python bench/harvest_dataset.py [--contexts 512] [--small-mb 20] [--large-mb 400]

1. Tokens/s of the whole ``harvest`` stage (contexts built, forward to the hook, shards written) on the shipped
   model and hook: from a JSON-lines file against the in-memory built-in corpus, each in its own process, the same
   number of contexts. The goal is a ratio of at least 0.9.
2. Peak RSS of building those contexts from a JSON-lines file of ``--small-mb`` and one of ``--large-mb``
   (HF datasets converts it to memory-mapped Arrow once; the packer reads only the documents it needs): memory
   should follow the contexts asked for, not the dataset's size.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

_HARVEST = """
import json, resource, sys, time
from trainer.pipeline import harvest_corpus
from trainer.text import TextSpec
out, contexts, dataset = sys.argv[1], int(sys.argv[2]), sys.argv[3]
text = TextSpec(dataset=dataset) if dataset != "-" else None
started = time.perf_counter()
manifest = harvest_corpus(None, out, hook="blocks.0.mlp.hook_post", contexts=contexts, context_length=256, dtype="float16",
                          max_chars=None, seed=0, text=text)
print(json.dumps({"tokens_per_s": manifest["tokens"] / (time.perf_counter() - started),
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""

_PACK = """
import json, resource, sys, time
from monosemantic.lm import load_lm
from monosemantic.shipped import reference_lm_path
from trainer.text import TextSpec, packed_contexts
tokenizer = load_lm(reference_lm_path()).tokenizer
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
started = time.perf_counter()
contexts, _ = packed_contexts(tokenizer, TextSpec(dataset=sys.argv[1]), "train", 256, int(sys.argv[2]))
print(json.dumps({"seconds": time.perf_counter() - started, "contexts": contexts.shape[0], "rss_before_mb": before,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def write_jsonl(path: Path, megabytes: float) -> None:
    rng = random.Random(0)
    words = [w for w in (ROOT / "README.md").read_text().split() if w.isalpha()]
    with open(path, "w") as fh:
        while fh.tell() < megabytes * 1e6:
            fh.write(json.dumps({"text": " ".join(rng.choice(words) for _ in range(rng.randint(100, 600)))}) + "\n")


def run(code: str, *args: str, cache: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_DATASETS_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, cwd=ROOT, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--contexts", type=int, default=512)
    parser.add_argument("--small-mb", type=float, default=20)
    parser.add_argument("--large-mb", type=float, default=400)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        small, large = tmp / "small.jsonl", tmp / "large.jsonl"
        write_jsonl(small, args.small_mb)
        write_jsonl(large, args.large_mb)
        rates = {"corpus": [], "dataset": []}
        for round_ in range(2):
            for kind, dataset in (("corpus", "-"), ("dataset", str(small))):
                rates[kind].append(run(_HARVEST, str(tmp / f"h-{kind}-{round_}"), str(args.contexts), dataset, cache=tmp / "cache")["tokens_per_s"])
        best = {k: max(v) for k, v in rates.items()}
        print(f"harvest of {args.contexts} contexts x 256: built-in corpus {best['corpus']:,.0f} tok/s, "
              f"JSON-lines dataset {best['dataset']:,.0f} tok/s, ratio {best['dataset'] / best['corpus']:.2f} (best of 2 each)")
        for name, path in (("small", small), ("large", large)):
            for attempt in ("first read (converts to Arrow)", "again (Arrow cache)"):
                r = run(_PACK, str(path), str(args.contexts), cache=tmp / f"cache-{name}")
                print(f"{name} {path.stat().st_size / 1e6:,.0f} MB, {attempt}: {r['contexts']} contexts in {r['seconds']:.1f} s, "
                      f"peak RSS {r['peak_rss_mb']:,.0f} MB (after loading the tokenizer {r['rss_before_mb']:,.0f} MB)")


if __name__ == "__main__":
    main()
