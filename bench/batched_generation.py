"""Benchmark: generation batched across requests (service/decoder.py) — concurrent steered streams against one
stream alone, and a cheap request's latency while they run, on the real server; optionally an older checkout's
server measured in the same run (--before), for the table before and after.

Each server runs in its own process (bench/serve.py's ServerProcess). The streams are REST server-sent events read
by asyncio httpx clients in this process (one process, not one thread per stream, so the clients take less of the
two cores the server also uses); the probe is a `/v1/activations` request for a 64-token text, sent one after the
other, alone first and then while the streams run.

    python bench/batched_generation.py [--streams 32] [--tokens 64] [--shape reference|gpt2] [--before <worktree>]
    python bench/batched_generation.py --in-process   # the core alone: a DecodeBatch of --streams rows against one row

--shape gpt2 serves GPT-2 small's shape in bf16 (random weights, bench/gpt2_shape.py) with a random TopK dictionary
of --d-sae features (bench/serve_scale.py), as bench/serve.py --shape gpt2 does.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

from serve import ROOT, STEERING, ServerProcess, texts_of_64_tokens

PROMPT = "def main():\n    "


async def _stream(http: httpx.AsyncClient, seed: int, tokens: int) -> int:
    body = {"prompt": PROMPT, "max_new_tokens": tokens, "seed": seed, "temperature": 1.0, "steering": STEERING, "stream": True}
    count = 0
    async with http.stream("POST", "/v1/generate", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if line == "event: token":
                count += 1
            elif line == "event: error":
                raise RuntimeError("a stream ended in an error event")
    return count


def probe_main(url: str, text: str, delay: float, seconds: float) -> None:
    """The probe as its own process (the streams' readers would otherwise delay its answers on their shared event
    loop): sequential activations requests for `seconds` after `delay`; prints their latencies as JSON."""
    latencies = []
    with httpx.Client(base_url=url, timeout=600) as http:
        for _ in range(10):  # warm the connection
            http.post("/v1/activations", json={"text": text, "top_k": 10}).raise_for_status()
        time.sleep(delay)
        until = time.perf_counter() + seconds
        while time.perf_counter() < until:
            started = time.perf_counter()
            http.post("/v1/activations", json={"text": text, "top_k": 10}).raise_for_status()
            latencies.append(time.perf_counter() - started)
    print(json.dumps(latencies))


def _probe_process(url: str, text: str, delay: float, seconds: float) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, __file__, "--probe", url, text, str(delay), str(seconds)], stdout=subprocess.PIPE, text=True)


def _latencies(process: subprocess.Popen) -> list[float]:
    out, _ = process.communicate(timeout=600)
    return json.loads(out)


async def measure(server: ServerProcess, streams: int, tokens: int, text: str, rounds: int) -> dict:
    """One stream alone, then `streams` together (tokens/s, each the median of `rounds`), then the streams again
    with the probe running beside them (from 0.3 s in to 80% of the streams' expected time): its p50 against its
    p50 idle; and the server's CPU per generated token at each concurrency."""
    url = server.url
    limits = httpx.Limits(max_connections=streams + 4, max_keepalive_connections=streams + 4)
    idle = _latencies(_probe_process(url, text, 0.0, 2.0))
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as http:
        per_cpu: dict[int, list[float]] = {1: [], streams: []}

        async def rate(n: int, seed: int) -> float:
            started, cpu = time.perf_counter(), server.cpu_seconds()
            counts = await asyncio.gather(*(_stream(http, seed + s, tokens) for s in range(n)))
            per_cpu.setdefault(n, []).append(sum(counts) / (server.cpu_seconds() - cpu))
            return sum(counts) / (time.perf_counter() - started)

        alone = statistics.median([await rate(1, r) for r in range(rounds)])
        together = statistics.median([await rate(streams, 100 * r) for r in range(rounds)])
        cpu_alone, cpu_together = statistics.median(per_cpu[1]), statistics.median(per_cpu[streams])
        busy: list[float] = []
        expected = streams * tokens / together
        for r in range(rounds):
            prober = _probe_process(url, text, 0.3, max(0.2, 0.8 * expected - 0.3))
            await asyncio.sleep(0.5)  # its interpreter and connection up before the streams start (warm-up, not timed)
            await rate(streams, 1000 + 100 * r)
            busy.extend(await asyncio.to_thread(_latencies, prober))
    return {"alone": alone, "together": together, "idle_p50": statistics.median(idle), "cpu_alone": cpu_alone, "cpu_together": cpu_together,
            "busy_p50": statistics.median(busy) if busy else float("nan"), "probes": len(busy)}


def in_process(streams: int, tokens: int) -> None:
    """The core alone, no server: one Generation stepped by itself against `streams` rows of one DecodeBatch (the
    reference model, the same steering and sampling as the streams), tokens/s and milliseconds per step."""
    from monosemantic.bound import load_bound
    from monosemantic.decode_batch import DecodeBatch
    from monosemantic.generation import DictionarySteering, Generation, SamplingConfig
    from monosemantic.model import load_model
    from monosemantic.shipped import REFERENCE_DICTIONARY, reference_lm_path, reference_registry_path
    from monosemantic.steering import SteeringSpec

    model = load_model(str(reference_lm_path()))
    reference = load_bound(model, reference_registry_path(), REFERENCE_DICTIONARY, None)
    specs = [SteeringSpec(s["feature"], s["mode"], s["value"]) for s in STEERING]
    ids = [model.bos_id, *model.tokenize(PROMPT, prepend_bos=False).ids]

    def generation(seed: int) -> Generation:
        return Generation(model, reference, ids, SamplingConfig(tokens, 1.0, 1.0, 0, seed, (), 5), [DictionarySteering(reference, specs)], False)

    alone = []
    for seed in range(3):
        g, started = generation(seed), time.perf_counter()
        while not g.done:
            g.step()
        alone.append(len(g.generated) / (time.perf_counter() - started))
    batch, rows = DecodeBatch(), [generation(s) for s in range(streams)]
    for g in rows:
        g.step()
        batch.join(g)
    started, steps = time.perf_counter(), 0
    while len(batch):
        outcomes = batch.step()
        steps += 1
        batch.leave({id(o.generation) for o in outcomes if o.generation.done})
    elapsed = time.perf_counter() - started
    together = sum(len(g.generated) - 1 for g in rows) / elapsed
    print(f"in-process: one generation alone {statistics.median(alone):.0f} tokens/s; {streams} rows of one DecodeBatch "
          f"{together:.0f} tokens/s ({elapsed / steps * 1000:.1f} ms a step), {together / statistics.median(alone):.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--streams", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--shape", choices=("reference", "gpt2"), default="reference")
    parser.add_argument("--d-sae", type=int, default=24_576, help="the dictionary's width at --shape gpt2")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each measurement; medians reported")
    parser.add_argument("--in-process", action="store_true", help="the core alone (DecodeBatch against one Generation), no server")
    parser.add_argument("--before", type=Path, help="an older checkout (a git worktree) whose server is measured first")
    args = parser.parse_args()
    if args.in_process:
        return in_process(args.streams, args.tokens)
    if args.shape == "gpt2":
        from gpt2_shape import gpt2_shaped
        from serve_scale import publish_bench_dictionary

        model = gpt2_shaped(argparse.Namespace(layers=12, d_model=768, vocab=50257), "bfloat16")
        registry, _ = publish_bench_dictionary(model, args.d_sae, 6)
        os.environ.update(MONOSEMANTIC_MODEL=str(model), MONOSEMANTIC_REGISTRY=str(registry), MONOSEMANTIC_DICTIONARY="bench")
        print(f"GPT-2 shape (bf16), {args.d_sae:,} TopK features at blocks.6.hook_resid_post", flush=True)
    # Throughput and latency, not refusals: the wait bound and the slots would refuse part of a before-tree's load.
    env = {"MONOSEMANTIC_MAX_QUEUE_WAIT_S": "0", "MONOSEMANTIC_MAX_QUEUE": "1024", "MONOSEMANTIC_MAX_NEW_TOKENS": str(max(256, args.tokens))}
    text = texts_of_64_tokens(1)[0]
    trees = ([("before", args.before)] if args.before else []) + [("now", ROOT)]
    print(f"{args.streams} concurrent steered streams x {args.tokens} tokens (REST SSE), against one alone; "
          "activations p50 (64 tokens) idle and while they run", flush=True)
    print("| build | one stream alone (tok/s) | together (tok/s) | ratio | activations p50 idle (ms) | while streaming (ms) | ratio "
          "| tokens per server CPU-s, alone / together |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, tree in trees:
        server = ServerProcess("ours", {**env, "PYTHONPATH": str(tree)}, tree=tree)
        try:
            r = asyncio.run(measure(server, args.streams, args.tokens, text, args.rounds))
        finally:
            server.stop()
        print(f"| {name} | {r['alone']:.0f} | {r['together']:.0f} | **{r['together'] / r['alone']:.2f}x** | "
              f"{r['idle_p50'] * 1000:.1f} | {r['busy_p50'] * 1000:.1f} ({r['probes']} probes) | "
              f"**{r['busy_p50'] / r['idle_p50']:.2f}x** | {r['cpu_alone']:.0f} / {r['cpu_together']:.0f} |", flush=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--probe"]:
        probe_main(sys.argv[2], sys.argv[3], float(sys.argv[4]), float(sys.argv[5]))
    else:
        main()
