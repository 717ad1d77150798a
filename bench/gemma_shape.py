"""A Gemma-2-2B-shaped model with random weights, saved once under /tmp in bf16 (5.2 GB, as the real checkpoint),
for the benches that measure real-size memory: a Llama with Gemma-2-2B's widths (hidden 2304, 26 layers, 8 heads
of 256 with 4 key-value heads, MLP 9216, vocabulary 256,000), the reference tokenizer beside it. Llama's blocks
stand in for Gemma's (no soft-capping or sandwich norms): the compute and the bytes are the same."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path


def gemma_shaped() -> Path:
    """The model's directory, built on first use (about 16 GB of memory while it is built, once)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from monosemantic import checksum_cache
    from monosemantic.shipped import reference_lm_path

    where = Path(tempfile.gettempdir()) / "monosemantic-bench-gemma2-2b-shape-bfloat16"
    if not (where / "config.json").exists():
        torch.manual_seed(0)
        config = LlamaConfig(hidden_size=2304, num_hidden_layers=26, num_attention_heads=8, num_key_value_heads=4,
                             head_dim=256, intermediate_size=9216, vocab_size=256_000, max_position_embeddings=8192,
                             tie_word_embeddings=True, bos_token_id=0, eos_token_id=0, pad_token_id=0)
        torch.set_default_dtype(torch.bfloat16)  # built in bf16 directly: 5.2 GB, not 10.4 GB of fp32 first
        try:
            model = LlamaForCausalLM(config)
        finally:
            torch.set_default_dtype(torch.float32)
        model.save_pretrained(where)
        AutoTokenizer.from_pretrained(reference_lm_path()).save_pretrained(where)
        del model
        time.sleep(checksum_cache.RACY_S + 0.2)
    return where
