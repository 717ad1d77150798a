"""What ``monosemantic-train export --to delphi`` writes: a dictionary's feature activations over text in the layout
of EleutherAI delphi's latent cache, so delphi's own explainers and scorers run on a monosemantic dictionary.

The layout (delphi 0.1.3's ``LatentCache.save_splits`` and ``save_config``, read by its ``LatentDataset``):
``OUT/<hook>/<first>_<last>.safetensors``, one file per range of features (both ends included), each holding
``locations`` [n, 3] — the context, the position and the feature less the range's first, uint16 where everything
fits and uint32 otherwise, as delphi narrows them — ``activations`` [n] float16 and ``tokens`` [contexts,
positions], the token ids of every context; and ``OUT/<hook>/config.json`` with the model's name and the contexts'
length. Positions are the contexts' own, BOS included; the BOS position never holds an activation (the service and
the dashboards skip it too).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import save_file

from monosemantic.artifact import load_dictionary, parse_reference
from monosemantic.bound import bind
from monosemantic.errors import ConfigError
from monosemantic.lm import read_activations
from monosemantic.model import Model
from trainer.pipeline import _dictionary_model, corpus_contexts

BATCH = 8


def export_latent_cache(registry: Path, reference: str, out: Path, *, contexts: int = 256, context_length: int = 64,
                        splits: int = 4, model: str | Path | None = None, model_dtype: str = "auto", seed: int = 0) -> dict:
    """Read NAME[:VERSION] on ``contexts`` held-out contexts of the built-in corpus and write delphi's latent cache."""
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"--out: {out} is not empty; give a new directory")
    if splits < 1:
        raise ConfigError(f"--splits must be at least 1, got {splits}")
    name, version = parse_reference(reference)
    lm = _dictionary_model(registry, name, version, model, model_dtype)
    loaded = Model.of(lm)
    dictionary = bind(loaded, load_dictionary(registry, name, version, expected_model_checksum=lm.checksum))
    ids, _ = corpus_contexts(lm.tokenizer, "heldout", context_length, None, contexts, seed=seed)
    located, values = [], []
    for start in range(0, ids.shape[0], BATCH):
        batch = ids[start:start + BATCH]
        with torch.no_grad():
            x = read_activations(lm, batch, dictionary.hook, attention_mask=torch.ones_like(batch)).float()
            codes = dictionary.sae.encode(x.reshape(-1, x.shape[-1])).reshape(x.shape[0], x.shape[1], -1)
        codes[:, 0] = 0  # BOS
        where = codes.nonzero()
        where[:, 0] += start
        located.append(where)
        values.append(codes[codes != 0])
    locations = torch.cat(located) if located else torch.zeros(0, 3, dtype=torch.long)
    activations = torch.cat(values) if values else torch.zeros(0)
    d_sae = dictionary.d_sae
    # Written beside and renamed, as the other exports are: a failed export leaves no half-written cache.
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        files = _write(staging / dictionary.hook.name, locations, activations, ids, d_sae, splits, lm, context_length, dictionary)
        if out.exists():
            out.rmdir()  # empty, checked above
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return {"out": str(out), "module": dictionary.hook.name, "files": files, "activations": int(activations.numel()),
            "contexts": int(ids.shape[0]), "features": d_sae}


def _write(module: Path, locations, activations, ids, d_sae: int, splits: int, lm, context_length: int, dictionary) -> list[str]:
    module.mkdir(parents=True)
    tokens = ids.numpy().astype(np.int64)
    edges = np.linspace(0, d_sae, splits + 1).astype(int)
    files = []
    for first, end in zip(edges[:-1], edges[1:]):
        last = int(end) - 1
        mine = (locations[:, 2] >= first) & (locations[:, 2] <= last)
        part = locations[mine].numpy().copy()
        part[:, 2] -= first
        narrow = np.uint16 if (part.size == 0 or (part[:, 2].max() < 2**16 and part[:, 0].max() < 2**16)) else np.uint32
        path = module / f"{int(first)}_{last}.safetensors"
        save_file({"locations": part.astype(narrow), "activations": activations[mine].half().numpy(), "tokens": tokens}, str(path))
        files.append(path.name)
    m = dictionary.dictionary.manifest
    config = {"model_name": str(lm.source), "cache_ctx_len": context_length, "ctx_len": context_length, "batch_size": BATCH,
              "n_tokens": int(ids.numel()), "n_splits": splits, "dataset_repo": "monosemantic built-in corpus (held out)",
              "dataset_split": "heldout", "dataset_name": "", "dataset_column": "text",
              "dictionary": f"{m.name}:v{m.version}", "hook": dictionary.hook.name}
    (module / "config.json").write_text(json.dumps(config, indent=2))
    return files
