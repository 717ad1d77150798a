"""The red-team review's cases (bench/RELIABILITY.md, "Red team"), each sent to a real server process as the
reviewer sent it, with what came back: a markdown table, one row per case.

    python bench/red_team.py [--tree PATH] [--json]

--tree runs the service of another checkout (an older commit, for a before/after) on the same cases; settings it
does not know are not given to it. Every wait is bounded, so a case that hangs reads "no answer in N s".
"""

from __future__ import annotations

import argparse
import concurrent.futures
import ctypes
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from serve import free_port  # noqa: E402

from monosemantic.artifact import load_dictionary, publish  # noqa: E402
from monosemantic.shipped import reference_registry_path  # noqa: E402
from monosemantic.v1 import feature_service_pb2 as pb  # noqa: E402

ADMIN, READ, STEER = "red-team-admin-key-0123", "red-team-read-key-01234", "red-team-steer-key-0123"


def _drop_root_reading() -> None:
    """Before exec: without CAP_DAC_OVERRIDE / CAP_DAC_READ_SEARCH, root is held to file permissions like anyone."""
    if os.geteuid() == 0:
        libc = ctypes.CDLL(None, use_errno=True)
        for cap in (1, 2):
            libc.prctl(24, cap, 0, 0, 0)  # PR_CAPBSET_DROP


class Server:
    def __init__(self, tree: Path, registry: Path, log: Path, **env: str) -> None:
        self.http_port, self.grpc_port = free_port(), free_port()
        self.url, self.target = f"http://127.0.0.1:{self.http_port}", f"127.0.0.1:{self.grpc_port}"
        self.log = log
        self.process = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "--http-port", str(self.http_port), "--grpc-port", str(self.grpc_port)],
            env={**os.environ, "MONOSEMANTIC_REGISTRY": str(registry), "MONOSEMANTIC_DICTIONARY": "reference:1",
                 "MONOSEMANTIC_ADMIN_KEY": ADMIN, **env},
            cwd=tree, stdout=subprocess.DEVNULL, stderr=log.open("ab"), preexec_fn=_drop_root_reading)
        deadline = time.time() + 120
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited: {log.read_text()[-500:]}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=5).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise RuntimeError("the server did not start")

    def cpu_seconds(self) -> float:
        with open(f"/proc/{self.process.pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def post(self, path: str, body, timeout: float = 15, key: str = ADMIN, headers: dict | None = None) -> httpx.Response:
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        return httpx.post(self.url + path, content=content, timeout=timeout,
                          headers={"content-type": "application/json", "authorization": f"Bearer {key}", **(headers or {})})

    def metric(self, line_prefix: str) -> float:
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(line_prefix))

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(30)


def _status(call) -> str:
    try:
        response = call()
    except httpx.TimeoutException as exc:
        return f"no answer in {exc.request.extensions.get('timeout', {}).get('read', '?')} s"
    except httpx.HTTPError as exc:
        return type(exc).__name__
    return f"{response.status_code} {response.text[:90]!r}"


def _grpc_code(method: str, payload: bytes, metadata=(), timeout: float = 15) -> tuple[str, str]:
    with grpc.insecure_channel(ADDRESS[0]) as channel:
        call = channel.unary_unary(f"/monosemantic.v1.FeatureService/{method}", request_serializer=lambda b: b, response_deserializer=lambda b: b)
        try:
            call(payload, metadata=(("authorization", f"Bearer {ADMIN}"), *metadata), timeout=timeout)
            return "OK", ""
        except grpc.RpcError as exc:
            return exc.code().name, exc.details() or ""


ADDRESS = [""]


def probe_p50(server: Server, seconds: float) -> float:
    latencies = []
    stop_at = time.perf_counter() + seconds
    with httpx.Client(base_url=server.url, headers={"authorization": f"Bearer {ADMIN}"}, timeout=30) as http:
        while time.perf_counter() < stop_at:
            started = time.perf_counter()
            http.post("/v1/activations", json={"text": "def main():"})
            latencies.append(time.perf_counter() - started)
    return statistics.median(latencies) * 1000


def _send_and_close(port: int, body: dict) -> None:
    raw = json.dumps(body).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"POST /v1/generate HTTP/1.1\r\nhost: x\r\nauthorization: Bearer %s\r\ncontent-type: application/json\r\n"
                     b"content-length: %d\r\n\r\n%s" % (ADMIN.encode(), len(raw), raw))


def cases(server: Server, registry: Path, tree: Path, knows: set[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    ADDRESS[0] = server.target
    log_before = server.log.stat().st_size
    surrogate = _status(lambda: server.post("/v1/activations", b'{"text": "a\\ud800b"}'))
    time.sleep(0.5)  # the server logs after it answers
    out["1 lone surrogate"] = f"{surrogate}; {server.log.stat().st_size - log_before:,} bytes logged"
    out["6 steering overflow"] = _status(lambda: server.post("/v1/generate", {"prompt": "def ", "max_new_tokens": 4, "steering": [{"feature": 5, "mode": "clamp", "value": 1e39}]}))
    code, details = _grpc_code("Generate", pb.GenerateRequest(prompt="def ", steering=[pb.Steering(feature=1, mode="pin", value=1)] * 1000).SerializeToString())
    out["7 1,000 bad steering entries (gRPC)"] = f"{code}, message {len(details)} chars"
    started = time.perf_counter()
    response = server.post("/v1/activations", {"text": "x", "feature_ids": ["x"] * 150_000}, timeout=60)
    out["7 150k bad feature_ids (REST)"] = f"{response.status_code}, body {len(response.content):,} bytes, {time.perf_counter() - started:.2f} s"
    out["8 undecodable gRPC message"] = ", ".join(_grpc_code("Activations", payload)[0] for payload in (b"\x0a\x03a\xffb", b"\xff" * 5))
    response = server.post("/v1/observe", {"texts": ["a " * 10000] * 7})
    out["9 observe that can never fit"] = f"{response.status_code} (Retry-After: {response.headers.get('retry-after')}) {response.text[:80]!r}"

    def reload(_):
        return httpx.post(f"{server.url}/v1/admin/reload", json={"name": "reference", "version": 2}, headers={"authorization": f"Bearer {ADMIN}"}, timeout=60).json()

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        previous = sorted(r.get("previous", {}).get("version") for r in pool.map(reload, range(4)))
    out["10 4 concurrent reloads v1 → v2: previous"] = str(previous)
    server.post("/v1/admin/reload", {"name": "reference", "version": 1})
    for label, headers in (("with the admin key", {"authorization": f"Bearer {ADMIN}"}), ("without a key", {})):
        request = urllib.request.Request(f"{server.url}/v1/activations", data=b"x" * (10 << 20), headers={"content-type": "application/json", **headers})
        try:
            urllib.request.urlopen(request, timeout=30)
            out[f"13 10 MB body, urllib, {label}"] = "200"
        except urllib.error.HTTPError as exc:
            out[f"13 10 MB body, urllib, {label}"] = f"{exc.code} {exc.read()[:60]!r}"
        except OSError as exc:
            out[f"13 10 MB body, urllib, {label}"] = f"{type(exc).__name__}: {exc}"
    out["14 JSON nested 100,000 deep"] = _status(lambda: server.post("/v1/activations", b"[" * 100_000 + b"]" * 100_000))

    # 3. unreadable registry (the server runs without root's reading power)
    failed = 'monosemantic_dictionary_reloads_total{result="failure"}'
    failures_before = server.metric(failed)
    registry.chmod(0)
    try:
        out["3 registry chmod 000: list"] = _status(lambda: httpx.get(f"{server.url}/v1/dictionaries", headers={"authorization": f"Bearer {ADMIN}"}, timeout=15))
        out["3 registry chmod 000: reload"] = _status(lambda: server.post("/v1/admin/reload", {"name": "reference", "version": 2}))
    finally:
        registry.chmod(0o700)
    out["3 failed reloads counted"] = f"{server.metric(failed) - failures_before:g} of 1"

    # 11. slowloris: 200 half-sent requests held
    socks = []
    for _ in range(200):
        sock = socket.create_connection(("127.0.0.1", server.http_port))
        sock.sendall(b"GET /healthz HTTP/1.1\r\nhost: x\r\nx-slow: ")
        socks.append(sock)
    held = probe_p50(server, 3)
    time.sleep(12)
    still_open = 0
    for sock in socks:
        sock.setblocking(False)
        try:
            data = sock.recv(4096)
            still_open += 0 if data == b"" or b" 408 " in data else 1
        except BlockingIOError:
            still_open += 1
        sock.close()
    out["11 200 half-sent connections"] = f"probe p50 {held:.1f} ms while held; {still_open} of 200 still open after 15 s"

    # 5. abandoned work: 100 heavy generations whose sockets close right after sending
    idle = probe_p50(server, 3)
    heavy = {"prompt": "def ", "max_new_tokens": 256, "compare_unsteered": True,
             "steering": [{"feature": f, "mode": "add", "value": 1.0} for f in range(16)]}
    for _ in range(100):
        _send_and_close(server.http_port, heavy)
    loaded = probe_p50(server, 5)
    cpu_before = server.cpu_seconds()
    time.sleep(10)
    out["5 probe p50, idle → under 100 abandoned generations"] = (
        f"{idle:.1f} → {loaded:.1f} ms; then, with no client left, server CPU {server.cpu_seconds() - cpu_before:.1f} s in 10 s")

    # 12. a second server on the same gRPC port, serving another version
    second_log = server.log.with_name("second.log")
    second = subprocess.Popen([sys.executable, "-m", "service.cli", "--http-port", str(free_port()), "--grpc-port", str(server.grpc_port),
                               "--registry", str(registry), "--dictionary", "reference:2"], cwd=tree, stdout=subprocess.DEVNULL,
                              stderr=second_log.open("wb"), env={**os.environ, "MONOSEMANTIC_ADMIN_KEY": ADMIN})
    try:
        second.wait(25)
        out["12 second server on the gRPC port"] = f"exit {second.returncode}: {second_log.read_text().strip().splitlines()[-1][:110]}"
    except subprocess.TimeoutExpired:
        versions = []
        for _ in range(12):
            with grpc.insecure_channel(server.target) as channel:
                reply = channel.unary_unary("/monosemantic.v1.FeatureService/ListDictionaries", request_serializer=lambda b: b,
                                            response_deserializer=pb.ListDictionariesResponse.FromString)(b"", metadata=(("authorization", f"Bearer {ADMIN}"),), timeout=10)
                versions.append(reply.dictionaries[0].version)
        out["12 second server on the gRPC port"] = f"started; 12 calls: {versions.count(1)} to v1, {versions.count(2)} to v2"
    finally:
        if second.poll() is None:
            second.kill()
            second.wait(10)
    return out


def keyed_cases(tree: Path, registry: Path, log: Path, knows: set[str]) -> dict[str, str]:
    keys = registry.parent / "keys.json"
    keys.write_text(json.dumps({"keys": [
        {"name": "reader", "key": READ, "scopes": ["read"], "requests_per_second": 50},
        {"name": "steerer", "key": STEER, "scopes": ["read", "steer"], "requests_per_second": 0.2}]}))
    server = Server(tree, registry, log, MONOSEMANTIC_API_KEYS_FILE=str(keys))
    try:
        through = 0
        for _ in range(5):
            r = httpx.post(f"{server.url}/v1/generate", timeout=30, content=json.dumps({"prompt": "def ", "max_new_tokens": 1, "steering": [{"feature": 5, "mode": "clamp", "value": 5}]}),
                           headers=[("content-type", "application/json"), ("authorization", f"Bearer {STEER}"), ("authorization", f"Bearer {READ}")])
            through += r.status_code == 200
        return {"4 two Authorization headers (steer key at 0.2/s, then a read key)": f"{through} of 5 steered generations went through (last status {r.status_code})"}
    finally:
        server.stop()


def stuck_reload(tree: Path, registry: Path, log: Path, knows: set[str]) -> dict[str, str]:
    stuck = registry / "reference" / "v9"
    shutil.copytree(registry / "reference" / "v2", stuck)
    for name in ("manifest.json", "sae.safetensors", "features.safetensors"):
        (stuck / name).unlink(missing_ok=True)
        os.mkfifo(stuck / name)
    env = {"MONOSEMANTIC_SHUTDOWN_GRACE_S": "5"}
    if "registry_timeout_s" in knows:
        env["MONOSEMANTIC_REGISTRY_TIMEOUT_S"] = "3"
    server = Server(tree, registry, log, **env)
    out = {}
    try:
        started = time.perf_counter()
        first = _status(lambda: server.post("/v1/admin/reload", {"name": "reference", "version": 9}, timeout=10))
        out["2 reload of a version whose files are FIFOs"] = f"{first} after {time.perf_counter() - started:.1f} s"
        out["2 a good reload after it"] = _status(lambda: server.post("/v1/admin/reload", {"name": "reference", "version": 2}, timeout=10))
        started = time.perf_counter()
        server.process.send_signal(signal.SIGTERM)
        try:
            code = server.process.wait(25)
            out["2 SIGTERM (grace 5 s)"] = f"exit {code} after {time.perf_counter() - started:.1f} s"
        except subprocess.TimeoutExpired:
            out["2 SIGTERM (grace 5 s)"] = "still alive after 25 s"
    finally:
        server.stop()
        shutil.rmtree(stuck)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tree", type=Path, default=ROOT)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    tree = args.tree.resolve()
    knows = set((tree / "service" / "settings.py").read_text().replace("(", " ").replace(":", " ").split())
    with tempfile.TemporaryDirectory() as tmp:
        registry = Path(tmp) / "registry"
        shutil.copytree(reference_registry_path() / "reference", registry / "reference")  # with its ledger
        shipped = load_dictionary(registry, "reference", 1)
        m = shipped.manifest
        publish(registry, "reference", shipped.sae, model=m.model, hook=m.hook, features=shipped.features, labels=shipped.labels, extra={"metrics": m.metrics})
        log = Path(tmp) / "server.log"
        results = {}
        server = Server(tree, registry, log)
        try:
            results.update(cases(server, registry, tree, knows))
        finally:
            server.stop()
        results.update(keyed_cases(tree, registry, log, knows))
        results.update(stuck_reload(tree, registry, log, knows))
    if args.json:
        print(json.dumps(results))
        return
    print(f"tree: {tree}\n\n| case | result |\n| --- | --- |")
    for case, result in sorted(results.items(), key=lambda kv: int(kv[0].split()[0])):
        print(f"| {case} | {result.replace('|', '/')} |")


if __name__ == "__main__":
    main()
