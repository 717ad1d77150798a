"""Specifications of the training side as a root of trust: nothing non-finite trained or published, data checked
against its digests, resumes only on the same data, checkpoints one atomic file, partial runs and harvests said
as such, hooks resolved on the model, every flag checked before work, and clear errors where tracebacks were.

Each test drives the real ``monosemantic-train`` command (typer's runner, in process) on small real data."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from monosemantic.artifact import SAE_FILE, HookRef, ModelRef, list_versions, load_dictionary, publish
from monosemantic.shipped import reference_lm_path
from trainer.activations import HARVEST_MANIFEST
from trainer.checkpoint import CHECKPOINT_FILE, LEGACY_STATE_FILE
from trainer.cli import app
from trainer.synthetic import make_sparse_data

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()


@pytest.fixture(scope="module")
def rows() -> np.ndarray:
    return make_sparse_data(20_000, d=16, n_features=32, seed=5).activations.numpy()


def save_rows(path: Path, array: np.ndarray) -> Path:
    np.save(path, array)
    return path


@pytest.fixture(scope="module")
def activations(tmp_path_factory, rows) -> Path:
    return save_rows(tmp_path_factory.mktemp("data") / "acts.npy", rows)


def train(data: Path, registry: Path | None, *extra: str, name: str = "toy"):
    args = ["train", "--activations", str(data), "--d-sae", "64", "--tokens", "40000", "--batch-size", "512"]
    if registry is not None:
        args += ["--registry", str(registry), "--name", name]
    return runner.invoke(app, [*args, *extra])


def refused(result, *words: str) -> None:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)  # typer's exit, not an escaped error
    for word in words:
        assert word in result.output, result.output


@pytest.fixture(scope="module")
def harvest_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("harvest") / "h"
    result = runner.invoke(app, ["harvest", "--out", str(out), "--contexts", "16", "--max-chars", "200000"])
    assert result.exit_code == 0, result.output
    return out


# ---- 1. non-finite rows, losses and metrics ------------------------------------------------------------------------


@pytest.mark.parametrize("arch", [["--arch", "topk", "--k", "4"], ["--arch", "batchtopk", "--k", "4"], ["--arch", "jumprelu"], ["--arch", "relu"]])
def test_nan_rows_the_input_scale_sample_does_not_draw_are_refused_naming_the_row(tmp_path, rows, arch):
    bad = rows.copy()
    bad[[17_001, 17_002, 17_003, 17_004, 17_005], 3] = np.nan
    result = train(save_rows(tmp_path / "nan.npy", bad), tmp_path / "registry", *arch)
    refused(result, "row 17001", "NaN or inf")
    assert list_versions(tmp_path / "registry", "toy") == []


def test_one_infinity_in_the_held_out_tail_is_refused_before_training(tmp_path, rows):
    bad = rows.copy()
    bad[-1, 0] = np.inf
    refused(train(save_rows(tmp_path / "inf.npy", bad), tmp_path / "registry"), f"row {len(rows) - 1}")


def test_a_learning_rate_that_diverges_stops_training_and_publishes_nothing(tmp_path, activations):
    result = train(activations, tmp_path / "registry", "--arch", "topk", "--k", "4", "--lr", "1e6")
    refused(result, "diverged", "lower --lr")
    assert list_versions(tmp_path / "registry", "toy") == []


def test_evaluate_exits_non_zero_when_a_metric_is_not_finite(tmp_path, activations, rows):
    from monosemantic.sae import SAEConfig, build_sae

    sae = build_sae(SAEConfig.build(architecture="relu", d_in=16, d_sae=64), seed=0)
    with torch.no_grad():
        sae.W_dec.mul_(1e38)  # finite, so it publishes, but its reconstructions overflow to inf
        sae.b_enc.fill_(10.0)
    publish(tmp_path, "huge", sae, model=ModelRef(name="m", checksum="c"), hook=HookRef(name="h", module_path="h"))
    result = runner.invoke(app, ["evaluate", "--registry", str(tmp_path), "--dictionary", "huge", "--activations", str(activations)])
    refused(result, "metrics are not finite", "fvu", "mse")


# ---- 3. harvest shards carry checksums --------------------------------------------------------------------------------


def copy_harvest(source: Path, target: Path) -> Path:
    import shutil

    shutil.copytree(source, target, ignore=shutil.ignore_patterns(".lock"))
    return target


def test_a_harvest_shard_with_overwritten_values_is_refused_by_train(tmp_path, harvest_dir):
    copy = copy_harvest(harvest_dir, tmp_path / "h")
    shard = np.load(copy / "shard_00000.npy", mmap_mode="r+")
    shard[100:104, :512] = 0.5  # 2,048 values
    shard.flush()
    del shard
    result = runner.invoke(app, ["train", "--harvest", str(copy), "--d-sae", "64", "--tokens", "4096", "--batch-size", "512"])
    refused(result, "shard_00000.npy does not match its sha256")


def test_a_truncated_harvest_shard_is_refused_with_a_clear_error(tmp_path, harvest_dir):
    copy = copy_harvest(harvest_dir, tmp_path / "h")
    path = copy / "shard_00000.npy"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    result = runner.invoke(app, ["train", "--harvest", str(copy), "--d-sae", "64", "--tokens", "4096", "--batch-size", "512"])
    refused(result, "shard_00000.npy cannot be read", "truncated")


def test_the_harvest_manifest_records_each_shards_sha256_and_shape(harvest_dir):
    manifest = json.loads((harvest_dir / HARVEST_MANIFEST).read_text())
    for shard in manifest["shards"]:
        assert shard["sha256"] == hashlib.sha256((harvest_dir / shard["file"]).read_bytes()).hexdigest()
        assert shard["shape"] == list(np.load(harvest_dir / shard["file"], mmap_mode="r").shape)


# ---- 4. resume checks its data ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_resume_on_another_file_of_the_same_width_is_refused(tmp_path, activations, rows):
    checkpoint = tmp_path / "ckpt"
    assert train(activations, None, "--checkpoint-dir", str(checkpoint)).exit_code == 0
    other = save_rows(tmp_path / "other.npy", rows[::-1].copy())
    refused(train(other, None, "--checkpoint-dir", str(checkpoint), "--resume"), "trained on other data")


def test_resume_on_data_of_another_width_is_refused_without_a_traceback(tmp_path, activations):
    checkpoint = tmp_path / "ckpt"
    assert train(activations, None, "--checkpoint-dir", str(checkpoint)).exit_code == 0
    wider = save_rows(tmp_path / "wide.npy", make_sparse_data(20_000, d=24, n_features=32, seed=6).activations.numpy())
    refused(train(wider, None, "--checkpoint-dir", str(checkpoint), "--resume"), "other data", "width 16")


# ---- 5. a checkpoint is one atomic file -------------------------------------------------------------------------------


def test_a_checkpoint_is_one_file_holding_weights_and_state_of_the_same_step(tmp_path, activations):
    checkpoint = tmp_path / "ckpt"
    assert train(activations, None, "--checkpoint-dir", str(checkpoint), "--tokens", "20480").exit_code == 0
    assert sorted(p.name for p in checkpoint.iterdir()) == [CHECKPOINT_FILE]
    from trainer.checkpoint import read_checkpoint

    state, tensors = read_checkpoint(checkpoint)
    assert state.step == state.planned_steps == 40 and "param.W_enc" in tensors


def test_a_checkpoint_directory_with_a_separate_state_file_is_refused_as_torn(tmp_path, activations):
    checkpoint = tmp_path / "ckpt"
    assert train(activations, None, "--checkpoint-dir", str(checkpoint)).exit_code == 0
    (checkpoint / LEGACY_STATE_FILE).write_text(json.dumps({"step": 10}))
    refused(train(activations, None, "--checkpoint-dir", str(checkpoint), "--resume"), LEGACY_STATE_FILE)


@pytest.mark.parametrize("damage", ["truncated", "missing"])
def test_a_damaged_checkpoint_is_refused_by_publish_with_a_clear_error(tmp_path, activations, damage):
    checkpoint = tmp_path / "ckpt"
    assert train(activations, None, "--checkpoint-dir", str(checkpoint)).exit_code == 0
    path = checkpoint / CHECKPOINT_FILE
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:1000])
    else:
        path.unlink()
    result = runner.invoke(app, ["publish", "--checkpoint-dir", str(checkpoint), "--registry", str(tmp_path / "r"), "--name", "x"])
    refused(result, "checkpoint")


# ---- 7. identical runs give identical files --------------------------------------------------------------------------

_TRAIN_AND_PUBLISH = [sys.executable, "-m", "trainer.cli", "train", "--d-sae", "64", "--tokens", "20480", "--batch-size", "512",
                      "--seed", "3", "--arch", "jumprelu", "--name", "seeded"]


@pytest.mark.slow
def test_the_same_seed_in_separate_processes_gives_byte_identical_dictionary_files(tmp_path, activations):
    digests = set()
    for i in range(2):
        subprocess.run([*_TRAIN_AND_PUBLISH, "--activations", str(activations), "--registry", str(tmp_path / f"r{i}")],
                       cwd=REPO, check=True, capture_output=True)
        digests.add(hashlib.sha256((tmp_path / f"r{i}" / "seeded" / "v1" / SAE_FILE).read_bytes()).hexdigest())
    assert len(digests) == 1


# ---- 8. partial runs and harvests ---------------------------------------------------------------------------------------


def test_publishing_a_run_stopped_part_way_is_refused_unless_asked_and_then_says_how_much_it_holds(tmp_path, activations):
    from trainer.activations import open_activation_file
    from trainer.train import TrainConfig, Trainer

    checkpoint = tmp_path / "ckpt"
    cfg = TrainConfig.build(d_sae=64, tokens=80 * 512, batch_size=512, checkpoint_every=10, target_l0=4)
    Trainer(cfg, open_activation_file(activations), checkpoint).run(progress=False, stop_after_steps=10)
    publish_args = ["publish", "--checkpoint-dir", str(checkpoint), "--registry", str(tmp_path / "r"), "--name", "part"]
    refused(runner.invoke(app, publish_args), "step 10 of 80", "--allow-partial")

    assert runner.invoke(app, [*publish_args, "--allow-partial"]).exit_code == 0
    manifest = load_dictionary(tmp_path / "r", "part").manifest
    assert manifest.progress == {"steps": 10, "planned_steps": 80, "fraction": 0.125}
    assert manifest.metrics["training_l0"] is not None and manifest.metrics["training_fvu"] is not None


def test_training_on_an_incomplete_harvest_is_refused_unless_asked(tmp_path, harvest_dir):
    copy = copy_harvest(harvest_dir, tmp_path / "h")
    manifest = json.loads((copy / HARVEST_MANIFEST).read_text())
    manifest.update(complete=False, contexts=manifest["contexts"] * 2)
    (copy / HARVEST_MANIFEST).write_text(json.dumps(manifest))
    args = ["train", "--harvest", str(copy), "--d-sae", "64", "--tokens", "4096", "--batch-size", "512",
            "--registry", str(tmp_path / "r"), "--name", "p"]
    refused(runner.invoke(app, args), "incomplete", "16 of 32")

    assert runner.invoke(app, [*args, "--allow-partial"]).exit_code == 0
    data = load_dictionary(tmp_path / "r", "p").manifest.data
    assert data["complete"] is False and data["harvested_fraction"] == 0.5


# ---- 9. harvest's --contexts -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("contexts", ["0", "-3"])
def test_harvest_refuses_a_context_count_that_is_not_positive(tmp_path, contexts):
    result = runner.invoke(app, ["harvest", "--out", str(tmp_path / "h"), "--contexts", contexts])
    assert result.exit_code == 2 and "--contexts" in result.output
    assert not (tmp_path / "h").exists()


def test_a_harvest_asking_more_contexts_than_the_corpus_holds_says_so(tmp_path):
    result = runner.invoke(app, ["harvest", "--out", str(tmp_path / "h"), "--contexts", "100000", "--max-chars", "60000"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["contexts_requested"] == 100_000 and report["contexts_done"] < 100_000
    assert f"holds {report['contexts_done']:,} training contexts" in result.stderr


# ---- 10. the hook resolved on the model, claims checked against the harvest ----------------------------------------------


def test_train_with_a_hook_the_model_does_not_have_is_refused_before_training(tmp_path, activations):
    result = train(activations, tmp_path / "r", "--model", str(reference_lm_path()), "--hook", "bogus.hook")
    refused(result, "bogus.hook")
    assert list_versions(tmp_path / "r", "toy") == []


def test_train_with_a_hook_of_another_width_than_the_data_is_refused(tmp_path, activations):
    result = train(activations, tmp_path / "r", "--model", str(reference_lm_path()), "--hook", "blocks.0.mlp.hook_post")
    refused(result, "width 512", "d_in 16")


def test_train_on_a_harvest_refuses_another_model_or_hook_than_the_harvests(tmp_path, harvest_dir):
    lm_dir = tmp_path / "other-lm"
    import shutil

    shutil.copytree(reference_lm_path(), lm_dir)
    from safetensors.torch import load_file, save_file

    weights = load_file(str(lm_dir / "model.safetensors"))
    first = sorted(weights)[0]
    weights[first] = weights[first] + 1.0
    save_file(weights, str(lm_dir / "model.safetensors"), metadata={"format": "pt"})
    base = ["train", "--harvest", str(harvest_dir), "--d-sae", "64", "--tokens", "4096", "--batch-size", "512"]
    refused(runner.invoke(app, [*base, "--model", str(lm_dir)]), "not the model this harvest was taken from")
    refused(runner.invoke(app, [*base, "--model", str(reference_lm_path()), "--hook", "blocks.0.hook_resid_post"]),
            "but the harvest was taken at transformer.h.0.mlp.act")


# ---- 11. every flag checked before any work ------------------------------------------------------------------------------


@pytest.mark.parametrize("flags, words", [
    (["--arch", "relu", "--k", "8"], ["k applies to topk, batchtopk, matryoshka, transcoder or skip-transcoder only"]),
    (["--arch", "jumprelu", "--k", "8"], ["k applies to topk, batchtopk, matryoshka, transcoder or skip-transcoder only"]),
    (["--arch", "topk", "--k", "8", "--l1", "2"], ["topk has no sparsity coefficient"]),
    (["--arch", "topk", "--k", "8", "--initial-firing-rate", "0.1"], ["initial_firing_rate applies to relu, jumprelu, batchtopk, matryoshka, relu-transcoder, relu-skip-transcoder, jumprelu-transcoder or jumprelu-skip-transcoder only"]),
    (["--target-l0", "500"], ["target_l0 (500) must be below d_sae (64)"]),
    (["--seed", "-1"], ["--seed"]),
])
def test_train_refuses_a_flag_that_does_nothing_or_cannot_work(tmp_path, activations, flags, words):
    refused(train(activations, tmp_path / "r", *flags, "--checkpoint-dir", str(tmp_path / "ckpt")), *words)
    assert not (tmp_path / "ckpt").exists()  # refused before any work


def test_train_refuses_an_unknown_storage_dtype_before_training(tmp_path, activations):
    refused(train(activations, tmp_path / "r", "--dtype", "int8", "--checkpoint-dir", str(tmp_path / "ckpt")), "int8")
    assert not (tmp_path / "ckpt").exists()


def test_evaluate_refuses_a_token_count_that_is_not_positive(tmp_path, activations):
    assert train(activations, tmp_path).exit_code == 0
    result = runner.invoke(app, ["evaluate", "--registry", str(tmp_path), "--dictionary", "toy", "--tokens", "-100"])
    assert result.exit_code == 2 and "--tokens" in result.output


# ---- 14. clear errors where tracebacks were ----------------------------------------------------------------------------


def test_constant_rows_are_refused_as_having_nothing_to_learn(tmp_path):
    refused(train(save_rows(tmp_path / "flat.npy", np.ones((4000, 16), dtype=np.float32)), None), "no variance")


def test_two_rows_are_refused_without_a_traceback(tmp_path, rows):
    refused(train(save_rows(tmp_path / "two.npy", rows[:2].copy()), None, "--batch-size", "1"), "no variance")


def test_features_refuses_top_k_zero(tmp_path):
    result = runner.invoke(app, ["features", "--registry", str(tmp_path), "--dictionary", "x", "--top-k", "0"])
    assert result.exit_code == 2 and "--top-k" in result.output


@pytest.mark.parametrize("text", ['{"shards": [', ""])
def test_a_truncated_harvest_manifest_is_refused_with_a_clear_error(tmp_path, harvest_dir, text):
    copy = copy_harvest(harvest_dir, tmp_path / "h")
    (copy / HARVEST_MANIFEST).write_text(text)
    result = runner.invoke(app, ["train", "--harvest", str(copy), "--d-sae", "64", "--tokens", "4096", "--batch-size", "512"])
    refused(result, "harvest.json", "not valid JSON")


def test_a_trainer_given_rows_in_memory_checks_them_too(rows):
    from trainer.activations import ActivationSource, DataError
    from trainer.train import TrainConfig, Trainer

    bad = rows.copy()
    bad[12_345, 0] = np.nan
    with pytest.raises(DataError, match="row 12345"):
        Trainer(TrainConfig.build(d_sae=64, tokens=4096, batch_size=512, target_l0=4), ActivationSource([bad], "float32"))
