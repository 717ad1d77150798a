"""Benchmark: feature-dashboard statistics throughput against a plain per-feature loop, and the dashboard
endpoint's latency under 32 concurrent clients — measured in the same run.

    python bench/features.py [--contexts 64] [--baseline-features 256] [--seconds 5]

The baseline computes, one feature at a time, what a dashboard needs (its activations over the tokens, density,
mean, max, histogram, top-k and the top windows) from activations read once; it runs on a sample of features and
is scaled to all 4096, so the bench stays short.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

import httpx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve import ServerProcess, closed_loop  # noqa: E402

from monosemantic.artifact import load_dictionary  # noqa: E402
from monosemantic.lm import load_lm, read_activations  # noqa: E402
from monosemantic.shipped import REFERENCE_DICTIONARY, REFERENCE_HOOK, reference_lm_path, reference_registry_path  # noqa: E402
from trainer.features import LOG10_ACTIVATION_EDGES, FeatureStatsConfig, feature_statistics  # noqa: E402
from trainer.pipeline import dashboard_contexts  # noqa: E402


def per_feature_loop(lm, sae, contexts: torch.Tensor, features: int, cfg: FeatureStatsConfig) -> float:
    """Seconds for `features` features, one at a time."""
    started = time.perf_counter()
    x = torch.cat([read_activations(lm.model, contexts[b : b + 16], REFERENCE_HOOK)[:, 1:].float() for b in range(0, contexts.shape[0], 16)])
    flat = x.reshape(-1, x.shape[-1]) * sae.cfg.input_scale - sae.b_dec
    for i in range(features):
        f = torch.relu(flat @ sae.W_enc[:, i] + sae.b_enc[i])
        active = f[f > 0]
        _density, _mean, _max = active.numel() / f.numel(), active.mean() if active.numel() else 0.0, f.max()
        _hist = torch.histc(torch.log10(active.clamp_min(1e-3)), bins=len(LOG10_ACTIVATION_EDGES) - 1, min=-2, max=2)
        top = f.topk(cfg.top_k).indices
        per_context = x.shape[1]
        for index in top.tolist():
            context, position = divmod(index, per_context)
            lo, hi = max(0, position - cfg.window_before), min(per_context, position + cfg.window_after + 1)
            _window = (contexts[context, 1 + lo : 1 + hi], f[context * per_context + lo : context * per_context + hi])
    return time.perf_counter() - started


async def drive_features(url: str, clients: int, seconds: float, d_sae: int) -> list[float]:
    pool = [httpx.AsyncClient(base_url=url, timeout=60) for _ in range(clients)]

    async def call(n: int, i: int) -> None:
        (await pool[n].get(f"/v1/features/{(i * 7919) % d_sae}")).raise_for_status()

    try:
        return await closed_loop(clients, seconds, call)
    finally:
        for client in pool:
            await client.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--contexts", type=int, default=64)
    parser.add_argument("--baseline-features", type=int, default=256)
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    lm = load_lm(reference_lm_path())
    sae = load_dictionary(reference_registry_path(), REFERENCE_DICTIONARY).sae.float()
    contexts, _ = dashboard_contexts(lm.tokenizer, args.contexts * 255, 256, None)
    tokens = contexts.shape[0] * 255
    cfg = FeatureStatsConfig()
    started = time.perf_counter()
    feature_statistics(lm, sae, REFERENCE_HOOK, contexts, cfg, progress=False)
    ours = time.perf_counter() - started
    baseline = per_feature_loop(lm, sae, contexts, args.baseline_features, cfg) * sae.cfg.d_sae / args.baseline_features
    print(f"feature statistics, {sae.cfg.d_sae} features over {tokens:,} tokens:")
    print(f"  ours (streamed, all features at once, 3 passes + windows/logits/neighbours/labels): {tokens / ours:,.0f} tokens/s ({ours:.1f} s)")
    print(f"  per-feature loop (scaled from {args.baseline_features} features): {tokens / baseline:,.0f} tokens/s ({baseline:.1f} s)")
    print(f"  ratio: {baseline / ours:.1f}x")

    server = ServerProcess("ours", {})
    try:
        latencies = sorted(asyncio.run(drive_features(f"http://127.0.0.1:{server.http_port}", 32, args.seconds, sae.cfg.d_sae)))
    finally:
        server.stop()
    p = lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))]  # noqa: E731
    print(f"GET /v1/features/{{id}}, 32 clients: {len(latencies) / args.seconds:.0f} req/s, p50 {p(0.5) * 1000:.1f} ms, "
          f"p99 {p(0.99) * 1000:.1f} ms (p99/p50 {p(0.99) / p(0.5):.2f})")


if __name__ == "__main__":
    main()
