"""Specifications of the sharp edges a new user hit with their own model (issue 13): each is refused with a clear
message or now works, through the real ``monosemantic-train`` command."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from typer.testing import CliRunner

from monosemantic.artifact import load_dictionary
from monosemantic.lm import load_lm, read_activations, resolve_hook
from monosemantic.shipped import reference_lm_path
from trainer.cli import app
from trainer.synthetic import make_sparse_data
from trainer.train import default_lr

runner = CliRunner()


@pytest.fixture(scope="module")
def activations(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "acts.npy"
    np.save(path, make_sparse_data(20_000, d=16, n_features=32, seed=9).activations.numpy())
    return path


@pytest.mark.slow
def test_lm_refuses_to_overwrite_the_shipped_model_without_a_flag():
    before = (reference_lm_path() / "model.safetensors").stat().st_mtime_ns
    result = runner.invoke(app, ["lm", "--out", str(reference_lm_path()), "--tokens", "1000"])
    assert result.exit_code == 2 and "--overwrite-shipped" in result.output
    assert (reference_lm_path() / "model.safetensors").stat().st_mtime_ns == before


def test_a_model_folder_without_tokenizer_files_says_so_and_where_it_looked(tmp_path):
    folder = tmp_path / "no-tokenizer"
    folder.mkdir()
    for name in ("config.json", "model.safetensors", "generation_config.json"):
        shutil.copy(reference_lm_path() / name, folder / name)
    result = runner.invoke(app, ["harvest", "--out", str(tmp_path / "h"), "--model", str(folder), "--contexts", "2"])
    assert result.exit_code == 2 and "has no tokenizer" in result.output and "tokenizer.json" in result.output


@pytest.mark.slow
def test_train_says_every_default_that_decides_the_result(activations):
    result = runner.invoke(app, ["train", "--activations", str(activations), "--arch", "topk", "--d-sae", "64",
                                 "--tokens", "20480", "--batch-size", "512"])
    assert result.exit_code == 0, result.output
    lr = default_lr(64, 20480 // 512)  # the budget rule's value, resolved and shown (trainer/train.py)
    assert "k 32 (default)" in result.stderr and f"lr {lr:.3g} (default)" in result.stderr


@pytest.mark.slow
def test_train_prints_a_short_table_and_keeps_the_whole_result_for_json(activations):
    args = ["train", "--activations", str(activations), "--arch", "topk", "--k", "4", "--d-sae", "64", "--tokens", "20480",
            "--batch-size", "512"]
    short = runner.invoke(app, args)
    assert short.exit_code == 0 and "density_histogram" not in short.stdout
    assert [line.split(":")[0].strip() for line in short.stdout.splitlines()[1:]] == ["l0", "fvu", "mse", "dead_fraction", "dense_fraction", "tokens"]
    assert "density_histogram" in runner.invoke(app, [*args, "--json"]).stdout


def test_train_help_shows_the_matrix_shape():
    assert "[rows, d_in]" in runner.invoke(app, ["train", "--help"], terminal_width=200).stdout


def test_a_hook_given_as_an_alias_is_recorded_in_the_form_serving_resolves(tmp_path):
    from monosemantic.bound import load_bound
    from monosemantic.model import Model

    lm = load_lm(reference_lm_path())
    ids = lm.tokenizer("def main():\n    return 1\n" * 40, return_tensors="pt").input_ids[:, :256]
    rows = read_activations(lm.model, ids, resolve_hook(lm.model, "blocks.0.hook_resid_post"))[0].numpy()
    np.save(tmp_path / "resid.npy", np.tile(rows, (8, 1)) + np.random.default_rng(0).normal(0, 0.01, (8 * rows.shape[0], rows.shape[1])).astype(np.float32))
    result = runner.invoke(app, ["train", "--activations", str(tmp_path / "resid.npy"), "--model", str(reference_lm_path()),
                                 "--hook", "blocks.0.hook_resid_post", "--d-sae", "64", "--tokens", "4096", "--batch-size", "256",
                                 "--registry", str(tmp_path / "r"), "--name", "resid"])
    assert result.exit_code == 0, result.output
    loaded = load_bound(Model.of(lm), tmp_path / "r", "resid", None)  # what the service does at start and reload
    assert loaded.hook.module_path == load_dictionary(tmp_path / "r", "resid").manifest.hook.module_path


@pytest.mark.slow
def test_model_takes_a_hub_id_and_says_so_when_the_hub_cannot_be_reached(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # tests never reach a hub: the id is tried, and the message says so
    result = runner.invoke(app, ["harvest", "--out", str(tmp_path / "h"), "--model", "openai-community/gpt2", "--contexts", "2"])
    assert result.exit_code == 2 and "hub id" in result.output and "model directory not found" not in result.output


@pytest.mark.slow
def test_progress_shows_as_lines_in_a_log_when_output_is_not_a_terminal(tmp_path, activations):
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {**os.environ, "MONOSEMANTIC_PROGRESS_S": "0"}  # a line at every update, instead of every 5 s
    result = subprocess.run([sys.executable, "-m", "trainer.cli", "train", "--activations", str(activations), "--d-sae", "64",
                             "--tokens", "20480", "--batch-size", "512", "--arch", "topk", "--k", "4"],
                            capture_output=True, text=True, env=env, cwd=Path(__file__).resolve().parents[1], check=True)
    lines = [line for line in result.stderr.splitlines() if line.startswith("train topk:")]
    assert len(lines) >= 10 and "/40 step" in lines[0] and "ETA" in lines[0] and "\r" not in result.stderr
