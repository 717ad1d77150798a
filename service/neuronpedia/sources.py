"""Neuronpedia's names for what the service serves: the model id, a source per loaded dictionary
(`{layer}-{dictionary name}`, the layer read from its hook) and a source set per dictionary name.

Read from the repository on each request, so a reload or unload is seen at once. Every unknown name is a 400
naming the field and what is served (Neuronpedia's own server answers an unknown source set the same way).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import NamedTuple

from monosemantic.bound import BoundDictionary
from monosemantic.lm import HookPoint
from service.errors import invalid
from service.repository import DictionaryRepository

_LAYER = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")


def layer_of(hook: HookPoint) -> int:
    """The block a hook is in: `blocks.5.hook_resid_post` → 5, `transformer.h.5.mlp` → 5; 0 for a hook outside the
    blocks (the embeddings)."""
    for name in (hook.alias or "", hook.module_path):
        match = _LAYER.search(name)
        if match:
            return int(match.group(1))
    return 0


def source_id(entry: BoundDictionary) -> str:
    return f"{layer_of(entry.hook)}-{entry.name}"


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
