"""The versioned dictionary format (v1): publish atomically, list, resolve ``latest``, load with sha256 checks.

Layout: ``<registry>/<name>/v<N>/{manifest.json, sae.safetensors, features.safetensors?, labels.json?}`` and
``<registry>/<name>/versions.json``, the ledger of version numbers and manifest digests (monosemantic/ledger.py). A
version is written into a hidden temporary directory and renamed into place, so readers see a whole version or
none; versions are never modified afterwards, and reading one checks the manifest against the ledger, every file
against the manifest, and that the directory holds nothing else. Nothing is loaded with pickle.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from monosemantic.errors import ArtifactError, ArtifactMismatch, ArtifactNotFound, ArtifactUnreadable, ConfigError, WriteFailed, os_reason
from monosemantic.feature_stats import FeatureStatistics
from monosemantic.ledger import (
    LEDGER_FILE, TEMPORARY_PREFIX, Ledger, LedgerEntry, digest_bytes, fsync_dir, held_directory, now,
    publishing_lock, read_ledger, remove_abandoned, write_ledger,
)
from monosemantic.sae import SAE_REGISTRY, SAEConfig, SparseAutoencoder, sae_from_tensors

FORMAT_VERSION = 1
SAE_FILE = "sae.safetensors"
FEATURES_FILE = "features.safetensors"
LABELS_FILE = "labels.json"  # one short label per feature (trainer/features.py), when feature statistics exist
MANIFEST_FILE = "manifest.json"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
_VERSION_DIR = re.compile(r"^v([1-9][0-9]*)$")
STORAGE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelRef(BaseModel):
    """The transformer a dictionary reads: a name for people, the weights checksum for machines."""

    name: str
    checksum: str
    source: str | None = None  # where to load it: a local path or a hub id (commands use it when --model is not given)


class HookRef(BaseModel):
    name: str  # as given (alias or module path)
    module_path: str
    alias: str | None = None
    kind: str = "output"


class Manifest(BaseModel):
    """``manifest.json``: everything needed to trust, rebuild and judge a dictionary version."""

    model_config = ConfigDict(extra="allow")

    format_version: int
    name: str
    version: int
    created: str
    architecture: str
    sae: SAEConfig
    sparsity_coefficient: float | None = None
    dtype: str
    model: ModelRef
    hook: HookRef
    hook_out: HookRef | None = None  # a transcoder's: where it writes (``hook`` is where it reads)
    input_scale: float
    training: dict[str, Any] = Field(default_factory=dict)
    data: dict[str, Any] = Field(default_factory=dict)
    seed: int | None = None
    tokens: int | None = None
    metrics: dict[str, Any] = Field(default_factory=dict)
    files: dict[str, str] = Field(default_factory=dict)


@dataclass
class Dictionary:
    """A loaded, verified dictionary version."""

    sae: SparseAutoencoder
    manifest: Manifest
    path: Path
    features: dict[str, Tensor] = field(default_factory=dict)  # features.safetensors as stored; {} without one
    labels: list[str] = field(default_factory=list)
    manifest_sha256: str = ""  # as the ledger recorded it: a pinned reference that changes on disk is detected by it

    @property
    def ref(self) -> str:
        return f"{self.manifest.name}:v{self.manifest.version}"

    @property
    def statistics(self) -> FeatureStatistics | None:
        """``features`` as a typed, checked object (monosemantic/feature_stats.py), None for a version without
        feature statistics; ArtifactError naming the tensor when the file does not follow the layout."""
        if not self.features:
            return None
        return FeatureStatistics.from_tensors(self.features, d_sae=self.sae.cfg.d_sae,
                                              where=f"{_label(self.path)}/{FEATURES_FILE}")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_name(name: str) -> None:
    if not _NAME.match(name):
        raise ConfigError(f"dictionary name {name!r} is invalid: use letters, digits, '.', '_' or '-' (max 100)")


@contextmanager
def _reading(what: str) -> Iterator[None]:
    """An OSError while reading the registry (permissions, an I/O error) as ArtifactUnreadable, whose message
    names the dictionary and the reason, never a file-system path (it reaches the service's clients)."""
    try:
        yield
    except OSError as exc:
        raise ArtifactUnreadable(f"{what}: cannot be read ({exc.strerror or type(exc).__name__})") from None


def list_versions(registry: Path, name: str) -> list[int]:
    """Published versions of ``name``, ascending (temporary directories are never listed)."""
    check_name(name)
    directory = Path(registry) / name
    with _reading(f"dictionary {name!r}"):
        if not directory.is_dir():
            return []
        return sorted(int(m.group(1)) for p in directory.iterdir() if (m := _VERSION_DIR.match(p.name)) and p.is_dir())


def list_dictionaries(registry: Path) -> dict[str, list[int]]:
    """Every dictionary in a registry with its versions."""
    registry = Path(registry)
    with _reading("the registry"):
        if not registry.is_dir():
            return {}
        names = sorted(p.name for p in registry.iterdir() if p.is_dir() and _NAME.match(p.name))
    out = {}
    for name in names:
        if versions := list_versions(registry, name):
            out[name] = versions
    return out


def parse_reference(reference: str) -> tuple[str, int | None]:
    """``NAME``, ``NAME:latest``, ``NAME:3`` or ``NAME:v3`` → (name, version or None for latest)."""
    name, _, version = reference.partition(":")
    check_name(name)
    if version in ("", "latest"):
        return name, None
    match = re.fullmatch(r"v?([1-9][0-9]*)", version)
    if not match:
        raise ConfigError(f"dictionary version {version!r} is invalid: use a positive integer, vN or 'latest'")
    return name, int(match.group(1))


def resolve_version(registry: Path, name: str, version: int | str | None = None) -> Path:
    """The directory of a version; ``None`` or ``"latest"`` means the highest published one."""
    versions = list_versions(registry, name)
    if not versions:
        raise ArtifactNotFound(f"dictionary {name!r} not found in registry {Path(registry).name!r}")
    if version in (None, "latest"):
        number = versions[-1]
    else:
        match = re.fullmatch(r"v?([1-9][0-9]*)", str(version))
        if not match:
            raise ConfigError(f"dictionary version {version!r} is invalid: use a positive integer, vN or 'latest'")
        number = int(match.group(1))
        if number not in versions:
            raise ArtifactNotFound(f"dictionary {name!r} has no version {number}; published: {versions}")
    return Path(registry) / name / f"v{number}"


def save_safetensors(tensors: dict[str, Tensor], path: Path, metadata: dict[str, Any] | None = None) -> None:
    """safetensors with byte-identical output for identical input: the library writes its metadata map in an order
    that varies from call to call (a Rust HashMap), so the metadata travels as one key holding sorted JSON."""
    header = {"monosemantic": json.dumps(metadata, sort_keys=True, separators=(",", ":"))} if metadata else None
    try:
        save_file(tensors, str(path), metadata=header)
    except SafetensorError as exc:  # the library reports a failed write (a full disk) as its own error type
        if (match := re.search(r"os error (\d+)", str(exc))) is None:
            raise
        number = int(match.group(1))
        raise OSError(number, os.strerror(number)) from None


def non_finite(value: Any, where: str = "") -> str | None:
    """The first place in a tensor, number or nested dict/list that is NaN or infinite, as a dotted path; None if
    everything is finite."""
    if isinstance(value, Tensor):
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            return where or "tensor"
        return None
    if isinstance(value, float):
        return None if math.isfinite(value) else (where or "value")
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, (list, tuple)):
        items = enumerate(value)
    else:
        return None
    for key, item in items:
        if (found := non_finite(item, f"{where}.{key}" if where else str(key))) is not None:
            return found
    return None


def publish(
    registry: Path,
    name: str,
    sae: SparseAutoencoder,
    *,
    model: ModelRef,
    hook: HookRef,
    dtype: str = "float32",
    features: dict[str, Tensor] | None = None,
    labels: list[str] | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write ``sae`` as the next version of ``name``; returns the version directory.

    Refuses weights, feature statistics or metrics that are not finite: a NaN dictionary is never published. The
    files are written and checksummed in a temporary directory; then, holding the dictionary's publishing lock,
    the next number is taken from the ledger, the manifest's digest recorded there, and the directory renamed to
    ``v<N>``. A kill before the ledger is written leaves only a temporary directory (removed by the next
    publish); a kill after it burns the number, which is never given again."""
    check_name(name)
    if dtype not in STORAGE_DTYPES:
        raise ConfigError(f"dtype {dtype!r} is not supported; use one of {sorted(STORAGE_DTYPES)}")
    tensors = {k: v.detach().to("cpu", STORAGE_DTYPES[dtype]).contiguous() for k, v in sae.tensors().items()}
    fields = dict(extra or {})
    for what, value in (("weights", tensors), ("feature statistics", features or {}), ("metrics", fields.get("metrics", {}))):
        if (where := non_finite(value)) is not None:
            raise ArtifactError(f"refusing to publish {name}: {what} are not finite ({where} holds NaN or inf)")
    if labels is not None and len(labels) != sae.cfg.d_sae:
        raise ConfigError(f"labels: {len(labels)} given for {sae.cfg.d_sae} features")
    directory = Path(registry) / name
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f"{TEMPORARY_PREFIX}{uuid.uuid4().hex}"
    try:
        with held_directory(tmp):
            save_safetensors(tensors, tmp / SAE_FILE, {"format": "monosemantic-v1", "architecture": sae.cfg.architecture})
            files = [SAE_FILE]
            if features:
                save_safetensors({k: v.detach().cpu().contiguous() for k, v in features.items()}, tmp / FEATURES_FILE)
                files.append(FEATURES_FILE)
            if labels is not None:
                (tmp / LABELS_FILE).write_text(json.dumps({"labels": labels}, ensure_ascii=False))
                files.append(LABELS_FILE)
            for f in files:
                os.chmod(tmp / f, 0o644)  # safetensors writes 0600; a service running as another user must read it
            _fsync_files(tmp, files)
            checksums = {f: sha256_file(tmp / f) for f in files}
            with publishing_lock(directory):
                remove_abandoned(directory)
                ledger = read_ledger(directory, name) or Ledger(name=name)
                number = ledger.next_number(list_versions(registry, name))
                manifest = Manifest(
                    format_version=FORMAT_VERSION, name=name, version=number, created=now(),
                    architecture=sae.cfg.architecture, sae=sae.cfg, dtype=dtype, model=model, hook=hook,
                    input_scale=sae.cfg.input_scale, files=checksums, **fields,
                )
                text = manifest.model_dump_json(indent=2).encode()
                (tmp / MANIFEST_FILE).write_bytes(text)
                os.chmod(tmp / MANIFEST_FILE, 0o644)
                _fsync_files(tmp, [MANIFEST_FILE])
                ledger.versions[number] = LedgerEntry(manifest_sha256=digest_bytes(text), recorded=manifest.created)
                ledger.last = number
                write_ledger(directory, ledger)
                target = directory / f"v{number}"
                os.rename(tmp, target)
                fsync_dir(directory)
                return target
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise WriteFailed(f"cannot publish {name}: {os_reason(exc)} while writing the registry (nothing was published)") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def seal(registry: Path, name: str) -> list[int]:
    """Record in the ledger the versions of ``name`` that a release before the ledger published (each checked
    file by file against its manifest first); versions already recorded are never changed. Returns the numbers
    recorded now."""
    directory = Path(registry) / name
    with publishing_lock(directory):
        ledger = read_ledger(directory, name) or Ledger(name=name)
        recorded = []
        for number in list_versions(registry, name):
            if number in ledger.versions:
                continue
            version_dir = directory / f"v{number}"
            text = _manifest_bytes(version_dir)
            _check_manifest(version_dir, _parse_manifest(version_dir, text))
            ledger.versions[number] = LedgerEntry(manifest_sha256=digest_bytes(text), recorded=now())
            ledger.last = max(ledger.last, number)
            recorded.append(number)
        if recorded:
            write_ledger(directory, ledger)
        return recorded


def _fsync_files(directory: Path, files: list[str]) -> None:
    for f in files:
        with open(directory / f, "rb") as fh:
            os.fsync(fh.fileno())


def _manifest_bytes(version_dir: Path) -> bytes:
    path = Path(version_dir) / MANIFEST_FILE
    with _reading(f"{_label(version_dir)}: {MANIFEST_FILE}"):
        if not path.exists():
            raise ArtifactError(f"{_label(version_dir)}: {MANIFEST_FILE} is missing")
        return path.read_bytes()


def _parse_manifest(version_dir: Path, text: bytes) -> Manifest:
    try:
        raw = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{_label(version_dir)}: {MANIFEST_FILE} is not valid JSON ({exc.msg if hasattr(exc, 'msg') else exc})") from None
    if not isinstance(raw, dict):
        raise ArtifactError(f"{_label(version_dir)}: {MANIFEST_FILE} must hold a JSON object")
    if raw.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"{_label(version_dir)}: unknown format_version {raw.get('format_version')!r}; this release reads {FORMAT_VERSION}")
    architecture = raw.get("architecture")
    if architecture not in SAE_REGISTRY:
        raise ArtifactError(f"{_label(version_dir)}: unknown architecture {architecture!r}; known: {', '.join(sorted(SAE_REGISTRY))}")
    try:
        manifest = Manifest.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()[:5])
        raise ArtifactError(f"{_label(version_dir)}: invalid manifest ({problems})") from None
    directory_name, directory_version = Path(version_dir).parent.name, Path(version_dir).name
    if manifest.name != directory_name or f"v{manifest.version}" != directory_version:
        raise ArtifactError(f"{_label(version_dir)}: the manifest calls itself {manifest.name}/v{manifest.version} "
                            "(a version copied or moved by hand)")
    return manifest


def _label(version_dir: Path) -> str:
    p = Path(version_dir)
    return f"{p.parent.name}/{p.name}"


def read_manifest(version_dir: Path) -> tuple[Manifest, str]:
    """The manifest of a published version and its sha256, checked against the dictionary's ledger: an edited
    manifest, or a version directory the registry never published, is refused."""
    version_dir = Path(version_dir)
    text = _manifest_bytes(version_dir)
    name = version_dir.parent.name
    with _reading(f"dictionary {name!r}: {LEDGER_FILE}"):
        ledger = read_ledger(version_dir.parent, name)
    if ledger is None:
        raise ArtifactError(f"dictionary {name!r} has no {LEDGER_FILE} (published by a release before the ledger); "
                            f"check and record its versions with: monosemantic-train seal --registry REGISTRY --name {name}")
    match = _VERSION_DIR.match(version_dir.name)
    entry = ledger.versions.get(int(match.group(1))) if match else None
    if entry is None:
        raise ArtifactError(f"{_label(version_dir)} was not published into this registry (its ledger has no such version)")
    digest = digest_bytes(text)
    if digest != entry.manifest_sha256:
        raise ArtifactError(f"{_label(version_dir)}: {MANIFEST_FILE} does not match the digest recorded when it was "
                            "published (edited or corrupted)")
    return _parse_manifest(version_dir, text), digest


def _check_manifest(version_dir: Path, manifest: Manifest) -> None:
    """Every file the manifest lists exists with its sha256, and the directory holds no other file."""
    if SAE_FILE not in manifest.files:
        raise ArtifactError(f"{_label(version_dir)}: manifest lists no {SAE_FILE}")
    with _reading(f"{_label(version_dir)}"):
        present = {p.name for p in Path(version_dir).iterdir()} - {MANIFEST_FILE}
    if unlisted := sorted(present - set(manifest.files)):
        raise ArtifactError(f"{_label(version_dir)} holds {', '.join(unlisted[:5])}, which its manifest does not list")
    for file, expected in manifest.files.items():
        path = Path(version_dir) / file
        with _reading(f"{_label(version_dir)}: {file}"):
            if not path.exists():
                raise ArtifactError(f"{_label(version_dir)}: {file} is missing")
            digest = sha256_file(path)
        if digest != expected:
            raise ArtifactError(f"{_label(version_dir)}: {file} does not match its sha256 in the manifest (corrupted or tampered)")


def verify(version_dir: Path) -> Manifest:
    """Check the manifest against the ledger and every file against the manifest."""
    manifest, _ = read_manifest(version_dir)
    _check_manifest(version_dir, manifest)
    return manifest


def recorded_model_source(registry: Path, name: str, version: int | str | None = None) -> str | None:
    """Where the model a dictionary version was trained on can be loaded from, as its manifest records it: a hub id,
    or a local path that still exists; None when it records none (the caller's default applies)."""
    source = read_manifest(resolve_version(registry, name, version))[0].model.source
    if source and (not Path(source).is_absolute() or Path(source).exists()):
        return source
    return None


def load_dictionary(
    registry: Path,
    name: str,
    version: int | str | None = None,
    *,
    expected_model_checksum: str | None = None,
    expected_d_in: int | None = None,
    device: str = "cpu",
) -> Dictionary:
    """Load and verify a version. Refuses a dictionary made for another model or input width."""
    version_dir = resolve_version(registry, name, version)
    manifest, manifest_sha256 = read_manifest(version_dir)
    _check_manifest(version_dir, manifest)
    if expected_model_checksum is not None and manifest.model.checksum != expected_model_checksum:
        raise ArtifactMismatch(
            f"dictionary {name}:v{manifest.version} was trained on model {manifest.model.name!r} "
            f"(weights checksum {manifest.model.checksum[:12]}…), not on the loaded model ({expected_model_checksum[:12]}…)"
        )
    if expected_d_in is not None and manifest.sae.d_in != expected_d_in:
        raise ArtifactMismatch(
            f"dictionary {name}:v{manifest.version} reads d_in={manifest.sae.d_in} at hook {manifest.hook.name!r}, "
            f"but the model's activation there has width {expected_d_in}"
        )
    try:
        tensors = load_file(str(version_dir / SAE_FILE))
        features = load_file(str(version_dir / FEATURES_FILE)) if FEATURES_FILE in manifest.files else {}
        labels = json.loads((version_dir / LABELS_FILE).read_text())["labels"] if LABELS_FILE in manifest.files else []
    except OSError as exc:
        raise ArtifactUnreadable(f"{_label(version_dir)}: cannot read tensors ({exc.strerror or type(exc).__name__})") from None
    except (SafetensorError, ValueError, KeyError, TypeError) as exc:
        raise ArtifactError(f"{_label(version_dir)}: cannot read tensors ({exc})") from None
    try:
        sae = sae_from_tensors(manifest.sae, {k: v.float() for k, v in tensors.items()})
    except ConfigError as exc:
        raise ArtifactError(f"{_label(version_dir)}: {exc}") from None
    return Dictionary(sae=sae.to(device), manifest=manifest, path=version_dir, features=features, labels=labels,
                      manifest_sha256=manifest_sha256)
