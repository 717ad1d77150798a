"""A model's weights checksum is remembered against its files' identity (monosemantic/checksum_cache.py): an
unchanged directory is not hashed again, and a changed weight file is, so dictionaries bound to the old weights
refuse the new ones."""

from __future__ import annotations

import json
import os
import shutil
import time

import pytest
import torch

from monosemantic import checksum_cache
from monosemantic.lm import load_lm, weights_checksum
from monosemantic.shipped import reference_lm_path

pytestmark = pytest.mark.slow  # each waits out the racy window (RACY_S) once


@pytest.fixture()
def model_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("MONOSEMANTIC_CACHE_DIR", str(tmp_path / "cache"))
    target = tmp_path / "lm"
    shutil.copytree(reference_lm_path(), target)
    old = time.time() - 60  # settled files: older than the racy window
    for f in target.iterdir():
        os.utime(f, (old, old))
    time.sleep(checksum_cache.RACY_S + 0.1)  # ctime cannot be set back: wait past the window instead
    return target


def _cached(tmp_path) -> dict:
    return json.loads((tmp_path / "cache" / checksum_cache.CACHE_FILE).read_text())


def test_the_first_load_remembers_the_checksum_it_computed(model_dir, tmp_path):
    lm = load_lm(model_dir)
    assert lm.checksum == weights_checksum(lm.model)
    [entry] = _cached(tmp_path).values()
    assert entry["checksum"] == lm.checksum


def test_an_unchanged_directory_is_not_hashed_again(model_dir, tmp_path):
    load_lm(model_dir)
    cache = tmp_path / "cache" / checksum_cache.CACHE_FILE
    data = json.loads(cache.read_text())
    [key] = data
    data[key]["checksum"] = "remembered"  # what only a remembered value can return
    cache.write_text(json.dumps(data))
    assert load_lm(model_dir).checksum == "remembered"


def test_a_weight_file_rewritten_in_place_is_hashed_again(model_dir, tmp_path):
    first = load_lm(model_dir)
    from safetensors.torch import load_file, save_file

    weights = model_dir / "model.safetensors"
    state = load_file(weights)
    name = sorted(state)[0]
    state[name] = state[name] + 1.0
    stat = weights.stat()
    save_file(state, weights, metadata={"format": "pt"})
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # even with its mtime put back
    second = load_lm(model_dir)
    assert second.checksum != first.checksum
    assert second.checksum == weights_checksum(second.model)


def test_a_fresh_directory_is_hashed_but_not_remembered(tmp_path, monkeypatch):
    monkeypatch.setenv("MONOSEMANTIC_CACHE_DIR", str(tmp_path / "cache"))
    target = tmp_path / "lm"
    shutil.copytree(reference_lm_path(), target)
    lm = load_lm(target)
    assert lm.checksum == weights_checksum(lm.model)
    assert not (tmp_path / "cache" / checksum_cache.CACHE_FILE).exists()


def test_an_unwritable_cache_only_costs_the_hash(model_dir, tmp_path, monkeypatch):
    (tmp_path / "blocked").write_text("a file where the cache directory would be")
    monkeypatch.setenv("MONOSEMANTIC_CACHE_DIR", str(tmp_path / "blocked" / "cache"))
    lm = load_lm(model_dir)
    assert lm.checksum == weights_checksum(lm.model)


def test_the_dtype_is_part_of_what_is_remembered(model_dir, tmp_path):
    load_lm(model_dir)
    load_lm(model_dir, dtype=torch.bfloat16)
    assert sorted(key.split("|")[1] for key in _cached(tmp_path)) == ["torch.bfloat16", "torch.float32"]
