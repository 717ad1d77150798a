"""trainer/features.py: every dashboard statistic on a dictionary whose answers are known.

The model is a one-layer GPT-2 whose token embeddings are the identity and whose position embeddings are zero,
read at blocks.0.hook_resid_pre: the activation there is exactly the one-hot vector of the token. The dictionary
is W_enc = W_dec = I with b_enc = -0.5, so feature i fires with value 0.5 on token i and nowhere else.
"""

import pytest
import torch

from conftest import one_hot_lm_and_sae
from monosemantic.feature_stats import LAYOUT, FeatureStatistics
from trainer.features import FeatureStatsConfig, feature_statistics

VOCAB = 32
HOOK = "blocks.0.hook_resid_pre"


@pytest.fixture(scope="module")
def one_hot_setup():
    lm, sae = one_hot_lm_and_sae(VOCAB)
    generator = torch.Generator().manual_seed(1)
    contexts = torch.randint(1, VOCAB, (40, 24), generator=generator)
    contexts[:, 0] = 0  # BOS
    contexts[contexts == 5] = 6  # token 5 never appears: feature 5 is dead
    cfg = FeatureStatsConfig(top_k=4, quantile_bins=2, per_quantile=2, window_before=3, window_after=2, batch_contexts=7)
    tensors, labels = feature_statistics(lm, sae, HOOK, contexts, cfg, progress=False)
    return contexts, tensors, labels, cfg


def test_the_statistics_are_written_in_the_layout_of_monosemantic_feature_stats(one_hot_setup):
    contexts, t, _, cfg = one_hot_setup
    assert set(t) == {spec.name for spec in LAYOUT}  # every tensor, the logit effects too (the unembedding is readable)
    for spec in LAYOUT:
        assert str(t[spec.name].dtype).removeprefix("torch.") in spec.dtype.split(" or "), spec.name
    statistics = FeatureStatistics.from_tensors(t, d_sae=VOCAB)
    window = cfg.window_before + 1 + cfg.window_after
    assert statistics.sizes == {"d_sae": VOCAB, "top_k": cfg.top_k, "samples": cfg.quantile_bins * cfg.per_quantile,
                                "window": window, "bins": 40, "logit_k": cfg.logit_k, "neighbours": cfg.neighbours}
    assert statistics.has_pages and statistics.centre == cfg.window_before and statistics.tokens == contexts[:, 1:].numel()
    assert statistics.top_tokens is t["top_tokens"] and statistics.extra == {}


def test_density_is_the_share_of_non_bos_tokens_that_are_the_features_token(one_hot_setup):
    contexts, t, _, _ = one_hot_setup
    body = contexts[:, 1:]
    expected = torch.stack([(body == i).float().mean() for i in range(VOCAB)])
    assert torch.allclose(t["density"], expected)
    assert int(t["stats_tokens"]) == body.numel()


def test_mean_and_max_activation_are_the_one_value_it_takes(one_hot_setup):
    _, t, _, _ = one_hot_setup
    assert t["max_activation"][7] == pytest.approx(0.5) and t["mean_activation"][7] == pytest.approx(0.5)
    assert t["max_activation"][5] == 0 and t["density"][5] == 0


def test_the_histogram_puts_every_firing_in_the_bin_of_its_value(one_hot_setup):
    contexts, t, _, _ = one_hot_setup
    edges = t["histogram_log10_edges"]
    bin_of_half = int(torch.bucketize(torch.log10(torch.tensor(0.5)), edges[1:-1]))
    counts = t["histogram_counts"][7]
    assert int(counts[bin_of_half]) == int((contexts[:, 1:] == 7).sum())
    assert int(counts.sum()) == int(counts[bin_of_half])


def test_top_examples_peak_on_the_features_token_and_carry_the_window_activations(one_hot_setup):
    _, t, _, cfg = one_hot_setup
    centre = cfg.window_before
    for feature in (3, 7, 12):
        windows, acts = t["top_tokens"][feature].long(), t["top_acts"][feature].float()
        assert (windows[:, centre] == feature).all()
        assert torch.allclose(t["top_values"][feature], torch.full((cfg.top_k,), 0.5))
        # every token in the window: 0.5 where it is the feature's token, 0 elsewhere (and -1 = outside the context)
        expected = torch.where(windows == feature, 0.5, 0.0)
        assert torch.allclose(acts, expected)


def test_quantile_examples_fall_in_their_interval_of_the_max(one_hot_setup):
    _, t, _, cfg = one_hot_setup
    values, bins = t["quantile_values"][7], t["quantile_bins"]
    # one value (0.5 = the max) exists, so only the top interval has examples
    assert (values[bins == cfg.quantile_bins - 1] == 0.5).all()
    assert (values[bins < cfg.quantile_bins - 1] == 0).all()


def test_logit_effects_raise_the_features_own_token_most(one_hot_setup):
    _, t, _, _ = one_hot_setup
    assert t["logit_up_ids"][:, 0].tolist() == list(range(VOCAB))  # tied unembedding = identity embeddings


def test_neighbours_of_orthogonal_decoder_rows_have_cosine_zero(one_hot_setup):
    _, t, _, _ = one_hot_setup
    assert torch.allclose(t["neighbour_cosines"], torch.zeros_like(t["neighbour_cosines"]), atol=1e-6)
    assert (t["neighbour_ids"] != torch.arange(VOCAB)[:, None]).all()


def test_labels_name_the_token_and_dead_features_say_so(one_hot_setup):
    _, _, labels, _ = one_hot_setup
    assert labels[7] == '"w7"'
    assert labels[5] == "dead"


def test_a_feature_that_never_fired_has_no_made_up_examples(one_hot_setup):
    _, t, _, _ = one_hot_setup
    assert (t["top_values"][5] == 0).all() and (t["top_tokens"][5] == -1).all() and (t["top_acts"][5] == 0).all()
    assert (t["quantile_tokens"][5] == -1).all()
