"""Specifications of the reference corpus: deterministic, mixed, split stably, packed with BOS."""

import pytest
import torch
from tokenizers import Regex, Tokenizer, models, pre_tokenizers

from monosemantic.errors import ConfigError
from trainer.corpus import BOS_TOKEN, build_corpus, is_heldout, kind_of, token_contexts


@pytest.fixture(scope="module")
def full():
    return build_corpus()


def test_building_twice_gives_the_same_documents_and_fingerprint(full):
    again = build_corpus()
    assert again.fingerprint == full.fingerprint
    assert again.train_paths == full.train_paths and again.heldout_paths == full.heldout_paths
    assert again.train == full.train


def test_fingerprint_changes_when_the_content_changes(tmp_path):
    (tmp_path / "a.py").write_text("x = 1\n")
    (tmp_path / "b.txt").write_text("some prose\n")
    before = build_corpus(root=tmp_path).fingerprint
    (tmp_path / "b.txt").write_text("other prose\n")
    assert build_corpus(root=tmp_path).fingerprint != before


def test_corpus_mixes_code_prose_email_markup_and_data(full):
    kinds = full.stats["kinds"]
    assert set(kinds) == {"code", "text", "email", "markup", "data"}
    assert all(k["files"] > 0 and k["chars"] > 0 for k in kinds.values())
    assert full.stats["chars"] == sum(k["chars"] for k in kinds.values())
    assert full.stats["python_version"].count(".") == 2


def test_corpus_holds_non_ascii_text_from_many_scripts(full):
    text = "".join(full.train) + "".join(full.heldout)
    assert any("\u4e00" <= ch <= "\u9fff" for ch in text)  # CJK
    assert any("\u0370" <= ch <= "\u03ff" for ch in text)  # Greek


def test_binary_and_third_party_files_are_left_out(full):
    paths = full.train_paths + full.heldout_paths
    assert not any("site-packages" in p or "__pycache__" in p or p.endswith((".pyc", ".png", ".whl"))
                   for p in paths)


def test_train_and_heldout_are_disjoint_and_chosen_by_path(full):
    assert not set(full.train_paths) & set(full.heldout_paths)
    assert 3 <= len(full.heldout) < 0.1 * len(full.train)
    assert all(is_heldout(p, 0.03) for p in full.heldout_paths)
    assert not any(is_heldout(p, 0.03) for p in full.train_paths)


def test_max_chars_caps_the_total_and_still_mixes_kinds():
    small = build_corpus(max_chars=20_000)
    assert sum(map(len, small.train + small.heldout)) == small.stats["chars"] <= 20_000
    assert small.stats["chars"] > 15_000
    assert all(k["chars"] > 0 for k in small.stats["kinds"].values())
    assert small.train and small.heldout
    assert build_corpus(max_chars=20_000).fingerprint == small.fingerprint


def test_a_bad_argument_raises_config_error_naming_it():
    with pytest.raises(ConfigError, match="heldout_fraction"):
        build_corpus(heldout_fraction=1.5)
    with pytest.raises(ConfigError, match="max_chars"):
        build_corpus(max_chars=0)


def test_kind_of_classifies_by_path():
    assert kind_of("json/decoder.py") == "code"
    assert kind_of("test/test_email/data/msg_01.txt") == "email"
    assert kind_of("idlelib/help.html") == "markup"
    assert kind_of("LICENSE.txt") == "text"
    assert kind_of("test/decimaltestdata/abs.decTest") == "data"


def _char_tokenizer() -> Tokenizer:
    vocab = {BOS_TOKEN: 0, **{c: i + 1 for i, c in enumerate("abcdefghij ")}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=BOS_TOKEN))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")  # one token per character
    return tok


def test_token_contexts_start_with_bos_separate_documents_and_drop_the_tail():
    docs = ["abc", "defgh", "ij"]  # 3 + 5 + 2 tokens, plus a BOS after each: a stream of 13
    contexts = token_contexts(_char_tokenizer(), docs, context_length=4, bos_token_id=0)
    assert contexts.dtype == torch.long and contexts.shape == (4, 4)  # 13 // 3 pieces of 3
    assert (contexts[:, 0] == 0).all()
    a, b, c, d, e, f, g, h = range(1, 9)
    assert contexts.tolist() == [[0, a, b, c], [0, 0, d, e], [0, f, g, h], [0, 0, 9, 10]]


def test_token_contexts_is_deterministic():
    docs = ["abc def", "ghij", "a b c d e"]
    first = token_contexts(_char_tokenizer(), docs, context_length=5, bos_token_id=0)
    assert torch.equal(first, token_contexts(_char_tokenizer(), docs, context_length=5, bos_token_id=0))


def test_token_contexts_are_the_same_whatever_the_encoding_chunk(monkeypatch):
    import trainer.corpus as corpus

    docs = [f"document {i} " * (i % 5 + 1) for i in range(23)]
    whole = token_contexts(_char_tokenizer(), docs, context_length=7, bos_token_id=0)
    monkeypatch.setattr(corpus, "ENCODE_CHUNK", 4)  # 23 documents in six calls, the last one short
    assert torch.equal(token_contexts(_char_tokenizer(), docs, context_length=7, bos_token_id=0), whole)
    assert whole.shape[0] > 10


def test_a_packed_stream_builds_exactly_the_contexts_asked_for():
    from trainer.corpus import pack_stream

    docs = [f"document {i} " * (i % 5 + 1) for i in range(23)]
    every = token_contexts(_char_tokenizer(), docs, context_length=7, bos_token_id=0)
    packed = pack_stream(_char_tokenizer(), docs, context_length=7, bos_token_id=0)
    rows = torch.randperm(len(packed), generator=torch.Generator().manual_seed(0))[:9]
    assert len(packed) == every.shape[0]
    assert torch.equal(packed.contexts(rows), every[rows])


def test_a_harvests_built_in_contexts_are_the_shuffled_corpus_cut_to_the_limit():
    from trainer.pipeline import corpus_contexts

    tok = _char_tokenizer()
    corpus = build_corpus(max_chars=30_000)
    every = token_contexts(tok, corpus.train, 16, bos_token_id=0)
    order = torch.randperm(every.shape[0], generator=torch.Generator().manual_seed(5))
    contexts, fingerprint = corpus_contexts(tok, "train", 16, 30_000, 12, seed=5)
    assert torch.equal(contexts, every[order][:12]) and fingerprint == corpus.fingerprint
