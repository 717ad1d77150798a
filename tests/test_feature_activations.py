"""Where dashboards read their activations (trainer/feature_activations.py): the model run once, or a harvest's shards.

The one-hot model and dictionary (conftest.one_hot_lm_and_sae) make every statistic's answer known; a tiny 2-layer
GPT-2 with random weights checks the same at a hook whose activations depend on the whole context.
"""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from conftest import one_hot_lm_and_sae
from monosemantic.errors import ConfigError, MonosemanticError
from monosemantic.lm import LoadedLM, weights_checksum
from monosemantic.sae import SAEConfig, build_sae
from trainer.activations import HARVEST_CONTEXTS, HARVEST_MANIFEST, DataError
from trainer.feature_activations import HarvestActivations, check_harvest_matches
from trainer.features import FeatureStatsConfig, feature_statistics
from trainer.harvest import harvest

VOCAB = 32
HOOK = "blocks.0.hook_resid_pre"
CFG = FeatureStatsConfig(top_k=4, quantile_bins=2, per_quantile=2, window_before=3, window_after=2, batch_contexts=5)


@pytest.fixture(scope="module")
def one_hot():
    lm, sae = one_hot_lm_and_sae(VOCAB)
    contexts = torch.randint(1, VOCAB, (18, 12), generator=torch.Generator().manual_seed(3))
    contexts[:, 0] = 0  # BOS
    return lm, sae, contexts


@pytest.fixture(scope="module")
def random_gpt2():
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=VOCAB, n_positions=16, n_embd=16, n_layer=2, n_head=2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(config).eval()
    lm = LoadedLM(model=model, tokenizer=one_hot_lm_and_sae(VOCAB)[0].tokenizer, source="tiny-gpt2-2", checksum=weights_checksum(model))
    sae = build_sae(SAEConfig.build(architecture="relu", d_in=16, d_sae=40))
    contexts = torch.randint(1, VOCAB, (14, 10), generator=torch.Generator().manual_seed(4))
    contexts[:, 0] = 0
    return lm, sae, contexts


def embedding_calls(lm: LoadedLM) -> tuple[list[int], object]:
    calls: list[int] = []
    return calls, lm.model.transformer.wte.register_forward_hook(lambda *_: calls.append(1))


def assert_same_statistics(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_dashboards_run_the_model_once_over_the_contexts(one_hot):
    lm, sae, contexts = one_hot
    calls, handle = embedding_calls(lm)
    try:
        feature_statistics(lm, sae, HOOK, contexts, CFG, progress=False)
    finally:
        handle.remove()
    assert len(calls) == -(-contexts.shape[0] // CFG.batch_contexts)  # one forward per batch, for both passes


@pytest.mark.parametrize("encode_dtype", ["float32", "bfloat16"])
def test_dashboards_past_the_memory_budget_run_the_model_again_with_the_same_result(random_gpt2, encode_dtype):
    lm, sae, contexts = random_gpt2
    cfg = CFG.model_copy(update={"encode_dtype": encode_dtype})
    calls, handle = embedding_calls(lm)
    try:
        kept, _ = feature_statistics(lm, sae, "blocks.1.hook_resid_post", contexts, cfg, progress=False)
        batches = len(calls)
        again, _ = feature_statistics(lm, sae, "blocks.1.hook_resid_post", contexts, cfg.model_copy(update={"cache_mib": 0}), progress=False)
    finally:
        handle.remove()
    assert len(calls) - batches == 2 * batches
    assert_same_statistics(kept, again)  # pass 2 from the kept entries equals pass 2 from the activations


@pytest.mark.parametrize("which", ["one_hot", "random_gpt2"])
def test_dashboards_from_a_harvest_equal_dashboards_from_the_model_on_its_contexts(which, request, tmp_path):
    lm, sae, contexts = request.getfixturevalue(which)
    hook = HOOK if which == "one_hot" else "blocks.1.hook_resid_post"
    harvest(lm, contexts, hook, tmp_path, dtype="float32", contexts_per_shard=4, batch_size=CFG.batch_contexts, progress=False)
    calls, handle = embedding_calls(lm)
    try:
        from_shards, shard_labels = feature_statistics(lm, sae, hook, cfg=CFG, activations=HarvestActivations(tmp_path, progress=False))
    finally:
        handle.remove()
    assert calls == []  # no model forward
    from_model, model_labels = feature_statistics(lm, sae, hook, contexts, CFG, progress=False)
    assert_same_statistics(from_shards, from_model)
    assert shard_labels == model_labels


def test_a_harvest_gives_its_first_contexts_holding_the_tokens_asked(one_hot, tmp_path):
    lm, _, contexts = one_hot
    harvest(lm, contexts, HOOK, tmp_path, dtype="float32", contexts_per_shard=4, progress=False)
    assert torch.equal(HarvestActivations(tmp_path, tokens=5 * 11, progress=False).contexts, contexts[:5])
    assert HarvestActivations(tmp_path, tokens=10**9, progress=False).contexts.shape[0] == contexts.shape[0]


def test_positions_a_harvest_left_out_count_as_not_firing(one_hot, tmp_path):
    lm, sae, contexts = one_hot
    contexts = contexts.clone()
    contexts[:, 4] = 0  # the special token (BOS, id 0) mid-context: the harvest below leaves these positions out
    harvest(lm, contexts, HOOK, tmp_path, dtype="float32", exclude_special_tokens=True, progress=False)
    t, _ = feature_statistics(lm, sae, HOOK, cfg=CFG, activations=HarvestActivations(tmp_path, progress=False))
    from_model, _ = feature_statistics(lm, sae, HOOK, contexts, CFG, progress=False)
    assert int(t["stats_tokens"]) == contexts.shape[0] * (contexts.shape[1] - 2)  # BOS and position 4 not counted
    assert float(t["density"][0]) == 0.0 and float(from_model["density"][0]) > 0  # feature 0 fires only on token 0
    firings = lambda s: (s["density"][1:].double() * int(s["stats_tokens"])).round()  # noqa: E731
    assert torch.equal(firings(t), firings(from_model))  # every other feature fires where it did


def test_a_harvest_without_its_token_ids_is_refused_naming_the_way_out(one_hot, tmp_path):
    lm, _, contexts = one_hot
    harvest(lm, contexts, HOOK, tmp_path, dtype="float32", progress=False)
    (tmp_path / HARVEST_CONTEXTS).unlink()
    with pytest.raises(MonosemanticError, match="harvest again, or compute the dashboards from the model"):
        HarvestActivations(tmp_path)


def test_token_ids_that_are_not_the_harvests_contexts_are_refused(one_hot, tmp_path):
    lm, _, contexts = one_hot
    harvest(lm, contexts, HOOK, tmp_path, dtype="float32", progress=False)
    np.save(tmp_path / HARVEST_CONTEXTS, (contexts.flip(0)).to(torch.int32).numpy())
    with pytest.raises(DataError, match="not the contexts"):
        HarvestActivations(tmp_path)


def test_a_resumed_harvest_by_an_earlier_release_gets_its_token_ids(one_hot, tmp_path):
    lm, _, contexts = one_hot
    harvest(lm, contexts[:8], HOOK, tmp_path, dtype="float32", contexts_per_shard=4, progress=False)
    manifest = json.loads((tmp_path / HARVEST_MANIFEST).read_text())
    assert manifest["complete"]
    (tmp_path / HARVEST_CONTEXTS).unlink()
    harvest(lm, contexts[:8], HOOK, tmp_path, dtype="float32", contexts_per_shard=4, progress=False)  # the same harvest again
    assert torch.equal(HarvestActivations(tmp_path, progress=False).contexts, contexts[:8])


def test_a_harvest_of_another_hook_or_model_is_refused_for_a_dictionary(one_hot, random_gpt2, tmp_path):
    lm, _, contexts = one_hot
    harvest(lm, contexts, HOOK, tmp_path, dtype="float32", progress=False)
    source = HarvestActivations(tmp_path, progress=False)
    check_harvest_matches(source, lm, HOOK)
    with pytest.raises(ConfigError, match="read at blocks.0.hook_resid_pre, the dictionary at blocks.0.hook_resid_post"):
        check_harvest_matches(source, lm, "blocks.0.hook_resid_post")
    other = random_gpt2[0]
    with pytest.raises(ConfigError, match="another model"):
        check_harvest_matches(source, other, HOOK)
