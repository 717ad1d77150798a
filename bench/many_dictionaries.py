"""Reading 4 dictionaries at 4 hooks in one request against reading 1: the forward is shared, so the cost should be
far below 4× (the goal: at most 1.5×). Run in this process on the engine itself (no HTTP), at a GPT-2-small shape
(12 layers × 768, random weights from its config class: nothing is downloaded) with 768→16,384 dictionaries at
blocks 2, 5, 8 and 11, and on the shipped reference (4 hooks of its one block).

    python bench/many_dictionaries.py [--repeats 15]

Prints, per model, the median milliseconds of one 64-token request through Engine.activations (validation, the
worker's forward and encodes, the response) for the deepest dictionary alone and for all four, and their ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from monosemantic import api
from monosemantic.artifact import HookRef, ModelRef, load_dictionary, publish
from monosemantic.lm import load_lm, read_activations, resolve_hook
from monosemantic.sae import SAEConfig, build_sae
from monosemantic.shipped import REFERENCE_DICTIONARY, reference_lm_path, reference_registry_path

TEXT = "import os\nimport sys\n\ndef main(argv):\n    for name in os.listdir(argv[1]):\n        print(name, len(name))\n" * 2


L0 = 32  # active features per token, as trained dictionaries have (the shipped one: ~30)


def _publish_at(registry: Path, lm, hooks: list[str], d_sae: int, prefix: str) -> list[str]:
    names = []
    width = lm.model.config.n_embd
    ids = lm.tokenizer(TEXT * 4, return_tensors="pt").input_ids[:, :256]
    for i, alias in enumerate(hooks):
        point = resolve_hook(lm.model, alias)
        sae = build_sae(SAEConfig.build(architecture="relu", d_in=width, d_sae=d_sae), seed=i)
        with torch.no_grad():
            # Random directions fire on half the features; one bias for all, set at the quantile of the real
            # pre-activations that leaves L0 active features per token, makes the readout as sparse as a trained one's.
            pre = sae.pre_activations(read_activations(lm.model, ids, point)[0])
            sae.b_enc.fill_(-float(pre.flatten()[:: max(1, pre.numel() // 4_000_000)].quantile(1 - L0 / d_sae)))
        name = f"{prefix}{i}"
        publish(registry, name, sae, model=ModelRef(name="bench", checksum=lm.checksum, source=str(lm.source)),
                hook=HookRef(name=point.name, module_path=point.module_path, alias=point.alias, kind=point.kind))
        names.append(name)
    return names


def gpt2_small(root: Path) -> tuple[Path, Path, list[str]]:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    reference = load_lm(reference_lm_path())
    config = GPT2Config(n_layer=12, n_embd=768, n_head=12, n_positions=256, vocab_size=reference.model.config.vocab_size,
                        bos_token_id=0, eos_token_id=0, pad_token_id=0)
    model_dir = root / "gpt2-small-shape"
    GPT2LMHeadModel(config).save_pretrained(model_dir)
    reference.tokenizer.save_pretrained(model_dir)
    lm = load_lm(model_dir)
    registry = root / "registry"
    names = _publish_at(registry, lm, [f"blocks.{b}.hook_resid_post" for b in (2, 5, 8, 11)], 16384, "g")
    return model_dir, registry, names[::-1]  # the deepest first: "one dictionary" is the one at the last block


def reference(root: Path) -> tuple[Path, Path, list[str]]:
    registry = root / "reference-registry"
    shutil.copytree(reference_registry_path() / REFERENCE_DICTIONARY, registry / REFERENCE_DICTIONARY)
    lm = load_lm(reference_lm_path())
    shipped = load_dictionary(registry, REFERENCE_DICTIONARY)
    assert shipped.manifest.model.checksum == lm.checksum
    others = _publish_at(registry, lm, ["blocks.0.hook_resid_pre", "blocks.0.hook_attn_out", "blocks.0.hook_resid_post"], 4096, "r")
    return reference_lm_path(), registry, [REFERENCE_DICTIONARY, *others]


def measure(model_dir: Path, registry: Path, names: list[str], repeats: int) -> tuple[float, float]:
    from service.engine import Engine
    from service.settings import ServiceSettings

    engine = Engine(ServiceSettings(model=str(model_dir), registry=registry, dictionaries=names, max_batch_requests=1))
    engine.load()
    engine.start()

    async def median_ms(request: api.ActivationsRequest) -> float:
        await engine.activations(request)  # warm: oneDNN builds its primitives for these shapes once
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            await engine.activations(request)
            times.append((time.perf_counter() - started) * 1000)
        return statistics.median(times)

    async def both() -> tuple[float, float]:
        one = await median_ms(api.ActivationsRequest(text=TEXT, top_k=10, dictionary=names[0]))
        four = await median_ms(api.ActivationsRequest(text=TEXT, top_k=10, dictionaries=names))
        return one, four

    try:
        return asyncio.run(both())
    finally:
        engine.stop()


def report(repeats: int = 15) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for label, build in (("gpt2-small shape, 768->16384 at blocks 2/5/8/11", gpt2_small), ("shipped reference, 4 hooks of block 0", reference)):
            model_dir, registry, names = build(root)
            one, four = measure(model_dir, registry, names, repeats)
            print(f"{label}: 1 dictionary {one:.1f} ms, 4 dictionaries {four:.1f} ms per 64-token request: {four / one:.2f}x", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=15)
    report(parser.parse_args().repeats)


if __name__ == "__main__":
    main()
