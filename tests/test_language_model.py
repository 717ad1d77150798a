"""Specifications of the reference LM: byte-level BPE tokenizer, validated config, one-layer model."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from monosemantic.errors import ConfigError
from trainer.corpus import BOS_TOKEN, build_corpus
from trainer.language_model import LMConfig, build_model, train_language_model, train_tokenizer

NON_ASCII = "naïve café — Ελληνικά 漢字 🙂"
TINY = dict(vocab_size=512, context_length=64, d_model=64, n_head=2, d_mlp=256, batch_size=16,
            lr=5e-3, warmup_fraction=0.05, eval_max_tokens=20_000)


@pytest.fixture(scope="module")
def small_corpus():
    return build_corpus(max_chars=250_000)


@pytest.fixture(scope="module")
def tokenizer(small_corpus):
    return train_tokenizer(small_corpus.train, vocab_size=400)


@pytest.fixture(scope="module")
def trained(small_corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("lm") / "reference-lm"
    cfg = LMConfig(**TINY, tokens=16 * 64 * 250)
    return cfg, out, train_language_model(cfg, small_corpus, out, progress=False)


def test_tokenizer_round_trips_non_ascii_text(tokenizer):
    ids = tokenizer(NON_ASCII, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == NON_ASCII


def test_tokenizer_offsets_cover_the_characters_of_non_ascii_text(tokenizer):
    offsets = tokenizer(NON_ASCII, return_offsets_mapping=True, add_special_tokens=False)["offset_mapping"]
    assert all(0 <= start < end <= len(NON_ASCII) for start, end in offsets)
    assert set().union(*(range(start, end) for start, end in offsets)) == set(range(len(NON_ASCII)))
    assert (NON_ASCII.index("漢"), NON_ASCII.index("漢") + 1) in offsets  # byte pieces map to the char


def test_tokenizer_has_its_vocab_size_and_endoftext_as_bos_eos_pad(tokenizer):
    assert len(tokenizer) == 400
    assert tokenizer.bos_token == tokenizer.eos_token == tokenizer.pad_token == BOS_TOKEN
    assert tokenizer.convert_tokens_to_ids(BOS_TOKEN) == tokenizer.bos_token_id == 0


def test_tokenizer_loads_back_with_auto_tokenizer(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    assert loaded(NON_ASCII)["input_ids"] == tokenizer(NON_ASCII)["input_ids"]
    assert loaded.bos_token_id == tokenizer.bos_token_id


def test_training_the_tokenizer_is_deterministic(small_corpus, tokenizer):
    again = train_tokenizer(small_corpus.train, vocab_size=400)
    assert again.get_vocab() == tokenizer.get_vocab()


def test_model_is_one_layer_gpt2_with_a_relu_mlp_of_the_configured_width():
    model = build_model(LMConfig(), vocab_size=4096)
    assert model.config.n_layer == 1 and model.config.n_embd == 128 and model.config.n_head == 4
    assert isinstance(model.get_submodule("transformer.h.0.mlp.act"), torch.nn.ReLU)
    assert model.get_submodule("transformer.h.0.mlp.c_fc").weight.shape == (128, 512)
    assert model.lm_head.weight is model.transformer.wte.weight  # tied embeddings
    assert model.config.resid_pdrop == model.config.embd_pdrop == model.config.attn_pdrop == 0.0


@pytest.mark.parametrize(("field", "value"), [
    ("d_model", 0), ("n_head", 3), ("lr", -1.0), ("activation", "tanh"), ("tokens", 10),
    ("context_length", 1), ("vocab_size", 100), ("not_a_field", 1),
])
def test_an_invalid_config_value_raises_config_error_naming_the_field(field, value):
    with pytest.raises(ConfigError, match=field):
        LMConfig(**{field: value})


def test_config_validated_from_a_dict_raises_config_error_too():
    with pytest.raises(ConfigError, match="batch_size"):
        LMConfig.model_validate({"batch_size": 0})


@pytest.mark.slow
def test_a_short_training_run_beats_the_unigram_and_uniform_baselines(trained):
    cfg, _, result = trained
    assert result["uniform_loss"] == pytest.approx(math.log(cfg.vocab_size))
    assert result["unigram_loss"] < result["uniform_loss"]
    assert result["heldout_loss"] < result["unigram_loss"] - 0.3
    assert result["train_tokens"] == cfg.steps * cfg.batch_size * cfg.context_length


@pytest.mark.slow
def test_the_saved_directory_loads_with_auto_classes(trained):
    cfg, out, _ = trained
    model = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(out, local_files_only=True)
    assert isinstance(model.get_submodule("transformer.h.0.mlp.act"), torch.nn.ReLU)
    assert model.config.n_inner == cfg.d_mlp and model.config.n_positions == cfg.context_length
    assert model.config.bos_token_id == tokenizer.bos_token_id
    ids = tokenizer("def f(x):\n    return x", return_tensors="pt")["input_ids"]
    assert model(ids).logits.shape == (1, ids.shape[1], len(tokenizer))


@pytest.mark.slow
def test_the_saved_directory_holds_training_json_and_nothing_half_written(trained, small_corpus):
    cfg, out, result = trained
    assert json.loads((out / "training.json").read_text()) == json.loads(json.dumps(result))
    assert result["corpus"]["fingerprint"] == small_corpus.fingerprint
    assert result["config"] == cfg.model_dump()
    assert {"torch", "transformers"} <= set(result["versions"])
    assert sorted(p.name for p in out.parent.iterdir()) == ["reference-lm"]  # no temporary siblings
    assert (out / "model.safetensors").exists()


@pytest.mark.slow
def test_the_saved_tokenizer_names_a_class_transformers_4_and_5_both_know(trained):
    _, out, _ = trained
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert all(p.stat().st_mode & 0o444 == 0o444 for p in out.iterdir())  # readable by any user


def test_training_is_deterministic_for_a_seed(small_corpus, tmp_path):
    cfg = LMConfig(**TINY, tokens=16 * 64 * 5)
    first = train_language_model(cfg, small_corpus, tmp_path / "a", progress=False)
    second = train_language_model(cfg, small_corpus, tmp_path / "b", progress=False)
    assert first["heldout_loss"] == second["heldout_loss"]
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_bf16_left_unset_is_on_only_where_this_machine_multiplies_it_faster_and_a_given_value_is_kept():
    # On a CPU without native bf16 the LM step ran ~30x slower under bf16 autocast (700 tok/s): measured, not assumed.
    from monosemantic.precision import fastest_dtype

    assert LMConfig().bf16 == (fastest_dtype(128, 512, "cpu") == torch.bfloat16)
    assert LMConfig(bf16=True).bf16 is True and LMConfig(bf16=False).bf16 is False
    assert LMConfig.model_validate(LMConfig(bf16=True).model_dump()).bf16 is True  # a saved config is read as saved
