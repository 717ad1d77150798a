"""Dictionary comparison (monosemantic/compare.py): a dictionary against itself, against a copy whose features were
permuted and two of them split in halves, and against the same features in another model's basis, gives exactly the
planted matches; the shipped reference against itself matches every feature to itself."""

from __future__ import annotations

import pytest
import torch

from monosemantic.artifact import HookRef, ModelRef, publish
from monosemantic.bound import load_bound
from monosemantic.compare import BestMatches, Pair, best_by_cosine, classify, compare
from monosemantic.errors import ConfigError
from monosemantic.lm import LoadedLM, resolve_hook, weights_checksum
from monosemantic.model import Model
from monosemantic.sae import SAEConfig, build_sae

from conftest import one_hot_lm_and_sae

HOOK = "blocks.0.hook_resid_pre"
VOCAB = 32
SPLIT = (3, 5)  # features of A each split into two halves in B
PERMUTATION = torch.randperm(VOCAB, generator=torch.Generator().manual_seed(1))  # A's feature i is B's PERMUTATION[i]


def _bound(lm, sae, root, name: str):
    model = Model.of(lm)
    point = resolve_hook(lm, HOOK)
    publish(root, name, sae, model=ModelRef(name=name, checksum=lm.checksum),
            hook=HookRef(name=HOOK, module_path=point.module_path, alias=point.alias, kind=point.kind))
    return load_bound(model, root, name, None)


def _permuted_and_split(sae):
    """B: A's features at PERMUTATION's places, and for each of SPLIT a second feature after them; each half reads
    half the pre-activation (ReLU(p/2) = ReLU(p)/2) and writes the same unit decoder row, so the two halves sum to A's."""
    n = VOCAB + len(SPLIT)
    b = build_sae(SAEConfig.build(architecture="relu", d_in=VOCAB, d_sae=n))
    with torch.no_grad():
        b.W_enc[:, PERMUTATION] = sae.W_enc
        b.b_enc[PERMUTATION] = sae.b_enc
        b.W_dec[PERMUTATION] = sae.W_dec
        b.b_dec.copy_(sae.b_dec)
        for extra, a in enumerate(SPLIT, start=VOCAB):
            home = int(PERMUTATION[a])
            b.W_enc[:, home] = b.W_enc[:, extra] = sae.W_enc[:, a] / 2
            b.b_enc[home] = b.b_enc[extra] = sae.b_enc[a] / 2
            b.W_dec[extra] = sae.W_dec[a]
    return b


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    lm, sae = one_hot_lm_and_sae(VOCAB)
    return lm, _bound(lm, sae, root, "a"), _bound(lm, _permuted_and_split(sae), root, "b")


def _text(rows: int = 24, length: int = 32) -> torch.Tensor:
    """BOS (w0) then w1..w31: feature 0 (token w0) never fires after BOS."""
    ids = torch.randint(1, VOCAB, (rows, length), generator=torch.Generator().manual_seed(0))
    ids[:, 0] = 0
    return ids


def test_a_dictionary_against_itself_is_one_to_one_on_every_live_feature(planted):
    lm, a, _ = planted
    result = compare(a, a, lm_a=lm, lm_b=lm, contexts=_text())
    m = result.matching
    assert [(p.a, p.b) for p in m.one_to_one] == [(i, i) for i in range(1, VOCAB)]
    assert all(p.score == pytest.approx(1.0) for p in m.one_to_one)
    assert m.dead_a == m.dead_b == [0] and not m.splits and not m.merges and not m.loose


def test_a_permuted_copy_with_two_features_split_gives_exactly_the_planted_matches(planted):
    lm, a, b = planted
    m = compare(a, b, lm_a=lm, lm_b=lm, contexts=_text()).matching
    planted_pairs = {(i, int(PERMUTATION[i])) for i in range(1, VOCAB) if i not in SPLIT}
    assert {(p.a, p.b) for p in m.one_to_one} == planted_pairs
    assert {f.feature: sorted(p.b for p in f.counterparts) for f in m.splits} == {
        a: sorted([int(PERMUTATION[a]), VOCAB + i]) for i, a in enumerate(SPLIT)}
    assert not m.merges and not m.loose and not m.unmatched_a
    assert m.dead_a == [0] and m.dead_b == [int(PERMUTATION[0])]


def test_b_against_a_reports_the_splits_as_merges(planted):
    lm, a, b = planted
    m = compare(b, a, lm_a=lm, lm_b=lm, contexts=_text()).matching
    assert {f.feature: sorted(p.a for p in f.counterparts) for f in m.merges} == {
        a: sorted([int(PERMUTATION[a]), VOCAB + i]) for i, a in enumerate(SPLIT)}
    assert not m.splits


def test_by_decoder_cosine_the_planted_matches_need_no_text(planted):
    _, a, b = planted
    result = compare(a, b, by="cosine")
    assert result.tokens == 0
    assert {(p.a, p.b) for p in result.matching.one_to_one} == {(i, int(PERMUTATION[i])) for i in range(VOCAB) if i not in SPLIT}
    assert {f.feature for f in result.matching.splits} == set(SPLIT)


def test_across_two_models_the_same_features_in_another_basis_are_found_by_correlation(planted, tmp_path):
    """Model B is model A in a rotated residual basis (embeddings and the dictionary turned by one orthogonal R, the
    block made to read and write through R); its features fire on the same tokens, its decoder rows point elsewhere."""
    lm, a, _ = planted
    rotation = torch.linalg.qr(torch.randn(VOCAB, VOCAB, generator=torch.Generator().manual_seed(2)))[0]
    import copy

    model_b = copy.deepcopy(lm.model)
    with torch.no_grad():
        model_b.transformer.wte.weight.copy_(lm.model.transformer.wte.weight @ rotation)
    lm_b = LoadedLM(model=model_b, tokenizer=lm.tokenizer, source="rotated", checksum=weights_checksum(model_b))
    sae_b = build_sae(SAEConfig.build(architecture="relu", d_in=VOCAB, d_sae=VOCAB))
    with torch.no_grad():
        sae_b.W_enc.copy_(rotation.T @ a.sae.W_enc)
        sae_b.W_dec.copy_(a.sae.W_dec @ rotation)
        sae_b.b_enc.copy_(a.sae.b_enc)
        sae_b.b_dec.zero_()
    b = _bound(lm_b, sae_b, tmp_path, "rotated")
    result = compare(a, b, lm_a=lm, lm_b=lm_b, contexts=_text())
    assert result.cosine is None  # another model: no shared space
    assert [(p.a, p.b) for p in result.matching.one_to_one] == [(i, i) for i in range(1, VOCAB)]
    with pytest.raises(ConfigError, match="one space"):
        compare(a, b, by="cosine")


def test_a_feature_whose_best_counterpart_is_below_the_threshold_has_none():
    best = BestMatches(torch.tensor([0, 1]), torch.tensor([0.9, 0.3]), torch.tensor([0, 1]), torch.tensor([0.9, 0.3]))
    m = classify(best, 0.5)
    assert m.one_to_one == [Pair(0, 0, pytest.approx(0.9))] and m.unmatched_a == [1] and m.unmatched_b == [1]


def test_scores_in_blocks_give_the_whole_matrixs_bests():
    a, b = torch.randn(50, 16, generator=torch.Generator().manual_seed(3)), torch.randn(70, 16, generator=torch.Generator().manual_seed(4))
    whole = torch.nn.functional.normalize(a, dim=1) @ torch.nn.functional.normalize(b, dim=1).T
    blocked = best_by_cosine(a, b, block_bytes=4 * 70 * 7)  # blocks of 7 rows
    assert torch.equal(blocked.a_to_b, whole.argmax(1)) and torch.equal(blocked.b_to_a, whole.argmax(0))
    assert torch.allclose(blocked.b_score, whole.max(0).values)


@pytest.mark.slow
def test_the_reference_against_itself_matches_every_feature_to_itself_by_cosine(reference_dictionary):
    result = compare(reference_dictionary, reference_dictionary, by="cosine")
    assert [(p.a, p.b) for p in result.matching.one_to_one] == [(i, i) for i in range(reference_dictionary.d_sae)]
