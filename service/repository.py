"""The repository of loaded dictionaries: one model and, by name, the dictionaries bound to it — loaded, verified,
swapped and unloaded one at a time while the others serve (KServe's ModelRepository beside its data plane).

Every entry is an immutable BoundDictionary: a request takes the entries serving when it arrives and finishes on
them; a load or reload builds the new one beside the old and swaps the reference, so a failure leaves the rest
serving as they were. Loading reads files only; the width check (a forward) runs where the model is owned, the
engine's worker.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterator

from monosemantic.artifact import list_dictionaries, parse_reference, read_manifest, resolve_version
from monosemantic.bound import BoundDictionary, load_bound
from monosemantic.errors import ArtifactError, ArtifactNotFound, ConfigError, MonosemanticError
from monosemantic.model import Model
from service.errors import ErrorKind, ServiceError, not_found

log = logging.getLogger("monosemantic.serve")


def bound_to_model(registry: Path, checksum: str) -> list[str]:
    """``all``: the latest version of every dictionary in the registry bound to the model with this weights
    checksum, by name (an unreadable or foreign version is passed over, with a log line)."""
    names = []
    for name, versions in list_dictionaries(registry).items():
        try:
            manifest, _ = read_manifest(resolve_version(registry, name, versions[-1]))
        except ArtifactError as exc:
            log.warning("MONOSEMANTIC_DICTIONARIES=all: %s:v%d passed over: %s", name, versions[-1], exc)
            continue
        if manifest.model.checksum == checksum:
            names.append(name)
    return names


class DictionaryRepository:
    def __init__(self, model: Model, registry: Path, device: str = "cpu", sae_dtype: str = "float32") -> None:
        self.model, self.registry, self.device, self.sae_dtype = model, Path(registry), device, sae_dtype
        self._loaded: dict[str, BoundDictionary] = {}  # in load order: the first is the default

    # ---- reading ---------------------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[BoundDictionary]:
        return iter(list(self._loaded.values()))

    def __len__(self) -> int:
        return len(self._loaded)

    def __contains__(self, name: str) -> bool:
        return name in self._loaded

    @property
    def default(self) -> BoundDictionary:
        return next(iter(self._loaded.values()))

    def refs(self) -> str:
        return ", ".join(d.ref for d in self._loaded.values())

    def get(self, reference: str | None, field: str = "dictionary") -> BoundDictionary:
        """``name`` or ``name:version`` (vN, N or latest) → the loaded entry; None → the default. A name that is
        not loaded, or a version that is not the one loaded, is NOT_FOUND listing what is."""
        if reference is None:
            return self.default
        try:
            name, version = parse_reference(reference)
        except ConfigError as exc:
            raise ServiceError(ErrorKind.INVALID_ARGUMENT, f"{field}: {exc}", field) from None
        entry = self._loaded.get(name)
        if entry is None or (version is not None and version != entry.version):
            what = f"{name}:v{version}" if version is not None else repr(name)
            raise not_found(field, f"dictionary {what} is not loaded; loaded: {self.refs()}")
        return entry

    # ---- changing --------------------------------------------------------------------------------------------
    def read(self, name: str, version: int | None, field: str = "name") -> BoundDictionary:
        """Load and verify a version from the registry (files only: no forward), as a candidate to swap in; every
        failure is a ServiceError naming `field` and never a path."""
        registry = self.registry
        try:
            version_dir = resolve_version(registry, name, version)
            if not version_dir.resolve().is_relative_to(registry.resolve()):
                raise ServiceError(ErrorKind.INVALID_ARGUMENT, f"{field}: dictionary {name!r} resolves outside the registry", field)
            return load_bound(self.model, registry, name, version, self.device, self.sae_dtype, check_width=False)
        except ArtifactNotFound as exc:
            raise ServiceError(ErrorKind.NOT_FOUND, f"{field}: {exc}", field) from None
        except ConfigError as exc:
            raise ServiceError(ErrorKind.INVALID_ARGUMENT, f"{field}: {exc}", field) from None
        except MonosemanticError as exc:  # tampered, truncated, unknown format, another model, unreadable
            raise ServiceError(ErrorKind.FAILED_PRECONDITION, f"dictionary {name}: {exc}", field) from None
        except OSError as exc:  # the registry's own directory, resolved above; the message names no path
            raise ServiceError(ErrorKind.FAILED_PRECONDITION, f"dictionary {name}: cannot be read ({exc.strerror or type(exc).__name__})", field) from None

    def changed_on_disk(self, candidate: BoundDictionary) -> str | None:
        """A version is immutable: the same name:version with another manifest digest than the one loaded is a
        registry rewritten underneath the service (restored from elsewhere, re-created by hand), not a reload."""
        serving = self._loaded.get(candidate.name)
        if serving is None or serving.version != candidate.version:
            return None
        old, new = serving.dictionary, candidate.dictionary
        if old.manifest_sha256 == new.manifest_sha256:
            return None
        return (f"dictionary {new.ref} on disk is not the one serving (manifest digest {new.manifest_sha256[:12]}… "
                f"against {old.manifest_sha256[:12]}…): a version never changes, so the registry was rewritten; "
                "publish the new dictionary as a new version")

    def put(self, entry: BoundDictionary) -> BoundDictionary | None:
        """Serve `entry` under its name (in place of the version serving there, keeping its place in the order;
        else last); returns the entry it replaced."""
        previous = self._loaded.get(entry.name)
        self._loaded[entry.name] = entry
        return previous

    def remove(self, name: str) -> BoundDictionary:
        entry = self._loaded.get(name)
        if entry is None:
            raise not_found("name", f"dictionary {name!r} is not loaded; loaded: {self.refs()}")
        if len(self._loaded) == 1:
            raise ServiceError(ErrorKind.FAILED_PRECONDITION, f"name: {entry.ref} is the only loaded dictionary; load another first", "name")
        return self._loaded.pop(name)
