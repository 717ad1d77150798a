"""End to end from the CLI alone, as a user with their own model and their own text: a tiny GPT-NeoX and a tiny Llama
built from transformers config classes (with the reference tokenizer), text as a JSON-lines file, a folder of text
files and a ``datasets`` save_to_disk folder; harvest at two hooks in one pass → train → evaluate → features → serve,
with no --model after the harvest, the dashboards' examples drawn from that text and the evaluation listed by the
service with the data it was measured on."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM
from typer.testing import CliRunner

from conftest import RunningServer
from monosemantic.artifact import load_dictionary
from monosemantic.client import RestClient
from monosemantic.shipped import reference_lm_path
from trainer.cli import app

# harvest → train → evaluate → features → serve from the CLI, once per model and text form
pytestmark = pytest.mark.slow

runner = CliRunner()
WORDS = "heron egret ibis stork crane plover avocet curlew godwit dunlin".split()
FAMILIES = {
    "gpt-neox": lambda: GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=4096, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                                                         num_attention_heads=4, max_position_embeddings=256)),
    "llama": lambda: LlamaForCausalLM(LlamaConfig(vocab_size=4096, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)),
}


def write_text(root: Path, form: str) -> list[str]:
    rng = random.Random(1)
    docs = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(60, 200))) for _ in range(240)]
    if form == "jsonl":
        (root / "birds.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
        return ["--dataset", str(root / "birds.jsonl")]
    if form == "save_to_disk":
        import datasets

        datasets.Dataset.from_dict({"text": docs}).save_to_disk(str(root / "birds-arrow"))
        return ["--dataset", str(root / "birds-arrow")]
    (root / "birds").mkdir()
    for i, d in enumerate(docs):
        (root / "birds" / f"{i}.txt").write_text(d)
    return ["--dataset", str(root / "birds")]


@pytest.mark.parametrize("family, form", [("gpt-neox", "jsonl"), ("llama", "folder"), ("llama", "save_to_disk")])
def test_a_users_model_and_text_go_through_every_stage_from_the_cli(tmp_path, family, form):
    torch.manual_seed(0)
    model_dir = tmp_path / family
    FAMILIES[family]().save_pretrained(model_dir)
    AutoTokenizer.from_pretrained(reference_lm_path()).save_pretrained(model_dir)
    data = write_text(tmp_path, form)

    harvest = runner.invoke(app, ["harvest", "--out", str(tmp_path / "h"), "--model", str(model_dir), "--hook", "blocks.0.hook_resid_post",
                                  "--hook", "blocks.1.hook_resid_post", "--contexts", "40", "--context-length", "64", *data])
    assert harvest.exit_code == 0, harvest.output
    hooks = json.loads(harvest.stdout)["hooks"]
    assert sorted(hooks) == ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"] and all(h["complete"] for h in hooks.values())
    trained = runner.invoke(app, ["train", "--harvest", hooks["blocks.1.hook_resid_post"]["directory"], "--arch", "topk", "--k", "8", "--d-sae", "128",
                                  "--tokens", "40000", "--batch-size", "512", "--registry", str(tmp_path / "r"), "--name", "birds"])
    assert trained.exit_code == 0, trained.output

    evaluated = runner.invoke(app, ["evaluate", "--registry", str(tmp_path / "r"), "--dictionary", "birds", "--tokens", "2000",
                                    "--json", *data])
    assert evaluated.exit_code == 0, evaluated.output
    metrics = json.loads(evaluated.stdout)
    assert metrics["l0"] == pytest.approx(8, abs=0.01) and metrics["data"]["dataset"] == data[1]

    featured = runner.invoke(app, ["features", "--registry", str(tmp_path / "r"), "--dictionary", "birds", "--tokens", "2000", *data])
    assert featured.exit_code == 0, featured.output
    dictionary = load_dictionary(tmp_path / "r", "birds")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    windows = dictionary.features["top_tokens"].reshape(-1, dictionary.features["top_tokens"].shape[-1]).tolist()
    pieces = [p for w in windows for p in tokenizer.decode([t for t in w if t >= 0]).replace(tokenizer.bos_token, " ").split()]
    assert pieces and all(any(p in word for word in WORDS) for p in pieces)

    running = RunningServer(registry=tmp_path / "r", dictionary="birds")  # the model comes from the manifest
    try:
        with RestClient(running.http_url) as client:
            result = client.activations(text="heron egret ibis", top_k=3)
            listed = client.dictionaries().dictionaries[0]
        assert result.dictionary.name == "birds" and all(len(t.top) <= 3 for t in result.tokens)
        assert listed.hook == "blocks.1.hook_resid_post"
        assert [(e.data["dataset"], e.measured) for e in listed.evaluations] == [(data[1], "birds:v1")]  # carried to v2 by `features`
    finally:
        running.stop()
