"""Harvest activations at a hook into memory-mapped shards: forward stopped at the hook layer, resumable."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from monosemantic.errors import ConfigError, MonosemanticError
from monosemantic.lm import LoadedLM, read_activations, resolve_hook
from trainer.activations import HARVEST_MANIFEST, SHARD_DTYPES, to_storage, write_json_atomic


def harvest(
    lm: LoadedLM,
    contexts: torch.Tensor,
    hook: str,
    out_dir: Path,
    *,
    dtype: str = "float16",
    contexts_per_shard: int = 1024,
    batch_size: int = 32,
    skip_bos: bool = True,
    data_fingerprint: str | None = None,
    progress: bool = True,
) -> dict:
    """Write the activations of ``contexts`` [n, ctx] at ``hook`` under ``out_dir``; returns the manifest.

    A restarted harvest of the same contexts continues after the last completed shard (each shard covers a
    fixed range of contexts and is renamed into place only when whole). The BOS position is skipped by
    default: its activations are atypical (an attention sink) and SAEBench masks it too."""
    if dtype not in SHARD_DTYPES:
        raise ConfigError(f"dtype {dtype!r} is not supported for shards; use one of {sorted(SHARD_DTYPES)}")
    if contexts.ndim != 2 or contexts.shape[0] == 0:
        raise ConfigError(f"contexts must be a non-empty [n, context_length] tensor, got {tuple(contexts.shape)}")
    hook_point = resolve_hook(lm.model, hook)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    identity = {
        "hook": hook_point.name, "module_path": hook_point.module_path, "model_checksum": lm.checksum,
        "dtype": dtype, "contexts": int(contexts.shape[0]), "context_length": int(contexts.shape[1]),
        "contexts_per_shard": contexts_per_shard, "skip_bos": skip_bos, "data_fingerprint": data_fingerprint,
        "contexts_checksum": _checksum(contexts),
    }
    manifest_path = out_dir / HARVEST_MANIFEST
    if manifest_path.exists():
        manifest = json.loads(manifest_path.read_text())
        if {k: manifest.get(k) for k in identity} != identity:
            raise MonosemanticError(f"{out_dir} holds a harvest of different data, model or hook; use an empty directory")
    else:
        manifest = {**identity, "shards": [], "contexts_done": 0, "tokens": 0, "complete": False}
        write_json_atomic(manifest_path, manifest)

    n = contexts.shape[0]
    started = time.perf_counter()
    tokens_before = manifest["tokens"]
    bar = tqdm(total=n, initial=manifest["contexts_done"], unit="ctx", desc="harvest", disable=None if progress else True)
    try:
        while manifest["contexts_done"] < n:
            lo = manifest["contexts_done"]
            hi = min(n, lo + contexts_per_shard)
            rows = []
            for b in range(lo, hi, batch_size):
                ids = contexts[b : min(hi, b + batch_size)]
                acts = read_activations(lm.model, ids, hook_point, stop_at_hook=True)
                if skip_bos:
                    acts = acts[:, 1:]
                rows.append(to_storage(acts.reshape(-1, acts.shape[-1]), dtype))
                bar.update(ids.shape[0])
            shard = np.concatenate(rows)
            name = f"shard_{len(manifest['shards']):05d}.npy"
            tmp = out_dir / (name + ".tmp")
            with open(tmp, "wb") as fh:
                np.save(fh, shard)
            tmp.replace(out_dir / name)
            manifest["shards"].append({"file": name, "rows": int(shard.shape[0]), "contexts": [lo, hi]})
            manifest["contexts_done"] = hi
            manifest["tokens"] += int(shard.shape[0])
            manifest["d_in"] = int(shard.shape[1])
            manifest["complete"] = hi >= n
            write_json_atomic(manifest_path, manifest)
            elapsed = time.perf_counter() - started
            bar.set_postfix(tok_s=f"{(manifest['tokens'] - tokens_before) / max(elapsed, 1e-9):,.0f}")
    finally:
        bar.close()
    return manifest


def _checksum(contexts: torch.Tensor) -> str:
    return hashlib.sha256(contexts.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()[:16]
