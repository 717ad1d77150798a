"""Single-dictionary serving, this checkout against an older one, interleaved: does a change cost the fast path?

    git worktree add /tmp/base COMMIT   # and generate its gRPC stubs (pip install -e there, or grpc_tools.protoc)
    python bench/serve_ab.py --tree /tmp/base [--rounds 3] [--clients 32] [--seconds 5]

Each round starts a fresh server of each build in turn (the older first) on the shipped reference and measures
activations at `--clients` concurrent clients over REST and gRPC with bench/serve.py's load generators (wrk,
h2load) and its server-CPU reading; machines drift within a session, so only builds measured in turns are compared.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

from serve import ROOT, ServerProcess, measure, texts_of_64_tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tree", type=Path, required=True, help="the older checkout (its stubs generated)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    generator = "wrk" if shutil.which("wrk") else "python"
    grpc_generator = "h2load" if shutil.which("h2load") else "python"
    texts_file = Path(os.environ.get("TMPDIR", "/tmp")) / "monosemantic-bench-texts.json"
    texts_file.write_text(json.dumps(texts_of_64_tokens(64)))
    rows: dict[str, list[str]] = {}
    for _ in range(args.rounds):
        for label, tree in ((f"base {args.tree}", args.tree.resolve()), ("this checkout", ROOT)):
            server = ServerProcess("ours", {"PYTHONPATH": str(tree)}, tree=tree)
            try:
                for protocol in ("rest", "grpc"):
                    url = f"http://127.0.0.1:{server.http_port}" if protocol == "rest" else f"127.0.0.1:{server.grpc_port}"
                    r = measure(url, protocol, texts_file, args.clients, args.seconds, generator, server.cpu_seconds,
                                grpc_generator, f"{server.url}/metrics")
                    cpu = f", {r['cpu_ms']:.2f} CPU-ms" if r.get("cpu_ms") is not None else ""
                    rows.setdefault(f"{label} {protocol}", []).append(f"{r['rps']:.1f} req/s (p99 {r['p99'] * 1000:.0f} ms{cpu})")
                    print(f"{label:40s} {protocol}: {rows[f'{label} {protocol}'][-1]}", flush=True)
            finally:
                server.stop()
    print(f"\n| build, protocol | {args.clients} clients, rounds in turn |\n| --- | --- |")
    for key, values in rows.items():
        print(f"| {key} | {'; '.join(values)} |")


if __name__ == "__main__":
    main()
