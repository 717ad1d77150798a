"""Where a dictionary version's explanation runs are kept and what each holds, defined once: the writer
(trainer/explain.py) and every reader go through ``runs_dir``, ``run_path``, ``ExplanationRun`` and ``read_run``.

A run is one explainer model, one scorer model and one prompt version over some of a version's features. It is kept
beside the version, never in it: ``REGISTRY/NAME/explanations/vN/RUN.jsonl``. A published version is sealed (its
manifest lists and hashes its files, monosemantic/artifact.py), and explanations come later and from models that
change, so writing them into the version would either break its digest or need a new version for every run; kept
beside it, several runs stay side by side and a version's digest never moves. The file is JSON lines: a header
(the run's settings), then one line per feature as it completes, so a run that stops keeps what it finished, and one
started again with the same explainer, scorer and prompt version continues where it stopped (a torn last line, from
a kill mid-write, is ignored).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Iterator

from pydantic import BaseModel, ConfigDict, ValidationError

from monosemantic.errors import ArtifactError

RUNS_DIR = "explanations"
_WHERE = {"settings", "endpoint", "scorer_endpoint"}  # may differ between the invocations of one run (a moved server)


class ScoreRecord(BaseModel):
    """One scorer's result on one feature: balanced accuracy over ``examples`` parsed answers (None when none
    parsed), the rates behind it, and the trials lost to answers that did not parse."""

    model_config = ConfigDict(extra="forbid")
    balanced_accuracy: float | None
    examples: int
    unparsed: int
    true_positive_rate: float | None = None
    true_negative_rate: float | None = None


class Usage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompt_tokens: int = 0
    completion_tokens: int = 0
    requests: int = 0

    def add(self, other: "Usage") -> "Usage":
        return Usage(prompt_tokens=self.prompt_tokens + other.prompt_tokens,
                     completion_tokens=self.completion_tokens + other.completion_tokens, requests=self.requests + other.requests)


class FeatureExplanation(BaseModel):
    """A feature's line of a run: the explanation (None when the explainer's answer did not parse: the answer is kept
    instead, so nothing is silently dropped), its scores, and the tokens each stage spent."""

    model_config = ConfigDict(extra="forbid")
    feature: int
    explanation: str | None
    unparsed_answer: str | None = None
    shown: int  # examples shown to the explainer
    detection: ScoreRecord | None = None
    fuzzing: ScoreRecord | None = None
    usage: dict[str, Usage] = {}  # by stage: explain, detection, fuzzing
    skipped: str | None = None  # why the feature was not explained (it never fired on the statistics' text)


class ExplanationRun(BaseModel):
    """A run's header line."""

    model_config = ConfigDict(extra="forbid")
    run: str
    dictionary: str
    version: int
    manifest_sha256: str
    explainer_model: str
    scorer_model: str
    prompt_version: str
    endpoint: str  # the explainer's base URL (no key: keys are never stored)
    scorer_endpoint: str | None = None  # the scorer's, when another
    settings: dict


def run_name(explainer_model: str, scorer_model: str, prompt_version: str) -> str:
    """The run's file stem: readable model names and a digest of the three, so the same explainer, scorer and
    prompt version always land in (and resume) one file, and different ones never share it."""
    digest = hashlib.sha256(f"{explainer_model}\0{scorer_model}\0{prompt_version}".encode()).hexdigest()[:10]
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", explainer_model)[:40].strip("-") or "model"
    return f"{slug}-{digest}"


def runs_dir(registry: Path, name: str, version: int) -> Path:
    return Path(registry) / name / RUNS_DIR / f"v{version}"


def run_path(registry: Path, name: str, version: int, run: str) -> Path:
    return runs_dir(registry, name, version) / f"{run}.jsonl"


def read_run(path: Path) -> tuple[ExplanationRun | None, dict[int, FeatureExplanation]]:
    """A run's header and its features' lines (the last line of a feature wins; a torn last line is ignored). A
    line that is whole but malformed is an ArtifactError naming the file and line: the record is not what this
    code wrote."""
    if not path.exists():
        return None, {}
    header, features = None, {}
    lines = path.read_bytes().split(b"\n")
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            data = json.loads(line)
        except ValueError:
            if number == len(lines):  # written without its newline: the run was killed mid-write
                break
            raise ArtifactError(f"{path.name} line {number} is not JSON") from None
        try:
            if header is None:
                header = ExplanationRun.model_validate(data)
            else:
                record = FeatureExplanation.model_validate(data)
                features[record.feature] = record
        except ValidationError as exc:
            raise ArtifactError(f"{path.name} line {number}: {exc.errors()[0]['loc']} {exc.errors()[0]['msg']}") from None
    return header, features


def list_runs(registry: Path, name: str, version: int) -> Iterator[tuple[ExplanationRun, dict[int, FeatureExplanation]]]:
    """Every run kept for a version, by file name."""
    directory = runs_dir(registry, name, version)
    if not directory.is_dir():
        return
    for path in sorted(directory.glob("*.jsonl")):
        header, features = read_run(path)
        if header is not None:
            yield header, features


class RunWriter:
    """Appends a run's lines, each flushed and fsynced as it is written (so what was reported done is on disk)."""

    def __init__(self, path: Path, header: ExplanationRun) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        existing, _ = read_run(path)
        if existing is not None and existing.model_dump(exclude=_WHERE) != header.model_dump(exclude=_WHERE):
            raise ArtifactError(f"{path.name} holds a run of another dictionary version or other models")
        self._repair_tail(path)
        self._file = path.open("ab")
        if existing is None:
            self._write(header.model_dump(mode="json"))

    @staticmethod
    def _repair_tail(path: Path) -> None:
        """Cut a torn last line (no newline: the run was killed mid-write) so the next line starts clean."""
        if not path.exists() or path.stat().st_size == 0:
            return
        data = path.read_bytes()
        if not data.endswith(b"\n"):
            with path.open("r+b") as f:
                f.truncate(data.rfind(b"\n") + 1)

    def _write(self, data: dict) -> None:
        self._file.write(json.dumps(data, ensure_ascii=False).encode() + b"\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def write(self, record: FeatureExplanation) -> None:
        self._write(record.model_dump(mode="json"))

    def close(self) -> None:
        self._file.close()
