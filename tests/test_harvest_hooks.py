"""Specifications of harvesting several hooks in one pass and of keeping special tokens out of the rows.

Models are real and local: a tiny 3-layer GPT-2 built from its config class, and the shipped reference with its
tokenizer (one special token, id 0, which is BOS, EOS and PAD and joins packed documents).
"""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from monosemantic.errors import ConfigError, MonosemanticError
from monosemantic.lm import LoadedLM, load_lm, read_activations, read_activations_at, weights_checksum
from monosemantic.shipped import reference_lm_path
from trainer.activations import HARVEST_MANIFEST, from_storage, open_harvest
from trainer.harvest import harvest, harvest_hooks, hook_directory

HOOKS = ["blocks.2.hook_resid_post", "blocks.0.mlp.hook_post", "blocks.1.hook_resid_pre"]


@pytest.fixture(scope="module")
def deep() -> LoadedLM:
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=3, n_head=2, n_inner=24,
                        activation_function="relu", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(config).eval()
    return LoadedLM(model=model, tokenizer=None, source="tiny-gpt2-3", checksum=weights_checksum(model))


@pytest.fixture(scope="module")
def contexts() -> torch.Tensor:
    return torch.randint(0, 50, (10, 8), generator=torch.Generator().manual_seed(1))


def rows(directory) -> torch.Tensor:
    source = open_harvest(directory)
    return torch.cat([from_storage(part, source.dtype) for part in source.parts])


def forwards(model) -> tuple[list[int], object]:
    calls: list[int] = []
    handle = model.transformer.wte.register_forward_hook(lambda *_: calls.append(1))
    return calls, handle


def test_several_hooks_from_one_forward_equal_one_hook_at_a_time(deep, contexts):
    together = read_activations_at(deep, contexts, HOOKS)
    for hook, activation in zip(HOOKS, together):
        assert torch.equal(activation, read_activations(deep, contexts, hook, stop_at_hook=False))


def test_the_forward_stops_at_the_deepest_hook(deep, contexts):
    reached = []
    handle = deep.model.transformer.ln_f.register_forward_hook(lambda *_: reached.append(1))
    try:
        read_activations_at(deep, contexts, ["blocks.0.mlp.hook_post", "blocks.1.hook_resid_post"])
        assert reached == []  # the final norm after block 2 is never computed
        read_activations_at(deep, contexts, ["blocks.2.hook_resid_post"])
        assert reached == []
    finally:
        handle.remove()


def test_a_several_hook_harvest_writes_one_shard_set_per_hook_from_one_forward_per_batch(deep, contexts, tmp_path):
    calls, handle = forwards(deep.model)
    try:
        manifests = harvest_hooks(deep, contexts, HOOKS, tmp_path / "h", contexts_per_shard=4, batch_size=3, progress=False)
    finally:
        handle.remove()
    assert len(calls) == 5 + 1  # batches of 3 within shards of 4: [0,3) [3,4) [4,7) [7,8) [8,10), and one width probe
    assert sorted(manifests) == sorted(HOOKS)
    for hook in HOOKS:
        directory = hook_directory(tmp_path / "h", hook)
        alone = harvest(deep, contexts, hook, tmp_path / "alone" / hook, contexts_per_shard=4, batch_size=3, progress=False)
        assert torch.equal(rows(directory), rows(tmp_path / "alone" / hook))
        assert manifests[hook]["shards"] == alone["shards"] and manifests[hook]["hook"] == hook
        assert json.loads((directory / HARVEST_MANIFEST).read_text()) == manifests[hook]


def test_calls_per_several_hook_harvest_are_one_forward_per_batch(deep, contexts, tmp_path):
    calls, handle = forwards(deep.model)
    try:
        harvest_hooks(deep, contexts, HOOKS, tmp_path / "h", contexts_per_shard=10, batch_size=5, progress=False)
        batches_with_three_hooks = len(calls) - 1  # less the width probe
        calls.clear()
        harvest(deep, contexts, HOOKS[0], tmp_path / "one", contexts_per_shard=10, batch_size=5, progress=False)
        batches_with_one_hook = len(calls) - 1
    finally:
        handle.remove()
    assert batches_with_three_hooks == batches_with_one_hook == 2


def test_a_one_hook_harvest_is_the_output_directory_itself(deep, contexts, tmp_path):
    harvest_hooks(deep, contexts, HOOKS[:1], tmp_path / "h", progress=False)
    assert (tmp_path / "h" / HARVEST_MANIFEST).exists() and not hook_directory(tmp_path / "h", HOOKS[0]).exists()


def test_a_hook_set_ahead_of_the_others_is_not_written_again(deep, contexts, tmp_path):
    ahead = hook_directory(tmp_path / "h", HOOKS[0])
    harvest(deep, contexts, HOOKS[0], ahead, contexts_per_shard=4, progress=False)  # as if killed after this set's write
    before = [p.stat().st_mtime_ns for p in sorted(ahead.glob("shard_*.npy"))]
    manifests = harvest_hooks(deep, contexts, HOOKS[:2], tmp_path / "h", contexts_per_shard=4, progress=False)
    assert [p.stat().st_mtime_ns for p in sorted(ahead.glob("shard_*.npy"))] == before
    assert all(m["complete"] for m in manifests.values())
    behind = harvest(deep, contexts, HOOKS[1], tmp_path / "alone", contexts_per_shard=4, progress=False)
    assert manifests[HOOKS[1]]["shards"] == behind["shards"]


def test_the_same_hook_point_twice_is_refused(deep, contexts, tmp_path):
    with pytest.raises(ConfigError, match="same hook point"):
        harvest_hooks(deep, contexts, ["blocks.0.mlp.hook_post", "transformer.h.0.mlp.act"], tmp_path / "h", progress=False)


def test_training_on_a_several_hook_harvest_directory_names_the_hooks_to_choose_from(deep, contexts, tmp_path):
    harvest_hooks(deep, contexts, HOOKS[:2], tmp_path / "h", progress=False)
    with pytest.raises(MonosemanticError, match="at 2 hooks") as refused:
        open_harvest(tmp_path / "h")
    assert f"--harvest {hook_directory(tmp_path / 'h', HOOKS[1])}" in str(refused.value)


@pytest.fixture(scope="module")
def reference() -> LoadedLM:
    return load_lm(reference_lm_path())


def test_excluding_special_tokens_drops_every_bos_eos_pad_position(reference, tmp_path):
    bos = reference.tokenizer.bos_token_id
    ids = torch.randint(1, 200, (4, 12), generator=torch.Generator().manual_seed(2))
    ids[:, 0] = bos
    ids[1, 5] = ids[3, 2] = ids[3, 9] = bos  # documents joined inside a context
    manifest = harvest(reference, ids, "blocks.0.mlp.hook_post", tmp_path / "h", exclude_special_tokens=True, dtype="float32",
                       progress=False)
    keep = ids != bos
    expected = read_activations(reference, ids, "blocks.0.mlp.hook_post", stop_at_hook=False)[keep]
    assert manifest["tokens"] == int(keep.sum()) == 4 * 11 - 3
    assert torch.equal(rows(tmp_path / "h"), expected)
    assert manifest["excluded_token_ids"] == [bos]


def test_without_the_flag_only_each_contexts_first_position_is_dropped(reference, tmp_path):
    ids = torch.randint(1, 200, (2, 6), generator=torch.Generator().manual_seed(3))
    ids[:, 0] = ids[1, 3] = reference.tokenizer.bos_token_id
    manifest = harvest(reference, ids, "blocks.0.mlp.hook_post", tmp_path / "h", progress=False)
    assert manifest["tokens"] == 2 * 5 and manifest["excluded_token_ids"] == []


def test_excluding_special_tokens_without_a_tokenizer_is_refused(deep, contexts, tmp_path):
    with pytest.raises(ConfigError, match="tokenizer"):
        harvest(deep, contexts, HOOKS[0], tmp_path / "h", exclude_special_tokens=True, progress=False)


def test_a_harvest_resumed_with_other_exclusion_settings_is_refused(reference, tmp_path):
    ids = torch.randint(1, 200, (2, 6), generator=torch.Generator().manual_seed(3))
    harvest(reference, ids, "blocks.0.mlp.hook_post", tmp_path / "h", progress=False)
    with pytest.raises(MonosemanticError, match="settings"):
        harvest(reference, ids, "blocks.0.mlp.hook_post", tmp_path / "h", exclude_special_tokens=True, progress=False)
