"""Interop, measured: how closely imports and exports agree with SAELens and sparsify, and what an import costs at
the shapes users bring.

    python bench/interop.py [--d-in 2304] [--d-sae 16384]

1. Agreement: max |a − b| / max |b| between monosemantic and the library itself, encoding and decoding the same
   activations, for every case tests/test_interop.py proves (the goal is ≤ 1e-4).
2. Cost: importing a Gemma Scope-sized JumpReLU dictionary saved by SAELens (``apply_b_dec_to_input: false``, so the
   b_dec fold runs) and exporting it again: seconds and the process's peak RSS against the file's size.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_interop import SAELENS_CASES, about, close, ours, saelens_sae, sparsify_dense, sparsify_sae  # noqa: E402

from monosemantic.interop import get_format  # noqa: E402


def agreement(tmp: Path) -> list[tuple[str, float, float]]:
    from sae_lens import SAE
    from sparsify import SparseCoder

    x = torch.randn(2048, 48, generator=torch.Generator().manual_seed(0)) * 3 + 0.5
    rows = []
    for case, (architecture, cfg) in sorted(SAELENS_CASES.items()):
        for dtype in ("float32", "bfloat16"):
            saelens_sae(architecture, dtype, **cfg).save_model(tmp / f"{case}-{dtype}")
            theirs = SAE.load_from_disk(tmp / f"{case}-{dtype}", dtype="float32")
            mine = get_format("saelens").read(tmp / f"{case}-{dtype}").sae
            f = theirs.encode(x)
            rows.append((f"import SAELens {case} ({dtype})", close(mine.encode(x), f), close(mine.decode(f), theirs.decode(f))))
    sparsify_sae(torch.float32).save_to_disk(tmp / "sparsify")
    theirs = SparseCoder.load_from_disk(tmp / "sparsify")
    mine = get_format("sparsify").read(tmp / "sparsify").sae
    out = theirs.encode(x)
    rows.append(("import sparsify topk", close(mine.encode(x), sparsify_dense(theirs, x)),
                 close(mine.decode(sparsify_dense(theirs, x)), theirs.decode(out.top_acts, out.top_indices))))
    for architecture in ("relu", "topk", "jumprelu"):
        sae = ours(architecture)
        get_format("saelens", writing=True).write(sae, tmp / f"out-{architecture}", about())
        theirs = SAE.load_from_disk(tmp / f"out-{architecture}")
        f = sae.encode(x)
        rows.append((f"export {architecture} to SAELens", close(theirs.encode(x), f), close(theirs.decode(f), sae.decode(f))))
    sae = ours("topk")
    get_format("sparsify", writing=True).write(sae, tmp / "out-sparsify", about())
    theirs = SparseCoder.load_from_disk(tmp / "out-sparsify")
    out = theirs.encode(x)
    rows.append(("export topk to sparsify", close(sparsify_dense(theirs, x), sae.encode(x)),
                 close(theirs.decode(out.top_acts, out.top_indices), sae.decode(sparsify_dense(theirs, x)))))
    return rows


_COST = """
import sys, time
from pathlib import Path
from monosemantic.interop import get_format
sys.path.insert(0, sys.argv[2])
from test_interop import about
tmp = Path(sys.argv[1])
def status(key):  # VmHWM, not ru_maxrss: after fork + exec, ru_maxrss starts at the parent's high-water mark
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(key)) / 1024
before = status("VmHWM:")
started = time.perf_counter()
imported = get_format("saelens").read(tmp / "big")
read_s = time.perf_counter() - started
started = time.perf_counter()
get_format("saelens", writing=True).write(imported.sae, tmp / "big-out", about())
write_s = time.perf_counter() - started
print(read_s, write_s, before, status("VmHWM:"))
"""


def cost(tmp: Path, d_in: int, d_sae: int) -> str:
    """Import and export in a fresh process, whose peak RSS is then the import's and the export's own."""
    from sae_lens import JumpReLUSAE, JumpReLUSAEConfig

    sae = JumpReLUSAE(JumpReLUSAEConfig(d_in=d_in, d_sae=d_sae, apply_b_dec_to_input=False))
    with torch.no_grad():
        for p in sae.parameters():
            p.normal_(0, 0.02)
    sae.save_model(tmp / "big")
    del sae
    size = sum(p.stat().st_size for p in (tmp / "big").iterdir())
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", _COST, str(tmp), str(root / "tests")], capture_output=True, text=True,
                         check=True, cwd=root, env={**os.environ, "PYTHONPATH": str(root)})
    read_s, write_s, before, peak = (float(v) for v in out.stdout.split()[-4:])
    return (f"{d_in} x {d_sae} JumpReLU ({size / 2**20:,.0f} MiB of safetensors): import {read_s:.1f} s, export {write_s:.1f} s; "
            f"peak RSS {peak:,.0f} MiB, {peak - before:+,.0f} MiB over the process after its imports ({before:,.0f} MiB): "
            f"{(peak - before) / (size / 2**20):.1f}x the file")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--d-in", type=int, default=2304)
    parser.add_argument("--d-sae", type=int, default=16384)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        rows = agreement(tmp)
        width = max(len(r[0]) for r in rows)
        print(f"{'case':<{width}}  encode    decode   (max |a-b| / max |b|; goal <= 1e-4)")
        for name, enc, dec in rows:
            print(f"{name:<{width}}  {enc:.1e}  {dec:.1e}")
        print(f"worst: {max(max(r[1], r[2]) for r in rows):.1e}")
        print(cost(tmp, args.d_in, args.d_sae))


if __name__ == "__main__":
    main()
