"""Explaining a dictionary end to end against real OpenAI-compatible servers on loopback: this project's own
/openai/v1, each serving a tiny chat model built from GPT-2's config class whose greedy answer is a fixed string
(tests/conftest.py's scripted_chat_model): the explainer's parses as an explanation, the scorer's as a list of five
labels, and the scorer's, asked to explain, does not parse. The scorer's server takes a key rate-limited so that
it answers 429 (with Retry-After) while the run keeps more requests in flight than the key allows. The answers are
fixed, so the scores mean nothing: this proves the pipeline, the recording of answers that do not parse, the
retries and resume; the scoring arithmetic is tests/test_explain.py's."""

from __future__ import annotations

import json
import re
import shutil

import httpx
import torch
import pytest
from typer.testing import CliRunner

from conftest import RunningServer, scripted_chat_registry
from monosemantic.client import RestClient
from monosemantic.explanations import list_runs, read_run
from monosemantic.shipped import reference_registry_path
from trainer.cli import app
from trainer.explain import Endpoint, ExplainSettings, explain_dictionary

pytestmark = pytest.mark.slow  # three servers and a dozen runs: ~40 s on 2 cores

KEY = "explainer-key-0123456789"
SETTINGS = ExplainSettings(concurrency=6, max_tokens=12, quiet_contexts=8)
EXPLAINER_ANSWER = ["[EXPLANATION]:", " fires", " on", " x"]
SCORER_ANSWER = ["[1,", " 0,", " 1,", "0,", " 1]"]  # distinct tokens for the chain: "[1, 0, 1,0, 1]"
SIMULATOR_ANSWER = [f"{n}\t{(3 * n) % 11}\n" for n in range(1, 13)]  # a prediction for each token of a 12-token window


def _serve_scripted(root, answer: list[str], **settings) -> RunningServer:
    model, registry = scripted_chat_registry(root, answer)
    return RunningServer(model=str(model), registry=registry, dictionary="d", sae_dtype="float32",
                         openai_model_id="scripted", **{"max_tokens": 4096, **settings})


@pytest.fixture(scope="module")
def scripted(tmp_path_factory):
    root = tmp_path_factory.mktemp("scripted-scorer")
    (root / "keys.json").write_text(json.dumps({"keys": [{"name": "explainer", "key": KEY, "scopes": ["read", "steer"],
                                                          "requests_per_second": 4}]}))
    explainer = _serve_scripted(tmp_path_factory.mktemp("scripted-explainer"), EXPLAINER_ANSWER)
    scorer = _serve_scripted(root, SCORER_ANSWER, api_keys_file=root / "keys.json")
    simulator = _serve_scripted(tmp_path_factory.mktemp("scripted-simulator"), SIMULATOR_ANSWER)
    yield explainer, scorer, simulator
    for running in (explainer, scorer, simulator):
        running.stop()


@pytest.fixture
def registry(tmp_path):
    copy = tmp_path / "registry"
    shutil.copytree(reference_registry_path(), copy)
    return copy


def _unparsed(scripted) -> Endpoint:
    """The scorer's model asked to explain: its answer has no [EXPLANATION]: line."""
    return Endpoint(url=f"{scripted[1].http_url}/openai/v1", explainer_model="scripted", scorer_model="scripted", api_key=KEY)


def _parsed(scripted) -> Endpoint:
    explainer, scorer, _ = scripted
    return Endpoint(url=f"{explainer.http_url}/openai/v1", explainer_model="scripted", scorer_model="scripted", api_key=KEY,
                    scorer_url=f"{scorer.http_url}/openai/v1")


def _refused(served) -> float:
    text = httpx.get(f"{served.http_url}/metrics").text
    return sum(float(v) for v in re.findall(r'^monosemantic_requests_total\{[^}]*code="429"[^}]*\} (\S+)$', text, re.M))


def test_an_explanation_that_does_not_parse_is_recorded_with_the_answer_and_the_tokens_spent(scripted, registry):
    result = explain_dictionary(registry, "reference", _unparsed(scripted), features="0-5", settings=SETTINGS, show_progress=False)
    header, features = read_run(result.path)
    assert header.explainer_model == "scripted" and header.dictionary == "reference" and header.version == 1
    assert sorted(features) == [0, 1, 2, 3, 4, 5] and result.done == 6 and result.resumed == 0
    for record in features.values():
        assert record.explanation is None and record.unparsed_answer == "[1, 0, 1,0, 1]"  # kept, not dropped
        assert record.detection is None and record.fuzzing is None  # nothing to score
        assert record.shown > 6 and record.usage["explain"].requests == 1  # 6 top examples and half the interval samples
        assert record.usage["explain"].prompt_tokens > 100
    assert result.usage.requests == 6 and result.parsed == 0
    assert result.path.parent == registry / "reference" / "explanations" / "v1"
    assert not (registry / "reference" / "v1" / "explanations").exists()  # the sealed version is untouched


def test_a_parsed_explanation_is_scored_by_detection_and_fuzzing_through_a_rate_limited_key(scripted, registry):
    _, scorer, _ = scripted
    before = _refused(scorer)
    endpoint = _parsed(scripted)
    result = explain_dictionary(registry, "reference", endpoint, features="0-3", settings=SETTINGS, show_progress=False)
    header, features = read_run(result.path)
    assert header.scorer_endpoint == endpoint.scorer_url and result.parsed == 4
    assert _refused(scorer) > before  # the key's rate was exceeded, and the SDK's retries still finished every feature
    for record in features.values():
        assert record.explanation == "fires on x" and record.unparsed_answer is None
        for kind in ("detection", "fuzzing"):
            scored, spent = getattr(record, kind), record.usage[kind]
            trials = scored.examples + scored.unparsed
            # Five trials a prompt: every full prompt's answer ([1, 0, 1, 0, 1]) parses, a short last one's cannot.
            assert scored.examples == 5 * (trials // 5) and scored.unparsed == trials % 5
            assert spent.requests == -(-trials // 5) and spent.prompt_tokens > 50 * spent.requests
            assert 0.0 <= scored.balanced_accuracy <= 1.0
        assert record.detection.examples + record.detection.unparsed == 2 * (record.fuzzing.examples + record.fuzzing.unparsed)
        # The label lists do not answer a simulation: every simulated example is unparsed, none is dropped.
        assert record.simulation.examples == 0 and record.simulation.unparsed == record.usage["simulation"].requests == 6
        assert record.simulation.correlation is None
    # Served from where the run left it, with its scores.
    running = RunningServer(registry=registry, dictionary="reference")
    try:
        with RestClient(running.http_url) as rest:
            shown = rest.feature(2).explanations[0]
            assert shown.explanation == "fires on x" and shown.detection.examples == features[2].detection.examples
            assert rest.dictionaries().dictionaries[0].explained == 4
    finally:
        running.stop()


def test_the_simulation_scorer_correlates_its_predictions_with_the_true_activations(scripted, registry, reference_model):
    from monosemantic.explain import correlation, feature_examples, split_examples

    explainer, _, simulator = scripted
    endpoint = Endpoint(url=f"{explainer.http_url}/openai/v1", explainer_model="scripted", scorer_model="scripted",
                        scorer_url=f"{simulator.http_url}/openai/v1")
    result = explain_dictionary(registry, "reference", endpoint, features="0-1", settings=SETTINGS, show_progress=False)
    from monosemantic.artifact import load_dictionary

    statistics = load_dictionary(registry, "reference", 1).statistics
    for feature, record in read_run(result.path)[1].items():
        simulation = record.simulation
        assert simulation.examples == 6 and simulation.unparsed == 0  # 4 activating and 2 silent windows, all answered
        assert record.detection.examples == 0  # the simulator's lines are not label lists
        # Its answer is the same twelve predictions for every window (a window clipped at its context's start takes
        # the first ones): r against the true activations of the windows it was shown.
        scored = split_examples(*feature_examples(statistics, feature, reference_model.token_text), 6).scored
        shown = [e for e, _ in scored[::max(1, len(scored) // 4)][:4]]
        truth = [a for e in shown for a in e.activations] + [0.0] * (simulation.tokens - sum(len(e.tokens) for e in shown))
        predicted = [float((3 * n) % 11) for e in shown for n in range(1, len(e.tokens) + 1)]
        predicted += [float((3 * n) % 11) for _ in range(2) for n in range(1, 13)]  # the silent windows: 12 tokens each
        assert simulation.tokens == len(truth) == len(predicted)
        assert simulation.correlation == pytest.approx(correlation(truth, predicted), abs=1e-9)


def test_a_second_run_continues_where_the_first_stopped(scripted, registry):
    first = explain_dictionary(registry, "reference", _unparsed(scripted), features="0-2", settings=SETTINGS, show_progress=False)
    lines = first.path.read_bytes()
    again = explain_dictionary(registry, "reference", _unparsed(scripted), features="0-4", settings=SETTINGS, show_progress=False)
    assert (again.done, again.resumed) == (2, 3) and again.path == first.path
    assert again.path.read_bytes().startswith(lines)  # what was done is kept as written
    assert sorted(read_run(again.path)[1]) == [0, 1, 2, 3, 4]


def test_a_run_killed_mid_line_resumes_from_its_last_whole_line(scripted, registry):
    first = explain_dictionary(registry, "reference", _unparsed(scripted), features="0-1", settings=SETTINGS, show_progress=False)
    with first.path.open("ab") as f:
        f.write(b'{"feature": 7, "explanation": nu')  # a write cut off by a kill
    assert sorted(read_run(first.path)[1]) == [0, 1]
    again = explain_dictionary(registry, "reference", _unparsed(scripted), features="0-2", settings=SETTINGS, show_progress=False)
    assert (again.done, again.resumed) == (1, 2)
    assert [sorted(features) for _, features in list_runs(registry, "reference", 1)] == [[0, 1, 2]]


def test_another_scorer_model_is_another_run_kept_beside_the_first(scripted, registry):
    explain_dictionary(registry, "reference", _unparsed(scripted), features="3", settings=SETTINGS, show_progress=False)
    other = _unparsed(scripted)
    other.scorer_model = "another-scorer"  # never asked: nothing parses, so nothing is scored
    explain_dictionary(registry, "reference", other, features="3", settings=SETTINGS, show_progress=False)
    assert sorted(h.scorer_model for h, _ in list_runs(registry, "reference", 1)) == ["another-scorer", "scripted"]


@pytest.mark.parametrize("options, named", [
    (["--features", "0-99999"], "--features"),
    (["--features", "a-b"], "--features"),
    ([], "--features, --sample and --all"),
    (["--features", "1", "--all"], "--features, --sample and --all"),
    (["--sample", "0"], "--sample"),
    (["--features", "1", "--api-key-env", "MONOSEMANTIC_TEST_UNSET_KEY"], "MONOSEMANTIC_TEST_UNSET_KEY"),
])
def test_bad_explain_options_exit_2_naming_the_option(registry, options, named):
    result = CliRunner().invoke(app, ["explain", "--registry", str(registry), "--dictionary", "reference",
                                      "--explainer-url", "http://127.0.0.1:9/v1", "--explainer-model", "m", *options])
    assert result.exit_code == 2 and named in result.output


def test_an_endpoint_that_refuses_the_connection_is_a_clear_error_not_a_traceback(registry):
    result = CliRunner().invoke(app, ["explain", "--registry", str(registry), "--dictionary", "reference", "--features", "0",
                                      "--explainer-url", "http://127.0.0.1:9/v1", "--explainer-model", "m", "--retries", "0"])
    assert result.exit_code == 2 and "http://127.0.0.1:9/v1" in result.output


def test_detections_silent_windows_are_silent_and_bounded_per_feature(registry, reference_model):
    from monosemantic.artifact import load_dictionary
    from monosemantic.bound import bind
    from monosemantic.lm import read_activations
    from trainer.explain import quiet_windows
    from trainer.pipeline import corpus_contexts

    dictionary = bind(reference_model, load_dictionary(registry, "reference", 1))
    contexts, _ = corpus_contexts(reference_model.lm.tokenizer, "heldout", 49, None, 16)
    found = quiet_windows(reference_model, dictionary, contexts, 12, [0, 1, 2, 2201], per_feature=5)
    assert all(len(windows) <= 5 for windows in found.values()) and len(found[0]) == 5
    ids = {tuple(reference_model.token_text(int(t)) for t in row[1:][lo:lo + 12]): (r, lo) for r, row in enumerate(contexts) for lo in range(0, 48, 12)}
    x = read_activations(reference_model.lm, contexts, dictionary.hook, attention_mask=torch.ones_like(contexts))[:, 1:].float()
    codes = dictionary.sae.encode(x.reshape(-1, x.shape[-1])).reshape(x.shape[0], x.shape[1], -1)
    for feature, windows in found.items():
        for window in windows:
            r, lo = ids[window.tokens]
            assert float(codes[r, lo:lo + 12, feature].max()) <= 0  # silent on every token of it


def test_a_prompt_the_endpoint_refuses_records_the_feature_as_refused_with_the_reason_and_goes_on(tmp_path, registry):
    short = _serve_scripted(tmp_path, EXPLAINER_ANSWER, max_tokens=64)  # a context shorter than any prompt
    try:
        endpoint = Endpoint(url=f"{short.http_url}/openai/v1", explainer_model="scripted", scorer_model="scripted")
        result = explain_dictionary(registry, "reference", endpoint, features="0-2", settings=SETTINGS, show_progress=False)
        records = read_run(result.path)[1]
        assert result.done == 3 and result.skipped == 3 and sorted(records) == [0, 1, 2]
        assert all(r.explanation is None and "refused" in r.skipped and "64" in r.skipped for r in records.values())
    finally:
        short.stop()
