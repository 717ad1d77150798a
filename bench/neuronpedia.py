"""What the Neuronpedia-compatible API costs over the service's own API doing the same work, at 32 clients.

    python bench/neuronpedia.py [--rounds 3] [--clients 32] [--seconds 5] [--steer-seconds 20]

One server (the shipped reference, MONOSEMANTIC_NEURONPEDIA_SECRET set); in each round, in turn:
- `activation/all` (25 features with their values at every token, ranked over all 4,096) against
  `/v1/activations` reading the same 25 features' values at every token (`feature_ids`, `top_k` 0): the same
  forward and encode; /all adds its ranking and its answer's shape;
- `steer/completion` (STEERED and DEFAULT, 16 tokens each, one feature added) against `/v1/generate` with the same
  `add` steering and `compare_unsteered` (both continuations): the same two generations.
Printed: requests per second, p50 latency and server CPU per request, and the ratio adapter / own.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

import httpx

from serve import ServerProcess, closed_loop, texts_of_64_tokens

SECRET = "bench-secret"


async def drive(url: str, clients: int, seconds: float, path: str, bodies: list[dict], headers: dict) -> list[float]:
    pool = [httpx.AsyncClient(base_url=url, timeout=120, headers=headers) for _ in range(clients)]

    async def call(n: int, i: int) -> None:
        response = await pool[n].post(path, json=bodies[i % len(bodies)])
        response.raise_for_status()

    try:
        return await closed_loop(clients, seconds, call)
    finally:
        for client in pool:
            await client.aclose()


def run(server: ServerProcess, clients: int, seconds: float, path: str, bodies: list[dict], headers: dict) -> dict:
    cpu, wall = server.cpu_seconds(), time.perf_counter()
    latencies = asyncio.run(drive(server.url, clients, seconds, path, bodies, headers))
    cpu, wall = server.cpu_seconds() - cpu, time.perf_counter() - wall
    # the CPU of the whole run (warm-up included) over every request it answered
    answered = len(latencies) * (wall / seconds) if latencies else 1
    return {"rps": len(latencies) / seconds, "p50": statistics.median(latencies), "cpu_ms": 1000 * cpu / answered}


def cases(texts: list[str]) -> dict[str, tuple[tuple[str, list[dict], dict], tuple[str, list[dict], dict]]]:
    secret = {"X-SECRET-KEY": SECRET}
    features = list(range(0, 4096, 160))[:25]
    all_bodies = [{"prompt": t, "model": "reference-lm", "source_set": "reference", "selected_sources": [], "sort_by_token_indexes": [],
                   "ignore_bos": True, "num_results": 25} for t in texts]
    own_reads = [{"text": t, "top_k": 0, "feature_ids": features} for t in texts]
    prompts = [t[:40] for t in texts[:8]]
    steer = [{"prompt": p, "model": "reference-lm", "steer_method": "SIMPLE_ADDITIVE", "normalize_steering": False, "types": ["STEERED", "DEFAULT"],
              "features": [{"model": "reference-lm", "source": "0-reference", "index": 7, "strength": 6}], "n_completion_tokens": 16,
              "temperature": 0.8, "strength_multiplier": 1, "freq_penalty": 0, "seed": 16} for p in prompts]
    own_generate = [{"prompt": p, "max_new_tokens": 16, "temperature": 0.8, "seed": 16, "steer_prompt": True, "compare_unsteered": True,
                     "features_top_k": 0, "steering": [{"feature": 7, "mode": "add", "value": 6}]} for p in prompts]
    return {
        "activation/all vs /v1/activations": (("/neuronpedia/v1/activation/all", all_bodies, secret), ("/v1/activations", own_reads, {})),
        "steer/completion vs /v1/generate": (("/neuronpedia/v1/steer/completion", steer, secret), ("/v1/generate", own_generate, {})),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--steer-seconds", type=float, default=20.0, help="a steered request takes seconds at 32 clients")
    args = parser.parse_args()
    texts = texts_of_64_tokens(64)
    server = ServerProcess("ours", {"MONOSEMANTIC_NEURONPEDIA_SECRET": SECRET, "MONOSEMANTIC_MAX_NEW_TOKENS": "64"})
    results: dict[str, list[tuple[dict, dict]]] = {}
    try:
        for _ in range(args.rounds):
            for name, (adapter, own) in cases(texts).items():
                seconds = args.steer_seconds if name.startswith("steer") else args.seconds
                a = run(server, args.clients, seconds, *adapter)
                b = run(server, args.clients, seconds, *own)
                results.setdefault(name, []).append((a, b))
                print(f"{name}: adapter {a['rps']:.1f} req/s, p50 {a['p50'] * 1000:.0f} ms, {a['cpu_ms']:.2f} CPU-ms | "
                      f"own {b['rps']:.1f} req/s, p50 {b['p50'] * 1000:.0f} ms, {b['cpu_ms']:.2f} CPU-ms", flush=True)
    finally:
        server.stop()
    print(f"\n| {args.clients} clients, {args.rounds} rounds in turn | throughput adapter/own | CPU per request adapter/own |\n| --- | --- | --- |")
    for name, rows in results.items():
        rps = statistics.median(a["rps"] / b["rps"] for a, b in rows)
        cpu = statistics.median(a["cpu_ms"] / b["cpu_ms"] for a, b in rows)
        print(f"| {name} | {rps:.3f} | {cpu:.3f} |")


if __name__ == "__main__":
    main()
