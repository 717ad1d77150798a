"""Generation speed at GPT-2 small's or Gemma-2-2B's shape: monosemantic's step loop, unsteered and steered, against
HF `generate`.

    python bench/generation.py [--shape gpt2|gemma] [--tokens 64] [--rounds 3] [--d-sae N] [--hook H]

The model is GPT-2 small's shape with random weights (bench/gpt2_shape.py; --dtype its checkpoint's dtype) or
Gemma-2-2B's in bf16 (bench/gemma_shape.py; defaults there: 16,384 features at blocks.12.hook_resid_post), the
dictionary a random ReLU one bound to it; the prompt 32 tokens. HF: `model.generate(use_cache=True, do_sample=True, min_new_tokens=max_new_tokens)`.
Ours: monosemantic.generation.Generation stepped to the end, as the service streams it, with features_top_k at its
default (5): unsteered, then with one `add` and one `clamp` on the reader's own dictionary. Each round runs the
three in turn on the same prompt; tokens/s counts generated tokens (prefill included in every figure), and the
table gives the medians and the ratios to HF.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gemma_shape import gemma_shaped  # noqa: E402
from gpt2_shape import add_arguments, gpt2_shaped  # noqa: E402

DEFAULTS = {"gpt2": {"d_sae": 24_576, "hook": "blocks.8.hook_resid_pre"}, "gemma": {"d_sae": 16_384, "hook": "blocks.12.hook_resid_post"}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--shape", choices=tuple(DEFAULTS), default="gpt2")
    parser.add_argument("--d-sae", type=int, help="default: 24,576 at GPT-2's shape, 16,384 at Gemma's")
    parser.add_argument("--hook", help="default: blocks.8.hook_resid_pre at GPT-2's shape, blocks.12.hook_resid_post at Gemma's")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="GPT-2's checkpoint dtype (Gemma's is bf16)")
    add_arguments(parser)
    args = parser.parse_args()
    args.d_sae = args.d_sae or DEFAULTS[args.shape]["d_sae"]
    args.hook = args.hook or DEFAULTS[args.shape]["hook"]
    dtype = "bfloat16" if args.shape == "gemma" else args.dtype

    import torch

    from monosemantic.artifact import HookRef, ModelRef, load_dictionary, publish
    from monosemantic.bound import bind
    from monosemantic.generation import DictionarySteering, Generation, SamplingConfig
    from monosemantic.lm import resolve_hook
    from monosemantic.model import load_model
    from monosemantic.sae import SAEConfig, build_sae
    from monosemantic.steering import SteeringSpec

    torch.set_num_threads(2)
    model = load_model(str(gemma_shaped() if args.shape == "gemma" else gpt2_shaped(args, args.dtype)), dtype="auto")
    net = model.lm.model
    torch.manual_seed(0)
    sae = build_sae(SAEConfig.build(architecture="relu", d_in=net.config.hidden_size, d_sae=args.d_sae))
    point = resolve_hook(net, args.hook)
    registry = Path(tempfile.mkdtemp())
    publish(registry, "bench", sae, model=ModelRef(name=f"{args.shape}-shape", checksum=model.lm.checksum),
            hook=HookRef(name=point.name, module_path=point.module_path, alias=point.alias, kind=point.kind))
    reader = bind(model, load_dictionary(registry, "bench", expected_model_checksum=model.lm.checksum), sae_dtype="auto")
    prompt = torch.randint(0, net.config.vocab_size, (32,), generator=torch.Generator().manual_seed(1)).tolist()
    steering = [DictionarySteering(reader, [SteeringSpec(7, "add", 4.0), SteeringSpec(11, "clamp", 3.0)])]

    def hf() -> float:
        ids = torch.tensor([prompt])
        started = time.perf_counter()
        with torch.inference_mode():
            out = net.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.tokens, min_new_tokens=args.tokens,
                               do_sample=True, top_p=1.0, top_k=0, temperature=1.0, use_cache=True, pad_token_id=0)
        return (out.shape[1] - ids.shape[1]) / (time.perf_counter() - started)

    def ours(steer: bool) -> float:
        cfg = SamplingConfig(args.tokens, 1.0, 1.0, 0, 3, (), 5)
        generation = Generation(model, reader, prompt, cfg, steering if steer else [], False)
        started = time.perf_counter()
        while not generation.done:
            generation.step()
        return len(generation.generated) / (time.perf_counter() - started)

    hf(), ours(False), ours(True)  # warm-up
    rates: dict[str, list[float]] = {"hf": [], "unsteered": [], "steered": []}
    for _ in range(args.rounds):
        rates["hf"].append(hf())
        rates["unsteered"].append(ours(False))
        rates["steered"].append(ours(True))
        print({k: round(v[-1], 1) for k, v in rates.items()}, flush=True)
    base = statistics.median(rates["hf"])
    print(f"\n| {'GPT-2' if args.shape == 'gpt2' else 'Gemma-2-2B'} shape ({dtype}), {args.d_sae:,} features at {args.hook}, {args.tokens} tokens | tokens/s (median of {args.rounds}) | vs HF generate |")
    print("| --- | --- | --- |")
    for label, key in (("HF generate(use_cache=True)", "hf"), ("ours, unsteered (features_top_k 5)", "unsteered"),
                       ("ours, steered (add + clamp)", "steered")):
        print(f"| {label} | {statistics.median(rates[key]):.1f} | {statistics.median(rates[key]) / base:.2f}× |")


if __name__ == "__main__":
    main()
