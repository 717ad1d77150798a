"""Neuronpedia's names and records: a dictionary's source id (`{layer}-{dictionary name}`, the layer read from its
hook), shared by the service's Neuronpedia-compatible API (service/neuronpedia/) and the explanations export, and
explanations in the shape of Neuronpedia's explanation export (one JSON object per explanation: ``modelId``,
``layer`` — the source id —, ``index``, ``description``, ``explanationModelName``, ``typeName``, and ``scores``
with ``explanationScoreTypeName`` — detection, fuzz, simulation (a correlation) —, ``explanationScoreModelName``
and ``value``)."""

from __future__ import annotations

import re
from typing import Iterator

from monosemantic.explanations import ExplanationIndex
from monosemantic.artifact import HookRef
from monosemantic.lm import HookPoint

_LAYER = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")
SCORE_TYPES = {"detection": "detection", "fuzzing": "fuzz"}  # ours → Neuronpedia's score type names


def layer_of(hook: HookPoint | HookRef) -> int:
    """The block a hook is in: `blocks.5.hook_resid_post` → 5, `transformer.h.5.mlp` → 5; 0 for a hook outside the
    blocks (the embeddings)."""
    for name in (hook.alias or "", hook.module_path):
        match = _LAYER.search(name)
        if match:
            return int(match.group(1))
    return 0


def source_id(name: str, hook: HookPoint | HookRef) -> str:
    return f"{layer_of(hook)}-{name}"


def explanation_records(index: ExplanationIndex, model_id: str, source: str) -> Iterator[dict]:
    """Every explanation of the index as a Neuronpedia explanation record, features in order, each feature's best
    first (typeName: ours, with the prompt version it was made with)."""
    for feature in sorted(index.by_feature):
        for e in index.by_feature[feature]:
            scores = [{"explanationScoreTypeName": SCORE_TYPES[kind], "explanationScoreModelName": e.scorer_model,
                       "value": record.balanced_accuracy, "examples": record.examples}
                      for kind, record in (("detection", e.detection), ("fuzzing", e.fuzzing))
                      if record is not None and record.balanced_accuracy is not None]
            if e.simulation is not None and e.simulation.correlation is not None:
                scores.append({"explanationScoreTypeName": "simulation", "explanationScoreModelName": e.scorer_model,
                               "value": e.simulation.correlation, "examples": e.simulation.examples})
            yield {"modelId": model_id, "layer": source, "index": str(feature), "description": e.explanation,
                   "explanationModelName": e.explainer_model, "typeName": f"monosemantic-{e.prompt_version}", "scores": scores}
