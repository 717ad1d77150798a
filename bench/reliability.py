"""Reliability figures (the checklist in bench/RELIABILITY.md) against the real server as a separate process.

    python bench/reliability.py [--quick] [--soak-seconds 600] [--json]

1. mixed load: 64 concurrent clients (half REST, half gRPC) of mixed operations; every answer counted by status.
2. hot reload under load: 20 reloads alternating good and broken versions (tampered, another model, truncated)
   while 16 clients run; failed requests, refused reloads, the version each answer carries.
3. overload: with Q request slots (MONOSEMANTIC_MAX_QUEUE), Q + K requests at once: exactly K refused, and how fast.
4. soak: RSS of the server process after warm-up and at the end of a bounded run at moderate load.
5. SIGTERM under load: in-flight requests and streams finish, new ones are refused, the exit code.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shutil
import signal
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import grpc
import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from serve import ServerProcess  # noqa: E402

from monosemantic.artifact import ModelRef, load_dictionary, publish  # noqa: E402
from monosemantic.shipped import reference_registry_path  # noqa: E402
from monosemantic.v1 import feature_service_pb2 as pb  # noqa: E402
from monosemantic.v1 import feature_service_pb2_grpc as rpc  # noqa: E402

ADMIN = "reliability-admin-key-0123456789"
TEXTS = ["def main():\n    return sorted(items, key=len)\n", "import os\nimport sys\n", "The quick brown fox jumps over the lazy dog.",
         "for i in range(10):\n    print(i * i)\n", "<html><body><p>Hello</p></body></html>"]


def Server(registry: Path, **env: str) -> ServerProcess:
    """The service on `registry` (reference v1 serving), admin key set, as its own process."""
    return ServerProcess("ours", {"MONOSEMANTIC_REGISTRY": str(registry), "MONOSEMANTIC_ADMIN_KEY": ADMIN,
                                  "MONOSEMANTIC_DICTIONARY": "reference:1", **env}, warm_up=False)


def make_registry(root: Path) -> Path:
    """reference v1 (shipped), v2 (good copy), v3 tampered, v4 another model's, v5 truncated tensors."""
    registry = root / "registry"
    shutil.copytree(reference_registry_path() / "reference", registry / "reference")  # with its ledger
    shipped = load_dictionary(registry, "reference", 1)
    m = shipped.manifest
    publish(registry, "reference", shipped.sae, model=m.model, hook=m.hook, dtype="bfloat16", features=shipped.features,
            labels=shipped.labels, extra={"metrics": m.metrics})
    publish(registry, "reference", shipped.sae, model=m.model, hook=m.hook, dtype="bfloat16")
    publish(registry, "reference", shipped.sae, model=ModelRef(name="another-model", checksum="0" * 64), hook=m.hook, dtype="bfloat16")
    publish(registry, "reference", shipped.sae, model=m.model, hook=m.hook, dtype="bfloat16")
    (registry / "reference" / "v3" / "sae.safetensors").open("r+b").write(b"\x00" * 64)  # tampered header
    path = registry / "reference" / "v5" / "sae.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return registry


async def mixed_client(n: int, server: Server, stop_at: float, statuses: Counter, versions: Counter, key: str | None = ADMIN) -> None:
    """One closed-loop client; even ones speak REST, odd ones gRPC; operations drawn at random."""
    rng = random.Random(n)
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    metadata = (("authorization", f"Bearer {key}"),) if key else ()
    if n % 2 == 0:
        async with httpx.AsyncClient(base_url=server.url, timeout=120, headers=headers) as http:
            while time.perf_counter() < stop_at:
                text = rng.choice(TEXTS)
                op = rng.choice(["activations", "activations", "attributions", "feature", "search", "generate", "observe"])
                try:
                    if op == "activations":
                        r = await http.post("/v1/activations", json={"text": text, "top_k": 5})
                    elif op == "attributions":
                        r = await http.post("/v1/attributions", json={"text": text, "target": 5})
                    elif op == "feature":
                        r = await http.get(f"/v1/features/{rng.randrange(4096)}")
                    elif op == "search":
                        r = await http.get("/v1/features/search", params={"q": text[:20], "by": "snippet"})
                    elif op == "generate":
                        r = await http.post("/v1/generate", json={"prompt": text, "max_new_tokens": 4, "seed": n,
                                                                   "steering": [{"feature": 5, "mode": "clamp", "value": 5}]})
                    else:
                        r = await http.post("/v1/observe", json={"texts": [text]})
                    statuses[f"rest {r.status_code}"] += 1
                    if r.status_code == 200 and "dictionary" in r.text[:40]:
                        versions[r.json()["dictionary"]["version"]] += 1
                except httpx.HTTPError as exc:
                    statuses[f"rest transport error {type(exc).__name__}"] += 1
    else:
        async with grpc.aio.insecure_channel(server.target) as channel:
            stub = rpc.FeatureServiceStub(channel)
            while time.perf_counter() < stop_at:
                text = rng.choice(TEXTS)
                op = rng.choice(["Activations", "Activations", "Attributions", "GetFeature", "Generate", "Observe"])
                request = {
                    "Activations": lambda: pb.ActivationsRequest(text=text, top_k=5),
                    "Attributions": lambda: pb.AttributionsRequest(text=text, target=pb.TokenSpec(id=5)),
                    "GetFeature": lambda: pb.GetFeatureRequest(feature=rng.randrange(4096)),
                    "Generate": lambda: pb.GenerateRequest(prompt=text, max_new_tokens=4, seed=n),
                    "Observe": lambda: pb.ObserveRequest(texts=[text]),
                }[op]()
                try:
                    reply = await getattr(stub, op)(request, timeout=120, metadata=metadata)
                    statuses["grpc OK"] += 1
                    if op == "Activations":
                        versions[reply.dictionary.version] += 1
                except grpc.aio.AioRpcError as exc:
                    statuses[f"grpc {exc.code().name}"] += 1


def run_clients(server: Server, clients: int, seconds: float, key: str | None = ADMIN) -> tuple[Counter, Counter]:
    statuses, versions = Counter(), Counter()

    async def main() -> None:
        stop_at = time.perf_counter() + seconds
        await asyncio.gather(*(mixed_client(n, server, stop_at, statuses, versions, key) for n in range(clients)))

    asyncio.run(main())
    return statuses, versions


def failures(statuses: Counter, allowed: tuple[str, ...] = ("rest 200", "rest 202", "grpc OK", "rest 429", "grpc RESOURCE_EXHAUSTED")) -> int:
    return sum(count for status, count in statuses.items() if status not in allowed)


def mixed_load(registry: Path, clients: int, seconds: float) -> dict:
    server = Server(registry)
    try:
        statuses, _ = run_clients(server, clients, seconds)
    finally:
        code = server.stop()
    return {"clients": clients, "seconds": seconds, "requests": sum(statuses.values()), "statuses": dict(statuses),
            "failures": failures(statuses), "exit_code": code}


def reload_under_load(registry: Path, reloads: int, clients: int) -> dict:
    server = Server(registry)
    outcomes = Counter()
    try:
        result: dict = {}

        async def main() -> None:
            statuses, versions = Counter(), Counter()
            stop_at = time.perf_counter() + 3600
            tasks = [asyncio.create_task(mixed_client(n, server, stop_at, statuses, versions, ADMIN)) for n in range(clients)]
            async with httpx.AsyncClient(base_url=server.url, timeout=120, headers={"Authorization": f"Bearer {ADMIN}"}) as admin:
                broken = [3, 4, 5]
                for i in range(reloads):
                    version = (1 + (i // 2) % 2) if i % 2 == 0 else broken[(i // 2) % 3]
                    r = await admin.post("/v1/admin/reload", json={"name": "reference", "version": version})
                    outcomes[f"v{version} {r.status_code}"] += 1
                    ready = (await admin.get("/readyz")).status_code
                    outcomes[f"readyz {ready}"] += 1
                    await asyncio.sleep(0.2)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            result.update(statuses=dict(statuses), versions={str(k): v for k, v in versions.items()})

        asyncio.run(main())
    finally:
        server.stop()
    good = sum(v for k, v in outcomes.items() if k.endswith(" 200") and not k.startswith("readyz"))
    refused = sum(v for k, v in outcomes.items() if k.startswith(("v3", "v4", "v5")) and not k.endswith(" 200"))
    return {"reloads": reloads, "clients": clients, "reload_outcomes": dict(outcomes), "good_reloads": good,
            "broken_refused": refused, "requests": sum(result["statuses"].values()), "failures": failures(result["statuses"]),
            "statuses": result["statuses"], "versions_answered": result["versions"]}


def overload(registry: Path, queue: int, extra: int) -> dict:
    # Slots alone (no wait bound): this scenario proves the count of refusals is exact.
    server = Server(registry, MONOSEMANTIC_MAX_QUEUE=str(queue), MONOSEMANTIC_MAX_BATCH_REQUESTS="1", MONOSEMANTIC_MAX_QUEUE_WAIT_S="0")
    try:
        async def main() -> list[tuple[int, float]]:
            async with httpx.AsyncClient(base_url=server.url, timeout=120, limits=httpx.Limits(max_connections=queue + extra + 8),
                                         headers={"Authorization": f"Bearer {ADMIN}"}) as http:
                async def one(i: int) -> tuple[int, float]:
                    started = time.perf_counter()
                    # 64 tokens: a served request takes ~4x the ~0.2 s stall a burst of new connections can meet
                    # on a loaded machine, so "every refusal before the first served" measures the queue, not the stall.
                    r = await http.post("/v1/generate", json={"prompt": "def ", "max_new_tokens": 64, "seed": i})
                    return r.status_code, time.perf_counter() - started
                return await asyncio.gather(*(one(i) for i in range(queue + extra + 1)))

        answers = asyncio.run(main())
        metrics = httpx.get(f"{server.url}/metrics").text
    finally:
        server.stop()
    refused = [t for code, t in answers if code == 429]
    served = [t for code, t in answers if code == 200]
    rejected_metric = next((float(line.split()[-1]) for line in metrics.splitlines()
                            if line.startswith('monosemantic_rejected_requests_total{reason="queue_full"}')), 0.0)
    return {"sent": len(answers), "queue": queue, "served": len(served), "refused_429": len(refused),
            "other": len(answers) - len(served) - len(refused), "rejected_metric": rejected_metric,
            "refused_median_s": sorted(refused)[len(refused) // 2] if refused else None,
            "served_median_s": sorted(served)[len(served) // 2] if served else None,
            "refused_slowest_s": max(refused, default=None), "served_fastest_s": min(served, default=None)}


def soak(registry: Path, seconds: float, clients: int) -> dict:
    server = Server(registry)
    try:
        run_clients(server, clients, min(15.0, seconds / 4))  # warm-up
        before = server.rss_bytes()
        statuses, _ = run_clients(server, clients, seconds)
        after = server.rss_bytes()
    finally:
        server.stop()
    return {"seconds": seconds, "clients": clients, "requests": sum(statuses.values()), "failures": failures(statuses),
            "rss_after_warmup_mb": before / 2**20, "rss_end_mb": after / 2**20, "rss_growth": (after - before) / before}


def sigterm_under_load(registry: Path) -> dict:
    server = Server(registry)
    outcome: dict = {}

    async def main() -> None:
        async with httpx.AsyncClient(base_url=server.url, timeout=120, headers={"Authorization": f"Bearer {ADMIN}"}) as http:
            async def plain(i: int) -> int:
                r = await http.post("/v1/generate", json={"prompt": "def ", "max_new_tokens": 48, "seed": i})
                return len(r.json()["tokens"]) if r.status_code == 200 else -r.status_code

            async def streamed() -> int:
                tokens = 0
                async with http.stream("POST", "/v1/generate", json={"prompt": "def ", "max_new_tokens": 48, "seed": 99, "stream": True}) as r:
                    async for line in r.aiter_lines():
                        tokens += line.startswith("event: token")
                return tokens

            tasks = [asyncio.create_task(plain(i)) for i in range(6)] + [asyncio.create_task(streamed()) for _ in range(2)]
            await asyncio.sleep(0.5)
            server.process.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.2)
            try:
                late = (await http.post("/v1/activations", json={"text": "late"})).status_code
            except httpx.HTTPError as exc:
                late = type(exc).__name__
            results = await asyncio.gather(*tasks)
            outcome.update(in_flight=len(tasks), completed=sum(r == 48 for r in results), results=results, late_request=late)

    asyncio.run(main())
    outcome["exit_code"] = server.process.wait(60)
    return outcome


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="short runs (CI): 8 s of load, a 10 s soak")
    parser.add_argument("--soak-seconds", type=float, default=None)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    load_seconds = 8.0 if args.quick else 30.0
    soak_seconds = args.soak_seconds or (10.0 if args.quick else 600.0)
    with tempfile.TemporaryDirectory() as tmp:
        registry = make_registry(Path(tmp))
        figures = {
            "mixed_load": mixed_load(registry, 64, load_seconds),
            "reload_under_load": reload_under_load(registry, 20, 16),
            "overload": overload(registry, queue=8, extra=10),
            "sigterm_under_load": sigterm_under_load(registry),
            "soak": soak(registry, soak_seconds, 16),
        }
    print(json.dumps(figures, indent=None if args.json else 2, default=str))


if __name__ == "__main__":
    main()
