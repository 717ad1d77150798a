"""Neuronpedia's names for what the service serves: the model id, a source per loaded dictionary
(`{layer}-{dictionary name}`, the layer read from its hook: monosemantic/interop/neuronpedia.py) and a source set
per dictionary name.

Read from the repository on each request, so a reload or unload is seen at once. Every unknown name is a 400
naming the field and what is served (Neuronpedia's own server answers an unknown source set the same way).
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

from monosemantic.bound import BoundDictionary
from monosemantic.interop import neuronpedia
from service.errors import invalid
from service.repository import DictionaryRepository

def source_id(entry: BoundDictionary) -> str:
    return neuronpedia.source_id(entry.name, entry.hook)


def default_model_id(model_source: str) -> str:
    """The model directory's name (a hub id's last part): what MONOSEMANTIC_NEURONPEDIA_MODEL_ID defaults to."""
    return Path(model_source.rstrip("/")).name or model_source


class Naming(NamedTuple):
    """The served model's id and its dictionaries under Neuronpedia's names, at one moment."""

    model_id: str
    repository: DictionaryRepository

    def check_model(self, field: str, model: str) -> None:
        if model != self.model_id:
            raise invalid(field, f"unknown model {model!r}; this server serves {self.model_id!r}")

    def sources(self) -> dict[str, BoundDictionary]:
        return {source_id(entry): entry for entry in self.repository}

    def source(self, field: str, source: str) -> BoundDictionary:
        served = self.sources()
        entry = served.get(source)
        if entry is None:
            raise invalid(field, f"unknown source {source!r}; served sources: {sorted(served)}")
        return entry

    def source_set(self, field: str, name: str) -> list[BoundDictionary]:
        """A source set is a dictionary name: its sources are that dictionary's (one, at its hook's layer)."""
        members = [entry for entry in self.repository if entry.name == name]
        if not members:
            raise invalid(field, f"unknown source set {name!r}; served sets: {sorted({e.name for e in self.repository})}")
        return members

    def sets(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for entry in self.repository:
            out.setdefault(entry.name, []).append(source_id(entry))
        return out
