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
from typing import Iterator, NamedTuple

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


class SimulationRecord(BaseModel):
    """The simulation scorer's result on one feature: Pearson's r between the activations it predicted from the
    explanation and the true ones over ``tokens`` tokens of ``examples`` examples (None when no answer parsed or
    either side was constant), and whether predictions were read from the endpoint's logprobs."""

    model_config = ConfigDict(extra="forbid")
    correlation: float | None
    examples: int
    tokens: int
    unparsed: int
    from_logprobs: bool = False


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
    simulation: SimulationRecord | None = None
    usage: dict[str, Usage] = {}  # by stage: explain, detection, fuzzing, simulation
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


def version_digest(dictionary) -> str:
    """The digest a run records and is matched by: the loaded version's manifest hash (monosemantic/artifact.py's
    Dictionary), so a version republished under the same number never shows another's explanations."""
    from monosemantic.artifact import MANIFEST_FILE, sha256_file

    return dictionary.manifest_sha256 or sha256_file(Path(dictionary.path) / MANIFEST_FILE)


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


# ---- reading a version's runs for the service and the browser -----------------------------------------------------
class Explained(NamedTuple):
    """One run's explanation of one feature, with its scores."""

    explanation: str
    score: float | None  # the mean of the scorers' balanced accuracies (None: nothing scored)
    detection: ScoreRecord | None
    fuzzing: ScoreRecord | None
    simulation: SimulationRecord | None
    run: str
    explainer_model: str
    scorer_model: str
    prompt_version: str


def _score_of(record: FeatureExplanation) -> float | None:
    values = [s.balanced_accuracy for s in (record.detection, record.fuzzing) if s is not None and s.balanced_accuracy is not None]
    return sum(values) / len(values) if values else None


class ExplanationIndex:
    """Every run's parsed explanations of one version (for its manifest digest), best-scoring first per feature."""

    def __init__(self, runs: list[tuple[ExplanationRun, dict[int, FeatureExplanation]]]) -> None:
        self.by_feature: dict[int, list[Explained]] = {}
        for header, features in runs:
            for record in features.values():
                if record.explanation is None:
                    continue
                self.by_feature.setdefault(record.feature, []).append(Explained(
                    record.explanation, _score_of(record), record.detection, record.fuzzing, record.simulation, header.run,
                    header.explainer_model, header.scorer_model, header.prompt_version))
        for explained in self.by_feature.values():
            explained.sort(key=lambda e: (e.score is None, -(e.score or 0.0), e.run))

    def best(self, feature: int) -> Explained | None:
        found = self.by_feature.get(feature)
        return found[0] if found else None

    @property
    def explained(self) -> int:
        return len(self.by_feature)

    @property
    def median_score(self) -> float | None:
        """The median over explained features of each one's best score (None when none is scored)."""
        scores = sorted(e[0].score for e in self.by_feature.values() if e[0].score is not None)
        if not scores:
            return None
        middle = len(scores) // 2
        return scores[middle] if len(scores) % 2 else (scores[middle - 1] + scores[middle]) / 2

    def search(self, query: str) -> list[tuple[int, float]]:
        """(feature, its best score or 0) for the features one of whose explanations contains every word of
        ``query`` (case-insensitive), best-scoring first."""
        words = query.lower().split()
        hits = []
        for feature, explained in self.by_feature.items():
            matching = [e for e in explained if all(w in e.explanation.lower() for w in words)]
            if matching:
                hits.append((feature, matching[0].score or 0.0))
        return sorted(hits, key=lambda h: (-h[1], h[0]))


_INDEXES: dict[Path, tuple[tuple, ExplanationIndex]] = {}


def explanation_index(registry: Path, name: str, version: int, manifest_sha256: str) -> ExplanationIndex:
    """The version's index, re-read only when a run file changed (size or mtime) since the last call: a feature
    page asks for it on every view, and a run being written appends to its file while the service reads."""
    directory = runs_dir(registry, name, version)
    files = sorted(directory.glob("*.jsonl")) if directory.is_dir() else []
    signature = (manifest_sha256, *((f.name, st.st_size, st.st_mtime_ns) for f in files for st in (f.stat(),)))
    cached = _INDEXES.get(directory)
    if cached is not None and cached[0] == signature:
        return cached[1]
    runs = [(h, features) for h, features in list_runs(registry, name, version) if h.manifest_sha256 == manifest_sha256]
    index = ExplanationIndex(runs)
    _INDEXES[directory] = (signature, index)
    return index
