"""The OpenAI-compatible API, driven by the real `openai` SDK (max_retries=0) against the real server on loopback, and
checked against the service's own /v1/generate for the same seed and steering."""

from __future__ import annotations

import asyncio
import json
import shutil

import httpx
import openai
import pytest

from conftest import RunningServer, tiny_llama
from monosemantic.artifact import HookRef, ModelRef, publish
from monosemantic.client import RestClient
from monosemantic.lm import load_lm, resolve_hook
from monosemantic.sae import SAEConfig, build_sae
from monosemantic.shipped import REFERENCE_DICTIONARY, reference_registry_path

MODEL = "reference-lm"
PROMPT = "import os\nfor name in "
TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
READ_KEY, STEER_KEY = "read-only-key-0123456789", "steering-key-0123456789"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("openai")
    (root / "template.jinja").write_text(TEMPLATE)
    running = RunningServer(dictionary=REFERENCE_DICTIONARY, sae_dtype="float32", max_new_tokens=200)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client(served):
    with openai.OpenAI(base_url=f"{served.http_url}/openai/v1", api_key="anything", max_retries=0) as made:
        yield made


@pytest.fixture(scope="module")
def ours(served):
    made = RestClient(served.http_url)
    yield made
    made.close()


# ---- models ------------------------------------------------------------------------------------------------------
def test_the_served_model_is_listed_and_retrieved(client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL


def test_an_unknown_model_is_404_model_not_found(client):
    with pytest.raises(openai.NotFoundError) as caught:
        client.completions.create(model="gpt-4o", prompt="x", max_tokens=2)
    assert caught.value.code == "model_not_found" and caught.value.param == "model"


# ---- completions ---------------------------------------------------------------------------------------------------
def test_a_greedy_completion_is_the_same_text_as_v1_generate(client, ours):
    answer = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0)
    mine = ours.generate(prompt=PROMPT, max_new_tokens=12, temperature=0, seed=1)
    assert answer.choices[0].text == mine.text
    assert answer.object == "text_completion" and answer.choices[0].finish_reason == mine.finish_reason.replace("eos", "stop")


def test_a_seeded_completion_is_the_same_text_as_v1_generate(client, ours):
    answer = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=16, temperature=0.9, top_p=0.95, seed=7)
    mine = ours.generate(prompt=PROMPT, max_new_tokens=16, temperature=0.9, top_p=0.95, seed=7)
    assert answer.choices[0].text == mine.text


def test_usage_counts_the_prompt_once_and_every_generated_token(client, reference_model):
    answer = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=9, temperature=0.7, seed=3, n=2)
    prompt_tokens = 1 + len(reference_model.tokenize(PROMPT, prepend_bos=False).ids)  # with the BOS
    assert answer.usage.prompt_tokens == prompt_tokens
    assert answer.usage.completion_tokens == 18 and all(c.finish_reason == "length" for c in answer.choices)


def test_n_choices_are_indexed_reproducible_and_the_first_is_the_seed_s(client):
    many = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=1.0, seed=11, n=3)
    assert [c.index for c in many.choices] == [0, 1, 2]
    again = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=1.0, seed=11, n=3)
    assert [c.text for c in many.choices] == [c.text for c in again.choices]
    alone = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=1.0, seed=11)
    assert many.choices[0].text == alone.choices[0].text
    assert len({c.text for c in many.choices}) > 1


def test_a_list_of_prompts_gives_choices_for_each_in_order(client):
    answer = client.completions.create(model=MODEL, prompt=["def ", "class "], max_tokens=4, temperature=0, n=2)
    assert [c.index for c in answer.choices] == [0, 1, 2, 3]
    assert answer.choices[0].text == answer.choices[1].text != answer.choices[2].text == answer.choices[3].text


def test_a_stop_string_ends_the_text_before_it(client):
    plain = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=24, temperature=0).choices[0].text
    stop = plain[5:7]
    answer = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=24, temperature=0, stop=[stop])
    assert answer.choices[0].text == plain[: plain.index(stop)] and answer.choices[0].finish_reason == "stop"


def test_completion_logprobs_are_parallel_arrays(client):
    answer = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0, logprobs=3)
    lp = answer.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 6
    assert "".join(lp.tokens) == answer.choices[0].text
    assert all(len(top) == 3 and max(top.values()) == pytest.approx(v) for top, v in zip(lp.top_logprobs, lp.token_logprobs))
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(6)]


def test_a_large_logit_bias_forces_its_token(client, reference_model):
    token = reference_model.tokenize(" os", prepend_bos=False).ids[0]
    answer = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5, temperature=0, logit_bias={str(token): 100})
    assert answer.choices[0].text == " os" * 5


def test_penalties_change_greedy_repetition(client):
    plain = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=24, temperature=0, logprobs=0).choices[0].logprobs.tokens
    penalised = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=24, temperature=0, logprobs=0, frequency_penalty=2.0,
                                          presence_penalty=2.0).choices[0].logprobs.tokens
    assert len(set(penalised)) > len(set(plain))


def test_streamed_completion_deltas_reassemble_the_whole_text(client):
    whole = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=16, temperature=0.8, seed=5, n=2)
    parts = {0: "", 1: ""}
    finishes = {}
    for chunk in client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=16, temperature=0.8, seed=5, n=2, stream=True):
        for c in chunk.choices:
            parts[c.index] += c.text
            if c.finish_reason:
                finishes[c.index] = c.finish_reason
    assert parts == {c.index: c.text for c in whole.choices}
    assert finishes == {c.index: c.finish_reason for c in whole.choices}


# ---- steering and features ---------------------------------------------------------------------------------------------
def test_steering_through_extra_body_is_v1_generate_s_steering(client, ours):
    steering = [{"feature": 7, "mode": "add", "value": 9.0}, {"feature": 40, "mode": "clamp", "value": 5.0}]
    answer = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0.8, seed=4, extra_body={"steering": steering})
    mine = ours.generate(prompt=PROMPT, max_new_tokens=12, temperature=0.8, seed=4, steering=steering)
    plain = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0.8, seed=4)
    assert answer.choices[0].text == mine.text != plain.choices[0].text


def test_an_add_of_zero_gives_exactly_the_unsteered_text(client):
    zero = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=16, temperature=0.9, seed=2,
                                     extra_body={"steering": [{"feature": 7, "mode": "add", "value": 0.0}]})
    plain = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=16, temperature=0.9, seed=2)
    assert zero.choices[0].text == plain.choices[0].text


def test_each_choice_reports_its_features_and_the_steering_applied(client):
    answer = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5, temperature=0,
                                       extra_body={"features_top_k": 3, "steering": [{"feature": 7, "mode": "clamp", "value": 4.0}]})
    extra = answer.choices[0].model_extra["monosemantic"]
    assert extra["dictionary"]["name"] == REFERENCE_DICTIONARY and extra["steering"][0]["feature"] == 7
    assert len(extra["tokens"]) == 5 and all(len(t["top"]) <= 3 for t in extra["tokens"])
    assert all(t["steered"][0]["after"] == pytest.approx(4.0, abs=1e-3) for t in extra["tokens"])


def test_concurrent_requests_with_different_steering_do_not_affect_each_other(served):
    async def run() -> list[str]:
        async with openai.AsyncOpenAI(base_url=f"{served.http_url}/openai/v1", api_key="x", max_retries=0) as aclient:
            async def one(value: float | None) -> str:
                extra = {"steering": [{"feature": 7, "mode": "add", "value": value}]} if value is not None else {}
                answer = await aclient.completions.create(model=MODEL, prompt=PROMPT, max_tokens=16, temperature=0.9, seed=8, extra_body=extra)
                return answer.choices[0].text
            together = await asyncio.gather(*(one(v) for v in (None, 12.0, -6.0, None, 12.0)))
            alone = [await one(v) for v in (None, 12.0, -6.0)]
            return together, alone
    together, alone = asyncio.run(run())
    assert together == [alone[0], alone[1], alone[2], alone[0], alone[1]]
    assert len(set(alone)) == 3


def test_a_bad_steering_entry_is_400_with_its_param(client):
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model=MODEL, prompt="x", max_tokens=2, extra_body={"steering": [{"feature": 999999, "mode": "add", "value": 1}]})
    assert caught.value.param == "steering[0].feature"


# ---- chat ----------------------------------------------------------------------------------------------------------
def test_chat_without_a_template_is_400_chat_template_missing(client):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
    assert caught.value.code == "chat_template_missing"


def test_chat_with_a_template_per_request_renders_it(client, ours):
    answer = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "def"}], max_completion_tokens=8, temperature=0,
                                            extra_body={"chat_template": TEMPLATE})
    rendered = "<|endoftext|><|user|>\ndef\n<|assistant|>\n"
    mine = ours.generate(prompt=rendered, max_new_tokens=8, temperature=0, prepend_bos=False)
    assert answer.choices[0].message.content == mine.text and answer.choices[0].message.role == "assistant"
    assert answer.object == "chat.completion"


def test_max_completion_tokens_wins_over_max_tokens(client):
    answer = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=3, max_completion_tokens=6,
                                            temperature=0.5, seed=1, extra_body={"chat_template": TEMPLATE})
    assert answer.usage.completion_tokens == 6 or answer.choices[0].finish_reason == "stop"


def test_chat_logprobs_have_the_content_shape(client):
    answer = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], max_completion_tokens=5, temperature=0,
                                            logprobs=True, top_logprobs=2, extra_body={"chat_template": TEMPLATE})
    content = answer.choices[0].logprobs.content
    assert "".join(c.token for c in content) == answer.choices[0].message.content
    assert all(len(c.top_logprobs) == 2 and c.top_logprobs[0].logprob == pytest.approx(c.logprob) for c in content)


def test_a_streamed_chat_starts_with_the_role_ends_with_usage_and_reassembles(client):
    kwargs = dict(model=MODEL, messages=[{"role": "user", "content": "def"}], max_completion_tokens=10, temperature=0.8, seed=9,
                  extra_body={"chat_template": TEMPLATE})
    whole = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len({c.id for c in chunks}) == 1
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


@pytest.mark.parametrize("field, value", [("tools", [{"type": "function", "function": {"name": "f", "parameters": {}}}]),
                                          ("response_format", {"type": "json_object"})])
def test_what_cannot_be_honoured_is_400_naming_the_field(client, field, value):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], extra_body={"chat_template": TEMPLATE, field: value})
    assert caught.value.param.startswith(field)


def test_an_unknown_field_is_refused_not_ignored(served):
    response = httpx.post(f"{served.http_url}/openai/v1/completions", json={"model": MODEL, "prompt": "x", "controller": {"nudge": 1}})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "controller" and response.headers["x-should-retry"] == "false"


def test_calls_are_counted_as_the_openai_protocol(served, client):
    client.completions.create(model=MODEL, prompt="x", max_tokens=1)
    text = httpx.get(f"{served.http_url}/metrics").text
    assert 'monosemantic_requests_total{code="200",method="completions",protocol="openai"}' in text


def _metric(served, name):
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(httpx.get(f"{served.http_url}/metrics").text):
        for sample in family.samples:
            if sample.name == name:
                return sample.value
    return None


def test_a_client_that_leaves_mid_stream_stops_the_generation(served, client):
    import time

    stream = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=48, temperature=0.9, seed=1, stream=True)
    next(iter(stream))
    stream.close()
    deadline = time.time() + 10
    while _metric(served, "monosemantic_inflight_requests") != 0 and time.time() < deadline:
        time.sleep(0.05)
    generated = _metric(served, "monosemantic_tokens_generated_total")
    time.sleep(0.5)
    assert _metric(served, "monosemantic_tokens_generated_total") == generated


def test_an_error_after_the_stream_started_is_an_in_band_error_frame_then_done(served):
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 200, "temperature": 0.9, "seed": 1, "stream": True, "n": 8}
    with httpx.stream("POST", f"{served.http_url}/openai/v1/completions", json=body, headers={"X-Request-Timeout": "0.3"}, timeout=30) as response:
        assert response.status_code == 200
        frames = [line[len("data: "):] for line in response.iter_lines() if line.startswith("data: ")]
    assert frames[-1] == "[DONE]"
    error = json.loads(frames[-2])["error"]
    assert error["code"] == "deadline_exceeded" and error["type"] == "timeout_error"


def test_the_sdk_raises_on_an_in_band_error(served, client):
    with pytest.raises(openai.APIError):
        for _ in client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=200, temperature=0.9, seed=1, n=8, stream=True,
                                           extra_headers={"X-Request-Timeout": "0.3"}):
            pass


# ---- a model with its own chat template; a template given at startup; keys ------------------------------------------
@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    root = tmp_path_factory.mktemp("llama-chat")
    lm = load_lm(tiny_llama(root / "model", chat_template=TEMPLATE))
    point = resolve_hook(lm, "blocks.1.mlp.hook_post")
    sae = build_sae(SAEConfig.build(architecture="relu", d_in=128, d_sae=256), seed=1)
    publish(root / "registry", "neurons", sae, model=ModelRef(name="tiny-llama", checksum=lm.checksum),
            hook=HookRef(name=point.name, module_path=point.module_path, alias=point.alias, kind=point.kind))
    running = RunningServer(model=str(root / "model"), registry=root / "registry", dictionary="neurons", sae_dtype="float32")
    yield running
    running.stop()


def test_chat_uses_the_tokenizer_s_own_template(llama):
    with openai.OpenAI(base_url=f"{llama.http_url}/openai/v1", api_key="x", max_retries=0) as made:
        answer = made.chat.completions.create(model="model", messages=[{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
                                              max_completion_tokens=4, temperature=0)
    with RestClient(llama.http_url) as mine:
        expected = mine.generate(prompt="<|endoftext|><|system|>\nbe brief\n<|user|>\nhi\n<|assistant|>\n", max_new_tokens=4, temperature=0,
                                 prepend_bos=False)
    assert answer.choices[0].message.content == expected.text and answer.model == "model"


def test_a_template_given_at_startup_serves_chat_on_the_reference(tmp_path):
    (tmp_path / "t.jinja").write_text(TEMPLATE)
    running = RunningServer(dictionary=REFERENCE_DICTIONARY, chat_template=tmp_path / "t.jinja", openai_model_id="ref")
    try:
        with openai.OpenAI(base_url=f"{running.http_url}/openai/v1", api_key="x", max_retries=0) as made:
            answer = made.chat.completions.create(model="ref", messages=[{"role": "user", "content": "def"}], max_completion_tokens=3, temperature=0)
        assert answer.choices[0].finish_reason in ("length", "stop") and answer.model == "ref"
    finally:
        running.stop()


def test_keys_and_scopes_apply_as_on_v1(tmp_path):
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({"keys": [{"name": "reader", "key": READ_KEY, "scopes": ["read"]},
                                         {"name": "steerer", "key": STEER_KEY, "scopes": ["read", "steer"], "requests_per_second": 0.2}]}))
    shutil.copy(keys, tmp_path / "keys-copy.json")
    running = RunningServer(dictionary=REFERENCE_DICTIONARY, api_keys_file=keys, registry=reference_registry_path())
    url = f"{running.http_url}/openai/v1"
    steer = {"steering": [{"feature": 7, "mode": "add", "value": 2.0}]}
    try:
        with openai.OpenAI(base_url=url, api_key="not-a-key-at-all-000", max_retries=0) as wrong, pytest.raises(openai.AuthenticationError):
            wrong.completions.create(model=MODEL, prompt="x", max_tokens=1)
        with openai.OpenAI(base_url=url, api_key=READ_KEY, max_retries=0) as reader:
            assert reader.completions.create(model=MODEL, prompt="x", max_tokens=1).choices
            with pytest.raises(openai.PermissionDeniedError):
                reader.completions.create(model=MODEL, prompt="x", max_tokens=1, extra_body=steer)
        with openai.OpenAI(base_url=url, api_key=STEER_KEY, max_retries=0) as steerer:
            steerer.completions.create(model=MODEL, prompt="x", max_tokens=1, extra_body=steer)
            with pytest.raises(openai.RateLimitError) as caught:
                for _ in range(3):
                    steerer.completions.create(model=MODEL, prompt="x", max_tokens=1)
            assert "retry-after" in caught.value.response.headers
    finally:
        running.stop()


def test_a_chat_template_file_that_cannot_be_read_stops_startup_naming_the_setting(tmp_path):
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-m", "service.cli", "--chat-template", str(tmp_path / "missing.jinja"), "--http-port", "0", "--grpc-port", "0"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 1 and "MONOSEMANTIC_CHAT_TEMPLATE: cannot read" in run.stderr


def test_langchain_s_openai_clients_work_unchanged(tmp_path):
    from langchain_openai import ChatOpenAI, OpenAI

    (tmp_path / "t.jinja").write_text("{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}")
    running = RunningServer(dictionary=REFERENCE_DICTIONARY, chat_template=tmp_path / "t.jinja")
    try:
        base = f"{running.http_url}/openai/v1"
        chat = ChatOpenAI(base_url=base, api_key="x", model=MODEL, max_retries=0, temperature=0, max_completion_tokens=8,
                          extra_body={"steering": [{"feature": 7, "mode": "add", "value": 6.0}]})
        said = chat.invoke("import os").content
        assert said and "".join(part.content for part in chat.stream("import os")) == said
        plain = OpenAI(base_url=base, api_key="x", model=MODEL, max_retries=0, temperature=0, max_tokens=8)
        with RestClient(running.http_url) as mine:
            assert plain.invoke("import os") == mine.generate(prompt="import os", max_new_tokens=8, temperature=0).text
    finally:
        running.stop()


def test_more_generations_than_one_request_may_hold_are_refused_naming_n(client):
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model=MODEL, prompt=["x"] * 20, max_tokens=1, n=8)
    assert caught.value.param == "n"


def test_chat_content_may_be_a_list_of_text_parts(client):
    parts = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": [{"type": "text", "text": "de"}, {"type": "text", "text": "f"}]}],
                                           max_completion_tokens=4, temperature=0, extra_body={"chat_template": TEMPLATE})
    whole = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "def"}], max_completion_tokens=4, temperature=0,
                                           extra_body={"chat_template": TEMPLATE})
    assert parts.choices[0].message.content == whole.choices[0].message.content


def test_an_image_part_is_refused_naming_it(client):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
                                       extra_body={"chat_template": TEMPLATE})
    assert caught.value.param.startswith("messages[0].content")


@pytest.mark.parametrize("prompt, param", [([], "prompt"), ([5, 99999], "prompt[1]")])
def test_an_empty_prompt_or_a_token_outside_the_vocabulary_is_400_on_prompt(client, prompt, param):
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model=MODEL, prompt=prompt, max_tokens=2)
    assert caught.value.param == param


def test_token_ids_are_continued_as_they_are(client, ours, reference_model):
    ids = [reference_model.bos_id, *reference_model.tokenize(PROMPT, prepend_bos=False).ids]
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=8, temperature=0)
    by_text = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0)
    assert by_ids.choices[0].text == by_text.choices[0].text
