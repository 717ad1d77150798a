"""The dashboards' logit effects at real shapes: the whole [d_sae, vocab] matrix against the chunked top-k
(monosemantic.lm.direct_logit_extremes), peak memory and time, each in a fresh process.

    python bench/logit_effects.py [--d-sae 24576] [--vocab 50257] [--d-model 768] [--only chunked]

The model is one GPT-2 block of the given width built from GPT2Config (random weights; only the final norm and the
unembedding take part), the directions random unit rows, as a dictionary's decoder is.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def run(way: str, d_sae: int, vocab: int, d_model: int) -> dict:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from monosemantic.lm import direct_logit_effects, direct_logit_extremes

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=d_model, n_head=12, vocab_size=vocab, n_positions=64)).eval()
    directions = torch.nn.functional.normalize(torch.randn(d_sae, d_model), dim=-1)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    if way == "dense":  # what trainer/features.py did before: the matrix, its negated copy, two top-ks
        effects = direct_logit_effects(model, "blocks.0.hook_resid_post", directions)
        up = effects.topk(10, dim=-1)
        (-effects).topk(10, dim=-1)  # the negated copy and its top-k, as the old code made them
        ids = up.indices
    else:
        ids = direct_logit_extremes(model, "blocks.0.hook_resid_post", directions, 10).up_ids
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"seconds": seconds, "extra_mib": (peak - before) / 1024, "checksum": int(ids[:, 0].sum())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--d-sae", type=int, default=24576)
    parser.add_argument("--vocab", type=int, default=50257)
    parser.add_argument("--d-model", type=int, default=768)
    parser.add_argument("--only", choices=("dense", "chunked"), help="run one way (the dense matrix cannot be allocated at Gemma-2's shape)")
    parser.add_argument("--way", choices=("dense", "chunked"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.way:
        print(json.dumps(run(args.way, args.d_sae, args.vocab, args.d_model)))
        return
    results = {}
    for way in (args.only,) if args.only else ("dense", "chunked"):
        out = subprocess.run([sys.executable, __file__, "--way", way, "--d-sae", str(args.d_sae), "--vocab", str(args.vocab),
                              "--d-model", str(args.d_model)], capture_output=True, text=True)
        if out.returncode != 0:
            print(f"{way}: failed ({out.stderr.strip().splitlines()[-1] if out.stderr.strip() else out.returncode})")
            continue
        results[way] = json.loads(out.stdout.strip().splitlines()[-1])
        r = results[way]
        print(f"{way:8s} {args.d_sae} x {args.vocab}: {r['seconds']:.1f} s, peak memory above the model {r['extra_mib']:.0f} MiB", flush=True)
    if len(results) == 2:
        same = results["dense"]["checksum"] == results["chunked"]["checksum"]
        print(f"chunked / dense memory {results['chunked']['extra_mib'] / results['dense']['extra_mib']:.3f}, "
              f"time {results['chunked']['seconds'] / results['dense']['seconds']:.2f}x; same top token ids: {same}")


if __name__ == "__main__":
    main()
