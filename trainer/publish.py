"""Turn a training result (or a checkpoint) into a published dictionary version with its manifest."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from monosemantic.artifact import HookRef, ModelRef, publish
from monosemantic.errors import MonosemanticError
from monosemantic.sae import SparseAutoencoder, build_sae
from trainer.checkpoint import Checkpoint, read_checkpoint
from trainer.train import DIVERGED_FVU, TrainConfig, TrainResult, running_state_of

UNSPECIFIED = "unspecified"


def publish_trained(
    registry: Path,
    name: str,
    sae: SparseAutoencoder,
    *,
    config: TrainConfig,
    sparsity_coefficient: float | None,
    tokens: int,
    model: ModelRef,
    hook: HookRef,
    metrics: dict[str, Any],
    features: dict[str, torch.Tensor] | None = None,
    labels: list[str] | None = None,
    data: dict[str, Any] | None = None,
    dtype: str = "float32",
    extra: dict[str, Any] | None = None,
) -> Path:
    """Publish with the manifest fields the dictionary format records (README.md, "The dictionary format (v1)"; the
    ``Manifest`` of monosemantic/artifact.py): training config, data, seed, tokens, metrics. A dictionary
    whose held-out FVU says its training diverged is refused (artifact.publish refuses non-finite values)."""
    fvu = metrics.get("fvu")
    if isinstance(fvu, float) and fvu > DIVERGED_FVU:
        raise MonosemanticError(f"refusing to publish {name}: held-out FVU {fvu:.3g} means training diverged; lower --lr")
    return publish(
        registry, name, sae, model=model, hook=hook, dtype=dtype, features=features, labels=labels,
        extra={**(extra or {}),
            "sparsity_coefficient": sparsity_coefficient if config.architecture_class.has_sparsity_coefficient else None,
            "training": config.model_dump(mode="json"), "data": data or {}, "seed": config.seed,
            "tokens": tokens, "metrics": metrics,
        },
    )


def result_from_checkpoint(checkpoint_dir: Path) -> tuple[TrainResult, Checkpoint]:
    """Rebuild the trained dictionary from a checkpoint written by ``Trainer`` (for ``publish``)."""
    found = read_checkpoint(checkpoint_dir)
    if found is None:
        raise MonosemanticError(f"no training checkpoint in {checkpoint_dir} (state.safetensors missing)")
    state, tensors = found
    cfg = TrainConfig.model_validate(state.config)
    d_in, d_out = tensors["param.W_enc"].shape[0], tensors["param.W_dec"].shape[1]
    paired = cfg.architecture_class.reads_pairs
    sae = build_sae(cfg.sae_config(d_in, state.input_scale, d_out if paired else None, state.output_scale))
    with torch.no_grad():
        for n, p in sae.named_parameters():
            p.copy_(tensors[f"param.{n}"])
    sae.load_running_state(running_state_of(tensors))
    result = TrainResult(sae=sae.eval(), config=cfg, sparsity_coefficient=state.coefficient, tokens=state.step * cfg.batch_size,
                         seconds=0.0, history=state.history, input_scale=state.input_scale, output_scale=state.output_scale)
    return result, state
