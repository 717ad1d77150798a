"""The second review's cases (bench/RELIABILITY.md, "Red team, second pass"), sent to a real server process as the
reviewer sent them; a markdown table, one row per case. The helpers are bench/red_team.py's.

    python bench/red_team_2.py [--tree PATH]

--tree runs the service of another checkout (an older commit) on the same cases.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from red_team import ADMIN, READ, STEER, Server  # noqa: E402
from serve import free_port  # noqa: E402

from monosemantic.shipped import reference_registry_path  # noqa: E402


def start_fails(tree: Path, registry: Path, **env: str) -> str:
    """How a server that should refuse to start ends: exit code, seconds, and its last stderr line (or that it served)."""
    port = free_port()
    started = time.monotonic()
    process = subprocess.Popen([sys.executable, "-m", "service.cli", "--http-port", str(port), "--grpc-port", str(free_port())], cwd=tree,
                               env={**os.environ, "MONOSEMANTIC_REGISTRY": str(registry), **env}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                open_ = httpx.post(f"http://127.0.0.1:{port}/v1/generate", json={"prompt": "def ", "max_new_tokens": 1,
                                   "steering": [{"feature": 5, "mode": "clamp", "value": 5}]}, timeout=30).status_code
                process.kill()
                process.wait(10)
                return f"**started**; a steered generation without a key: {open_}"
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    if process.poll() is None:
        process.kill()
    lines = [line for line in process.stderr.read().splitlines() if line.strip() and "Loading weights" not in line]
    return f"exit {process.wait(10)} after {time.monotonic() - started:.1f} s, {len(lines)} lines: {lines[-1][:120] if lines else ''!r}"


def probe(url: str, seconds: float) -> dict[str, float]:
    out: dict[str, list[float]] = {"healthz": [], "activations": []}
    stop = time.monotonic() + seconds
    with httpx.Client(base_url=url, timeout=60, headers={"authorization": f"Bearer {ADMIN}"}) as http:
        while time.monotonic() < stop:
            for name, call in (("healthz", lambda: http.get("/healthz")), ("activations", lambda: http.post("/v1/activations", json={"text": "def main():"}))):
                started = time.perf_counter()
                call()
                out[name].append(time.perf_counter() - started)
    return {name: statistics.median(values) * 1000 for name, values in out.items()}


def cases(tree: Path, registry: Path, tmp: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    keys = tmp / "keys.json"
    for label, content in (("1 keys file with no keys", []),
                           ("2 the same key twice (read-only at 1/s, then admin)", [{"name": "slow", "key": READ, "scopes": ["read"], "requests_per_second": 1},
                                                                                  {"name": "root", "key": READ, "scopes": ["read", "admin"]}]),
                           ("3 a key with a trailing space", [{"name": "spaced", "key": READ + " ", "scopes": ["read"]}])):
        keys.write_text(json.dumps({"keys": content}))
        out[label] = start_fails(tree, registry, MONOSEMANTIC_API_KEYS_FILE=str(keys))
    out["10 TLS certificate file missing"] = start_fails(tree, registry, MONOSEMANTIC_TLS_CERT_FILE=str(tmp / "nowhere.pem"), MONOSEMANTIC_TLS_KEY_FILE=str(tmp / "nowhere-key.pem"))

    keys.write_text(json.dumps({"keys": [{"name": "old", "key": READ, "scopes": ["read"]}]}))  # ADMIN is MONOSEMANTIC_ADMIN_KEY
    server = Server(tree, registry, tmp / "server.log", MONOSEMANTIC_API_KEYS_FILE=str(keys))
    try:
        staged = tmp / "keys.staged"
        staged.write_text(json.dumps({"keys": [{"name": "new", "key": STEER, "scopes": ["read"]}]}))
        staged.replace(keys)
        time.sleep(4)
        old, new = (server.post("/v1/activations", {"text": "x"}, key=k).status_code for k in (READ, STEER))
        out["4 keys file replaced (old key revoked, new key added)"] = f"4 s later: old key {old}, new key {new}"
        out["6 /metrics on a keyed server"] = f"{httpx.get(f'{server.url}/metrics', timeout=10).status_code} without a key (open by convention)"

        idle = probe(server.url, 2)
        texts = ["a " * 7000] * 64
        stop = time.monotonic() + 5
        statuses: list[int] = []

        def storm() -> None:
            with httpx.Client(timeout=60, headers={"authorization": f"Bearer {ADMIN}"}) as http:
                while time.monotonic() < stop:
                    statuses.append(http.post(f"{server.url}/v1/observe", json={"texts": texts}).status_code)

        threads = [threading.Thread(target=storm) for _ in range(2)]
        for thread in threads:
            thread.start()
        time.sleep(0.5)
        loaded = probe(server.url, 4)
        for thread in threads:
            thread.join()
        out["7 two clients looping ~900 KB observes: probe p50"] = (
            f"/healthz {idle['healthz']:.1f} → {loaded['healthz']:.1f} ms, activations {idle['activations']:.1f} → {loaded['activations']:.1f} ms "
            f"(observes answered {sorted(set(statuses))})")

        rss = lambda: int(next(line.split()[1] for line in open(f"/proc/{server.process.pid}/status") if line.startswith("VmRSS:"))) >> 10  # noqa: E731
        small = server.post("/v1/observe", {"texts": ["a " * 10000] * 4})
        before = rss()
        codes = [server.post("/v1/observe", {"texts": [("def " * 4080).rstrip()[:20000]] * 4}).status_code for _ in range(12)]
        time.sleep(5)
        out["8 one observe of 4 × 20k characters; then 12 in a row"] = (
            f"{small.status_code} {small.text[:70]!r}; RSS {before} → {rss()} MiB 5 s after 12 observes ({sorted(set(codes))})")

        def stream(_):
            with httpx.stream("POST", f"{server.url}/v1/generate", json={"prompt": "def ", "max_new_tokens": 48, "temperature": 0, "stream": True},
                              headers={"authorization": f"Bearer {ADMIN}"}, timeout=60) as r:
                for _ in r.iter_lines():
                    pass

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(stream, i) for i in range(8)]
            time.sleep(0.5)
            inflight = server.metric("monosemantic_inflight_requests")
            for f in futures:
                f.result()
        out["9 8 REST streams running: in-flight gauge"] = f"{inflight:g}"

        heads = [httpx.head(f"{server.url}{p}", timeout=10).status_code for p in ("/", "/healthz", "/readyz", "/metrics")]
        options = httpx.options(f"{server.url}/v1/activations", timeout=10)
        true_id = server.post("/v1/activations", {"token_ids": [True, 5]})
        out["11 HEAD /, /healthz, /readyz, /metrics; OPTIONS /v1/activations; token id `true`"] = (
            f"{heads}; {options.status_code} {options.headers.get('allow', '')!r}; {true_id.status_code}")
    finally:
        server.stop()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tree", type=Path, default=ROOT)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        registry = Path(tmp) / "registry"
        shutil.copytree(reference_registry_path() / "reference", registry / "reference")  # with its ledger
        results = cases(args.tree.resolve(), registry, Path(tmp))
    print(f"tree: {args.tree.resolve()}\n\n| case | result |\n| --- | --- |")
    for case, result in sorted(results.items(), key=lambda kv: int(kv[0].split()[0])):
        print(f"| {case} | {result.replace('|', '/')} |")


if __name__ == "__main__":
    main()
