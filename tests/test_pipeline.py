"""End to end: the whole chain (corpus → LM → harvest → train → evaluate → publish → verify) on a corpus slice."""

import json

import pytest
from typer.testing import CliRunner

from monosemantic.artifact import load_dictionary
from monosemantic.lm import load_lm
from trainer.cli import app

# the whole chain in one module fixture: an LM trained, harvested, a dictionary trained, evaluated, given dashboards (20 s)
pytestmark = pytest.mark.slow

runner = CliRunner()


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref")
    result = runner.invoke(app, [
        "reference", "--out", str(out), "--work-dir", str(out / "work"), "--retrain-lm", "--max-chars", "400000",
        "--lm-tokens", "60000", "--harvest-contexts", "120", "--tokens", "120000", "--d-sae", "256",
        "--target-l0", "12", "--eval-tokens", "8000", "--feature-tokens", "20000",
    ])
    assert result.exit_code == 0, result.output
    return out, json.loads(result.stdout)


def test_the_whole_chain_publishes_a_verified_dictionary_for_the_model_it_trained(reference_run):
    out, summary = reference_run
    lm = load_lm(out / "reference-lm")
    dictionary = load_dictionary(out / "registry", "reference", expected_model_checksum=lm.checksum, expected_d_in=512)
    assert dictionary.manifest.hook.module_path == "transformer.h.0.mlp.act"
    assert dictionary.manifest.data["corpus_fingerprint"]
    assert set(summary["timings"]) >= {"lm_seconds", "harvest_seconds", "train_seconds", "evaluate_seconds"}


def test_the_published_dictionary_carries_its_feature_dashboards(reference_run):
    out, _ = reference_run
    dictionary = load_dictionary(out / "registry", "reference")
    assert len(dictionary.labels) == 256
    assert {"top_tokens", "top_acts", "quantile_tokens", "histogram_counts", "logit_up_ids", "neighbour_ids"} <= set(dictionary.features)
    assert dictionary.manifest.model_extra["feature_statistics"]["tokens"] > 0


def test_evaluate_with_the_model_reports_every_metric_and_a_meaningful_loss_recovered(reference_run):
    out, _ = reference_run
    result = runner.invoke(app, ["evaluate", "--registry", str(out / "registry"), "--dictionary", "reference:latest",
                                 "--model", str(out / "reference-lm"), "--tokens", "8000", "--json"])
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.stdout)
    assert {"l0", "fvu", "mse", "loss_recovered", "dead_fraction", "dense_fraction"} <= set(metrics)
    assert metrics["ce_loss_clean"] < metrics["ce_loss_spliced"] < metrics["ce_loss_zero_ablated"]
    assert 0 < metrics["loss_recovered"] < 1


def test_verify_accepts_the_pair_and_a_dictionary_refuses_another_model(reference_run):
    out, _ = reference_run
    ok = runner.invoke(app, ["verify", "--registry", str(out / "registry"), "--model", str(out / "reference-lm")])
    assert ok.exit_code == 0 and json.loads(ok.stdout)["checksums"] == "ok"
    wrong = runner.invoke(app, ["evaluate", "--registry", str(out / "registry"), "--dictionary", "reference",
                                "--json"])  # default model: the shipped reference LM, which it was not trained on
    assert wrong.exit_code == 2 and "not on the loaded model" in wrong.output


def test_train_on_a_harvest_records_the_hooks_module_path_and_the_model_checksum(reference_run, tmp_path):
    out, _ = reference_run
    result = runner.invoke(app, ["train", "--harvest", str(out / "work" / "harvest"), "--d-sae", "64", "--tokens", "20000",
                                 "--batch-size", "1024", "--registry", str(tmp_path), "--name", "h"])
    assert result.exit_code == 0, result.output
    manifest = load_dictionary(tmp_path, "h").manifest
    assert (manifest.hook.name, manifest.hook.module_path) == ("blocks.0.mlp.hook_post", "transformer.h.0.mlp.act")
    assert manifest.model.checksum == load_lm(out / "reference-lm").checksum
