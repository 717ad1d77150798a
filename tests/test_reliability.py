"""The reliability figures of bench/reliability.py, run short (--quick) against the real server as a process:
mixed load, hot reload of good and broken versions under load, overload, SIGTERM under load, a short soak.
Also: a publisher killed with SIGKILL mid-publish leaves no partial version."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from monosemantic.artifact import list_versions

# bench/reliability.py --quick against the real server as a process: load, reloads, a soak (a minute)
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def figures():
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "reliability.py"), "--quick", "--json"],
                            capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_64_mixed_clients_over_both_transports_see_no_error(figures):
    load = figures["mixed_load"]
    assert load["requests"] > 200 and load["failures"] == 0, load["statuses"]
    assert {"grpc OK", "rest 200"} <= set(load["statuses"])


def test_20_reloads_of_good_and_broken_versions_under_load_lose_no_request(figures):
    reload = figures["reload_under_load"]
    assert reload["failures"] == 0, reload["statuses"]
    assert reload["good_reloads"] == 10 and reload["broken_refused"] == 10
    assert reload["reload_outcomes"]["readyz 200"] == 20
    assert set(reload["versions_answered"]) == {"1", "2"}  # both good versions really served


def test_overload_is_refused_at_once_and_exactly(figures):
    over = figures["overload"]
    assert over["other"] == 0 and over["served"] + over["refused_429"] == over["sent"]
    assert over["refused_429"] == over["sent"] - over["queue"]  # exactly: slots count requests, not steps
    assert over["rejected_metric"] == over["refused_429"]
    # At once: every refusal is answered before the first admitted request is served, so none waited behind the
    # work. (A ratio of medians was flaky: in about one run of three here, the one burst of 19 requests starts with
    # a stall of ~200 ms, on the client's side or the server's, that delays the refusals and the served alike.)
    assert over["refused_slowest_s"] < over["served_fastest_s"]


def test_sigterm_under_load_finishes_requests_and_streams_then_exits_zero(figures):
    term = figures["sigterm_under_load"]
    assert term["completed"] == term["in_flight"] and term["exit_code"] == 0
    assert term["late_request"] in (503, "ConnectError", "RemoteProtocolError")


def test_a_short_soak_has_no_errors_and_bounded_memory(figures):
    soak = figures["soak"]
    assert soak["failures"] == 0
    assert soak["rss_growth"] < 0.5  # the 10-minute figure is in bench/RELIABILITY.md; 10 s only catches a leak


def test_a_publisher_killed_mid_publish_leaves_no_partial_version(tmp_path):
    script = (
        "import sys, torch\n"
        "from monosemantic.artifact import HookRef, ModelRef, publish\n"
        "from monosemantic.sae import SAEConfig, build_sae\n"
        "sae = build_sae(SAEConfig.build(architecture='relu', d_in=512, d_sae=65536))\n"
        "print('ready', flush=True)\n"
        "while True:\n"
        f"    publish({str(tmp_path)!r}, 'big', sae, model=ModelRef(name='m', checksum='0'*64), hook=HookRef(name='h', module_path='h'))\n"
    )
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "ready"
    deadline = time.time() + 60
    while time.time() < deadline and not any((tmp_path / "big").glob(".tmp-*")) :
        time.sleep(0.005)
    time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    versions = list_versions(tmp_path, "big")
    for version in versions:  # every version that exists is complete and verifies
        from monosemantic.artifact import verify

        verify(tmp_path / "big" / f"v{version}")
    leftovers = [p.name for p in (tmp_path / "big").iterdir() if not p.name.startswith(("v", ".tmp-"))]
    assert leftovers == []
