"""What the OpenAI-compatible API costs over /v1/generate doing the same work: server CPU per generated token.

    python bench/openai_api.py [--rounds 3] [--seconds 10] [--tokens 16]

One server on the shipped reference (a chat template file given, since the reference has none); at 1 and at 32
closed-loop clients, in turn each round: `/openai/v1/completions` and `/openai/v1/chat/completions` (the chat
rendered to a prompt as long as the completion's), each against `/v1/generate` with the same prompt tokens, length,
temperature, seed and one `add` steering. Printed per case: generated tokens per second and server CPU per
generated token, and the ratio adapter / own (the issue's bound: at most 1.05).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from serve import ServerProcess, closed_loop

TEMPLATE = "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
PROMPTS = ["import os\nfor name in ", "def main():\n    return ", "class Reader:\n    def ", "with open(path) as fh:\n    "]
STEERING = [{"feature": 7, "mode": "add", "value": 6.0}]


async def drive(url: str, clients: int, seconds: float, path: str, bodies: list[dict], tokens: list[int]) -> list[float]:
    pool = [httpx.AsyncClient(base_url=url, timeout=300) for _ in range(clients)]

    async def call(n: int, i: int) -> None:
        response = await pool[n].post(path, json=bodies[i % len(bodies)])
        response.raise_for_status()
        body = response.json()
        tokens.append(body["usage"]["completion_tokens"] if "usage" in body else len(body["tokens"]))

    try:
        return await closed_loop(clients, seconds, call)
    finally:
        for client in pool:
            await client.aclose()


def run(server: ServerProcess, clients: int, seconds: float, path: str, bodies: list[dict]) -> dict:
    tokens: list[int] = []
    cpu, wall = server.cpu_seconds(), time.perf_counter()
    asyncio.run(drive(server.url, clients, seconds, path, bodies, tokens))
    cpu, wall = server.cpu_seconds() - cpu, time.perf_counter() - wall
    generated = sum(tokens)  # every call of the run, warm-up included, as the CPU is
    return {"tokens_per_s": generated / wall, "cpu_ms_per_token": 1000 * cpu / max(1, generated)}


def cases(n_tokens: int) -> dict[str, tuple[tuple[str, list[dict]], tuple[str, list[dict]]]]:
    common = {"temperature": 0.8, "seed": 3}
    completions = [{"model": "reference-lm", "prompt": p, "max_tokens": n_tokens, "steering": STEERING, **common} for p in PROMPTS]
    chats = [{"model": "reference-lm", "messages": [{"role": "user", "content": p}], "max_completion_tokens": n_tokens, "steering": STEERING,
              **common} for p in PROMPTS]
    own = [{"prompt": p, "max_new_tokens": n_tokens, "steering": STEERING, "features_top_k": 0, **common} for p in PROMPTS]
    return {"completions": (("/openai/v1/completions", completions), ("/v1/generate", own)),
            "chat": (("/openai/v1/chat/completions", chats), ("/v1/generate", own))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--tokens", type=int, default=16)
    args = parser.parse_args()
    template = Path(tempfile.mkdtemp()) / "template.jinja"
    template.write_text(TEMPLATE)
    server = ServerProcess("ours", {"MONOSEMANTIC_CHAT_TEMPLATE": str(template)})
    results: dict[str, list[tuple[dict, dict]]] = {}
    try:
        for _ in range(args.rounds):
            for clients in (1, 32):
                for name, (adapter, own) in cases(args.tokens).items():
                    a = run(server, clients, args.seconds, *adapter)
                    b = run(server, clients, args.seconds, *own)
                    results.setdefault(f"{name}, {clients} clients", []).append((a, b))
                    print(f"{name} at {clients}: adapter {a['tokens_per_s']:.0f} tok/s, {a['cpu_ms_per_token']:.3f} CPU-ms/token | "
                          f"own {b['tokens_per_s']:.0f} tok/s, {b['cpu_ms_per_token']:.3f} CPU-ms/token", flush=True)
    finally:
        server.stop()
    print(f"\n| case, {args.rounds} rounds in turn | tokens/s adapter/own | server CPU per token adapter/own |\n| --- | --- | --- |")
    for name, rows in results.items():
        rate = statistics.median(a["tokens_per_s"] / b["tokens_per_s"] for a, b in rows)
        cpu = statistics.median(a["cpu_ms_per_token"] / b["cpu_ms_per_token"] for a, b in rows)
        print(f"| {name} | {rate:.3f} | {cpu:.3f} |")


if __name__ == "__main__":
    main()
