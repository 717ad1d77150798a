"""The model's memory when served in its checkpoint's dtype (MONOSEMANTIC_DTYPE=auto) against widened to fp32.

    python bench/serve_dtype.py [--layers 12 --d-model 768 --vocab 50257]   # GPT-2 small's shape, random weights, bf16

Saves the model once in bfloat16 under /tmp, then in a fresh process per dtype loads it as the service does
(monosemantic.model.load_model) and runs one 64-token forward; printed: the checkpoint's bytes, the process's RSS
above a process that only imported the same modules, and its high-water mark.
"""

from __future__ import annotations

import argparse
import subprocess
import sys

from gpt2_shape import add_arguments, gpt2_shaped

CHILD = """
import resource, sys, torch
from monosemantic.model import load_model
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2LMHeadModel  # imported before the base is read
def rss():
    return next(int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith('VmRSS:'))
base = rss()
model = load_model(sys.argv[1], 'cpu', sys.argv[2])
with torch.inference_mode():
    model.lm.model(torch.zeros((1, 64), dtype=torch.long))
print(rss() - base, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base, next(model.lm.model.parameters()).dtype)
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_arguments(parser)
    where = gpt2_shaped(parser.parse_args(), "bfloat16")
    checkpoint = sum(f.stat().st_size for f in where.glob("*.safetensors"))
    print(f"checkpoint {checkpoint / 2**20:.0f} MiB (bf16)\n\n| dtype | model's RSS | high-water above the imports | RSS / checkpoint |\n| --- | --- | --- | --- |")
    for dtype in ("auto", "float32"):
        out = subprocess.run([sys.executable, "-c", CHILD, str(where), dtype], capture_output=True, text=True, check=True).stdout.split()
        rss, peak = int(out[0]), int(out[1])
        print(f"| {dtype} ({out[2]}) | {rss / 2**20:.0f} MiB | {peak / 2**20:.0f} MiB | {rss / checkpoint:.2f}× |")


if __name__ == "__main__":
    main()
