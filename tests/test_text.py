"""Specifications of text a user brings (trainer/text.py): every local form HF datasets reads, packed as the built-in
corpus is, split by document, in a seeded order; and the CLI's harvest → train → evaluate → features on it, with
the dashboards' examples drawn from that text."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from monosemantic.artifact import load_dictionary
from monosemantic.lm import load_lm
from monosemantic.shipped import reference_lm_path
from trainer.cli import app
from trainer.text import TextSpec, documents, packed_contexts

WORDS = "zebra quokka narwhal axolotl pangolin okapi tapir wombat platypus capybara".split()
runner = CliRunner()


def from_the_users_text(tokenizer, windows) -> bool:
    """Every word piece of every window (windows start and end mid-word) is part of one of the user's words or of a
    ``docN`` marker, which Python sources, the built-in corpus, would not give."""
    allowed = WORDS + [f"doc{i}" for i in range(300)]
    texts = [tokenizer.decode([t for t in w if t >= 0]).replace(tokenizer.bos_token, " ") for w in windows]  # BOS joins documents
    pieces = [p for text in texts for p in text.split()]
    return bool(pieces) and all(any(p in word for word in allowed) for p in pieces)


def make_documents(n: int = 300, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [f"doc{i} " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(40, 160))) for i in range(n)]


@pytest.fixture(scope="module")
def tokenizer():
    return load_lm(reference_lm_path()).tokenizer


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    """The same documents as JSON lines, as a folder of text files, as a save_to_disk dataset, and pre-tokenized."""
    import datasets

    root, docs = tmp_path_factory.mktemp("text"), make_documents()
    jsonl = root / "docs.jsonl"
    jsonl.write_text("".join(json.dumps({"body": d, "n": i}) + "\n" for i, d in enumerate(docs)))
    folder = root / "folder"
    folder.mkdir()
    for i, d in enumerate(docs):
        (folder / f"{i:04d}.txt").write_text(d)
    saved = root / "saved"
    datasets.Dataset.from_dict({"text": docs}).save_to_disk(str(saved))
    return {"jsonl": jsonl, "folder": folder, "saved": saved}


@pytest.mark.parametrize("form", ["jsonl", "folder", "saved"])
def test_every_local_form_gives_the_same_documents(sources, form):
    spec = TextSpec(dataset=str(sources[form]), text_field="body" if form == "jsonl" else "text")
    train = set(documents(spec, "train"))
    heldout = set(documents(spec, "heldout"))
    assert train | heldout == set(make_documents()) and not train & heldout
    assert 0 < len(heldout) < 0.1 * len(train)  # 3% by content hash, whatever the order


def test_contexts_start_with_bos_and_decode_to_the_users_text(sources, tokenizer):
    contexts, fingerprint = packed_contexts(tokenizer, TextSpec(dataset=str(sources["saved"])), "train", 64, limit=50)
    assert contexts.shape == (50, 64) and bool((contexts[:, 0] == tokenizer.bos_token_id).all())
    assert from_the_users_text(tokenizer, contexts[:20].tolist())
    assert len(fingerprint) == 64


def test_the_order_is_fixed_by_the_seed(sources, tokenizer):
    spec = TextSpec(dataset=str(sources["jsonl"]), text_field="body")
    first, _ = packed_contexts(tokenizer, spec, "train", 32, limit=40, seed=1)
    again, _ = packed_contexts(tokenizer, spec, "train", 32, limit=40, seed=1)
    other, _ = packed_contexts(tokenizer, spec, "train", 32, limit=40, seed=2)
    assert torch.equal(first, again) and not torch.equal(first, other)


def test_a_pre_tokenized_input_ids_column_is_used_as_it_is(tmp_path, tokenizer):
    import datasets

    ids = [[7, 8, 9, 10, 11] * 20 for _ in range(50)]
    datasets.Dataset.from_dict({"input_ids": ids}).save_to_disk(str(tmp_path / "ids"))
    contexts, _ = packed_contexts(tokenizer, TextSpec(dataset=str(tmp_path / "ids")), "train", 11, limit=5)
    assert set(contexts[:, 1:].flatten().tolist()) <= {7, 8, 9, 10, 11, tokenizer.bos_token_id}


def test_a_missing_dataset_or_text_field_is_refused_naming_it(tmp_path, sources):
    result = runner.invoke(app, ["harvest", "--out", str(tmp_path / "h"), "--dataset", str(tmp_path / "nothing-here.jsonl")])
    assert result.exit_code == 2 and "--dataset" in result.output
    result = runner.invoke(app, ["harvest", "--out", str(tmp_path / "h2"), "--dataset", str(sources["jsonl"])])
    assert result.exit_code == 2 and "--text-field 'text'" in result.output and "body" in result.output


def test_harvest_train_evaluate_and_features_run_on_the_users_text_from_the_cli(tmp_path, sources, tokenizer):
    data = ["--dataset", str(sources["jsonl"]), "--text-field", "body"]
    harvest = runner.invoke(app, ["harvest", "--out", str(tmp_path / "h"), "--contexts", "48", "--context-length", "64", *data])
    assert harvest.exit_code == 0, harvest.output
    trained = runner.invoke(app, ["train", "--harvest", str(tmp_path / "h"), "--d-sae", "128", "--tokens", "60000",
                                  "--batch-size", "512", "--registry", str(tmp_path / "r"), "--name", "mine"])
    assert trained.exit_code == 0, trained.output
    manifest = load_dictionary(tmp_path / "r", "mine").manifest
    assert manifest.data["text"]["dataset"] == str(sources["jsonl"]) and manifest.data["fingerprint"]

    evaluated = runner.invoke(app, ["evaluate", "--registry", str(tmp_path / "r"), "--dictionary", "mine", "--tokens", "3000", "--json", *data])
    assert evaluated.exit_code == 0, evaluated.output
    metrics = json.loads(evaluated.stdout)
    assert metrics["data"]["dataset"] == str(sources["jsonl"]) and metrics["data"]["split"] == "heldout"

    featured = runner.invoke(app, ["features", "--registry", str(tmp_path / "r"), "--dictionary", "mine", "--tokens", "3000", *data])
    assert featured.exit_code == 0, featured.output
    dashboards = load_dictionary(tmp_path / "r", "mine")
    assert dashboards.manifest.feature_statistics["text"]["dataset"] == str(sources["jsonl"])
    top = dashboards.features["top_tokens"]  # [d_sae, top_k, window] token ids, -1 where a window runs off a context
    assert from_the_users_text(tokenizer, top.reshape(-1, top.shape[-1]).tolist())


@pytest.mark.slow
def test_features_from_a_harvest_read_its_shards_and_show_its_text(tmp_path, sources, tokenizer):
    data = ["--dataset", str(sources["jsonl"]), "--text-field", "body"]
    assert runner.invoke(app, ["harvest", "--out", str(tmp_path / "h"), "--contexts", "24", "--context-length", "64", *data]).exit_code == 0
    assert runner.invoke(app, ["train", "--harvest", str(tmp_path / "h"), "--d-sae", "64", "--tokens", "20000", "--batch-size",
                               "512", "--registry", str(tmp_path / "r"), "--name", "mine"]).exit_code == 0
    refused = runner.invoke(app, ["features", "--registry", str(tmp_path / "r"), "--dictionary", "mine", "--harvest", str(tmp_path / "h"), *data])
    assert refused.exit_code == 2 and "--harvest" in refused.output and "--dataset" in refused.output
    featured = runner.invoke(app, ["features", "--registry", str(tmp_path / "r"), "--dictionary", "mine", "--tokens", "630",
                                   "--harvest", str(tmp_path / "h")])
    assert featured.exit_code == 0, featured.output
    dashboards = load_dictionary(tmp_path / "r", "mine")
    recorded = dashboards.manifest.feature_statistics
    assert recorded["tokens"] == 10 * 63 and recorded["text"]["kind"] == "harvest"  # its first 10 contexts
    assert recorded["text"]["data"]["dataset"] == str(sources["jsonl"])
    top = dashboards.features["top_tokens"]
    assert from_the_users_text(tokenizer, top.reshape(-1, top.shape[-1]).tolist())


def test_evaluate_and_features_use_the_model_the_dictionary_records_when_no_model_is_given(tmp_path, sources):
    import shutil

    from safetensors.torch import load_file, save_file

    own = tmp_path / "my-model"  # the user's model: not the shipped one (other weights), at a path of their own
    shutil.copytree(reference_lm_path(), own)
    weights = load_file(str(own / "model.safetensors"))
    first = sorted(weights)[0]
    weights[first] = weights[first] * 1.01
    save_file(weights, str(own / "model.safetensors"), metadata={"format": "pt"})
    data = ["--dataset", str(sources["saved"])]
    assert runner.invoke(app, ["harvest", "--out", str(tmp_path / "h"), "--model", str(own), "--contexts", "24",
                               "--context-length", "64", *data]).exit_code == 0
    assert runner.invoke(app, ["train", "--harvest", str(tmp_path / "h"), "--d-sae", "64", "--tokens", "20000", "--batch-size",
                               "512", "--registry", str(tmp_path / "r"), "--name", "mine"]).exit_code == 0
    assert load_dictionary(tmp_path / "r", "mine").manifest.model.source == str(own.resolve())

    evaluated = runner.invoke(app, ["evaluate", "--registry", str(tmp_path / "r"), "--dictionary", "mine", "--tokens", "2000", *data])
    assert evaluated.exit_code == 0, evaluated.output
    featured = runner.invoke(app, ["features", "--registry", str(tmp_path / "r"), "--dictionary", "mine", "--tokens", "2000", *data])
    assert featured.exit_code == 0, featured.output
    verified = runner.invoke(app, ["verify", "--registry", str(tmp_path / "r"), "--dictionary", "mine"])
    assert verified.exit_code == 0 and json.loads(verified.stdout)["model"]["source"] == str(own.resolve())

    from conftest import RunningServer

    from monosemantic.client import RestClient

    running = RunningServer(registry=tmp_path / "r", dictionary="mine")  # no model setting: the recorded one
    try:
        with RestClient(running.http_url) as client:
            assert client.activations(text="zebra okapi").dictionary.name == "mine"
        assert running.engine.repository.model.lm.source == str(own.resolve())
    finally:
        running.stop()
