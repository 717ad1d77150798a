"""Access control: scoped API keys from a file, constant-time checks, per-key rate limits, and TLS."""

import json
import subprocess
import time

import httpx
import pytest

from conftest import RunningServer
from monosemantic.client import GrpcClient, RestClient, ServiceCallError
from monosemantic.shipped import reference_registry_path
from service.access import AccessControl, load_key_file
from monosemantic.errors import ConfigError

READ, STEER, ADMIN, SLOW = "read-key-0123456789", "steer-key-0123456789", "admin-key-0123456789", "slow-key-0123456789"
STEERING = [{"feature": 5, "mode": "clamp", "value": 5.0}]


@pytest.fixture(scope="module")
def keyed(tmp_path_factory):
    path = tmp_path_factory.mktemp("keys") / "keys.json"
    path.write_text(json.dumps({"keys": [
        {"name": "dashboards", "key": READ, "scopes": ["read"]},
        {"name": "playground", "key": STEER, "scopes": ["read", "steer"]},
        {"name": "ops", "key": ADMIN, "scopes": ["read", "admin"]},
        {"name": "batch-job", "key": SLOW, "scopes": ["read"], "requests_per_second": 1},
    ]}))
    running = RunningServer(registry=reference_registry_path(), api_keys_file=path)
    yield running
    running.stop()


def clients(server, key):
    return [RestClient(server.http_url, api_key=key), GrpcClient(server.grpc_target, api_key=key)]


def test_a_read_key_queries_but_cannot_steer_or_reload(keyed):
    for client in clients(keyed, READ):
        with client:
            assert client.activations(text="def f():").tokens
            assert client.generate(prompt="def ", max_new_tokens=2, seed=1).tokens
            with pytest.raises(ServiceCallError) as steer:
                client.generate(prompt="def ", max_new_tokens=2, steering=STEERING)
            with pytest.raises(ServiceCallError) as reload:
                client.reload("reference", 1)
            assert steer.value.status in (403, "PERMISSION_DENIED") and "steer" in steer.value.message
            assert reload.value.status in (403, "PERMISSION_DENIED") and "admin" in reload.value.message


def test_a_steer_key_steers_and_an_admin_key_reloads(keyed):
    for client in clients(keyed, STEER):
        with client:
            assert client.generate(prompt="def ", max_new_tokens=2, steering=STEERING).tokens[0].steered
    for client in clients(keyed, ADMIN):
        with client:
            assert client.reload("reference", 1).dictionary.version == 1


def test_measuring_steering_needs_the_steer_scope_as_steering_does(keyed):
    texts = ["import os\nimport sys\n\ndef main(argv):\n    return 0\n", "for i in range(10):\n    print(i * i, end=' ')\n"]
    for client in clients(keyed, READ):
        with client:
            with pytest.raises(ServiceCallError) as refused:
                client.steer_eval(7, texts=texts, methods=["add"], multiples=[1.0], new_tokens=2, prompts=1)
            assert refused.value.status in (403, "PERMISSION_DENIED") and "steer" in refused.value.message
    for client in clients(keyed, STEER):
        with client:
            assert client.steer_eval(7, texts=texts, methods=["add"], multiples=[1.0], new_tokens=2, prompts=1).curves[0].method == "add"


@pytest.mark.parametrize("key", [None, "not-a-key-0123456789"])
def test_a_missing_or_wrong_key_is_unauthenticated_and_says_nothing_about_the_keys(keyed, key):
    for client in clients(keyed, key):
        with client, pytest.raises(ServiceCallError) as caught:
            client.activations(text="x")
        assert caught.value.status in (401, "UNAUTHENTICATED")
        for secret in ("dashboards", "playground", "ops", "batch-job", READ, STEER):
            assert secret not in caught.value.message


def test_an_anonymous_request_is_refused_before_its_body_is_read(keyed):
    response = httpx.post(f"{keyed.http_url}/v1/activations", content=b"{not json")
    assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer"


def test_health_metrics_and_the_browser_need_no_key(keyed):
    for path in ("/healthz", "/readyz", "/metrics", "/", "/openapi.json"):
        assert httpx.get(keyed.http_url + path).status_code == 200


def test_a_keys_rate_limit_answers_429_and_resource_exhausted(keyed):
    with RestClient(keyed.http_url, api_key=SLOW) as rest, GrpcClient(keyed.grpc_target, api_key=SLOW) as grpc_client:
        statuses = []
        for _ in range(6):
            try:
                rest.dictionaries()
                statuses.append(200)
            except ServiceCallError as exc:
                statuses.append(exc.status)
        with pytest.raises(ServiceCallError) as caught:
            for _ in range(4):
                grpc_client.dictionaries()
    assert statuses[:2] == [200, 200] and 429 in statuses
    assert caught.value.status == "RESOURCE_EXHAUSTED"
    with RestClient(keyed.http_url, api_key=READ) as other:  # other keys are not limited by it
        assert other.dictionaries().dictionaries


def test_a_malformed_key_file_is_refused_naming_the_setting_and_not_the_keys(tmp_path):
    path = tmp_path / "keys.json"
    path.write_text(json.dumps({"keys": [{"name": "x", "key": "short-secret", "scopes": ["read"]}]}))
    with pytest.raises(ConfigError) as caught:
        load_key_file(path)
    assert "MONOSEMANTIC_API_KEYS_FILE" in str(caught.value) and "short-secret" not in str(caught.value)
    path.write_text("{")
    with pytest.raises(ConfigError, match="not JSON"):
        load_key_file(path)


def test_an_open_server_keeps_admin_off():
    with pytest.raises(Exception, match="admin operations are disabled"):
        AccessControl([]).check(None, "admin")


def test_tls_serves_both_protocols(tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    running = RunningServer(registry=reference_registry_path(), tls_cert_file=cert, tls_key_file=key)
    try:
        with RestClient(f"https://127.0.0.1:{running.server.http_port}", ca_file=str(cert)) as rest:
            assert rest.activations(text="secure").tokens
        with GrpcClient(running.grpc_target, ca_file=str(cert)) as grpc_client:
            assert grpc_client.activations(text="secure").tokens
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://127.0.0.1:{running.server.http_port}/healthz", timeout=5)
    finally:
        running.stop()


def _key_file(tmp_path, keys):
    path = tmp_path / "keys.json"
    path.write_text(json.dumps({"keys": keys}))
    return path


def test_a_key_file_that_grants_nothing_is_refused_naming_the_setting(tmp_path):
    with pytest.raises(ConfigError, match="MONOSEMANTIC_API_KEYS_FILE: keys: List should have at least 1 item"):
        AccessControl.from_settings(_key_file(tmp_path, []), None)


def test_two_keys_with_the_same_value_are_refused_naming_both(tmp_path):
    path = _key_file(tmp_path, [{"name": "slow", "key": READ, "scopes": ["read"], "requests_per_second": 1},
                                {"name": "root", "key": READ, "scopes": ["read", "admin"]}])
    with pytest.raises(ConfigError) as caught:
        AccessControl.from_settings(path, None)
    assert "'slow' and 'root' have the same value" in str(caught.value) and READ not in str(caught.value)
    with pytest.raises(ConfigError, match="same value"):
        AccessControl.from_settings(_key_file(tmp_path, [{"name": "a", "key": ADMIN, "scopes": ["read"]}]), ADMIN)


@pytest.mark.parametrize("value", [" leading-space-key-0123", "trailing-space-key-0123 ", "clé-non-ascii-0123456", "tab\tinside-key-012345"])
def test_a_key_no_client_could_send_is_refused_naming_its_entry(tmp_path, value):
    with pytest.raises(ConfigError) as caught:
        AccessControl.from_settings(_key_file(tmp_path, [{"name": "broken", "key": value, "scopes": ["read"]}]), None)
    assert "key 'broken'" in str(caught.value) and "visible ASCII" in str(caught.value) and value not in str(caught.value)
    with pytest.raises(ConfigError, match="MONOSEMANTIC_ADMIN_KEY"):
        AccessControl.from_settings(None, value)


@pytest.mark.slow  # starts the service as its own process
@pytest.mark.parametrize("problem", ["missing", "garbage", "mismatched"])
def test_a_bad_tls_pair_stops_startup_before_the_model_loads_with_one_line(tmp_path, problem):
    import sys
    import time

    cert, key, other = tmp_path / "cert.pem", tmp_path / "key.pem", tmp_path / "other.pem"
    for out, keyout in ((cert, key), (tmp_path / "unused.pem", other)):
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                        "-keyout", str(keyout), "-out", str(out)], check=True, capture_output=True)
    if problem == "missing":
        cert = tmp_path / "nowhere.pem"
    elif problem == "garbage":
        key.write_text("not a key")
    else:
        key = other
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "service.cli", "--http-port", "0", "--grpc-port", "0"], capture_output=True, text=True, timeout=120,
                            env={**__import__("os").environ, "MONOSEMANTIC_TLS_CERT_FILE": str(cert), "MONOSEMANTIC_TLS_KEY_FILE": str(key)})
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 1 and len(lines) == 1, result.stderr[-2000:]
    assert lines[0].startswith("error: cannot start: MONOSEMANTIC_TLS_") and "Traceback" not in result.stderr
    assert ("nowhere.pem" in lines[0]) if problem == "missing" else ("matches it" in lines[0])
    assert "Loading weights" not in result.stderr and time.monotonic() - started < 30


def _rotate(path, keys) -> None:
    """Replace the file as a Kubernetes Secret update does: a new file renamed over the old one."""
    staged = path.with_suffix(".staged")
    staged.write_text(json.dumps({"keys": keys}))
    staged.replace(path)


def _status(server, key):
    return httpx.post(f"{server.http_url}/v1/activations", json={"text": "x"}, headers={"authorization": f"Bearer {key}"}, timeout=30).status_code


def test_a_rotated_keys_file_takes_effect_without_a_restart_and_a_bad_one_keeps_the_old_keys(tmp_path):
    from test_service_operations import _metric

    path = _key_file(tmp_path, [{"name": "old", "key": READ, "scopes": ["read"]}])
    running = RunningServer(registry=reference_registry_path(), api_keys_file=path, api_keys_poll_s=0.2)
    try:
        assert _status(running, READ) == 200 and _status(running, STEER) == 401
        _rotate(path, [{"name": "new", "key": STEER, "scopes": ["read", "steer"]}])
        deadline = time.monotonic() + 10
        while _status(running, STEER) != 200 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _status(running, STEER) == 200 and _status(running, READ) == 401  # revoked
        staged = path.with_suffix(".staged")
        staged.write_text("{not json")
        staged.replace(path)
        time.sleep(1.0)
        assert _status(running, STEER) == 200  # the previous keys stay
        assert _metric(running, "monosemantic_api_keys_reloads_total", result="failure") == 1
        assert _metric(running, "monosemantic_api_keys_reloads_total", result="success") == 1
    finally:
        running.stop()


@pytest.mark.slow  # starts the service as its own process
def test_sighup_rereads_the_keys_file(tmp_path):
    import os
    import signal
    import sys

    from conftest import free_port, wait_until_ok

    path = _key_file(tmp_path, [{"name": "old", "key": READ, "scopes": ["read"]}])
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "service.cli", "--http-port", str(port), "--grpc-port", str(free_port())],
                               env={**os.environ, "MONOSEMANTIC_API_KEYS_FILE": str(path), "MONOSEMANTIC_API_KEYS_POLL_S": "3600"},
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until_ok(f"http://127.0.0.1:{port}/readyz")

        class At:
            http_url = f"http://127.0.0.1:{port}"

        assert _status(At, READ) == 200
        _rotate(path, [{"name": "new", "key": STEER, "scopes": ["read"]}])
        process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while _status(At, STEER) != 200 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _status(At, STEER) == 200 and _status(At, READ) == 401
    finally:
        process.terminate()
        process.wait(30)


def test_metrics_can_be_made_to_need_a_key(tmp_path):
    path = _key_file(tmp_path, [{"name": "prometheus", "key": READ, "scopes": ["read"]}])
    running = RunningServer(registry=reference_registry_path(), api_keys_file=path, metrics_need_key=True)
    try:
        assert httpx.get(f"{running.http_url}/metrics", timeout=10).status_code == 401
        scraped = httpx.get(f"{running.http_url}/metrics", headers={"authorization": f"Bearer {READ}"}, timeout=10)
        assert scraped.status_code == 200 and "monosemantic_requests_total" in scraped.text
        assert httpx.get(f"{running.http_url}/healthz", timeout=10).status_code == 200
    finally:
        running.stop()
