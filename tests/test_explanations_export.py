"""`monosemantic-train explanations` writes a version's explanations in the shape of Neuronpedia's explanation
export (one JSON object per explanation), from run records beside a copy of the reference."""

from __future__ import annotations

import gzip
import json
import shutil

import pytest
from typer.testing import CliRunner

from conftest import write_explanation_run
from monosemantic.shipped import REFERENCE_DICTIONARY, reference_registry_path
from trainer.cli import app


@pytest.fixture
def registry(tmp_path):
    root = tmp_path / "registry"
    shutil.copytree(reference_registry_path() / REFERENCE_DICTIONARY, root / REFERENCE_DICTIONARY)
    write_explanation_run(root, REFERENCE_DICTIONARY, "first", {9: ("numbers", 0.7), 3: ("the word cat", None), 4: (None, None)})
    write_explanation_run(root, REFERENCE_DICTIONARY, "second", {3: ("dogs and cats", 0.6)})
    write_explanation_run(root, REFERENCE_DICTIONARY, "stale", {5: ("of another version", 1.0)}, digest="0" * 64)
    return root


def _export(registry, out, *options):
    result = CliRunner().invoke(app, ["explanations", "--registry", str(registry), "--dictionary", REFERENCE_DICTIONARY,
                                      "--out", str(out), *options])
    assert result.exit_code == 0, result.output
    return result


def test_each_explanation_is_one_neuronpedia_record_features_in_order_best_first(registry, tmp_path):
    _export(registry, tmp_path / "x.jsonl", "--model-id", "ref-1l")
    records = [json.loads(line) for line in (tmp_path / "x.jsonl").read_text().splitlines()]
    assert [(r["index"], r["description"]) for r in records] == [("3", "dogs and cats"), ("3", "the word cat"), ("9", "numbers")]
    first = records[0]
    assert first["modelId"] == "ref-1l" and first["layer"] == "0-reference"  # the source id the /neuronpedia API serves it under
    assert first["explanationModelName"] == "second-explainer" and first["typeName"] == "monosemantic-delphi-1"
    assert first["scores"] == [{"explanationScoreTypeName": "detection", "explanationScoreModelName": "second-scorer", "value": 0.6, "examples": 20},
                               {"explanationScoreTypeName": "fuzz", "explanationScoreModelName": "second-scorer", "value": 0.6, "examples": 20}]
    assert records[1]["scores"] == []  # unscored: no score claimed


def test_a_gz_name_writes_it_gzipped_and_the_model_id_defaults_to_the_recorded_model(registry, tmp_path):
    result = _export(registry, tmp_path / "x.jsonl.gz")
    records = [json.loads(line) for line in gzip.decompress((tmp_path / "x.jsonl.gz").read_bytes()).decode().splitlines()]
    assert len(records) == 3 and "3 explanations of 2 features" in result.output
    assert {r["modelId"] for r in records} == {json.loads((registry / REFERENCE_DICTIONARY / "v1" / "manifest.json").read_text())["model"]["name"]}


def test_an_unwritable_out_exits_2_naming_it(registry, tmp_path):
    result = CliRunner().invoke(app, ["explanations", "--registry", str(registry), "--dictionary", REFERENCE_DICTIONARY,
                                      "--out", str(tmp_path / "missing" / "x.jsonl")])
    assert result.exit_code == 2 and "--out" in result.output
