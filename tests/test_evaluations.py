"""Specifications of the evaluations a user runs: kept beside the version (which stays as published), listed with
the data they were measured on by /v1/dictionaries over REST and gRPC; and of binding a dictionary trained on a
bare activation matrix to its model later, and of the warnings that say what a user cannot match."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import RunningServer
from monosemantic.artifact import load_dictionary, publish
from monosemantic.client import GrpcClient, RestClient
from monosemantic.evaluations import evaluations_path, read_evaluations
from monosemantic.shipped import REFERENCE_DICTIONARY, reference_lm_path, reference_registry_path
from trainer.cli import app
from trainer.corpus import build_corpus
from trainer.synthetic import make_sparse_data

runner = CliRunner()


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "notes.jsonl"
    lines = [f"def f{i}(x):\n    return x * {i} + {i % 7}\n" * 6 for i in range(300)]
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in lines))
    return path


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, text):
    """A copy of the shipped registry, evaluated twice from the CLI: on the built-in corpus and on the user's text."""
    root = tmp_path_factory.mktemp("registry")
    shutil.copytree(reference_registry_path() / REFERENCE_DICTIONARY, root / REFERENCE_DICTIONARY)
    before = sorted(p.name for p in (root / REFERENCE_DICTIONARY / "v1").iterdir())
    results = []
    for extra in ([], ["--dataset", str(text)]):
        run = runner.invoke(app, ["evaluate", "--registry", str(root), "--dictionary", "reference", "--tokens", "3000", "--json", *extra])
        assert run.exit_code == 0, run.output
        results.append(json.loads(run.stdout))
    return root, results, before


@pytest.mark.slow
def test_an_evaluation_is_recorded_beside_the_version_which_stays_as_published(evaluated):
    root, results, before = evaluated
    assert sorted(p.name for p in (root / REFERENCE_DICTIONARY / "v1").iterdir()) == before
    dictionary = load_dictionary(root, REFERENCE_DICTIONARY, 1)  # the ledger still verifies the version
    assert results[0]["recorded"] == str(evaluations_path(root, REFERENCE_DICTIONARY, 1))
    recorded = read_evaluations(root, REFERENCE_DICTIONARY, 1, dictionary.manifest_sha256)
    assert [e.data["kind"] for e in recorded] == ["builtin-corpus", "dataset"]
    assert [e.metrics["l0"] for e in recorded] == pytest.approx([r["l0"] for r in results])
    assert recorded[1].data["dataset"] == results[1]["data"]["dataset"] and recorded[1].data["fingerprint"]


@pytest.mark.slow
def test_a_record_made_for_another_manifest_is_not_shown(evaluated):
    root, _, _ = evaluated
    assert read_evaluations(root, REFERENCE_DICTIONARY, 1, "0" * 64) == []


def test_evaluate_with_no_record_keeps_nothing(tmp_path):
    shutil.copytree(reference_registry_path() / REFERENCE_DICTIONARY, tmp_path / REFERENCE_DICTIONARY)
    run = runner.invoke(app, ["evaluate", "--registry", str(tmp_path), "--dictionary", "reference", "--tokens", "1000", "--no-record"])
    assert run.exit_code == 0, run.output
    assert not evaluations_path(tmp_path, REFERENCE_DICTIONARY, 1).exists() and "recorded" not in run.stdout


@pytest.mark.parametrize("transport", ["rest", "grpc"])
@pytest.mark.slow
def test_the_service_lists_each_evaluation_with_its_data(evaluated, transport):
    root, results, _ = evaluated
    running = RunningServer(registry=root, dictionary="reference")
    try:
        client = RestClient(running.http_url) if transport == "rest" else GrpcClient(running.grpc_target)
        with client:
            serving = client.dictionaries().dictionaries[0]
    finally:
        running.stop()
    assert [e.data["kind"] for e in serving.evaluations] == ["builtin-corpus", "dataset"]
    assert serving.evaluations[1].data["dataset"] == results[1]["data"]["dataset"]
    assert serving.evaluations[1].metrics["fvu"] == pytest.approx(results[1]["fvu"])
    assert serving.evaluations[0].model_checksum == serving.model_checksum


def test_a_damaged_evaluations_record_hides_the_evaluations_not_the_dictionary(tmp_path):
    shutil.copytree(reference_registry_path() / REFERENCE_DICTIONARY, tmp_path / REFERENCE_DICTIONARY)
    path = evaluations_path(tmp_path, REFERENCE_DICTIONARY, 1)
    path.parent.mkdir()
    path.write_text("{not json")
    running = RunningServer(registry=tmp_path, dictionary="reference")
    try:
        with RestClient(running.http_url) as client:
            serving = client.dictionaries().dictionaries[0]
    finally:
        running.stop()
    assert serving.name == "reference" and serving.evaluations == []


# ---- a dictionary trained on a bare matrix, bound to its model later ------------------------------------------------


@pytest.fixture(scope="module")
def unbound(tmp_path_factory):
    """A dictionary trained from the CLI on a matrix of the reference model's MLP activations, with no --model."""
    from monosemantic.lm import load_lm, read_activations
    from trainer.corpus import token_contexts

    root = tmp_path_factory.mktemp("unbound")
    lm = load_lm(reference_lm_path())
    contexts = token_contexts(lm.tokenizer, build_corpus(max_chars=200_000).train, 64)[:40]
    acts = read_activations(lm, contexts, "blocks.0.mlp.hook_post").reshape(-1, 512).numpy()
    np.save(root / "acts.npy", acts)
    run = runner.invoke(app, ["train", "--activations", str(root / "acts.npy"), "--d-sae", "256", "--tokens", "20000",
                              "--batch-size", "512", "--registry", str(root / "r"), "--name", "mine"])
    assert run.exit_code == 0, run.output
    return root, run


def test_training_without_a_model_says_the_dictionary_cannot_be_served_and_how_to_bind_it(unbound):
    _, run = unbound
    assert "recorded against model 'unspecified'" in run.stderr and "monosemantic-train bind" in run.stderr


def test_bind_publishes_the_same_weights_bound_to_the_model_as_the_next_version(unbound):
    root, _ = unbound
    run = runner.invoke(app, ["bind", "--registry", str(root / "r"), "--dictionary", "mine", "--model", str(reference_lm_path()),
                              "--hook", "blocks.0.mlp.hook_post"])
    assert run.exit_code == 0, run.output
    first, bound = load_dictionary(root / "r", "mine", 1), load_dictionary(root / "r", "mine", 2)
    assert first.manifest.model.checksum == "unspecified"
    assert bound.manifest.model.source == str(reference_lm_path().resolve()) and bound.manifest.hook.name == "blocks.0.mlp.hook_post"
    assert bound.manifest.model_extra["bound_from"] == "mine:v1"
    for name, tensor in first.sae.tensors().items():
        assert (tensor == bound.sae.tensors()[name]).all()
    assert bound.manifest.metrics == first.manifest.metrics
    running = RunningServer(registry=root / "r", dictionary="mine")  # the model comes from the bound manifest
    try:
        with RestClient(running.http_url) as client:
            assert client.activations(text="def main():", top_k=2).dictionary.version == 2
    finally:
        running.stop()


def test_bind_refuses_a_hook_of_another_width_and_an_already_bound_dictionary(unbound, tmp_path):
    root, _ = unbound
    wrong = runner.invoke(app, ["bind", "--registry", str(root / "r"), "--dictionary", "mine:1", "--model", str(reference_lm_path()),
                                "--hook", "blocks.0.hook_resid_post"])
    assert wrong.exit_code == 2 and "width 128" in wrong.output
    shutil.copytree(reference_registry_path() / REFERENCE_DICTIONARY, tmp_path / REFERENCE_DICTIONARY)
    again = runner.invoke(app, ["bind", "--registry", str(tmp_path), "--dictionary", "reference", "--model", str(reference_lm_path()),
                                "--hook", "blocks.0.mlp.hook_post"])
    assert again.exit_code == 2 and "already bound" in again.output


# ---- what cannot be matched on another Python ------------------------------------------------------------------


def _republished_with_corpus(tmp_path, fingerprint: str):
    shipped = load_dictionary(reference_registry_path(), REFERENCE_DICTIONARY, 1)
    m = shipped.manifest
    publish(tmp_path, "ref", shipped.sae, model=m.model, hook=m.hook, extra={"metrics": m.metrics, "data": {"corpus_fingerprint": fingerprint, "python": "3.99.0"}})
    return runner.invoke(app, ["verify", "--registry", str(tmp_path), "--dictionary", "ref", "--model", str(reference_lm_path())])


def test_verify_warns_when_this_pythons_corpus_is_not_the_one_the_dictionary_was_trained_on(tmp_path):
    run = _republished_with_corpus(tmp_path, "ab" * 32)
    assert run.exit_code == 0, run.output
    assert "warning: the built-in corpus here (Python" in run.stderr and "Python 3.99.0's" in run.stderr
    assert json.loads(run.stdout)["warnings"]


def test_verify_is_quiet_when_the_corpus_is_the_same(tmp_path):
    run = _republished_with_corpus(tmp_path, build_corpus().fingerprint)
    assert run.exit_code == 0 and "warning" not in run.stderr and json.loads(run.stdout)["warnings"] == []


# ---- monosemantic-serve's help and log ----------------------------------------------------------------------------


def test_serve_help_lists_every_setting_with_its_environment_variable_and_default():
    from service.settings import ServiceSettings

    shown = subprocess.run([sys.executable, "-m", "service.cli", "--help"], capture_output=True, text=True, timeout=60).stdout
    for name in ServiceSettings.model_fields:
        assert f"MONOSEMANTIC_{name.upper()} = " in shown
    assert "MONOSEMANTIC_MAX_QUEUE = 256" in shown and "MONOSEMANTIC_HTTP_PORT = 8000" in shown


@pytest.mark.slow
def test_the_startup_line_is_logged_at_info():
    import os

    from conftest import free_port, wait_until_ok

    http = free_port()
    env = {**os.environ, "MONOSEMANTIC_HTTP_PORT": str(http), "MONOSEMANTIC_GRPC_PORT": str(free_port())}
    process = subprocess.Popen([sys.executable, "-m", "service.cli"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_until_ok(f"http://127.0.0.1:{http}/readyz", timeout=120)
    finally:
        process.terminate()
        log = process.communicate(timeout=60)[1]
    line = next(line for line in log.splitlines() if "monosemantic serving reference:v1" in line)
    assert " INFO monosemantic.serve: " in line
