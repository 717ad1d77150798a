"""Every bad request gets a clear error naming the field, with the matching pair of HTTP status and gRPC code."""

import httpx
import pytest

from monosemantic.client import ServiceCallError
from service.errors import ERROR_TABLE, ErrorKind

LONG_TEXT = "x" * 2001  # the test server's max_text_chars is 2000

# (operation, request, field named in the message, error kind)
BAD_REQUESTS = [
    ("activations", dict(text="hi", top_k=-1), "top_k", ErrorKind.INVALID_ARGUMENT),
    ("activations", dict(text="hi", top_k=101), "top_k", ErrorKind.INVALID_ARGUMENT),
    ("activations", dict(text="hi", feature_ids=[4096]), "feature_ids[0]", ErrorKind.INVALID_ARGUMENT),
    ("activations", dict(text="hi", feature_ids=[-1]), "feature_ids[0]", ErrorKind.INVALID_ARGUMENT),
    ("activations", dict(token_ids=[1, 99999]), "token_ids[1]", ErrorKind.INVALID_ARGUMENT),
    ("activations", dict(text=LONG_TEXT), "text", ErrorKind.INVALID_ARGUMENT),
    ("activations", dict(text="", prepend_bos=False), "text", ErrorKind.INVALID_ARGUMENT),
    ("activations", dict(top_k=3), "give exactly one of text and token_ids", ErrorKind.INVALID_ARGUMENT),
    ("activations", dict(token_ids=list(range(257))), "token_ids", ErrorKind.INVALID_ARGUMENT),
    ("attributions", dict(text="def f(x):", target=" self is two tokens"), "target", ErrorKind.INVALID_ARGUMENT),
    ("attributions", dict(text="def f(x):", target=5000), "target", ErrorKind.INVALID_ARGUMENT),
    ("attributions", dict(text="def f(x):", target=5, position=40), "position", ErrorKind.INVALID_ARGUMENT),
    ("attributions", dict(text="def f(x):", target=5, contrast=5), "contrast", ErrorKind.INVALID_ARGUMENT),
    ("generate", dict(prompt="a", max_new_tokens=65), "max_new_tokens", ErrorKind.INVALID_ARGUMENT),
    ("generate", dict(prompt="a", max_new_tokens=0), "max_new_tokens", ErrorKind.INVALID_ARGUMENT),
    ("generate", dict(prompt="a", temperature=-1.0), "temperature", ErrorKind.INVALID_ARGUMENT),
    ("generate", dict(prompt="a", top_p=0.0), "top_p", ErrorKind.INVALID_ARGUMENT),
    ("generate", dict(prompt="a", steering=[{"feature": 9999, "mode": "clamp", "value": 1.0}]), "steering[0].feature", ErrorKind.INVALID_ARGUMENT),
    ("generate", dict(prompt="a", steering=[{"feature": 1, "mode": "pin", "value": 1.0}]), "steering.0.mode", ErrorKind.INVALID_ARGUMENT),
    ("generate", dict(prompt="a", steering=[{"feature": 1, "mode": "add", "value": 1.0}] * 2), "steering[1].feature", ErrorKind.INVALID_ARGUMENT),
    ("generate", dict(prompt="a", steering=[{"feature": i, "mode": "add", "value": 1.0} for i in range(17)]), "steering", ErrorKind.INVALID_ARGUMENT),
    ("generate", dict(prompt="a", stop=[""]), "stop[0]", ErrorKind.INVALID_ARGUMENT),
    ("generate", dict(prompt="a", features_top_k=500), "features_top_k", ErrorKind.INVALID_ARGUMENT),
]


@pytest.mark.parametrize("operation,request_fields,field,kind", BAD_REQUESTS, ids=[f"{o}-{f}" for o, _, f, _ in BAD_REQUESTS])
def test_a_bad_request_is_refused_with_the_field_named(client, operation, request_fields, field, kind):
    with pytest.raises(ServiceCallError) as caught:
        getattr(client, operation)(**request_fields)
    error = caught.value
    expected = ERROR_TABLE[kind].http_status if client.transport == "rest" else ERROR_TABLE[kind].grpc_code.name
    assert error.status == expected
    assert field in error.message
    assert "Traceback" not in error.message and "/" not in error.message.replace("n/a", "")


def test_a_streamed_generation_with_a_bad_request_fails_before_streaming(client):
    with pytest.raises(ServiceCallError) as caught:
        list(client.generate_stream(prompt="a", max_new_tokens=1000))
    assert "max_new_tokens" in caught.value.message


def test_malformed_json_is_a_422_naming_the_body(server):
    response = httpx.post(f"{server.http_url}/v1/activations", content=b'{"text": "hi"', headers={"content-type": "application/json"})
    assert response.status_code == 422
    assert response.json()["error"]["kind"] == "invalid_argument"


def test_an_unknown_field_is_refused_rather_than_ignored(server):
    response = httpx.post(f"{server.http_url}/v1/activations", json={"text": "hi", "topk": 3})
    assert response.status_code == 422
    assert "topk" in response.json()["error"]["message"]


def test_a_body_over_the_limit_is_413_before_it_is_read(server):
    response = httpx.post(f"{server.http_url}/v1/activations", json={"text": "x" * (1 << 20)})
    assert response.status_code == 413
    assert "MONOSEMANTIC_MAX_BODY_BYTES" in response.json()["error"]["message"]


def test_a_chunked_body_over_the_limit_is_413_too(server):
    def chunks():
        for _ in range(300):
            yield b"x" * 4096

    response = httpx.post(f"{server.http_url}/v1/activations", content=chunks(), headers={"content-type": "application/json"})
    assert response.status_code == 413


def test_an_unknown_route_is_404(server):
    assert httpx.get(f"{server.http_url}/v1/nothing").status_code == 404


def test_the_server_still_answers_after_every_bad_request(server):
    assert httpx.get(f"{server.http_url}/healthz").status_code == 200
    assert httpx.get(f"{server.http_url}/readyz").status_code == 200


# Each limit accepts its own value and refuses one more (the test server: max_text_chars 2000, max_new_tokens 64).
AT_THE_LIMIT = [
    ("activations", dict(text="-" * 2000, top_k=100)),  # 2,000 characters, 32 tokens
    ("activations", dict(token_ids=[1] * 256)),
    ("activations", dict(text="x", feature_ids=list(range(256)))),
    ("generate", dict(prompt="a", max_new_tokens=64, steering=[{"feature": i, "mode": "add", "value": 0.0} for i in range(16)], stop=["zzz"] * 8)),
]


@pytest.mark.parametrize("operation,request_fields", AT_THE_LIMIT, ids=[f"{o}-{i}" for i, (o, _) in enumerate(AT_THE_LIMIT)])
def test_a_request_exactly_at_a_limit_is_accepted(client, operation, request_fields):
    getattr(client, operation)(**request_fields)


def test_an_oversized_grpc_message_is_resource_exhausted(server):
    from monosemantic.client import GrpcClient

    with GrpcClient(server.grpc_target) as client, pytest.raises(ServiceCallError) as caught:
        client.activations(text="x" * (2 << 20))
    assert caught.value.status == "RESOURCE_EXHAUSTED"
