"""The red-team cases that need the server as its own process: a reload stuck on I/O (and SIGTERM after it), an
unreadable registry (the server without the root's power to read everything), and a port already in use."""

import ctypes
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from conftest import RunningServer, free_port, wait_until_ok
from monosemantic.artifact import load_dictionary, publish
from monosemantic.client import GrpcClient, ServiceCallError
from monosemantic.shipped import REFERENCE_DICTIONARY, reference_registry_path
from test_service_operations import _metric

# server processes started, stuck and killed (5-20 s each)
pytestmark = pytest.mark.slow

ADMIN = "process-admin-key-0123"
PR_CAPBSET_DROP, CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH = 24, 1, 2


def _registry_with_two_versions(root: Path) -> Path:
    shutil.copytree(reference_registry_path() / REFERENCE_DICTIONARY, root / REFERENCE_DICTIONARY)
    shipped = load_dictionary(root, REFERENCE_DICTIONARY, 1)
    m = shipped.manifest
    publish(root, REFERENCE_DICTIONARY, shipped.sae, model=m.model, hook=m.hook, extra={"metrics": m.metrics})
    return root


def _without_root_reading_power() -> None:
    """In the child before exec: drop the capabilities that let root read any file (a server run as root in a
    container has them), so that permissions apply to it as to any other user."""
    if os.geteuid() != 0:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH):
        if libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


class ServerProcess:
    def __init__(self, registry: Path, unprivileged: bool = False, **env: str) -> None:
        self.http_port, self.grpc_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.http_port}"
        full_env = {**os.environ, "MONOSEMANTIC_REGISTRY": str(registry), "MONOSEMANTIC_DICTIONARY": "reference:1",
                    "MONOSEMANTIC_ADMIN_KEY": ADMIN, "MONOSEMANTIC_HTTP_PORT": str(self.http_port),
                    "MONOSEMANTIC_GRPC_PORT": str(self.grpc_port), **env}
        self.process = subprocess.Popen([sys.executable, "-m", "service.cli"], env=full_env, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.PIPE, text=True, preexec_fn=_without_root_reading_power if unprivileged else None)
        wait_until_ok(f"{self.url}/readyz", timeout=120)

    auth = {"authorization": f"Bearer {ADMIN}"}

    def reload(self, version: int) -> httpx.Response:
        return httpx.post(f"{self.url}/v1/admin/reload", json={"name": "reference", "version": version}, headers=self.auth, timeout=60)

    def metric(self, name: str, **labels: str) -> float:
        class _At:
            http_url = self.url

        return _metric(_At, name, **labels) or 0

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        self.process.stderr.close()


# ---- 2. a reload stuck on I/O --------------------------------------------------------------------------------------
def test_a_reload_stuck_on_a_fifo_times_out_later_reloads_work_and_sigterm_still_exits(tmp_path):
    registry = _registry_with_two_versions(tmp_path / "registry")
    stuck = registry / "reference" / "v3"
    shutil.copytree(registry / "reference" / "v2", stuck)
    for name in ("manifest.json", "sae.safetensors", "features.safetensors"):
        (stuck / name).unlink(missing_ok=True)
        os.mkfifo(stuck / name)  # opening it for reading blocks until a writer comes: none will
    server = ServerProcess(registry, MONOSEMANTIC_REGISTRY_TIMEOUT_S="1.5", MONOSEMANTIC_SHUTDOWN_GRACE_S="2")
    try:
        started = time.monotonic()
        response = server.reload(3)
        assert response.status_code == 504, response.text
        assert "MONOSEMANTIC_REGISTRY_TIMEOUT_S" in response.json()["error"]["message"]
        assert time.monotonic() - started < 5
        with GrpcClient(f"127.0.0.1:{server.grpc_port}", api_key=ADMIN) as client:
            with pytest.raises(ServiceCallError) as caught:
                client.reload("reference", 3)
            assert caught.value.status == "DEADLINE_EXCEEDED"
            assert client.dictionaries().dictionaries[0].version == 1  # the old version serves on
        good = server.reload(2)  # not blocked behind the two stuck reads
        assert good.status_code == 200 and good.json()["dictionary"]["version"] == 2
        assert server.metric("monosemantic_dictionary_reloads_total", result="failure") == 2
        server.process.send_signal(signal.SIGTERM)
        server.process.wait(timeout=2 + 8)  # the grace, and the model's own teardown
        assert server.process.returncode == 0
    finally:
        server.stop()


# ---- 3. an unreadable registry ----------------------------------------------------------------------------------------
def test_an_unreadable_registry_or_version_is_refused_without_a_path_and_counted(tmp_path):
    registry = _registry_with_two_versions(tmp_path / "registry")
    server = ServerProcess(registry, unprivileged=True)
    version_file = registry / "reference" / "v2" / "sae.safetensors"
    try:
        version_file.chmod(0)
        response = server.reload(2)
        assert response.status_code == 409, response.text
        assert "Permission denied" in response.json()["error"]["message"] and str(tmp_path) not in response.text
        (registry / "reference" / "v2").chmod(0)
        assert server.reload(2).status_code == 409
        registry.chmod(0)
        listing = httpx.get(f"{server.url}/v1/dictionaries", headers=server.auth, timeout=30)
        assert listing.status_code == 503 and str(tmp_path) not in listing.text
        assert listing.json()["error"]["kind"] == "unavailable"
        refused = server.reload(2)
        assert refused.status_code == 409 and str(tmp_path) not in refused.text
        assert httpx.post(f"{server.url}/v1/activations", json={"text": "def f():"}, headers=server.auth, timeout=30).status_code == 200
        assert server.metric("monosemantic_dictionary_reloads_total", result="failure") == 3
        registry.chmod(stat.S_IRWXU)
        (registry / "reference" / "v2").chmod(stat.S_IRWXU)
        version_file.chmod(stat.S_IRUSR | stat.S_IWUSR)
        assert server.reload(2).status_code == 200  # readable again: the same version loads
    finally:
        for path in (registry, registry / "reference" / "v2"):
            path.chmod(stat.S_IRWXU)
        version_file.chmod(stat.S_IRUSR | stat.S_IWUSR)
        server.stop()


# ---- 12. a port in use ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def first_server():
    running = RunningServer(registry=reference_registry_path())
    yield running
    running.stop()


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_a_second_server_on_a_port_in_use_stops_with_a_clear_error(first_server, protocol):
    taken = first_server.server.grpc_port if protocol == "grpc" else first_server.server.http_port
    ports = {"grpc": (free_port(), taken), "http": (taken, free_port())}[protocol]
    result = subprocess.run([sys.executable, "-m", "service.cli", "--http-port", str(ports[0]), "--grpc-port", str(ports[1])],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert f"cannot bind the {'gRPC' if protocol == 'grpc' else 'HTTP'} port" in result.stderr and str(taken) in result.stderr
    assert httpx.get(f"{first_server.http_url}/readyz", timeout=10).status_code == 200


# ---- second review (issue 28): memory after a burst ----------------------------------------------------------------
def test_memory_returns_after_a_burst_of_large_observes(tmp_path):
    server = ServerProcess(_registry_with_two_versions(tmp_path / "registry"))
    try:
        def rss() -> int:
            with open(f"/proc/{server.process.pid}/status") as fh:
                return next(int(line.split()[1]) for line in fh if line.startswith("VmRSS:"))

        text = ("def " * 255 * 16).rstrip()[:20000]
        httpx.post(f"{server.url}/v1/activations", json={"text": "warm up"}, headers=server.auth, timeout=60)
        time.sleep(2)
        before = rss()
        def observe() -> int:
            # A 429 says the previous burst still holds its share of the queue (on a slow machine 0.5 s is not
            # enough to read 64 windows); a client waits and sends again, as this one does, for at most 60 s.
            deadline = time.monotonic() + 60
            while (status := httpx.post(f"{server.url}/v1/observe", json={"texts": [text] * 4}, headers=server.auth,
                                        timeout=60).status_code) == 429 and time.monotonic() < deadline:
                time.sleep(0.2)
            return status

        for _ in range(12):
            assert observe() == 202
            time.sleep(0.5)
        drained = time.monotonic() + 60  # the last burst read to its end (a slow machine needs longer than 0.5 s)
        while server.metric("monosemantic_queue_depth") > 0 and time.monotonic() < drained:
            time.sleep(0.2)
        time.sleep(4)  # idle: the worker gives back what the batches freed
        assert rss() < before * 1.15, (before, rss())  # 07a263b: +76% (438,764 → 772,344 kB), and it stayed
    finally:
        server.stop()
