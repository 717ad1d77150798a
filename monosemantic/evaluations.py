"""Evaluations kept beside a dictionary version: ``<registry>/<name>/evaluations/v<N>.json``.

A version is immutable and sealed by its ledger, and an evaluation does not change the dictionary, so a user's
evaluation is recorded beside the version rather than published as a new one (which would copy the weights and
give a new number to the same dictionary). Each record names the sha256 of the manifest it measured: a record is shown only with the version it
was made for. Writers serialise on the dictionary's publishing lock; the file is replaced atomically.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from pydantic import BaseModel, ValidationError

from monosemantic.errors import ArtifactError, WriteFailed, os_reason
from monosemantic.ledger import now, publishing_lock, write_durably

EVALUATIONS_DIR = "evaluations"
# The numbers worth showing beside a dictionary; the full result (density histogram included) stays in the CLI's --json.
SUMMARY_METRICS = ("l0", "fvu", "mse", "loss_recovered", "ce_loss_clean", "ce_loss_spliced", "ce_loss_zero_ablated",
                   "dead_fraction", "dense_fraction", "tokens")


class Evaluation(BaseModel):
    recorded: str  # UTC, ISO 8601
    manifest_sha256: str  # the version it measured
    model_checksum: str | None = None
    data: dict  # what it was measured on: kind, dataset, split, fingerprint
    metrics: dict[str, float | None]
    measured: str | None = None  # "name:vN" when measured on an earlier version with the same weights


class EvaluationsFile(BaseModel):
    format_version: int = 1
    name: str
    version: int
    evaluations: list[Evaluation] = []


def evaluations_path(registry: Path, name: str, version: int) -> Path:
    return Path(registry) / name / EVALUATIONS_DIR / f"v{version}.json"


def non_finite(metrics: dict) -> list[str]:
    """The headline metrics that are NaN or infinite (a NaN dictionary, or data it cannot reconstruct)."""
    return sorted(k for k in ("l0", "fvu", "mse", "loss_recovered") if isinstance(metrics.get(k), float) and not math.isfinite(metrics[k]))


def summary(metrics: dict) -> dict[str, float | None]:
    """The headline numbers of an evaluation result; non-finite ones become null (JSON has no NaN)."""
    out: dict[str, float | None] = {}
    for key in SUMMARY_METRICS:
        if isinstance(value := metrics.get(key), (int, float)):
            out[key] = float(value) if math.isfinite(value) else None
    return out


def read_evaluations(registry: Path, name: str, version: int, manifest_sha256: str) -> list[Evaluation]:
    """The evaluations recorded for this exact version (oldest first); none when nothing was recorded."""
    record = _read(evaluations_path(registry, name, version), name, version)
    return [e for e in record.evaluations if e.manifest_sha256 == manifest_sha256]


def record_evaluations(registry: Path, name: str, version: int, evaluations: list[Evaluation]) -> Path:
    """Append ``evaluations`` to the version's record, in one write under the dictionary's lock."""
    path = evaluations_path(registry, name, version)
    try:
        path.parent.mkdir(exist_ok=True)
        with publishing_lock(path.parent.parent):
            record = _read(path, name, version)
            record.evaluations.extend(evaluations)
            write_durably(path, record.model_dump_json(indent=2))
    except OSError as exc:
        raise WriteFailed(f"cannot record the evaluation of {name}:v{version} in {path.parent}: {os_reason(exc)}") from None
    return path


def _read(path: Path, name: str, version: int) -> EvaluationsFile:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return EvaluationsFile(name=name, version=version)
    except OSError as exc:
        raise ArtifactError(f"dictionary {name}:v{version}: cannot read its evaluations ({os_reason(exc)})") from None
    try:
        record = EvaluationsFile.model_validate(json.loads(raw))
    except (json.JSONDecodeError, UnicodeDecodeError, ValidationError):
        raise ArtifactError(f"dictionary {name}:v{version}: {EVALUATIONS_DIR}/{path.name} is not a valid evaluations record") from None
    if (record.name, record.version) != (name, version):
        raise ArtifactError(f"dictionary {name}:v{version}: {EVALUATIONS_DIR}/{path.name} belongs to {record.name}:v{record.version}")
    return record


def carry_evaluations(source_registry: Path, source: tuple[str, int, str], registry: Path, version: int, manifest_sha256: str) -> int:
    """Record the evaluations of version ``source`` (name, number, manifest sha256) for a later version with the same
    weights (``features`` and ``bind`` republish them); returns how many."""
    name, number, sha = source
    carried = [e.model_copy(update={"manifest_sha256": manifest_sha256, "measured": e.measured or f"{name}:v{number}"})
               for e in read_evaluations(source_registry, name, number, sha)]
    if carried:
        record_evaluations(registry, name, version, carried)
    return len(carried)


def new_evaluation(manifest_sha256: str, model_checksum: str | None, data: dict, metrics: dict) -> Evaluation:
    return Evaluation(recorded=now(), manifest_sha256=manifest_sha256, model_checksum=model_checksum, data=data,
                      metrics=summary(metrics))
