"""Specifications of the explanation and scoring arithmetic (monosemantic/explain.py) on planted answers."""

import pytest

from monosemantic.explain import (Example, Trial, balanced_accuracy, batches, detection_trials, explainer_messages,
                                  fuzzing_trials, parse_explanation, parse_labels, scaled, score, split_examples)


def _example(text: str, values: list[float]) -> Example:
    return Example(tuple(text.split("|")), tuple(values))


def test_the_tokens_at_or_above_three_tenths_of_the_peak_are_marked_and_neighbours_share_brackets():
    example = _example("the| cat| sat| on| the| mat", [0.0, 10.0, 3.0, 2.9, 0.0, 5.0])
    assert example.marked() == "the<< cat sat>> on the<< mat>>"
    assert example.plain() == "the cat sat on the mat"


def test_an_example_that_never_fires_marks_nothing():
    assert _example("a| b", [0.0, 0.0]).marked() == "a b"


def test_activations_are_shown_as_integers_from_0_to_10_of_the_features_maximum():
    assert scaled([0.0, 1.0, 4.96, 10.0, 12.0], maximum=10.0) == [0, 1, 5, 10, 10]
    assert scaled([1.0], maximum=0.0) == [0]


def test_the_explainer_is_shown_each_examples_marked_text_and_the_marked_tokens_values():
    messages = explainer_messages([_example("x| cat", [0.0, 2.0])], maximum=4.0)
    assert messages[0]["role"] == "system" and "[EXPLANATION]:" in messages[0]["content"]
    assert "Example 1: x<< cat>>" in messages[1]["content"] and "' cat' (5)" in messages[1]["content"]


@pytest.mark.parametrize("answer, expected", [
    ("Thinking...\n[EXPLANATION]: the word cat", "the word cat"),
    ("[explanation]: first\n[EXPLANATION]: \"second\"", "second"),
    ("it fires on cats", None),
    ("[EXPLANATION]:   ", None),
    ("", None),
])
def test_the_explanation_is_what_follows_the_last_marker_and_none_without_one(answer, expected):
    assert parse_explanation(answer) == expected


@pytest.mark.parametrize("answer, count, expected", [
    ("[1, 0, 0, 1, 0]", 5, [1, 0, 0, 1, 0]),
    ("Let me see [0, 1] ... final: [1, 1, 0]", 3, [1, 1, 0]),
    ("[1, 0, 2]", 3, None),  # not binary
    ("[1.0, 0, 1]", 3, None),  # a float is not a label
    ("[1, 0]", 3, None),  # wrong count
    ("yes, no, yes", 3, None),
])
def test_a_scorers_answer_is_its_last_list_of_the_right_count_of_0s_and_1s(answer, count, expected):
    assert parse_labels(answer, count) == expected


def test_balanced_accuracy_is_the_mean_of_the_two_rates():
    assert balanced_accuracy([1, 1, 1, 1, 0, 0], [1, 1, 1, 0, 1, 0]) == (0.625, 0.75, 0.5)
    assert balanced_accuracy([1, 1, 0, 0], [1, 1, 1, 1])[0] == 0.5  # answering all 1s is chance
    assert balanced_accuracy([1, 0], [1, 0])[0] == 1.0
    assert balanced_accuracy([1, 1], [1, 0]) == (0.5, 0.5, None)  # one class: its rate alone


def test_a_batch_whose_answer_does_not_parse_is_counted_as_unparsed_not_as_wrong():
    asked = [[Trial("a", 1), Trial("b", 0)], [Trial("c", 1), Trial("d", 0), Trial("e", 0)]]
    result = score(asked, [[1, 0], None])
    assert result.balanced_accuracy == 1.0 and result.examples == 2 and result.unparsed == 3
    assert score(asked, [None, None]).balanced_accuracy is None


def test_fuzzing_marks_the_features_own_tokens_on_half_and_as_many_other_tokens_on_the_rest():
    examples = [(_example("a| b| c| d| e", [0.0, 4.0, 0.0, 0.0, 0.0]), q) for q in range(4)]
    trials = fuzzing_trials(examples, seed=0)
    assert [t.truth for t in trials] == [1, 0, 1, 0]
    assert all(t.text == "a<< b>> c d e" for t in trials if t.truth == 1)
    for wrong in (t for t in trials if t.truth == 0):
        assert wrong.text.count("<<") == 1 and "<< b>>" not in wrong.text


def test_detection_shows_plain_text_with_the_activating_examples_true_and_the_quiet_ones_false():
    trials = detection_trials([(_example("a| b", [0.0, 1.0]), 2)], [_example("c| d", [0.0, 0.0])])
    assert trials == [Trial("a b", 1, 2), Trial("c d", 0, None)]


def test_no_example_is_both_shown_to_the_explainer_and_scored():
    top = [_example(f"t{i}| x", [float(10 - i), 0.0]) for i in range(6)]
    samples = [(_example(f"q{i}| y", [0.5 + i, 0.0]), i // 2) for i in range(6)]  # two samples in each of 3 intervals
    quantiles = [(top[4], 3), *samples, (_example("z| z", [0.0, 0.0]), 1)]
    split = split_examples(top, quantiles, shown=3)
    scored = [e for e, _ in split.scored]
    assert not set(scored) & set(split.shown)
    assert split.shown == top[:3] + [top[4], samples[0][0], samples[2][0], samples[4][0]]  # every other sample per interval
    assert scored == [top[3], top[5], samples[1][0], samples[3][0], samples[5][0]]  # top[4] went to the explainer first
    assert {q for _, q in split.scored if q is not None} == {0, 1, 2}  # every interval is scored too


def test_the_scorers_questions_are_the_same_on_a_rerun_and_five_to_a_prompt():
    trials = [Trial(str(i), i % 2) for i in range(12)]
    first = batches(trials, seed=7)
    assert first == batches(trials, seed=7) and [len(b) for b in first] == [5, 5, 2]
    assert sorted(t.text for b in first for t in b) == sorted(t.text for t in trials)


def test_a_simulation_gives_each_token_its_predicted_activation():
    from monosemantic.explain import parse_simulation

    assert parse_simulation("1\t0\n2\t7\n3\t10", 3) == ([0.0, 7.0, 10.0], False)
    assert parse_simulation("Sure!\n1: 2\n3\t1\n2\t4\n", 3) == ([2.0, 4.0, 1.0], False)  # any order, chatter ignored
    assert parse_simulation("1\t0\n2\t7", 3) is None  # a token without a prediction
    assert parse_simulation("1\t0\n2\t70\n3\t1", 3) == ([0.0, 10.0, 1.0], False)  # capped at the scale's top


def test_with_logprobs_a_prediction_is_its_expected_value_over_the_digit_alternatives():
    import math

    from monosemantic.explain import TokenChoice, parse_simulation

    tokens = [TokenChoice("1", ()), TokenChoice("\t", ()), TokenChoice("8", (("8", math.log(0.5)), ("6", math.log(0.25)), ("x", math.log(0.25)))),
              TokenChoice("\n", ()), TokenChoice("2", ()), TokenChoice("\t", ()), TokenChoice("0", (("0", 0.0),))]
    predicted, refined = parse_simulation("1\t8\n2\t0", 2, tokens)
    assert refined and predicted == [pytest.approx((8 * 0.5 + 6 * 0.25) / 0.75), 0.0]  # "x" is not a prediction


def test_simulation_is_scored_by_pearsons_correlation():
    from monosemantic.explain import correlation

    assert correlation([0, 1, 2, 3], [0, 2, 4, 6]) == pytest.approx(1.0)
    assert correlation([0, 1, 2, 3], [3, 2, 1, 0]) == pytest.approx(-1.0)
    assert correlation([0, 1, 0, 1], [5, 5, 5, 5]) is None  # a constant prediction has no correlation
