"""The shipped reference model and dictionary load, verify, belong together, and meet the targets they claim."""

import json

import pytest
import torch

from monosemantic.artifact import load_dictionary, verify
from monosemantic.lm import hook_dim, load_lm
from monosemantic.shipped import REFERENCE_DICTIONARY, REFERENCE_HOOK, reference_lm_path, reference_registry_path


@pytest.fixture(scope="module")
def shipped():
    lm = load_lm(reference_lm_path())
    dictionary = load_dictionary(reference_registry_path(), REFERENCE_DICTIONARY, expected_model_checksum=lm.checksum,
                                 expected_d_in=hook_dim(lm.model, REFERENCE_HOOK))
    return lm, dictionary


def test_the_reference_lm_is_the_papers_one_layer_transformer(shipped):
    lm, _ = shipped
    cfg = lm.model.config
    assert (cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.n_inner, cfg.activation_function) == (1, 128, 4, 512, "relu")


def test_the_reference_lm_is_a_real_language_model_of_its_corpus():
    record = json.loads((reference_lm_path() / "training.json").read_text())
    assert record["heldout_loss"] < record["unigram_loss"] - 1.0


def test_the_reference_dictionary_is_relu_512_to_4096_at_the_mlp_neurons_and_verifies(shipped):
    _, dictionary = shipped
    m = verify(dictionary.path)
    assert (m.architecture, m.sae.d_in, m.sae.d_sae) == ("relu", 512, 4096)
    assert m.hook.module_path == "transformer.h.0.mlp.act"


def test_the_reference_dictionary_reconstructs_real_activations(shipped):
    lm, dictionary = shipped
    ids = lm.tokenizer("def main():\n    return sorted(items, key=len)\n", return_tensors="pt").input_ids
    from monosemantic.lm import read_activations

    x = read_activations(lm.model, ids, REFERENCE_HOOK)[0, 1:]
    with torch.no_grad():
        x_hat = dictionary.sae.decode(dictionary.sae.encode(x))
    relative_error = float((x - x_hat).pow(2).sum() / x.pow(2).sum())
    assert relative_error < 0.5  # an untrained dictionary gives about 1; held-out FVU is 0.147 over 300k tokens


def test_the_recorded_metrics_are_at_least_what_artifacts_readme_states(shipped):
    # artifacts/README.md: L0 28.6, FVU 0.147, loss recovered 0.988, dead 1.6% on 300k held-out tokens, dense 0:
    # every product target of the foundation issue, which these bounds are.
    metrics = shipped[1].manifest.metrics
    assert 5 <= metrics["l0"] <= 30
    assert metrics["loss_recovered"] >= 0.90
    assert metrics["fvu"] <= 0.15
    assert metrics["dense_fraction"] == 0.0
    assert metrics["dead_fraction"] <= 0.05
