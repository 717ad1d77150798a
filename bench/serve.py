"""Benchmark: the real server under concurrent clients on loopback, dynamic batching on vs off, against a naive
per-request FastAPI baseline — all measured in the same run.

For each configuration the server runs in its own process; a separate load process drives N closed-loop
clients sending activations requests for 64-token texts, and reports requests/s and p50/p99 latency. Then
tokens/s of generate (REST, 4 concurrent streams).

The REST load comes from `wrk` (C; `apt-get install wrk`) when it is installed, else from Python (httpx). The
machine has 2 cores that the load generator shares with the server, so a client that spends a millisecond of
CPU per request measures itself as much as the server: httpx took about half the CPU at 240 req/s. The gRPC
load comes from `h2load` (C, nghttp2; `apt-get install nghttp2-client`) sending the framed ActivationsRequest when it
is installed, else from Python (grpc.aio), which takes the server's cores and hides what a call costs.

With wrk and h2load, each row also reports the server's CPU time per request (from /proc, all its threads), and the
table ends with gRPC's CPU per request over REST's at each concurrency (the same work: a 64-token text, top_k 10). At the end
the bench times the engine's batch function in-process (one request alone against a batch of 32) and prints the
ceiling the CPU sets: with every core busy, the batched server can't pass cores × 1000 / its CPU-ms per request.

    python bench/serve.py [--seconds 6] [--clients 1,8,32,128] [--load-generator wrk|python] [--shape reference|gpt2]

--shape gpt2 serves GPT-2 small's shape in bf16 (bench/gpt2_shape.py, random weights) with a random TopK dictionary
of --d-sae features at blocks.6.hook_resid_post, published bound to it (bench/serve_scale.py); all three servers get
it through MONOSEMANTIC_MODEL / _REGISTRY / _DICTIONARY, and the reference-only parts at the end are left out.

The wait bound is off unless MONOSEMANTIC_MAX_QUEUE_WAIT_S is set: at the GPT-2 shape a batch of 32 takes longer than
its default 2 s on two cores, and on the reference the unbatched server at 128 clients queues ~2.7 s, so part of the
load would be refused, and wrk counts a 429 as a failed request (bench/serve_scale.py measures the bound itself).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import httpx

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def texts_of_64_tokens(count: int) -> list[str]:
    """Pieces of this repository's own source, each 63 tokens (+ BOS = 64) under the reference tokenizer."""
    from transformers import AutoTokenizer

    from monosemantic.shipped import reference_lm_path

    tokenizer = AutoTokenizer.from_pretrained(reference_lm_path())
    source = "".join(p.read_text() for p in sorted((ROOT / "service").glob("*.py")))
    ids = tokenizer(source, add_special_tokens=False).input_ids
    out, start = [], 0
    while len(out) < count and start + 63 < len(ids):
        text = tokenizer.decode(ids[start : start + 63])
        if len(tokenizer(text, add_special_tokens=False).input_ids) == 63:
            out.append(text)
        start += 63
    return out


class ServerProcess:
    """The real service (`kind="ours"`, `monosemantic-serve`) or the naive baseline, as its own process on free
    ports, returned once it answers. The benches share it (serve, features, reliability)."""

    def __init__(self, kind: str, env: dict[str, str], warm_up: bool = True, tree: Path = ROOT) -> None:
        """tree: the checkout whose service runs (bench/red_team.py's --tree runs an older one for a before/after)."""
        self.http_port, self.grpc_port = free_port(), free_port()
        self.url, self.target = f"http://127.0.0.1:{self.http_port}", f"127.0.0.1:{self.grpc_port}"
        if kind == "naive":
            cmd = [sys.executable, str(ROOT / "bench" / "naive_server.py"), str(self.http_port)]
        else:
            cmd = [sys.executable, "-m", "service.cli", "--http-port", str(self.http_port), "--grpc-port", str(self.grpc_port)]
        self.process = subprocess.Popen(cmd, env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=tree)
        deadline = time.time() + 120
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{kind} server exited: {self.process.stderr.read()[-500:]}")
            try:
                # the naive baseline has no /readyz: a first request is its readiness check (and everyone's warm-up)
                if kind == "naive" or warm_up:
                    httpx.post(f"{self.url}/v1/activations", json={"text": "warm up"}, timeout=5).raise_for_status()
                    return
                if httpx.get(f"{self.url}/readyz", timeout=5).status_code == 200:
                    return
            except (httpx.TransportError, httpx.HTTPStatusError):
                pass
            time.sleep(0.2)
        raise RuntimeError(f"{kind} server did not start")

    def rss_bytes(self) -> int:
        with open(f"/proc/{self.process.pid}/status") as fh:
            return next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmRSS:"))

    def cpu_seconds(self) -> float:
        """User + system CPU time the server process has used so far (all its threads)."""
        with open(f"/proc/{self.process.pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> int:
        """SIGTERM (the server drains), then its exit code."""
        self.process.terminate()
        return self.process.wait(60)


WARMUP_S = 1.0  # every client runs this long before latencies count: connections open, caches warm


async def closed_loop(clients: int, seconds: float, call) -> list[float]:
    """`clients` concurrent loops each calling call(client_index, request_index) back to back; latencies of the
    calls that start after the warm-up and before the end."""
    latencies: list[float] = []
    start_counting = time.perf_counter() + WARMUP_S
    stop_at = start_counting + seconds

    async def loop(n: int) -> None:
        i = n
        while (started := time.perf_counter()) < stop_at:
            await call(n, i)
            if started >= start_counting:
                latencies.append(time.perf_counter() - started)
            i += clients

    await asyncio.gather(*(loop(n) for n in range(clients)))
    return latencies


async def drive_rest(url: str, texts: list[str], clients: int, seconds: float) -> list[float]:
    # One AsyncClient (one keep-alive connection) per simulated client, made before the clock starts: a shared
    # httpcore pool scans all its connections for every request, which at 128 made the load generator the
    # bottleneck.
    pool = [httpx.AsyncClient(base_url=url, timeout=60) for _ in range(clients)]

    async def call(n: int, i: int) -> None:
        response = await pool[n].post("/v1/activations", json={"text": texts[i % len(texts)], "top_k": 10})
        response.raise_for_status()

    try:
        return await closed_loop(clients, seconds, call)
    finally:
        for client in pool:
            await client.aclose()


async def drive_grpc(target: str, texts: list[str], clients: int, seconds: float) -> list[float]:
    import grpc

    from monosemantic.v1 import feature_service_pb2 as pb
    from monosemantic.v1 import feature_service_pb2_grpc as rpc

    async with grpc.aio.insecure_channel(target) as channel:
        stub = rpc.FeatureServiceStub(channel)

        async def call(n: int, i: int) -> None:
            await stub.Activations(pb.ActivationsRequest(text=texts[i % len(texts)], top_k=10), timeout=60)

        return await closed_loop(clients, seconds, call)


def load_main(args: argparse.Namespace) -> None:
    """Runs in its own process: drives one server at one concurrency and prints one JSON line."""
    texts = json.loads(Path(args.texts).read_text())
    drive = drive_rest(args.url, texts, args.load_clients, args.seconds) if args.protocol == "rest" else drive_grpc(args.url, texts, args.load_clients, args.seconds)
    latencies = asyncio.run(drive)
    elapsed = args.seconds
    latencies.sort()
    p = lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))]  # noqa: E731
    print(json.dumps({"rps": len(latencies) / elapsed, "p50": p(0.5), "p99": p(0.99), "n": len(latencies)}))


WRK_SCRIPT = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local bodies = { %s }
local i = 0
request = function()
  i = i + 1
  return wrk.format(nil, "/v1/activations", nil, bodies[(i %% #bodies) + 1])
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('{"requests": %%d, "duration_us": %%d, "p50_us": %%d, "p99_us": %%d, "failed": %%d}\\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    e.connect + e.read + e.write + e.status + e.timeout))
end
"""


def measure_wrk(url: str, texts: list[str], clients: int, seconds: float, cpu_seconds: Callable[[], float] | None = None) -> dict:
    """wrk, one thread, `clients` keep-alive connections, after a warm-up run of WARMUP_S that is thrown away; with
    `cpu_seconds` (the server's CPU clock) also the server's CPU time per request over the measured run."""
    bodies = ", ".join(f"[==[{json.dumps({'text': t, 'top_k': 10})}]==]" for t in texts)
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(WRK_SCRIPT % bodies)
    try:
        def run(duration: float) -> dict:
            out = subprocess.run(["wrk", "-t1", f"-c{clients}", f"-d{max(1, round(duration))}s", "--timeout", "60s",
                                  "-s", script.name, url], capture_output=True, text=True, check=True).stdout
            return json.loads(next(line for line in out.splitlines() if line.startswith('{"requests"')))

        run(WARMUP_S)
        cpu_before = cpu_seconds() if cpu_seconds else 0.0
        r = run(seconds)
        cpu = cpu_seconds() - cpu_before if cpu_seconds else None
    finally:
        os.unlink(script.name)
    if r["failed"]:
        raise RuntimeError(f"wrk: {r['failed']} of {r['requests']} requests failed against {url}")
    return {"rps": r["requests"] / (r["duration_us"] / 1e6), "p50": r["p50_us"] / 1e6, "p99": r["p99_us"] / 1e6, "n": r["requests"],
            "cpu_ms": None if cpu is None else cpu / r["requests"] * 1000}


def grpc_frame(message: bytes) -> bytes:
    """A gRPC length-prefixed message: an uncompressed flag byte, the length as 4 bytes big-endian, the bytes
    (the gRPC over HTTP/2 protocol, doc/PROTOCOL-HTTP2.md in grpc/grpc)."""
    return b"\x00" + len(message).to_bytes(4, "big") + message


def _grpc_outcomes(metrics_url: str) -> dict[str, float]:
    """The server's count of gRPC activations calls by status code (its own Prometheus counter): h2load sees only
    HTTP/2 status 200, as a gRPC call's status travels in its trailers."""
    counts: dict[str, float] = {}
    for line in httpx.get(metrics_url, timeout=30).text.splitlines():
        if line.startswith('monosemantic_requests_total{') and 'protocol="grpc"' in line and 'method="activations"' in line:
            code = line.split('code="', 1)[1].split('"', 1)[0]
            counts[code] = counts.get(code, 0.0) + float(line.rsplit(" ", 1)[1])
    return counts


def measure_h2load(target: str, metrics_url: str, text: str, clients: int, seconds: float,
                   cpu_seconds: Callable[[], float] | None = None) -> dict:
    """h2load (C, nghttp2; `apt-get install nghttp2-client`) as a gRPC client: `clients` HTTP/2 connections, one
    stream each (closed loop, as wrk's connections), each POSTing the framed ActivationsRequest for `text` to
    /monosemantic.v1.FeatureService/Activations. h2load takes one body, so every call reads the same 64-token text
    (wrk's REST calls rotate 64 such texts: the same work per call). Latencies come from h2load's per-request log;
    a call is counted failed when the server's own metrics counted it with a status other than OK (beyond the calls
    h2load cancels when its time is up)."""
    from monosemantic.v1 import feature_service_pb2 as pb

    body = grpc_frame(pb.ActivationsRequest(text=text, top_k=10).SerializeToString())
    with tempfile.TemporaryDirectory() as tmp:
        body_file, log_file = Path(tmp) / "body", Path(tmp) / "log"
        body_file.write_bytes(body)

        def run(duration: float, log: Path | None = None) -> None:
            cmd = ["h2load", "-c", str(clients), "-m", "1", "-t", "1", "-D", str(max(1, round(duration))), "-d", str(body_file),
                   "-H", "content-type: application/grpc", "-H", "te: trailers"]
            cmd += ["--log-file", str(log)] if log else []
            subprocess.run(cmd + [f"http://{target}/monosemantic.v1.FeatureService/Activations"], capture_output=True, text=True, check=True)

        run(WARMUP_S)
        before, cpu_before = _grpc_outcomes(metrics_url), cpu_seconds() if cpu_seconds else 0.0
        run(seconds, log_file)
        cpu = cpu_seconds() - cpu_before if cpu_seconds else None
        after = _grpc_outcomes(metrics_url)
        rows = [line.split("\t") for line in log_file.read_text().splitlines() if line.strip()]
    # h2load resets the calls still open when its duration ends: up to one per connection counts as a client gone (499).
    cancelled = after.get("499", 0) - before.get("499", 0)
    failed = sum(after.get(c, 0) - before.get(c, 0) for c in after if c not in ("200", "499")) + max(0, cancelled - clients)
    failed += sum(1 for r in rows if r[1] != "200")
    if failed or not rows:
        codes = {c: after.get(c, 0) - before.get(c, 0) for c in after}
        raise RuntimeError(f"h2load: {failed:.0f} of {len(rows)} gRPC calls failed against {target} (server codes {codes}, "
                           f"HTTP statuses {sorted({r[1] for r in rows})})")
    latencies = sorted(int(r[2]) / 1e6 for r in rows)
    starts = [int(r[0]) / 1e6 for r in rows]
    elapsed = max(s + l for s, l in zip(starts, (int(r[2]) / 1e6 for r in rows))) - min(starts)
    p = lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))]  # noqa: E731
    return {"rps": len(rows) / elapsed, "p50": p(0.5), "p99": p(0.99), "n": len(rows),
            "cpu_ms": None if cpu is None else cpu / len(rows) * 1000}


def measure(url: str, protocol: str, texts_file: Path, clients: int, seconds: float, generator: str = "python",
            cpu_seconds: Callable[[], float] | None = None, grpc_generator: str = "python", metrics_url: str = "") -> dict:
    """One load level: wrk for REST and h2load for gRPC when chosen (then with the server's CPU per request, given
    `cpu_seconds`), else the Python load process, which reports no CPU figure: its own warm-up would count in the
    server's clock."""
    if protocol == "rest" and generator == "wrk":
        return measure_wrk(url, json.loads(texts_file.read_text()), clients, seconds, cpu_seconds)
    if protocol == "grpc" and grpc_generator == "h2load":
        return measure_h2load(url, metrics_url, json.loads(texts_file.read_text())[0], clients, seconds, cpu_seconds)
    out = subprocess.run(
        [sys.executable, __file__, "--load", "--url", url, "--protocol", protocol, "--texts", str(texts_file), "--load-clients", str(clients), "--seconds", str(seconds)],
        capture_output=True, text=True, check=True,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def generate_rate(url: str, streams: int, tokens: int) -> float:
    async def run() -> int:
        async with httpx.AsyncClient(base_url=url, timeout=120) as http:
            async def one(seed: int) -> int:
                r = await http.post("/v1/generate", json={"prompt": "def main():\n    ", "max_new_tokens": tokens, "seed": seed})
                r.raise_for_status()
                return len(r.json()["tokens"])

            return sum(await asyncio.gather(*(one(s) for s in range(streams))))

    started = time.perf_counter()
    count = asyncio.run(run())
    return count / (time.perf_counter() - started)


STEERING = [{"feature": 3329, "mode": "add", "value": 4.0}, {"feature": 2508, "mode": "clamp", "value": 0.0}]


def stream_rate(server: ServerProcess, protocol: str, streams: int = 4, tokens: int = 64) -> dict:
    """Steered streaming generation (REST server-sent events or gRPC GenerateStream, through the package's clients):
    `streams` concurrent streams of `tokens` tokens each, reporting tokens/s and the server's tokens per CPU-second."""
    from concurrent.futures import ThreadPoolExecutor

    from monosemantic import api
    from monosemantic.client import GrpcClient, RestClient

    def one(seed: int) -> int:
        client = RestClient(server.url) if protocol == "rest" else GrpcClient(server.target)
        with client:
            events = client.generate_stream(prompt="def main():\n    ", max_new_tokens=tokens, seed=seed, steering=STEERING)
            return sum(isinstance(event, api.GeneratedToken) for event in events)

    cpu_before, started = server.cpu_seconds(), time.perf_counter()
    with ThreadPoolExecutor(streams) as pool:
        count = sum(pool.map(one, range(streams)))
    elapsed, cpu = time.perf_counter() - started, server.cpu_seconds() - cpu_before
    return {"tokens_per_s": count / elapsed, "tokens_per_cpu_s": count / cpu, "tokens": count}


def worker_cost(texts: list[str], batch: int = 32, repeats: int = 15) -> tuple[float, float]:
    """Milliseconds the engine's worker spends on one 64-token activations request alone, and per request in a
    batch of `batch` (medians of `repeats`), run in this process with no server on the machine: how much of a
    request's forward batching shares. Every forward runs on the one worker thread, so 1000 / the second figure
    caps the batched server's requests/s even with a free HTTP layer; the CPU ceiling printed beside it, which
    counts the HTTP layer too, is the tighter one."""
    import statistics

    from monosemantic.readout import Read
    from service.batcher import Job
    from service.engine import Engine, ReadJob
    from service.settings import ServiceSettings

    engine = Engine(ServiceSettings())
    engine.load()
    model, reads = engine.repository.model, (Read(engine.repository.default, 10),)
    jobs = [Job(run=engine._run_reads, payload=ReadJob(model.tokenize(t, True).ids, reads)) for t in texts[:batch]]

    def median_ms(group: list[Job]) -> float:
        group[0].run(group)  # warm: oneDNN builds its primitive for this shape once
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            group[0].run(group)
            times.append((time.perf_counter() - started) * 1000)
        return statistics.median(times)

    return median_ms(jobs[:1]), median_ms(jobs) / len(jobs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--clients", default="1,8,32,128")
    parser.add_argument("--load-generator", choices=("wrk", "python"), default="wrk" if shutil.which("wrk") else "python",
                        help="REST load: wrk (the default when installed) or httpx")
    parser.add_argument("--grpc-load-generator", choices=("h2load", "python"), default="h2load" if shutil.which("h2load") else "python",
                        help="gRPC load: h2load (the default when installed) or grpc.aio")
    parser.add_argument("--load", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--protocol", help=argparse.SUPPRESS)
    parser.add_argument("--texts", help=argparse.SUPPRESS)
    parser.add_argument("--load-clients", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--shape", choices=("reference", "gpt2"), default="reference")
    parser.add_argument("--d-sae", type=int, default=24_576, help="the dictionary's width at --shape gpt2")
    args = parser.parse_args()
    if args.load:
        return load_main(args)
    if args.shape == "gpt2":
        from gpt2_shape import gpt2_shaped
        from serve_scale import publish_bench_dictionary

        model = gpt2_shaped(argparse.Namespace(layers=12, d_model=768, vocab=50257), "bfloat16")
        registry, _ = publish_bench_dictionary(model, args.d_sae, 6)
        os.environ.update(MONOSEMANTIC_MODEL=str(model), MONOSEMANTIC_REGISTRY=str(registry), MONOSEMANTIC_DICTIONARY="bench")
        print(f"GPT-2 shape (bf16) at {model}, {args.d_sae:,} TopK features at blocks.6.hook_resid_post", flush=True)

    os.environ.setdefault("MONOSEMANTIC_MAX_QUEUE_WAIT_S", "0")  # throughput, not refusals: see the module's docstring
    levels = [int(c) for c in args.clients.split(",")]
    grpc_tool = "h2load" if args.grpc_load_generator == "h2load" else "python (grpc.aio)"
    print(f"REST load generator: {args.load_generator}; gRPC load generator: {grpc_tool}", flush=True)
    texts_file = Path(os.environ.get("TMPDIR", "/tmp")) / "monosemantic-bench-texts.json"
    texts_file.write_text(json.dumps(texts_of_64_tokens(64)))
    configs = [
        ("batched", "ours", {}, ("rest", "grpc")),
        ("unbatched", "ours", {"MONOSEMANTIC_MAX_BATCH_REQUESTS": "1"}, ("rest", "grpc")),
        ("naive", "naive", {}, ("rest",)),
    ]
    results: dict[tuple[str, str, int], dict] = {}
    gen = {}
    streamed: dict[tuple[str, str], dict] = {}
    for name, kind, env, protocols in configs:
        server = ServerProcess(kind, env)
        try:
            for protocol in protocols:
                url = f"http://127.0.0.1:{server.http_port}" if protocol == "rest" else f"127.0.0.1:{server.grpc_port}"
                for clients in levels:
                    r = results[(name, protocol, clients)] = measure(url, protocol, texts_file, clients, args.seconds, args.load_generator,
                                                                    server.cpu_seconds, args.grpc_load_generator, f"{server.url}/metrics")
                    cpu = f"  server CPU {r['cpu_ms']:.2f} ms/request" if r.get("cpu_ms") is not None else ""
                    print(f"{name:9s} {protocol:4s} clients={clients:4d}  {r['rps']:8.1f} req/s  p50 {r['p50']*1000:7.1f} ms  p99 {r['p99']*1000:7.1f} ms  (p99/p50 {r['p99']/r['p50']:.2f}){cpu}", flush=True)
            if kind == "ours":
                gen[name] = generate_rate(f"http://127.0.0.1:{server.http_port}", 4, 64)
                print(f"{name:9s} generate: {gen[name]:.1f} tokens/s (4 streams x 64 tokens)", flush=True)
                if args.shape == "reference":  # the steered features are the reference dictionary's
                    for protocol in ("rest", "grpc"):
                        g = streamed[(name, protocol)] = stream_rate(server, protocol)
                        print(f"{name:9s} steered streaming over {protocol}: {g['tokens_per_s']:.1f} tokens/s, "
                              f"{g['tokens_per_cpu_s']:.1f} tokens per server CPU-second (4 streams x 64 tokens)", flush=True)
        finally:
            server.stop()

    print("\n| clients | protocol | batched req/s | unbatched req/s | naive req/s | batched / unbatched | batched / naive | batched p50 ms | batched p99 ms | p99/p50 | batched CPU-ms / request |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for protocol in ("rest", "grpc"):
        for clients in levels:
            b, u = results[("batched", protocol, clients)], results[("unbatched", protocol, clients)]
            n = results.get(("naive", "rest", clients))
            naive = f"{n['rps']:.1f}" if n and protocol == "rest" else "—"
            ratio_naive = f"{b['rps'] / n['rps']:.2f}×" if n and protocol == "rest" else "—"
            cpu = f"{b['cpu_ms']:.2f}" if b.get("cpu_ms") is not None else "—"
            print(f"| {clients} | {protocol} | {b['rps']:.1f} | {u['rps']:.1f} | {naive} | {b['rps'] / u['rps']:.2f}× | {ratio_naive} | {b['p50']*1000:.1f} | {b['p99']*1000:.1f} | {b['p99']/b['p50']:.2f} | {cpu} |")
    for name in ("batched", "unbatched"):
        pairs = [(c, results[(name, "grpc", c)].get("cpu_ms"), results[(name, "rest", c)].get("cpu_ms")) for c in levels]
        if all(g is not None and r is not None for _, g, r in pairs):
            print(f"{name} server CPU per request, gRPC / REST: " + ", ".join(f"{g / r:.2f}× at {c}" for c, g, r in pairs))
    print(f"\ngenerate tokens/s: batched server {gen.get('batched', 0):.1f}, unbatched server {gen.get('unbatched', 0):.1f}")

    # What batching can share on this machine, measured on the engine's own batch function with no server running,
    # and the ceiling that the server's CPU time per request sets on requests/s when every core is busy.
    single, batched = worker_cost(json.loads(texts_file.read_text()))
    print(f"\nworker, in-process, machine otherwise idle: one 64-token request alone {single:.2f} ms; in a batch of 32, "
          f"{batched:.2f} ms per request ({single / batched:.2f}× less)")
    cores = len(os.sched_getaffinity(0))
    for clients in levels:
        b, u = results[("batched", "rest", clients)], results[("unbatched", "rest", clients)]
        if b.get("cpu_ms") is None:
            continue
        cap = cores * 1000 / b["cpu_ms"]
        print(f"  {clients} clients: the batched server used {b['cpu_ms']:.2f} CPU-ms per request (unbatched {u['cpu_ms']:.2f}); "
              f"on {cores} cores it can't pass {cap:.0f} req/s, {cap / u['rps']:.2f}× the unbatched {u['rps']:.1f} req/s, "
              f"even if the load generator took no CPU")

    if args.shape != "reference":
        return
    # Many dictionaries on one model: 4 at 4 hooks in one request against 1 (bench/many_dictionaries.py).
    from many_dictionaries import report

    print("\nmany dictionaries, in-process, one 64-token request:")
    report(repeats=9)


if __name__ == "__main__":
    main()
