"""The Neuronpedia-compatible API, driven by Neuronpedia's own published client (neuronpedia-inference-client) against
the real server on loopback, and checked against the service's own /v1 answers for the same text."""

from __future__ import annotations

import shutil

import httpx
import neuronpedia_inference_client as npc
import pytest
import torch

from conftest import RunningServer
from monosemantic.artifact import HookRef, load_dictionary, publish
from monosemantic.bound import load_bound
from monosemantic.client import RestClient
from monosemantic.lm import read_activations, resolve_hook
from monosemantic.model import load_model
from monosemantic.sae import SAEConfig, build_sae
from monosemantic.shipped import REFERENCE_DICTIONARY, reference_lm_path, reference_registry_path

SECRET = "a-neuronpedia-secret"
MODEL_ID = "reference-lm"
TEXT = "import os\nfor name in os.listdir(path):\n    print(name)\n"
REF_SOURCE = f"0-{REFERENCE_DICTIONARY}"


@pytest.fixture(scope="module")
def model():
    return load_model(str(reference_lm_path()))


@pytest.fixture(scope="module")
def registry(tmp_path_factory, model):
    """The shipped `reference` and `resid`, a second dictionary at the residual stream after block 0."""
    root = tmp_path_factory.mktemp("neuronpedia")
    shutil.copytree(reference_registry_path() / REFERENCE_DICTIONARY, root / REFERENCE_DICTIONARY)
    m = load_dictionary(root, REFERENCE_DICTIONARY, 1).manifest
    point = resolve_hook(model.lm, "blocks.0.hook_resid_post")
    sae = build_sae(SAEConfig.build(architecture="relu", d_in=128, d_sae=256), seed=3)
    with torch.no_grad():
        sae.b_enc.fill_(0.05)
    publish(root, "resid", sae, model=m.model, hook=HookRef(name=point.name, module_path=point.module_path, alias=point.alias, kind=point.kind))
    return root


@pytest.fixture(scope="module")
def served(registry):
    running = RunningServer(registry=registry, dictionaries=[REFERENCE_DICTIONARY, "resid"], sae_dtype="float32", max_new_tokens=32,
                            neuronpedia_secret=SECRET)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def api(served):
    config = npc.Configuration(host=f"{served.http_url}/neuronpedia/v1")
    config.api_key["SimpleSecretAuth"] = SECRET
    with npc.ApiClient(config) as client:
        yield npc.DefaultApi(client)


@pytest.fixture(scope="module")
def ours(served):
    client = RestClient(served.http_url)
    yield client
    client.close()


def _post(served, path: str, body: dict, secret: str | None = SECRET, **headers) -> httpx.Response:
    if secret is not None:
        headers["X-SECRET-KEY"] = secret
    return httpx.post(f"{served.http_url}/neuronpedia/v1/{path}", json=body, headers=headers, timeout=60)


def _all(api, **fields):
    request = {"prompt": TEXT, "model": MODEL_ID, "source_set": REFERENCE_DICTIONARY, "selected_sources": [], "sort_by_token_indexes": [],
               "ignore_bos": False, "num_results": 10, **fields}
    return api.activation_all_post(npc.ActivationAllPostRequest(**request))


# ---- who ---------------------------------------------------------------------------------------------------------
def test_health_answers_without_a_secret(served):
    response = httpx.get(f"{served.http_url}/neuronpedia/health")
    assert response.status_code == 200 and response.json() == {"status": "healthy"}


@pytest.mark.parametrize("secret", [None, "wrong-secret"])
def test_a_missing_or_wrong_secret_is_401_with_an_error_string(served, secret):
    response = _post(served, "tokenize", {"model": MODEL_ID, "text": "hi"}, secret=secret)
    assert response.status_code == 401
    assert response.json() == {"error": "Invalid or missing X-SECRET-KEY header"}


def test_the_client_with_a_wrong_secret_sees_401(served):
    config = npc.Configuration(host=f"{served.http_url}/neuronpedia/v1")
    config.api_key["SimpleSecretAuth"] = "not-it"
    with npc.ApiClient(config) as client, pytest.raises(npc.ApiException) as caught:
        npc.DefaultApi(client).tokenize_post(npc.TokenizePostRequest(model=MODEL_ID, text="hi"))
    assert caught.value.status == 401


def test_the_v1_api_keeps_its_own_keys_and_is_not_opened_by_the_secret(served):
    response = httpx.post(f"{served.http_url}/v1/activations", json={"text": "hi"}, headers={"X-SECRET-KEY": SECRET})
    assert response.status_code == 200  # no /v1 keys configured: open, as before; the secret changes nothing there
    assert "error" not in response.json()


def test_capabilities_name_the_model_its_sets_and_sources(api, served):
    response = httpx.get(f"{served.http_url}/neuronpedia/v1/capabilities", headers={"X-SECRET-KEY": SECRET}).json()
    assert response["model"] == MODEL_ID
    assert response["sae_sets"] == sorted([REFERENCE_DICTIONARY, "resid"])
    assert set(response["sources"]) == {REF_SOURCE, "0-resid"}
    assert response["endpoints"]["steer_completion"] is True


# ---- activation/all ----------------------------------------------------------------------------------------------
def test_all_gives_the_same_features_and_values_as_our_activations(api, ours):
    answer = _all(api)
    ids = [a.index for a in answer.activations]
    mine = ours.activations(text=TEXT, feature_ids=ids)
    assert answer.tokens == [t.text for t in mine.tokens]  # the BOS included
    for column, feature in enumerate(answer.activations):
        assert feature.source == REF_SOURCE
        assert feature.values == [t.values[column] for t in mine.tokens]
        assert feature.max_value == max(feature.values)
        assert feature.max_value_index == feature.values.index(feature.max_value)


def test_all_ranks_by_max_value_stably_with_ties_by_index(api, reference_dictionary, model):
    answer = _all(api, num_results=200)
    keys = [(-a.max_value, a.index) for a in answer.activations]
    assert keys == sorted(keys)
    # nothing stronger was left out: the 200th's max is at least every other feature's
    ids = torch.tensor([model.bos_id, *model.tokenize(TEXT, prepend_bos=False).ids])
    features = reference_dictionary.sae.encode(read_activations(model.lm, ids[None], reference_dictionary.hook)[0])
    best = features.max(0).values.sort(descending=True).values
    assert answer.activations[-1].max_value == pytest.approx(float(best[199]), abs=1e-5)


def test_all_ranks_by_the_sum_at_the_given_token_indexes(api):
    answer = _all(api, sort_by_token_indexes=[3, 4], num_results=30)
    sums = [f.values[3] + f.values[4] for f in answer.activations]
    assert sums == sorted(sums, reverse=True)
    assert [f.sum_values for f in answer.activations] == pytest.approx(sums, abs=1e-5)


def test_ignore_bos_zeroes_the_bos_column(api):
    answer = _all(api, ignore_bos=True, num_results=50)
    assert all(f.values[0] == 0 for f in answer.activations)
    assert all(f.max_value_index > 0 for f in answer.activations if f.max_value > 0)


def test_num_results_caps_the_answer(api):
    assert len(_all(api, num_results=3).activations) == 3


def test_selected_sources_across_a_set_and_a_source_outside_it_is_400(api):
    with pytest.raises(npc.ApiException) as caught:
        _all(api, selected_sources=["0-resid"])
    assert caught.value.status == 400 and "not in the source set" in caught.value.body


@pytest.mark.parametrize("field, value, words", [
    ("model", "gpt2-small", "unknown model"),
    ("source_set", "res-jb", "unknown source set"),
    ("selected_sources", ["5-reference"], "unknown source"),
    ("sort_by_token_indexes", [999], "out of range"),
])
def test_unknown_names_and_bad_positions_are_400_with_an_error_string(served, field, value, words):
    body = {"prompt": TEXT, "model": MODEL_ID, "source_set": REFERENCE_DICTIONARY, "selected_sources": [], "sort_by_token_indexes": [],
            "ignore_bos": False, field: value}
    response = _post(served, "activation/all", body)
    assert response.status_code == 400
    assert set(response.json()) == {"error"} and words in response.json()["error"]


def test_a_body_off_the_schema_is_422_with_an_error_string_naming_the_field(served):
    response = _post(served, "activation/all", {"prompt": TEXT, "model": MODEL_ID, "ignore_bos": "perhaps"})
    assert response.status_code == 422
    assert "source_set" in response.json()["error"] or "sourceSet" in response.json()["error"]


def test_all_batch_answers_each_prompt_as_alone(api):
    prompts = [TEXT, "def f(x):\n    return x\n"]
    batch = api.activation_all_batch_post(npc.ActivationAllBatchPostRequest(
        prompts=prompts, model=MODEL_ID, source_set="resid", selected_sources=[], sort_by_token_indexes=[], ignore_bos=True, num_results=5))
    for prompt, result in zip(prompts, batch.results):
        alone = _all(api, prompt=prompt, source_set="resid", ignore_bos=True, num_results=5)
        # The batch runs padded together, so values agree to fp32 rounding (a CPU's kernel may sum in another order),
        # and everything else exactly.
        assert result.tokens == alone.tokens
        assert [(f.source, f.index, f.max_value_index) for f in result.activations] == \
            [(f.source, f.index, f.max_value_index) for f in alone.activations]
        for got, want in zip(result.activations, alone.activations):
            assert got.values == pytest.approx(want.values, abs=1e-5)
            assert got.max_value == pytest.approx(want.max_value, abs=1e-5)


# ---- activation/single, topk-by-token, source --------------------------------------------------------------------
def test_single_drops_the_bos_so_its_indices_are_one_lower(api, ours):
    answer = api.activation_single_post(npc.ActivationSinglePostRequest(prompt=TEXT, model=MODEL_ID, source=REF_SOURCE, index="7"))
    mine = ours.activations(text=TEXT, feature_ids=[7])
    assert answer.activation.values == [t.values[0] for t in mine.tokens][1:]
    assert answer.tokens == [t.text for t in mine.tokens][1:]
    assert answer.tokens_is_special == [False] * len(answer.tokens)
    assert answer.activation.max_value_index == answer.activation.values.index(answer.activation.max_value)


def test_single_by_vector_is_the_activation_at_the_hook_dotted_with_it(api, model):
    vector = [((i % 7) - 3) / 10 for i in range(128)]
    answer = api.activation_single_post(npc.ActivationSinglePostRequest(prompt=TEXT, model=MODEL_ID, vector=vector, hook="blocks.0.hook_resid_post"))
    ids = model.tokenize(TEXT, prepend_bos=False).ids
    x = read_activations(model.lm, torch.tensor([ids]), resolve_hook(model.lm, "blocks.0.hook_resid_post"))[0]
    assert answer.activation.values == pytest.approx((x @ torch.tensor(vector)).tolist(), abs=1e-4)


def test_single_needs_exactly_one_of_feature_and_vector(served):
    response = _post(served, "activation/single", {"prompt": TEXT, "model": MODEL_ID})
    assert response.status_code == 400 and "exactly one" in response.json()["error"]


def test_single_batch_equals_single(api):
    prompts = ["a = 1\n", "print(a)\n"]
    batch = api.activation_single_batch_post(npc.ActivationSingleBatchPostRequest(prompts=prompts, model=MODEL_ID, source="0-resid", index="4"))
    for prompt, result in zip(prompts, batch.results):
        alone = api.activation_single_post(npc.ActivationSinglePostRequest(prompt=prompt, model=MODEL_ID, source="0-resid", index="4"))
        assert (result.tokens, result.activation.max_value_index) == (alone.tokens, alone.activation.max_value_index)
        assert result.activation.values == pytest.approx(alone.activation.values, abs=1e-5)  # padded together: fp32 rounding


def test_topk_by_token_positions_count_from_the_bos_and_match_our_top_features(api, ours):
    answer = api.activation_topk_by_token_post(npc.ActivationTopkByTokenPostRequest(prompt=TEXT, model=MODEL_ID, source=REF_SOURCE, top_k=4, ignore_bos=False))
    mine = ours.activations(text=TEXT, top_k=4)
    assert [r.token_position for r in answer.results] == list(range(len(mine.tokens)))
    for result, token in zip(answer.results, mine.tokens):
        assert [(f.feature_index, f.activation_value) for f in result.top_features] == [(f.feature, f.value) for f in token.top]
    assert answer.results[0].is_special is True  # the BOS


def test_topk_by_token_ignore_bos_drops_its_row_but_keeps_positions(api):
    answer = api.activation_topk_by_token_post(npc.ActivationTopkByTokenPostRequest(prompt=TEXT, model=MODEL_ID, source=REF_SOURCE, ignore_bos=True))
    assert answer.results[0].token_position == 1 and len(answer.tokens) == len(answer.results)
    assert all(len(r.top_features) <= 5 for r in answer.results)  # the default top_k


def test_source_gives_every_active_feature_after_the_bos_rounded(api, ours):
    answer = api.activation_source_post(npc.ActivationSourcePostRequest(prompts=[TEXT], model=MODEL_ID, source=REF_SOURCE))
    mine = ours.activations(text=TEXT, top_k=100)
    expected: dict[str, list[list[float]]] = {}
    for t, token in enumerate(mine.tokens):
        if t == 0:
            continue
        for f in sorted(token.top, key=lambda f: f.feature):
            expected.setdefault(str(f.feature), []).append([t, round(f.value, 3)])
    got = answer.results[0].active_features
    assert {k: sorted(v) for k, v in got.items()} == {k: sorted(v) for k, v in expected.items()}


def test_source_takes_at_most_four_prompts(served):
    response = _post(served, "activation/source", {"prompts": ["a"] * 5, "model": MODEL_ID, "source": REF_SOURCE})
    assert response.status_code == 422 and "prompts" in response.json()["error"]


# ---- tokenize, util ------------------------------------------------------------------------------------------------
def test_tokenize_prepends_the_bos_unless_told_not_to(api, model):
    with_bos = api.tokenize_post(npc.TokenizePostRequest(model=MODEL_ID, text="print(x)"))
    without = api.tokenize_post(npc.TokenizePostRequest(model=MODEL_ID, text="print(x)", prepend_bos=False))
    assert with_bos.tokens == [model.bos_id, *without.tokens] and with_bos.prepend_bos and not without.prepend_bos
    assert "".join(without.token_strings) == "print(x)"


def test_sae_vector_is_the_encoder_column_in_raw_units(api, registry, model):
    answer = api.util_sae_vector_post(npc.UtilSaeVectorPostRequest(model=MODEL_ID, source=REF_SOURCE, index=11))
    sae = load_bound(model, registry, REFERENCE_DICTIONARY, None).sae
    assert answer.vector == pytest.approx((sae.W_enc[:, 11] * sae.cfg.input_scale).tolist(), rel=1e-6)
    assert answer.hook_name == "blocks.0.mlp.hook_post"


def test_decoder_cossim_finds_the_feature_itself_first_and_compares_across_dictionaries(api, registry, model):
    feature = npc.NPFeature(model=MODEL_ID, source="0-resid", index=9)
    same = api.util_sae_topk_by_decoder_cossim_post(npc.UtilSaeTopkByDecoderCossimPostRequest(feature=feature, model=MODEL_ID, source="0-resid", num_results=5))
    first = same.topk_decoder_cossim_features[0]
    assert (first.feature.index, first.cosine_similarity) == (9, pytest.approx(1.0, abs=1e-5))
    sae = load_bound(model, registry, "resid", None).sae
    cosines = torch.nn.functional.cosine_similarity(sae.W_dec, sae.W_dec[9][None], dim=1)
    assert [f.feature.index for f in same.topk_decoder_cossim_features] == cosines.topk(5).indices.tolist()


def test_decoder_cossim_of_a_vector_of_the_wrong_width_is_400(served):
    response = _post(served, "util/sae-topk-by-decoder-cossim", {"vector": [1.0, 2.0], "model": MODEL_ID, "source": REF_SOURCE, "num_results": 3})
    assert response.status_code == 400 and "wide" in response.json()["error"]


# ---- spelling ----------------------------------------------------------------------------------------------------
def test_a_camel_case_request_is_answered_in_camel_case(served):
    response = _post(served, "activation/all", {"prompt": TEXT, "model": MODEL_ID, "sourceSet": REFERENCE_DICTIONARY, "selectedSources": [],
                                                "sortByTokenIndexes": [], "ignoreBos": True, "numResults": 2})
    assert response.status_code == 200
    first = response.json()["activations"][0]
    assert {"maxValue", "maxValueIndex", "sumValues"} <= set(first) and "max_value" not in first


def test_a_snake_case_request_is_answered_in_snake_case(served):
    response = _post(served, "activation/topk-by-token", {"prompt": TEXT, "model": MODEL_ID, "source": REF_SOURCE, "ignore_bos": False})
    first = response.json()["results"][0]
    assert {"token_position", "is_special", "top_features"} <= set(first)


def test_without_multi_word_fields_the_published_client_gets_snake_and_others_camel(served):
    body = {"model": MODEL_ID, "text": "x = 1"}
    assert "token_strings" in _post(served, "tokenize", body, **{"User-Agent": "OpenAPI-Generator/1.10.1/python"}).json()
    assert "tokenStrings" in _post(served, "tokenize", body, **{"User-Agent": "node-fetch"}).json()


def test_source_keeps_active_features_spelled_as_the_client_reads_it_in_both(served):
    for body in ({"prompts": ["x = 1"], "model": MODEL_ID, "source": REF_SOURCE}, {"prompts": ["x = 1"], "model": MODEL_ID, "source": REF_SOURCE}):
        for agent in ("OpenAPI-Generator/1.10.1/python", "node-fetch"):
            assert "activeFeatures" in _post(served, "activation/source", body, **{"User-Agent": agent}).json()["results"][0]


# ---- accounting ----------------------------------------------------------------------------------------------------
def test_calls_are_counted_in_the_request_metrics_by_status(served, api):
    api.tokenize_post(npc.TokenizePostRequest(model=MODEL_ID, text="counted"))
    _post(served, "tokenize", {"model": "nope", "text": "x"})
    text = httpx.get(f"{served.http_url}/metrics").text
    assert 'monosemantic_requests_total{code="200",method="tokenize",protocol="neuronpedia"}' in text
    assert 'monosemantic_requests_total{code="400",method="tokenize",protocol="neuronpedia"}' in text


def test_an_oversized_body_is_413_in_neuronpedia_s_error_shape(served):
    response = _post(served, "tokenize", {"model": MODEL_ID, "text": "x" * (2 << 20)})
    assert response.status_code == 413 and isinstance(response.json()["error"], str)


def test_without_a_secret_the_api_is_not_mounted(registry):
    running = RunningServer(registry=registry, dictionary=REFERENCE_DICTIONARY)
    try:
        assert httpx.get(f"{running.http_url}/neuronpedia/health").status_code == 404
    finally:
        running.stop()


# ---- steer/completion --------------------------------------------------------------------------------------------
def _steer(api, features=None, vectors=None, **fields):
    request = {"prompt": "import os\n", "model": MODEL_ID, "steer_method": npc.NPSteerMethod.SIMPLE_ADDITIVE, "normalize_steering": False,
               "types": [npc.NPSteerType.STEERED, npc.NPSteerType.DEFAULT], "n_completion_tokens": 12, "temperature": 0.8,
               "strength_multiplier": 1, "freq_penalty": 0, "seed": 16, **fields}
    if features is not None:
        request["features"] = [npc.NPSteerFeature(model=MODEL_ID, source=s, index=i, strength=v) for s, i, v in features]
    if vectors is not None:
        request["vectors"] = [npc.NPSteerVector(steering_vector=v, strength=c, hook=h) for v, c, h in vectors]
    outputs = api.steer_completion_post(npc.SteerCompletionRequest(**request)).outputs
    return {o.type.value: o for o in outputs}


def test_steered_completion_equals_our_generate_with_add_steering_at_the_same_seed(api, ours):
    answer = _steer(api, features=[(REF_SOURCE, 7, 6.0), (REF_SOURCE, 40, 3.0)], strength_multiplier=1.5)
    mine = ours.generate(prompt="import os\n", max_new_tokens=12, temperature=0.8, seed=16, steer_prompt=True,
                         steering=[{"feature": 7, "mode": "add", "value": 9.0}, {"feature": 40, "mode": "add", "value": 4.5}])
    plain = ours.generate(prompt="import os\n", max_new_tokens=12, temperature=0.8, seed=16)
    assert answer["STEERED"].output == mine.text
    assert answer["DEFAULT"].output == plain.text
    assert answer["STEERED"].output != answer["DEFAULT"].output


def test_strength_zero_equals_the_default_completion(api):
    answer = _steer(api, features=[(REF_SOURCE, 7, 0.0)])
    assert answer["STEERED"].output == answer["DEFAULT"].output


def test_outputs_come_in_the_order_of_types(api):
    outputs = api.steer_completion_post(npc.SteerCompletionRequest(
        prompt="x", model=MODEL_ID, steer_method=npc.NPSteerMethod.SIMPLE_ADDITIVE, normalize_steering=False,
        types=[npc.NPSteerType.DEFAULT, npc.NPSteerType.STEERED], features=[npc.NPSteerFeature(model=MODEL_ID, source=REF_SOURCE, index=7, strength=4)],
        n_completion_tokens=4, temperature=0, strength_multiplier=1, freq_penalty=0, seed=1)).outputs
    assert [o.type.value for o in outputs] == ["DEFAULT", "STEERED"]


def test_a_raw_vector_along_the_decoder_row_steers_as_the_feature_does(api, registry, model):
    sae = load_bound(model, registry, REFERENCE_DICTIONARY, None).sae
    row = (sae.W_dec[7] / sae.cfg.input_scale).tolist()
    by_feature = _steer(api, features=[(REF_SOURCE, 7, 8.0)], types=[npc.NPSteerType.STEERED])
    by_vector = _steer(api, vectors=[(row, 8.0, "blocks.0.mlp.hook_post")], types=[npc.NPSteerType.STEERED])
    assert by_vector["STEERED"].output == by_feature["STEERED"].output


def test_normalize_steering_adds_the_unit_direction(api, registry, model):
    sae = load_bound(model, registry, REFERENCE_DICTIONARY, None).sae
    row = sae.W_dec[7] / sae.cfg.input_scale
    normalized = _steer(api, features=[(REF_SOURCE, 7, 5.0)], normalize_steering=True, types=[npc.NPSteerType.STEERED])
    scaled = _steer(api, vectors=[((row / row.norm()).tolist(), 5.0, "blocks.0.mlp.hook_post")], types=[npc.NPSteerType.STEERED])
    assert normalized["STEERED"].output == scaled["STEERED"].output


def test_orthogonal_decomposition_at_coefficient_one_and_a_cap_far_above_change_nothing(api):
    orthogonal = _steer(api, features=[(REF_SOURCE, 7, 1.0)], steer_method=npc.NPSteerMethod.ORTHOGONAL_DECOMP)
    assert orthogonal["STEERED"].output == orthogonal["DEFAULT"].output
    capped = _steer(api, features=[(REF_SOURCE, 7, 1e5)], steer_method=npc.NPSteerMethod.PROJECTION_CAP)
    assert capped["STEERED"].output == capped["DEFAULT"].output


def test_orthogonal_decomposition_at_a_large_coefficient_steers(api):
    answer = _steer(api, features=[(REF_SOURCE, 7, 40.0)], steer_method=npc.NPSteerMethod.ORTHOGONAL_DECOMP, temperature=0)
    assert answer["STEERED"].output != answer["DEFAULT"].output


def test_logprobs_are_reported_per_generated_token_when_asked(api):
    answer = _steer(api, features=[(REF_SOURCE, 7, 2.0)], n_logprobs=3, temperature=0, types=[npc.NPSteerType.DEFAULT])
    logprobs = answer["DEFAULT"].logprobs
    assert len(logprobs) == 12 and "".join(lp.token for lp in logprobs) == answer["DEFAULT"].output
    for lp in logprobs:
        assert len(lp.top_logprobs) == 3 and lp.logprob == pytest.approx(lp.top_logprobs[0].logprob)  # greedy: the top one
    assert _steer(api, features=[(REF_SOURCE, 7, 2.0)], types=[npc.NPSteerType.DEFAULT])["DEFAULT"].logprobs is None


def test_a_large_frequency_penalty_stops_greedy_repetition(api):
    plain = _steer(api, features=[(REF_SOURCE, 7, 0.0)], temperature=0, n_completion_tokens=24, types=[npc.NPSteerType.DEFAULT], n_logprobs=1)
    penalised = _steer(api, features=[(REF_SOURCE, 7, 0.0)], temperature=0, n_completion_tokens=24, types=[npc.NPSteerType.DEFAULT], n_logprobs=1,
                       freq_penalty=100)
    tokens = [lp.token for lp in penalised["DEFAULT"].logprobs]
    assert len(set(tokens)) == len(tokens)
    assert len({lp.token for lp in plain["DEFAULT"].logprobs}) < 24  # the reference repeats itself when greedy


def test_the_stream_sends_frames_each_with_the_whole_text_so_far(served, api):
    body = {"prompt": "import os\n", "model": MODEL_ID, "steerMethod": "SIMPLE_ADDITIVE", "normalizeSteering": False, "types": ["STEERED", "DEFAULT"],
            "features": [{"model": MODEL_ID, "source": REF_SOURCE, "index": 7, "strength": 6}], "nCompletionTokens": 12, "temperature": 0.8,
            "strengthMultiplier": 1, "freqPenalty": 0, "seed": 16, "stream": True}
    with httpx.stream("POST", f"{served.http_url}/neuronpedia/v1/steer/completion", json=body, headers={"X-SECRET-KEY": SECRET}, timeout=60) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        frames = [__import__("json").loads(line[len("data: "):]) for line in response.iter_lines() if line.startswith("data: ")]
    steered = [f["outputs"][0]["output"] for f in frames]
    assert all(b.startswith(a) for a, b in zip(steered, steered[1:]))  # each frame extends the last
    whole = _steer(api, features=[(REF_SOURCE, 7, 6.0)])
    assert [o["output"] for o in frames[-1]["outputs"]] == [whole["STEERED"].output, whole["DEFAULT"].output]
    assert len(frames) == 24  # one frame per generated token of each type


@pytest.mark.parametrize("fields, where", [
    ({"features": None, "vectors": None}, "exactly one"),
    ({"seed": -1}, "seed"),
    ({"n_completion_tokens": 1000}, "n_completion_tokens"),
])
def test_bad_steering_requests_are_400_naming_the_field(served, fields, where):
    body = {"prompt": "x", "model": MODEL_ID, "steer_method": "SIMPLE_ADDITIVE", "normalize_steering": False, "types": ["STEERED"],
            "features": [{"model": MODEL_ID, "source": REF_SOURCE, "index": 7, "strength": 6}], "n_completion_tokens": 4, "temperature": 0,
            "strength_multiplier": 1, "freq_penalty": 0, "seed": 1}
    body.update(fields)
    body = {k: v for k, v in body.items() if v is not None}
    response = _post(served, "steer/completion", body)
    assert response.status_code == 400 and where in response.json()["error"]


def test_a_feature_of_an_unknown_source_is_400_naming_its_place(served):
    body = {"prompt": "x", "model": MODEL_ID, "steer_method": "SIMPLE_ADDITIVE", "normalize_steering": False, "types": ["STEERED"],
            "features": [{"model": MODEL_ID, "source": "3-nowhere", "index": 7, "strength": 6}], "n_completion_tokens": 4, "temperature": 0,
            "strength_multiplier": 1, "freq_penalty": 0, "seed": 1}
    response = _post(served, "steer/completion", body)
    assert response.status_code == 400 and response.json()["error"].startswith("features[0].source")


def test_the_model_id_is_the_setting_when_given(registry, monkeypatch):
    monkeypatch.setenv("MONOSEMANTIC_NEURONPEDIA_MODEL_ID", "gpt2-small")
    monkeypatch.setenv("MONOSEMANTIC_NEURONPEDIA_SECRET", SECRET)
    running = RunningServer(registry=registry, dictionary=REFERENCE_DICTIONARY)
    try:
        assert _post(running, "tokenize", {"model": "gpt2-small", "text": "x"}).status_code == 200
        refused = _post(running, "tokenize", {"model": MODEL_ID, "text": "x"})
        assert refused.status_code == 400 and "'gpt2-small'" in refused.json()["error"]
    finally:
        running.stop()
