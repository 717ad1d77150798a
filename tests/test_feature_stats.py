"""monosemantic/feature_stats.py: the one definition of features.safetensors, and its messages for a bad file."""

import pytest
import torch

from monosemantic.errors import ArtifactError
from monosemantic.feature_stats import (
    LAYOUT, REQUIRED, REQUIRED_FOR_PAGES, SPECS, FeatureStatistics, check_layout, missing_for_pages,
)

D_SAE, TOP_K, WINDOW, SAMPLES, BINS = 6, 3, 5, 4, 7


def full() -> dict[str, torch.Tensor]:
    """A well-formed file with every tensor, in the dtypes the trainer writes."""
    sizes = {"d_sae": D_SAE, "top_k": TOP_K, "window": WINDOW, "samples": SAMPLES, "bins": BINS, "logit_k": 2,
             "neighbours": 2}
    dtypes = {"float32": torch.float32, "float16": torch.float16, "int16 or int32": torch.int16, "int32": torch.int32,
              "int64": torch.int64}
    out = {}
    for spec in LAYOUT:
        shape = [int(d) if d.isdigit() else sizes[d.partition("+")[0]] + (1 if "+" in d else 0) for d in spec.shape]
        out[spec.name] = torch.ones(shape, dtype=dtypes[spec.dtype])
    return out


def test_every_tensor_is_described_and_the_page_tensors_are_in_the_layout():
    assert [spec.name for spec in LAYOUT] == list(SPECS) and len(SPECS) == 20
    assert all(spec.meaning and spec.dtype and spec.shape for spec in LAYOUT)
    assert REQUIRED == ("density", "mean_activation", "max_activation")
    assert set(REQUIRED_FOR_PAGES) <= set(SPECS)


def test_a_full_file_reads_back_with_every_attribute_and_writes_the_same_tensors():
    tensors = {**full(), "something_newer": torch.zeros(2)}
    statistics = FeatureStatistics.from_tensors(tensors, d_sae=D_SAE)
    assert statistics.sizes == {"d_sae": D_SAE, "top_k": TOP_K, "window": WINDOW, "samples": SAMPLES, "bins": BINS,
                                "logit_k": 2, "neighbours": 2}
    assert statistics.has_pages and statistics.d_sae == D_SAE and statistics.tokens == 1
    assert "top_acts" in statistics and "something_newer" in statistics and "nothing" not in statistics
    assert set(statistics.extra) == {"something_newer"}  # unknown tensors kept, not refused
    written = statistics.to_tensors()
    assert set(written) == set(tensors) and all(torch.equal(written[k], tensors[k]) for k in tensors)


def test_optional_tensors_are_none_and_pages_say_what_they_lack():
    tensors = {name: full()[name] for name in REQUIRED}
    statistics = FeatureStatistics.from_tensors(tensors)
    assert statistics.top_tokens is None and statistics.centre is None and statistics.tokens is None
    assert not statistics.has_pages
    assert missing_for_pages(tensors) == ["top_tokens", "top_acts", "top_values", "window_offsets"]
    assert missing_for_pages(full()) == []


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.pop("max_activation"), "tensor max_activation is missing (every features file holds density, "
                                        "mean_activation, max_activation)"),
    (lambda t: t.pop("top_acts"), "tensor top_acts is missing (top_values, top_tokens, window_offsets are present"),
    (lambda t: t.pop("neighbour_cosines"), "tensor neighbour_cosines is missing (neighbour_ids is present"),
    (lambda t: t.update(top_acts=torch.ones(D_SAE, TOP_K, WINDOW + 1)),
     f"tensor top_acts has shape [{D_SAE}, {TOP_K}, {WINDOW + 1}], expected [d_sae={D_SAE}, top_k={TOP_K}, window={WINDOW}]"),
    (lambda t: t.update(mean_activation=torch.ones(D_SAE + 1)),
     f"tensor mean_activation has shape [{D_SAE + 1}], expected [d_sae={D_SAE}]"),
    (lambda t: t.update(histogram_log10_edges=torch.ones(BINS)), f"expected [bins+1={BINS + 1}]"),
    (lambda t: t.update(quantile_tokens=torch.ones(D_SAE, SAMPLES, WINDOW)),
     "tensor quantile_tokens has dtype float32, expected integer (int16 or int32)"),
    (lambda t: t.update(stats_tokens=torch.ones(2, dtype=torch.int64)), "tensor stats_tokens has shape [2], expected [1]"),
])
def test_a_bad_file_is_refused_naming_the_tensor(edit, message):
    tensors = full()
    edit(tensors)
    with pytest.raises(ArtifactError, match="^reg/v1/features.safetensors: ") as caught:
        FeatureStatistics.from_tensors(tensors, where="reg/v1/features.safetensors")
    assert message in str(caught.value)


def test_the_dictionary_width_is_checked_when_given_and_construction_checks_too():
    with pytest.raises(ArtifactError, match=rf"tensor density has shape \[{D_SAE}\], expected \[d_sae=8\]"):
        check_layout(full(), d_sae=8)
    with pytest.raises(ArtifactError, match="tensor top_values is missing"):
        FeatureStatistics(**{name: full()[name] for name in (*REQUIRED, "top_tokens", "top_acts", "window_offsets")})
