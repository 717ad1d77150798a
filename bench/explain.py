"""Benchmark: what explaining features costs — prompt and completion tokens per feature for the explainer and each
scorer, and features per minute against a local OpenAI-compatible endpoint at 1 and 8 requests in flight.

    python bench/explain.py [--features 24] [--concurrency 1,8]

The endpoint is this project's own /openai/v1 on loopback, in a separate process (`monosemantic-serve`), serving
tests/conftest.py's scripted chat model: a one-layer GPT-2 whose greedy answers are fixed strings that parse (an
explanation for the explainer, a list of labels for the scorer), so every stage runs as it would against vLLM and
the token counts are the prompts' real sizes in its tokenizer (whitespace words: a BPE tokenizer counts more). Its
replies are 4-5 tokens (and the label list's to a simulation prompt, which does not parse), so the rates measure the
pipeline and the
prompts' prefill on this model, not an LLM's decoding: a real explainer's minutes per feature are its own. The
dictionary explained is the shipped reference (10 top examples and 12 interval samples per feature), a copy of its
registry in a temporary directory. Prints the table; nothing here is a bound.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from conftest import scripted_chat_registry  # noqa: E402
from monosemantic.shipped import reference_registry_path  # noqa: E402
from trainer.explain import Endpoint, ExplainSettings, explain_dictionary  # noqa: E402

EXPLAINER_ANSWER = ["[EXPLANATION]:", " fires", " on", " x"]
SCORER_ANSWER = ["[1,", " 0,", " 1,", "0,", " 1]"]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(root: Path, answer: list[str]) -> tuple[subprocess.Popen, str]:
    model, registry = scripted_chat_registry(root, answer)
    port = _port()
    env = {**os.environ, "MONOSEMANTIC_MODEL": str(model), "MONOSEMANTIC_REGISTRY": str(registry),
           "MONOSEMANTIC_DICTIONARY": "d", "MONOSEMANTIC_HTTP_PORT": str(port), "MONOSEMANTIC_GRPC_PORT": str(_port()),
           "MONOSEMANTIC_OPENAI_MODEL_ID": "scripted", "MONOSEMANTIC_HOST": "127.0.0.1"}
    process = subprocess.Popen([sys.executable, "-m", "service.cli"], env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                return process, f"{url}/openai/v1"
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    process.kill()
    raise SystemExit("the endpoint did not become ready")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--features", type=int, default=24, help="features explained per row")
    parser.add_argument("--concurrency", default="1,8")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-explain-"))
    explainer, explainer_url = serve(work / "explainer", EXPLAINER_ANSWER)
    scorer, scorer_url = serve(work / "scorer", SCORER_ANSWER)
    try:
        print(f"reference dictionary, {args.features} features per row, scripted explainer and scorer on loopback")
        print("| requests in flight | features/min | explain: prompt / completion tokens per feature | "
              "detection: prompt / completion | fuzzing: prompt / completion | simulation: prompt / completion | requests per feature |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for concurrency in (int(c) for c in args.concurrency.split(",")):
            registry = work / f"registry-{concurrency}"
            shutil.copytree(reference_registry_path(), registry)
            endpoint = Endpoint(url=explainer_url, explainer_model="scripted", scorer_model="scripted", scorer_url=scorer_url)
            started = time.perf_counter()
            result = explain_dictionary(registry, "reference", endpoint, features=f"0-{args.features - 1}",
                                        settings=ExplainSettings(concurrency=concurrency), show_progress=False)
            minutes = (time.perf_counter() - started) / 60
            from monosemantic.explanations import read_run

            _, records = read_run(result.path)
            scored = [r for r in records.values() if r.explanation is not None]
            n = max(1, len(scored))

            def per(stage: str, what: str) -> float:
                return sum(getattr(r.usage[stage], what) for r in scored if stage in r.usage) / n

            requests = sum(u.requests for r in scored for u in r.usage.values()) / n
            print(f"| {concurrency} | {len(records) / minutes:.1f} | {per('explain', 'prompt_tokens'):,.0f} / {per('explain', 'completion_tokens'):.0f} | "
                  f"{per('detection', 'prompt_tokens'):,.0f} / {per('detection', 'completion_tokens'):.0f} | "
                  f"{per('fuzzing', 'prompt_tokens'):,.0f} / {per('fuzzing', 'completion_tokens'):.0f} | "
                  f"{per('simulation', 'prompt_tokens'):,.0f} / {per('simulation', 'completion_tokens'):.0f} | {requests:.1f} |")
    finally:
        for process in (explainer, scorer):
            process.terminate()
            process.wait(timeout=30)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
