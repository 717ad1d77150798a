"""Generation in the service is batched across requests (service/decoder.py): concurrent requests with different
steering get exactly the answers they get alone, a stream that leaves mid-batch leaves the others intact, and a
stream holds one admission slot for its whole life, not one per step."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from monosemantic import api
from monosemantic.client import GrpcClient, RestClient

from conftest import RunningServer

PROMPT = "def main():\n    "
REQUESTS = [
    dict(prompt=PROMPT, max_new_tokens=24, temperature=0.0),  # unsteered
    dict(prompt=PROMPT, max_new_tokens=24, temperature=0.9, seed=1, steering=[{"feature": 7, "mode": "add", "value": 8.0}]),
    dict(prompt="import os\n", max_new_tokens=24, temperature=0.9, seed=2, top_p=0.9,
         steering=[{"feature": 3329, "mode": "add", "value": 4.0}, {"feature": 2508, "mode": "clamp", "value": 0.0}]),
    dict(prompt="class A:\n", max_new_tokens=24, temperature=0.0, steering=[{"feature": 100, "mode": "clamp", "value": 5.0}], steer_prompt=False),
    dict(prompt="x = ", max_new_tokens=24, temperature=0.8, seed=3, top_k=40, steering=[{"feature": 9, "mode": "add", "value": -3.0}]),
    dict(prompt=PROMPT, max_new_tokens=24, temperature=0.9, seed=4, steering=[{"feature": 2000, "mode": "clamp", "value": 10.0}],
         compare_unsteered=True),
    dict(prompt="print(", max_new_tokens=24, temperature=0.7, seed=5, stop=["\n"]),
    dict(prompt="if not ", max_new_tokens=24, temperature=0.9, seed=6, features_top_k=3,
         steering=[{"feature": 7, "mode": "add", "value": 8.0}]),
]


@pytest.fixture(scope="module")
def served():
    running = RunningServer(dictionary="reference", sae_dtype="float32")
    yield running
    running.stop()


def _texts(response: api.GenerateResponse) -> tuple:
    plain = response.unsteered
    return (response.text, [t.id for t in response.tokens], response.finish_reason,
            None if plain is None else (plain.text, [t.id for t in plain.tokens]))


def _row_steps(running) -> float:
    """Rows stepped so far, summed over decode steps (monosemantic_generation_batch_rows' sum)."""
    family = running.engine.metrics.generation_rows.collect()[0]
    return next(sample.value for sample in family.samples if sample.name.endswith("_sum"))


def test_concurrent_requests_with_different_steering_get_exactly_their_answers_alone(served):
    with RestClient(served.http_url) as client:
        alone = [_texts(client.generate(**r)) for r in REQUESTS]
    before = served.engine.metrics.generation_rows.collect()[0]
    batched_steps = lambda family: sum(s.value for s in family.samples if s.name.endswith("_bucket") and s.labels["le"] == "1.0")

    def one(request: dict) -> tuple:
        with RestClient(served.http_url) as client:
            return _texts(client.generate(**request))

    with ThreadPoolExecutor(len(REQUESTS)) as pool:
        together = list(pool.map(one, REQUESTS))
    assert together == alone
    after = served.engine.metrics.generation_rows.collect()[0]
    count = lambda family: next(s.value for s in family.samples if s.name.endswith("_count"))
    assert count(after) - batched_steps(after) > count(before) - batched_steps(before)  # steps of more than one row ran


def test_grpc_and_rest_streams_batched_together_get_their_answers_alone(served):
    request = REQUESTS[2]
    with RestClient(served.http_url) as rest:
        expected = rest.generate(**request)

    def over_grpc() -> str:
        with GrpcClient(served.grpc_target) as client:
            return next(e for e in client.generate_stream(**request) if isinstance(e, api.GenerateResponse)).text

    def over_rest() -> str:
        with RestClient(served.http_url) as client:
            return next(e for e in client.generate_stream(**request) if isinstance(e, api.GenerateResponse)).text

    with ThreadPoolExecutor(6) as pool:
        texts = [f.result() for f in [pool.submit(over_grpc) for _ in range(3)] + [pool.submit(over_rest) for _ in range(3)]]
    assert texts == [expected.text] * 6


def test_a_stream_that_leaves_mid_batch_leaves_the_others_intact(served):
    long = dict(prompt=PROMPT, max_new_tokens=120, temperature=0.9, steering=[{"feature": 7, "mode": "add", "value": 8.0}])
    with RestClient(served.http_url) as client:
        alone = [client.generate(**long, seed=s).text for s in range(3)]

    def stay(seed: int) -> str:
        with RestClient(served.http_url) as client:
            return client.generate(**long, seed=seed).text

    stepped = _row_steps(served)
    with ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(stay, s) for s in (0, 2)]
        with httpx.stream("POST", f"{served.http_url}/v1/generate", json={**long, "seed": 1, "stream": True}, timeout=30) as response:
            assert next(line for line in response.iter_lines() if line == "event: token")
        texts = [f.result() for f in futures]
    assert texts == [alone[0], alone[2]]
    deadline = time.time() + 10
    while served.engine.decoder.rows and time.time() < deadline:  # the one that left is dropped at a step
        time.sleep(0.02)
    assert served.engine.decoder.rows == 0
    assert _row_steps(served) - stepped < 2 * 119 + 60  # the two that stayed (119 decode steps each), and not all of the third


def test_a_grpc_stream_cancelled_mid_batch_leaves_the_others_intact(served):
    long = dict(prompt=PROMPT, max_new_tokens=120, temperature=0.9, steering=[{"feature": 7, "mode": "add", "value": 8.0}])
    with RestClient(served.http_url) as client:
        alone = [client.generate(**long, seed=s).text for s in (0, 2)]

    def stay(seed: int) -> str:
        with GrpcClient(served.grpc_target) as client:
            return next(e for e in client.generate_stream(**long, seed=seed) if isinstance(e, api.GenerateResponse)).text

    stepped = _row_steps(served)
    with ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(stay, s) for s in (0, 2)]
        with GrpcClient(served.grpc_target) as client:
            events = client.generate_stream(**long, seed=1)
            assert isinstance(next(events), api.GeneratedToken)
            events.close()  # cancels the call on the server
        texts = [f.result() for f in futures]
    assert texts == alone
    deadline = time.time() + 10
    while served.engine.decoder.rows and time.time() < deadline:
        time.sleep(0.02)
    assert served.engine.decoder.rows == 0
    assert _row_steps(served) - stepped < 2 * 119 + 60  # the two that stayed (119 decode steps each), and not all of the third


def test_a_stream_holds_one_admission_slot_for_its_life_and_other_requests_get_the_rest():
    running = RunningServer(dictionary="reference", max_queue=4, max_queue_wait_s=0)
    try:
        body = {"prompt": PROMPT, "max_new_tokens": 250, "temperature": 0.9, "seed": 1, "stream": True}
        with httpx.Client(base_url=running.http_url, timeout=30) as http, \
                http.stream("POST", "/v1/generate", json=body) as first, http.stream("POST", "/v1/generate", json=body) as second, \
                http.stream("POST", "/v1/generate", json=body) as third:
            for stream in (first, second, third):
                assert stream.status_code == 200
            assert running.engine._worker._admitted == 3  # three streams, one slot each, however many steps ran
            assert http.post("/v1/activations", json={"text": "import os"}).status_code == 200  # the fourth slot
            with http.stream("POST", "/v1/generate", json=body) as fourth:
                assert fourth.status_code == 200
                refused = http.post("/v1/activations", json={"text": "import os"})
            assert refused.status_code == 429 and "MONOSEMANTIC_MAX_QUEUE" in refused.text
            assert int(refused.headers["Retry-After"]) >= 1
    finally:
        running.stop()


def test_a_row_past_its_deadline_ends_alone_and_the_others_finish_as_alone(served):
    with RestClient(served.http_url) as client:
        alone = [_texts(client.generate(**r)) for r in REQUESTS[1:4]]

    def one(request: dict) -> tuple:
        with RestClient(served.http_url) as client:
            return _texts(client.generate(**request))

    def late() -> int:
        body = {"prompt": PROMPT, "max_new_tokens": 240, "temperature": 0.9, "seed": 9}
        return httpx.post(f"{served.http_url}/v1/generate", json=body, headers={"X-Request-Timeout": "0.1"}, timeout=30).status_code

    with ThreadPoolExecutor(4) as pool:
        refused = pool.submit(late)
        together = list(pool.map(one, REQUESTS[1:4]))
        assert refused.result() == 504
    assert together == alone


def test_a_stream_past_its_deadline_ends_with_an_error_event_counted_as_a_deadline_refusal(served):
    rejected = served.engine.metrics.rejected.labels("deadline")
    before = rejected._value.get()
    body = {"prompt": PROMPT, "max_new_tokens": 240, "temperature": 0.9, "seed": 9, "stream": True}
    with httpx.stream("POST", f"{served.http_url}/v1/generate", json=body, headers={"X-Request-Timeout": "0.1"}, timeout=30) as response:
        assert response.status_code == 200
        events = [line for line in response.iter_lines() if line.startswith("event: ")]
    assert events[0] == "event: token" and events[-1] == "event: error"
    assert rejected._value.get() == before + 1


def test_with_batching_off_streams_still_interleave_step_by_step_and_each_gets_its_text_alone():
    running = RunningServer(dictionary="reference", max_batch_requests=1)
    try:
        with RestClient(running.http_url) as client:
            alone = [_texts(client.generate(**r)) for r in REQUESTS[1:4]]

        def one(request: dict) -> tuple:
            with RestClient(running.http_url) as client:
                return _texts(client.generate(**request))

        with ThreadPoolExecutor(3) as pool:
            together = list(pool.map(one, REQUESTS[1:4]))
        assert together == alone
        family = running.engine.metrics.generation_rows.collect()[0]
        alone_steps = next(s.value for s in family.samples if s.name.endswith("_bucket") and s.labels["le"] == "1.0")
        total = next(s.value for s in family.samples if s.name.endswith("_count"))
        assert total > alone_steps  # some steps advanced more than one stream (each by its own forward)
    finally:
        running.stop()
