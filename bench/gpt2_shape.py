"""A GPT-2-shaped model with random weights, saved once under /tmp (with the reference tokenizer), for the benches
that measure real-size loading: its compute and bytes equal the real model's. `add_arguments` gives a bench the
shape flags."""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--d-model", type=int, default=768)
    parser.add_argument("--vocab", type=int, default=50257)


def gpt2_shaped(args: argparse.Namespace, dtype: str = "float32") -> Path:
    """The model's directory, built on first use; its files are then left to age past the checksum cache's racy
    window (monosemantic/checksum_cache.py), as a user's downloaded model has."""
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    from monosemantic import checksum_cache
    from monosemantic.shipped import reference_lm_path

    where = Path(tempfile.gettempdir()) / f"monosemantic-bench-gpt2-{dtype}-{args.layers}x{args.d_model}x{args.vocab}"
    if not (where / "model.safetensors").exists():
        torch.manual_seed(0)
        config = GPT2Config(n_layer=args.layers, n_embd=args.d_model, n_head=max(1, args.d_model // 64), vocab_size=args.vocab)
        GPT2LMHeadModel(config).to(getattr(torch, dtype)).save_pretrained(where)
        AutoTokenizer.from_pretrained(reference_lm_path()).save_pretrained(where)
        time.sleep(checksum_cache.RACY_S + 0.2)
    return where
