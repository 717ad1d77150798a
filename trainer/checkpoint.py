"""A training checkpoint: one ``state.safetensors`` holding the weights, Adam's moments and (as metadata) the run's
state, written beside and renamed into place, so a kill at any moment leaves the previous checkpoint or the next,
never weights of one step beside the state of another."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError
from safetensors import SafetensorError, safe_open
from torch import Tensor

from monosemantic.artifact import save_safetensors
from monosemantic.errors import MonosemanticError, WriteFailed, os_reason
from monosemantic.ledger import fsync_dir

CHECKPOINT_FILE = "state.safetensors"
LEGACY_STATE_FILE = "state.json"  # beside the weights, in releases before the single file


class Checkpoint(BaseModel):
    """The run's state beside its tensors; ``data`` identifies the activations it was trained on."""

    step: int
    planned_steps: int
    coefficient: float
    l0_ema: float | None
    l0_slow: float | None
    input_scale: float
    variance: float
    output_scale: float | None = None  # a transcoder's, of its targets
    adam_steps: dict[str, float]
    config: dict[str, Any]
    source: dict[str, Any]
    data: dict[str, Any]
    history: list[dict]
    last: dict[str, Any] = {}  # the last step's metrics, so a partial run still says how it stood

    @property
    def fraction(self) -> float:
        return self.step / max(1, self.planned_steps)


def write_checkpoint(directory: Path, state: Checkpoint, tensors: dict[str, Tensor]) -> None:
    directory = Path(directory)
    path = directory / CHECKPOINT_FILE
    tmp = path.with_name(path.name + ".tmp")
    try:
        directory.mkdir(parents=True, exist_ok=True)
        save_safetensors(tensors, tmp, {"checkpoint": state.model_dump(mode="json")})
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        fsync_dir(directory)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise WriteFailed(f"cannot write the checkpoint in {directory}: {os_reason(exc)} (the previous checkpoint is kept)") from None
    (directory / LEGACY_STATE_FILE).unlink(missing_ok=True)


def read_checkpoint(directory: Path) -> tuple[Checkpoint, dict[str, Tensor]] | None:
    """The checkpoint in ``directory``, or None when there is none; a torn, truncated or foreign one is refused."""
    path = Path(directory) / CHECKPOINT_FILE
    if not path.exists():
        if (Path(directory) / LEGACY_STATE_FILE).exists():
            raise MonosemanticError(f"{directory} holds {LEGACY_STATE_FILE} without {CHECKPOINT_FILE}: a torn checkpoint, "
                                    "or one from a release before single-file checkpoints; use a new --checkpoint-dir")
        return None
    if (Path(directory) / LEGACY_STATE_FILE).exists():
        raise MonosemanticError(f"{directory} holds a checkpoint from a release before single-file checkpoints "
                                f"({LEGACY_STATE_FILE} beside the weights); use a new --checkpoint-dir")
    try:
        with safe_open(str(path), framework="pt") as fh:
            raw = (fh.metadata() or {}).get("monosemantic")
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
        state = Checkpoint.model_validate(json.loads(raw)["checkpoint"]) if raw else None
    except OSError as exc:
        raise MonosemanticError(f"the checkpoint in {directory} cannot be read ({os_reason(exc)})") from None
    except (SafetensorError, ValueError, KeyError, TypeError, ValidationError) as exc:
        raise MonosemanticError(f"the checkpoint in {directory} is truncated or corrupted ({type(exc).__name__}); "
                                "use a new --checkpoint-dir") from None
    if state is None:
        raise MonosemanticError(f"{path.name} in {directory} is not a training checkpoint (no state recorded in it)")
    return state, tensors
