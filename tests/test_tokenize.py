"""Model.tokenize gives exactly the ids and character offsets of the HF tokenizer call, for byte-level BPE and for a
SentencePiece-style (Metaspace) tokenizer, with or without truncation configured on the Rust backend."""

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, trainers, decoders
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from monosemantic.model import Model, _plain_backend
from monosemantic.shipped import reference_lm_path

TEXTS = ["def main():\n    return 0\n", "  leading spaces and trailing  ", "naïve café — 東京 🙂", "", "<|endoftext|>x = 1<|endoftext|>",
         "tabs\tand\r\nnewlines\n\n\n", "a" * 300]


class _WithTokenizer:
    """Just what Model.tokenize reads of a loaded LM."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer


def _model(tokenizer) -> Model:
    return Model(lm=_WithTokenizer(tokenizer), max_positions=1024, vocab_size=len(tokenizer))  # type: ignore[arg-type]


def _hf(tokenizer, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return list(encoded["input_ids"]), [tuple(span) for span in encoded["offset_mapping"]]


def _metaspace_tokenizer() -> PreTrainedTokenizerFast:
    backend = Tokenizer(models.Unigram())
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    corpus = [t for t in TEXTS if t] * 20 + ["the quick brown fox jumps over the lazy dog"] * 20
    backend.train_from_iterator(corpus, trainers.UnigramTrainer(vocab_size=120, special_tokens=["<s>", "<unk>"], unk_token="<unk>"))
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", unk_token="<unk>")


@pytest.mark.parametrize("text", TEXTS)
def test_byte_level_bpe_tokenizes_as_the_hf_call(text):
    tokenizer = AutoTokenizer.from_pretrained(reference_lm_path())
    assert _plain_backend(tokenizer) is not None  # the fast path is the one under test
    tokenized = _model(tokenizer).tokenize(text, prepend_bos=False)
    assert (tokenized.ids, tokenized.offsets) == _hf(tokenizer, text)


@pytest.mark.parametrize("text", TEXTS)
def test_a_metaspace_tokenizer_tokenizes_as_the_hf_call(text):
    tokenizer = _metaspace_tokenizer()
    tokenized = _model(tokenizer).tokenize(text, prepend_bos=True)
    ids, offsets = _hf(tokenizer, text)
    assert (tokenized.ids, tokenized.offsets) == ([tokenizer.bos_token_id, *ids], [(0, 0), *offsets])


def test_truncation_configured_on_the_backend_is_not_applied_to_a_request():
    tokenizer = AutoTokenizer.from_pretrained(reference_lm_path())
    tokenizer.backend_tokenizer.enable_truncation(max_length=8)  # as some tokenizer.json files ship
    assert _plain_backend(tokenizer) is None
    tokenized = _model(tokenizer).tokenize(TEXTS[0] * 4, prepend_bos=False)
    assert len(tokenized.ids) > 8 and (tokenized.ids, tokenized.offsets) == _hf(tokenizer, TEXTS[0] * 4)
