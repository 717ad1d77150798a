"""Specifications of the ``monosemantic-train`` command line: the interface users and docs rely on."""

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from monosemantic.artifact import list_versions, load_dictionary
from trainer.cli import app
from trainer.synthetic import make_sparse_data

runner = CliRunner()


@pytest.fixture(scope="module")
def activations(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "acts.npy"
    np.save(path, make_sparse_data(20_000, d=16, n_features=32, seed=4).activations.numpy())
    return path


def _train(activations, registry, *extra):
    return runner.invoke(app, ["train", "--activations", str(activations), "--d-sae", "64", "--tokens", "40000",
                               "--batch-size", "512", "--registry", str(registry), "--name", "toy", *extra])


@pytest.mark.parametrize("options", [["--arch", "relu", "--target-l0", "4"], ["--arch", "topk", "--k", "4"],
                                     ["--arch", "jumprelu", "--l1", "0.5"]])
def test_train_publishes_the_next_version_of_the_named_dictionary(activations, tmp_path, options):
    assert _train(activations, tmp_path, *options).exit_code == 0
    assert _train(activations, tmp_path, *options).exit_code == 0
    assert list_versions(tmp_path, "toy") == [1, 2]
    manifest = load_dictionary(tmp_path, "toy").manifest
    assert manifest.architecture == options[1] and {"l0", "fvu", "mse"} <= set(manifest.metrics)


def test_evaluate_with_activations_prints_the_reconstruction_metrics_as_json(activations, tmp_path):
    assert _train(activations, tmp_path, "--arch", "topk", "--k", "4").exit_code == 0
    result = runner.invoke(app, ["evaluate", "--registry", str(tmp_path), "--dictionary", "toy:1",
                                 "--activations", str(activations), "--json"])
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.stdout)
    assert {"l0", "fvu", "mse", "dead_fraction", "dense_fraction"} <= set(metrics)
    assert metrics["l0"] == pytest.approx(4.0, abs=0.05)


@pytest.mark.parametrize("args, message", [
    (["--arch", "quantum"], "architecture"),
    (["--arch", "topk", "--k", "999"], "k"),
    (["--tokens", "0"], "tokens"),
])
def test_train_refuses_bad_options_with_a_message_naming_them(activations, tmp_path, args, message):
    result = _train(activations, tmp_path, *args)
    assert result.exit_code == 2
    assert message in result.output and "Traceback" not in result.output


def test_train_names_a_missing_activation_file(tmp_path):
    result = runner.invoke(app, ["train", "--activations", str(tmp_path / "nope.npy"), "--registry", str(tmp_path), "--name", "x"])
    assert result.exit_code == 2 and "nope.npy" in result.output


def test_evaluate_of_an_unknown_dictionary_says_it_is_not_found(tmp_path):
    result = runner.invoke(app, ["evaluate", "--registry", str(tmp_path), "--dictionary", "ghost", "--json"])
    assert result.exit_code == 2 and "not found" in result.output


@pytest.mark.parametrize("command", ["corpus", "lm", "harvest", "train", "evaluate", "publish", "reference", "verify"])
def test_every_stage_has_help(command):
    result = runner.invoke(app, [command, "--help"])
    assert result.exit_code == 0 and "Usage" in result.output
