"""Specifications of activation harvesting: shards equal the hook's activations, resume after a crash, bf16 storage.

The transformer is a real, tiny GPT-2 (1 layer, d_model 16, ReLU MLP of 32) built locally; nothing touches the hub.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # any accidental hub call must fail loudly, not hang

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

import trainer.harvest as harvest_module
from monosemantic.errors import ConfigError, MonosemanticError
from monosemantic.lm import LoadedLM, read_activations, weights_checksum
from trainer.activations import HARVEST_CONTEXTS, HARVEST_MANIFEST, from_storage, open_harvest, to_storage
from trainer.harvest import harvest

HOOK = "blocks.0.mlp.hook_post"
N_CONTEXTS, CTX_LEN, D_MLP = 10, 8, 32
SHARD = 4  # contexts per shard: shards cover [0, 4), [4, 8), [8, 10)


@pytest.fixture(scope="module")
def lm() -> LoadedLM:
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=50, n_positions=16, n_embd=16, n_layer=1, n_head=2, n_inner=D_MLP, activation_function="relu",
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )
    model = GPT2LMHeadModel(config).eval()
    return LoadedLM(model=model, tokenizer=None, source="tiny-gpt2", checksum=weights_checksum(model))


@pytest.fixture(scope="module")
def contexts() -> torch.Tensor:
    return torch.randint(0, 50, (N_CONTEXTS, CTX_LEN), generator=torch.Generator().manual_seed(1))


def run(lm, contexts, out_dir, **kwargs) -> dict:
    options = {"contexts_per_shard": SHARD, "batch_size": 3, "progress": False, **kwargs}
    return harvest(lm, contexts, HOOK, out_dir, **options)


def all_rows(directory: Path) -> torch.Tensor:
    source = open_harvest(directory)
    return torch.cat([from_storage(part, source.dtype) for part in source.parts])


def expected_rows(lm, contexts, skip_bos: bool = True) -> torch.Tensor:
    acts = read_activations(lm, contexts, HOOK, stop_at_hook=False)
    if skip_bos:
        acts = acts[:, 1:]
    return acts.reshape(-1, acts.shape[-1])


def test_harvest_rows_equal_the_hook_activations_without_the_bos_position(lm, contexts, tmp_path):
    manifest = run(lm, contexts, tmp_path / "h")

    rows = all_rows(tmp_path / "h")
    assert rows.shape == (N_CONTEXTS * (CTX_LEN - 1), D_MLP)
    torch.testing.assert_close(rows, expected_rows(lm, contexts), rtol=1e-3, atol=1e-3)  # fp16 storage
    assert manifest["complete"] and manifest["tokens"] == N_CONTEXTS * (CTX_LEN - 1) and manifest["d_in"] == D_MLP
    assert [s["contexts"] for s in manifest["shards"]] == [[0, 4], [4, 8], [8, 10]]
    assert json.loads((tmp_path / "h" / HARVEST_MANIFEST).read_text()) == manifest


def test_harvest_keeps_the_bos_position_when_asked(lm, contexts, tmp_path):
    run(lm, contexts, tmp_path / "h", skip_bos=False)
    rows = all_rows(tmp_path / "h")
    assert rows.shape == (N_CONTEXTS * CTX_LEN, D_MLP)
    torch.testing.assert_close(rows, expected_rows(lm, contexts, skip_bos=False), rtol=1e-3, atol=1e-3)


def test_an_interrupted_harvest_continues_after_its_last_complete_shard(lm, contexts, tmp_path, monkeypatch):
    out = tmp_path / "resumed"
    real_write, writes = harvest_module._write_shard, []

    def write_crashing_on_the_second_shard(*args, **kwargs):
        writes.append(1)
        if len(writes) == 2:
            raise KeyboardInterrupt  # as if the job were stopped while writing shard 1
        return real_write(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(harvest_module, "_write_shard", write_crashing_on_the_second_shard)
        with pytest.raises(KeyboardInterrupt):
            run(lm, contexts, out)
    interrupted = json.loads((out / HARVEST_MANIFEST).read_text())
    assert (interrupted["contexts_done"], len(interrupted["shards"]), interrupted["complete"]) == (SHARD, 1, False)
    first = (out / "shard_00000.npy").stat()

    manifest = run(lm, contexts, out)

    again = (out / "shard_00000.npy").stat()
    assert (again.st_ino, again.st_mtime_ns) == (first.st_ino, first.st_mtime_ns)  # not rewritten
    assert manifest["complete"] and manifest["tokens"] == N_CONTEXTS * (CTX_LEN - 1)
    uninterrupted = run(lm, contexts, tmp_path / "uninterrupted")
    assert manifest["shards"] == uninterrupted["shards"]
    assert torch.equal(all_rows(out), all_rows(tmp_path / "uninterrupted"))
    assert sorted(p.name for p in out.iterdir()) == sorted([".lock", HARVEST_CONTEXTS, HARVEST_MANIFEST, "shard_00000.npy", "shard_00001.npy", "shard_00002.npy"])


def test_an_interrupted_harvest_can_be_read_up_to_its_last_complete_shard(lm, contexts, tmp_path, monkeypatch):
    real_write, calls = harvest_module._write_shard, []

    def write_crashing_on_the_second_shard(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise MemoryError
        return real_write(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(harvest_module, "_write_shard", write_crashing_on_the_second_shard)
        with pytest.raises(MemoryError):
            run(lm, contexts, tmp_path / "h")

    rows = all_rows(tmp_path / "h")
    torch.testing.assert_close(rows, expected_rows(lm, contexts[:SHARD]), rtol=1e-3, atol=1e-3)


def test_restarting_into_a_directory_holding_a_harvest_of_other_contexts_is_refused(lm, contexts, tmp_path):
    run(lm, contexts, tmp_path / "h")
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "h").iterdir()}

    with pytest.raises(MonosemanticError, match="different"):
        run(lm, (contexts + 1) % 50, tmp_path / "h")

    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "h").iterdir()} == before


def test_bfloat16_shards_round_trip_through_open_harvest(lm, contexts, tmp_path):
    run(lm, contexts, tmp_path / "h", dtype="bfloat16")

    source = open_harvest(tmp_path / "h")
    assert source.dtype == "bfloat16" and source.d_in == D_MLP and source.rows == N_CONTEXTS * (CTX_LEN - 1)
    rows = all_rows(tmp_path / "h")
    assert rows.dtype == torch.float32
    torch.testing.assert_close(rows, expected_rows(lm, contexts), rtol=1e-2, atol=1e-2)


def test_bfloat16_storage_widens_exactly_from_a_read_only_memory_map(tmp_path):
    values = torch.tensor([[1.0, -2.5, 3.140625, 1e-40], [float("inf"), float("-inf"), -0.0, float("nan")]])
    path = tmp_path / "shard.npy"
    np.save(path, to_storage(values, "bfloat16"))
    mapped = np.load(path, mmap_mode="r")
    assert not mapped.flags.writeable

    widened = from_storage(mapped, "bfloat16")

    assert widened.dtype == torch.float32
    expected = values.to(torch.bfloat16).float()
    assert torch.equal(widened.view(torch.int32), expected.view(torch.int32))  # bit for bit: −0.0, NaN, subnormal


def test_an_unsupported_shard_dtype_is_a_config_error(lm, contexts, tmp_path):
    with pytest.raises(ConfigError, match="dtype"):
        run(lm, contexts, tmp_path / "h", dtype="int8")


def test_open_harvest_of_a_directory_without_a_manifest_is_refused(tmp_path):
    with pytest.raises(MonosemanticError, match=HARVEST_MANIFEST):
        open_harvest(tmp_path)
