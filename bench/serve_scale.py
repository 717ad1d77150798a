"""The service at a real shape: its memory against the checkpoint and the dictionary, its start against a bare
transformers load, and 32 clients against a slow model — refused fast with the wait bound, queued without it.

    python bench/serve_scale.py [--shape gemma|gpt2] [--clients 32] [--seconds 20] [--d-sae 16384]

The model is Gemma-2-2B's shape in bf16 (bench/gemma_shape.py; GPT-2 small's with --shape gpt2), the dictionary a
random TopK one (k 32) at a middle layer, published bound to it (which also leaves its checksum remembered, as on
any start after the first). Measured, each in a fresh process:
- baseline: `python -c` importing transformers, `from_pretrained` of the checkpoint (its dtype) and one 64-token
  forward, wall time from spawn to exit;
- `monosemantic-serve`: seconds from spawn to /readyz 200, then its RSS and high-water mark (/proc) against the
  checkpoint's bytes plus the dictionary's;
- overload: N closed-loop clients send activations for 64-token texts for --seconds, honouring Retry-After after
  a 429 as SDKs do; with MONOSEMANTIC_MAX_QUEUE_WAIT_S at its default (2 s), then 0 (no bound: the behaviour
  before it). Per run: served per second, p50/p99 of the served, how fast the refusals came, the Retry-After seen.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gemma_shape import gemma_shaped  # noqa: E402
from gpt2_shape import add_arguments, gpt2_shaped  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

_PUBLISH = """
import json, sys, torch
from monosemantic.artifact import HookRef, ModelRef, publish
from monosemantic.lm import resolve_hook
from monosemantic.model import load_model
from monosemantic.sae import SAEConfig, build_sae
model_dir, registry, d_sae, layer = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
model = load_model(model_dir, dtype="auto")
net = model.lm.model
torch.manual_seed(0)
sae = build_sae(SAEConfig.build(architecture="topk", d_in=net.config.hidden_size, d_sae=d_sae, k=32))
point = resolve_hook(net, f"blocks.{layer}.hook_resid_post")
version = publish(registry, "bench", sae, dtype="bfloat16", model=ModelRef(name="bench-shape", checksum=model.lm.checksum, source=model_dir),
                  hook=HookRef(name=point.name, module_path=point.module_path, alias=point.alias, kind=point.kind))
print(json.dumps({"bytes": sum(p.stat().st_size for p in version.glob("*.safetensors"))}))
"""

_BASELINE = """
import sys, torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], torch_dtype="auto")
with torch.inference_mode():
    model(torch.randint(1, 1000, (1, 64)))
"""


def publish_bench_dictionary(model: Path, d_sae: int, layer: int) -> tuple[Path, int]:
    """A random TopK dictionary "bench" (k 32, bf16) at blocks.{layer}.hook_resid_post, published bound to `model` in a
    fresh registry (in its own process, so the caller's memory stays the caller's); the registry and its bytes."""
    registry = Path(tempfile.mkdtemp(prefix="monosemantic-bench-registry-"))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    published = subprocess.run([sys.executable, "-c", _PUBLISH, str(model), str(registry), str(d_sae), str(layer)],
                               env=env, capture_output=True, text=True, check=True)
    return registry, json.loads(published.stdout.strip().splitlines()[-1])["bytes"]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def proc_status(pid: int) -> dict[str, int]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) * 1024
    return fields


def start_server(model: Path, registry: Path, **env: str) -> tuple[subprocess.Popen, str, float]:
    port = free_port()
    environment = {**os.environ, "MONOSEMANTIC_MODEL": str(model), "MONOSEMANTIC_REGISTRY": str(registry),
                   "MONOSEMANTIC_DICTIONARY": "bench", "MONOSEMANTIC_HTTP_PORT": str(port),
                   "MONOSEMANTIC_GRPC_PORT": str(free_port()), "HF_HUB_OFFLINE": "1", **env}
    started = time.perf_counter()
    server = subprocess.Popen([sys.executable, "-m", "service.cli"], cwd=ROOT, env=environment,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    while True:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited: {server.stderr.read()[-2000:]}")
        try:
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                return server, url, time.perf_counter() - started
        except httpx.HTTPError:
            pass
        time.sleep(0.1)


def overload(url: str, clients: int, seconds: float) -> dict:
    """N closed-loop clients for `seconds`: every answer's status, latency and Retry-After."""
    text = " ".join(f"word{i}" for i in range(40))  # ~64 tokens
    answers: list[tuple[int, float, str | None]] = []
    lock = threading.Lock()
    stop_at = time.monotonic() + seconds

    def client(_: int) -> None:
        with httpx.Client(timeout=300) as http:
            while time.monotonic() < stop_at:
                started = time.monotonic()
                response = http.post(f"{url}/v1/activations", json={"text": text})
                with lock:
                    answers.append((response.status_code, time.monotonic() - started, response.headers.get("retry-after")))
                if response.status_code == 429:
                    time.sleep(float(response.headers.get("retry-after", "1")))

    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    served = sorted(latency for status, latency, _ in answers if status == 200)
    refused = sorted(latency for status, latency, _ in answers if status == 429)
    quantile = lambda values, q: values[min(len(values) - 1, int(q * len(values)))] if values else None  # noqa: E731
    return {"served": len(served), "served_per_s": len(served) / seconds, "refused": len(refused),
            "other": sum(1 for status, _, _ in answers if status not in (200, 429)),
            "served_p50_s": quantile(served, 0.5), "served_p99_s": quantile(served, 0.99),
            "refused_p99_s": quantile(refused, 0.99),
            "retry_after_s": sorted({int(r) for status, _, r in answers if status == 429 and r})}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=("gemma", "gpt2"), default="gemma")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--d-sae", type=int, default=16_384)
    add_arguments(parser)
    args = parser.parse_args()
    model = gemma_shaped() if args.shape == "gemma" else gpt2_shaped(args, "bfloat16")
    layers = json.loads((model / "config.json").read_text()).get("num_hidden_layers") or args.layers
    checkpoint = sum(p.stat().st_size for p in model.glob("*.safetensors"))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    registry, dictionary = publish_bench_dictionary(model, args.d_sae, layers // 2)
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", _BASELINE, str(model)], env=env, check=True, capture_output=True)
    baseline_s = time.perf_counter() - started
    rows = {"shape": args.shape, "checkpoint_bytes": checkpoint, "dictionary_bytes": dictionary, "baseline_start_s": baseline_s}

    for bound in ("2", "0"):
        server, url, ready_s = start_server(model, registry, MONOSEMANTIC_MAX_QUEUE_WAIT_S=bound)
        try:
            ready_memory = proc_status(server.pid)
            load = overload(url, args.clients, args.seconds)
            memory = proc_status(server.pid)  # after serving: every weight touched (the checkpoint is memory-mapped)
        finally:
            server.terminate()
            server.wait(60)
        rows[f"wait_bound_{bound}"] = {"ready_s": ready_s, "ready_rss_bytes": ready_memory["VmRSS"], "rss_bytes": memory["VmRSS"],
                                       "hwm_bytes": memory["VmHWM"], **load}
        print(json.dumps({"wait_bound_s": bound, **rows[f"wait_bound_{bound}"]}), flush=True)

    base = checkpoint + dictionary
    first = rows["wait_bound_2"]
    print(f"\n| {args.shape} shape: checkpoint {checkpoint / 2**30:.2f} GiB + dictionary {dictionary / 2**20:.0f} MiB | measured | ratio | goal |")
    print("| --- | --- | --- | --- |")
    print(f"| serving RSS, after the overload | {first['rss_bytes'] / 2**30:.2f} GiB | {first['rss_bytes'] / base:.2f}× | ≤ 1.15× |")
    print(f"| high-water (loading and serving) | {first['hwm_bytes'] / 2**30:.2f} GiB | {first['hwm_bytes'] / base:.2f}× | ≤ 1.3× |")
    print(f"| ready (checksum remembered) vs bare transformers load + 64-token forward ({baseline_s:.1f} s) | "
          f"{first['ready_s']:.1f} s | {first['ready_s'] / baseline_s:.2f}× | ≤ 2× |")
    for bound in ("2", "0"):
        r = rows[f"wait_bound_{bound}"]
        fmt = lambda v: "–" if v is None else f"{v:.2f} s"  # noqa: E731
        print(f"| {args.clients} clients, MONOSEMANTIC_MAX_QUEUE_WAIT_S={bound} | {r['served_per_s']:.1f} served/s, "
              f"p50 {fmt(r['served_p50_s'])}, p99 {fmt(r['served_p99_s'])}; {r['refused']} refused (p99 {fmt(r['refused_p99_s'])}, "
              f"Retry-After {r['retry_after_s']}) | | |")


if __name__ == "__main__":
    main()
