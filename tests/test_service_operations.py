"""Running the service: health, metrics, hot reload, overload, batching, cancellation and graceful shutdown."""

import concurrent.futures
import os
import signal
import subprocess
import sys
import threading
import time

import grpc
import httpx
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from monosemantic.client import GrpcClient, RestClient, ServiceCallError
from monosemantic.v1 import feature_service_pb2 as pb
from conftest import ADMIN_KEY, RunningServer, free_port, wait_until_ok


def _metric(server, metric_name, **labels):
    text = httpx.get(f"{server.http_url}/metrics").text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == metric_name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return None


def test_health_readiness_and_grpc_health_agree(server):
    assert httpx.get(f"{server.http_url}/healthz").json() == {"status": "ok"}
    assert httpx.get(f"{server.http_url}/readyz").status_code == 200
    with grpc.insecure_channel(server.grpc_target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", "monosemantic.v1.FeatureService"):
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_grpc_reflection_lists_the_feature_service(server):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(server.grpc_target) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        replies = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5)
        names = {s.name for reply in replies for s in reply.list_services_response.service}
    assert "monosemantic.v1.FeatureService" in names and "grpc.health.v1.Health" in names


def test_openapi_documents_every_operation_with_typed_bodies(server):
    spec = httpx.get(f"{server.http_url}/openapi.json").json()
    for path in ("/v1/activations", "/v1/attributions", "/v1/generate", "/v1/admin/reload"):
        operation = spec["paths"][path]["post"]
        assert "$ref" in operation["requestBody"]["content"]["application/json"]["schema"]
        assert "422" in operation["responses"]
    assert httpx.get(f"{server.http_url}/docs").status_code == 200


def test_metrics_count_requests_by_protocol_method_and_code(server):
    before = _metric(server, "monosemantic_requests_total", protocol="rest", method="activations", code="200") or 0
    before_grpc = _metric(server, "monosemantic_requests_total", protocol="grpc", method="activations", code="422") or 0
    with RestClient(server.http_url) as rest, GrpcClient(server.grpc_target) as grpc_client:
        rest.activations(text="one")
        rest.activations(text="two")
        with pytest.raises(ServiceCallError):
            grpc_client.activations(text="x", top_k=1000)
    assert _metric(server, "monosemantic_requests_total", protocol="rest", method="activations", code="200") == before + 2
    assert _metric(server, "monosemantic_requests_total", protocol="grpc", method="activations", code="422") == before_grpc + 1
    assert _metric(server, "monosemantic_dictionary_info", name="reference") == 1


def test_a_generation_is_counted_once_streamed_or_not(server):
    before = _metric(server, "monosemantic_requests_total", protocol="rest", method="generate", code="200") or 0
    with RestClient(server.http_url) as rest:
        rest.generate(prompt="def ", max_new_tokens=2, seed=1)
        list(rest.generate_stream(prompt="def ", max_new_tokens=2, seed=1))
    assert _metric(server, "monosemantic_requests_total", protocol="rest", method="generate", code="200") == before + 2
    assert _metric(server, "monosemantic_tokens_processed_total") > 0


def test_dictionaries_lists_the_serving_version_and_the_available_ones(client):
    answer = client.dictionaries()
    (serving,) = answer.dictionaries
    assert (serving.architecture, serving.d_in, serving.d_sae) == ("relu", 512, 4096)
    assert serving.hook == "blocks.0.mlp.hook_post" and "fvu" in serving.metrics
    assert {(r.name, r.version) for r in answer.available} >= {("reference", 1), ("reference", 2), ("stranger", 1)}


# ---- reload ---------------------------------------------------------------------------------------------------
@pytest.fixture
def fresh_server(registry):
    running = RunningServer(registry=registry, dictionary="reference:1", admin_key=ADMIN_KEY)
    yield running
    running.stop()


@pytest.mark.parametrize("transport", ["rest", "grpc"])
def test_reload_needs_the_admin_key(fresh_server, transport):
    make = (lambda key: RestClient(fresh_server.http_url, api_key=key)) if transport == "rest" else (lambda key: GrpcClient(fresh_server.grpc_target, api_key=key))
    with make(None) as anonymous, make("wrong") as wrong:
        with pytest.raises(ServiceCallError) as no_key:
            anonymous.reload("reference", 2)
        with pytest.raises(ServiceCallError) as bad_key:
            wrong.reload("reference", 2)
    assert no_key.value.status in (401, "UNAUTHENTICATED")
    assert bad_key.value.status in (401, "UNAUTHENTICATED")


def test_admin_operations_are_off_without_a_configured_key(registry):
    running = RunningServer(registry=registry, dictionary="reference:1")
    try:
        with RestClient(running.http_url, api_key="anything") as client, pytest.raises(ServiceCallError) as caught:
            client.reload("reference", 2)
        assert caught.value.status == 403 and "MONOSEMANTIC_ADMIN_KEY" in caught.value.message
    finally:
        running.stop()


def test_reload_under_concurrent_traffic_loses_no_request(fresh_server):
    stop = threading.Event()
    seen_versions, failures = set(), []

    def traffic():
        with RestClient(fresh_server.http_url, api_key=ADMIN_KEY) as client:
            while not stop.is_set():
                try:
                    seen_versions.add(client.activations(text="for x in range(10): print(x)", top_k=3).dictionary.version)
                except Exception as exc:  # any failure at all fails the test
                    failures.append(exc)

    threads = [threading.Thread(target=traffic) for _ in range(6)]
    for t in threads:
        t.start()
    with RestClient(fresh_server.http_url, api_key=ADMIN_KEY) as admin:
        for version in (2, 1, 2, 1, 2):
            answer = admin.reload("reference", version)
            assert answer.dictionary.version == version
            assert admin.ready()
    stop.set()
    for t in threads:
        t.join()
    assert failures == []
    assert seen_versions == {1, 2}
    assert _metric(fresh_server, "monosemantic_dictionary_reloads_total", result="success") == 5


@pytest.mark.parametrize(
    "name,version,status,grpc_code",
    [
        ("stranger", None, 409, "FAILED_PRECONDITION"),  # trained on another model
        ("missing", None, 404, "NOT_FOUND"),
        ("reference", 9, 404, "NOT_FOUND"),
        ("../reference", None, 422, "INVALID_ARGUMENT"),
    ],
)
def test_a_failed_reload_names_the_reason_and_the_old_version_keeps_serving(fresh_server, name, version, status, grpc_code):
    with RestClient(fresh_server.http_url, api_key=ADMIN_KEY) as rest, GrpcClient(fresh_server.grpc_target, api_key=ADMIN_KEY) as grpc_client:
        with pytest.raises(ServiceCallError) as over_rest:
            rest.reload(name, version)
        with pytest.raises(ServiceCallError) as over_grpc:
            grpc_client.reload(name, version)
        assert (over_rest.value.status, over_grpc.value.status) == (status, grpc_code)
        assert "/" not in over_rest.value.message.replace("../", "")
        assert rest.activations(text="still here").dictionary.version == 1
    assert _metric(fresh_server, "monosemantic_dictionary_reloads_total", result="failure") == 2


def test_a_tampered_version_is_refused_on_reload(tmp_path, registry):
    import shutil

    shutil.copytree(registry / "reference", tmp_path / "reference")
    with open(tmp_path / "reference" / "v2" / "sae.safetensors", "r+b") as fh:
        fh.seek(-16, os.SEEK_END)
        fh.write(b"\x00" * 16)
    running = RunningServer(registry=tmp_path, dictionary="reference:1", admin_key=ADMIN_KEY)
    try:
        with RestClient(running.http_url, api_key=ADMIN_KEY) as client:
            with pytest.raises(ServiceCallError) as caught:
                client.reload("reference", 2)
            assert caught.value.status == 409 and "sha256" in caught.value.message
            assert client.activations(text="ok").dictionary.version == 1
    finally:
        running.stop()


def test_a_pinned_version_rewritten_underneath_the_server_is_refused_on_reload(tmp_path, registry):
    """The registry replaced by another one whose reference:1 is another dictionary (its own ledger, every file
    consistent): reloading the pinned reference:1 must not silently swap dictionaries."""
    import shutil

    from monosemantic.artifact import load_dictionary, publish

    shutil.copytree(registry / "reference", tmp_path / "serving" / "reference")
    shipped = load_dictionary(registry, "reference", 1)
    with torch.no_grad():
        shipped.sae.b_dec.add_(1.0)
    m = shipped.manifest
    publish(tmp_path / "other", "reference", shipped.sae, model=m.model, hook=m.hook, dtype="bfloat16")
    running = RunningServer(registry=tmp_path / "serving", dictionary="reference:1", admin_key=ADMIN_KEY)
    try:
        shutil.rmtree(tmp_path / "serving" / "reference")
        shutil.copytree(tmp_path / "other" / "reference", tmp_path / "serving" / "reference")
        with RestClient(running.http_url, api_key=ADMIN_KEY) as client:
            with pytest.raises(ServiceCallError) as caught:
                client.reload("reference", 1)
            assert caught.value.status == 409 and "is not the one serving" in caught.value.message
            assert client.activations(text="ok").dictionary.version == 1
    finally:
        running.stop()


# ---- load: batching and overload ----------------------------------------------------------------------------
def test_concurrent_requests_are_gathered_into_shared_forwards(registry):
    running = RunningServer(registry=registry, max_wait_ms=20)
    try:
        with RestClient(running.http_url) as client, concurrent.futures.ThreadPoolExecutor(16) as pool:
            list(pool.map(lambda i: client.activations(text=f"item {i} = compute({i})", top_k=2), range(64)))
        batches = _metric(running, "monosemantic_batch_requests_count")
        requests = _metric(running, "monosemantic_batch_requests_sum")
        assert requests == 64 and batches < 64  # some forwards served several requests
    finally:
        running.stop()


def test_a_full_queue_refuses_at_once_with_429_and_the_rest_succeed(registry):
    running = RunningServer(registry=registry, max_queue=2, max_batch_requests=1)
    try:
        codes = []

        def call(_):
            response = httpx.post(f"{running.http_url}/v1/generate", json={"prompt": "def ", "max_new_tokens": 24, "seed": 1}, timeout=60)
            return response.status_code, response.headers.get("retry-after")

        with concurrent.futures.ThreadPoolExecutor(12) as pool:
            codes = list(pool.map(call, range(12)))
        statuses = [c for c, _ in codes]
        assert set(statuses) <= {200, 429} and 429 in statuses and 200 in statuses
        assert all(retry == "1" for c, retry in codes if c == 429)
        assert _metric(running, "monosemantic_rejected_requests_total", reason="queue_full") == statuses.count(429)
    finally:
        running.stop()


def test_a_request_behind_more_queued_work_than_the_wait_bound_is_refused_with_a_retry_after(registry):
    # One read at a time (no batching) and a 50 ms bound: once the server has timed a read of this text, a burst
    # queues seconds of work and whoever arrives behind it is refused at once, on both transports.
    running = RunningServer(registry=registry, max_batch_requests=1, max_queue_wait_s=0.05)
    text = "def total(values):\n    return sum(v * v for v in values)\n" * 12
    try:
        assert httpx.post(f"{running.http_url}/v1/activations", json={"text": text}, timeout=60).status_code == 200

        def call(_):
            response = httpx.post(f"{running.http_url}/v1/activations", json={"text": text}, timeout=60)
            return response.status_code, response.headers.get("retry-after"), response.json()

        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(call, range(16)))
        statuses = [status for status, _, _ in answers]
        assert set(statuses) <= {200, 429} and 429 in statuses and 200 in statuses
        refused = [(retry, body) for status, retry, body in answers if status == 429]
        assert all(int(retry) >= 1 and "MONOSEMANTIC_MAX_QUEUE_WAIT_S" in body["error"]["message"] for retry, body in refused)
        assert _metric(running, "monosemantic_rejected_requests_total", reason="queue_wait") == len(refused)
        assert _metric(running, "monosemantic_rejected_requests_total", reason="queue_full") == 0

        request = pb.ActivationsRequest(text=text)

        def grpc_call(_):
            with grpc.insecure_channel(running.grpc_target) as channel:
                call = channel.unary_unary("/monosemantic.v1.FeatureService/Activations",
                                           request_serializer=pb.ActivationsRequest.SerializeToString,
                                           response_deserializer=pb.ActivationsResponse.FromString)
                try:
                    call(request, timeout=60)
                    return grpc.StatusCode.OK, None
                except grpc.RpcError as exc:
                    return exc.code(), dict(exc.trailing_metadata() or ()).get("grpc-retry-pushback-ms")

        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            outcomes = list(pool.map(grpc_call, range(16)))
        pushbacks = [pushback for code, pushback in outcomes if code == grpc.StatusCode.RESOURCE_EXHAUSTED]
        assert pushbacks and all(int(ms) >= 1000 for ms in pushbacks)  # gRFC A6 retry pushback, in milliseconds
        assert {code for code, _ in outcomes} <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}
    finally:
        running.stop()


@pytest.mark.parametrize("transport", ["rest", "grpc"])
def test_a_client_that_leaves_mid_stream_stops_the_generation(server, transport):
    make = RestClient(server.http_url) if transport == "rest" else GrpcClient(server.grpc_target)
    with make as client:
        stream = client.generate_stream(prompt="def ", max_new_tokens=64, seed=9)
        next(stream)
        stream.close()  # leave after the first token
    deadline = time.time() + 10
    while _metric(server, "monosemantic_inflight_requests") != 0 and time.time() < deadline:
        time.sleep(0.05)
    assert _metric(server, "monosemantic_inflight_requests") == 0
    generated = _metric(server, "monosemantic_tokens_generated_total")
    time.sleep(0.5)
    assert _metric(server, "monosemantic_tokens_generated_total") == generated  # nothing runs on for it


def test_a_grpc_deadline_shorter_than_the_work_is_deadline_exceeded(server):
    with GrpcClient(server.grpc_target) as client, pytest.raises(ServiceCallError) as caught:
        client.generate(prompt="def ", max_new_tokens=64, timeout=0.05)
    assert caught.value.status == "DEADLINE_EXCEEDED"


# ---- the process: CLI, settings and graceful shutdown ----------------------------------------------------------


def test_serve_help_lists_every_flag():
    out = subprocess.run([sys.executable, "-m", "service.cli", "--help"], capture_output=True, text=True, check=True).stdout
    for flag in ("--host", "--http-port", "--grpc-port", "--registry", "--dictionary", "--model", "--device"):
        assert flag in out


@pytest.mark.slow  # starts the service as its own process
def test_a_bad_setting_stops_the_cli_with_the_setting_named():
    env = {**os.environ, "MONOSEMANTIC_MAX_QUEUE": "0"}
    result = subprocess.run([sys.executable, "-m", "service.cli"], capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 2 and "max_queue" in result.stderr


@pytest.mark.slow  # starts the service as its own process
def test_a_missing_dictionary_stops_the_cli_with_a_one_line_cause(tmp_path):
    result = subprocess.run([sys.executable, "-m", "service.cli", "--registry", str(tmp_path), "--http-port", "0", "--grpc-port", "0"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "cannot start" in result.stderr and "reference" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow  # starts the service as its own process
def test_sigterm_finishes_in_flight_requests_then_exits_zero():
    http_port, grpc_port = free_port(), free_port()
    env = {**os.environ, "MONOSEMANTIC_HTTP_PORT": str(http_port), "MONOSEMANTIC_GRPC_PORT": str(grpc_port)}
    process = subprocess.Popen([sys.executable, "-m", "service.cli"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{http_port}"
        wait_until_ok(f"{url}/readyz")
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            in_flight = pool.submit(httpx.post, f"{url}/v1/generate", json={"prompt": "def ", "max_new_tokens": 200, "seed": 1}, timeout=60)
            time.sleep(0.3)
            process.send_signal(signal.SIGTERM)
            response = in_flight.result()
        assert response.status_code == 200 and len(response.json()["tokens"]) == 200
        assert process.wait(60) == 0
    finally:
        process.kill()
