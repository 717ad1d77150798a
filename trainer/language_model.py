"""The reference LM: a byte-level BPE tokenizer and the paper's one-layer transformer, trained on the corpus."""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
import tokenizers
import torch
import transformers
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from monosemantic.errors import ConfigError, describe_validation_error
from monosemantic.precision import fastest_dtype
from trainer.corpus import BOS_TOKEN, Corpus, build_corpus, token_contexts
from trainer.progress import progress as progress_bar

log = logging.getLogger(__name__)


def train_tokenizer(documents: list[str], vocab_size: int = 4096) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer (as GPT-2's) whose only special token is `<|endoftext|>`.

    Byte-level pre-tokenisation means every string, in any script, encodes and decodes exactly,
    and the character offsets of the tokens are tracked through the byte mapping.
    """
    if vocab_size < 257:
        raise ConfigError(f"vocab_size must be at least 257 (256 bytes and {BOS_TOKEN}), got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # trim_offsets=False keeps a token's leading space inside its span, so spans tile the text.
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[BOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(documents, trainer=trainer, length=len(documents))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS_TOKEN, eos_token=BOS_TOKEN, pad_token=BOS_TOKEN
    )


class LMConfig(BaseModel):
    """Everything that decides the reference model; constructing one with a bad value raises ConfigError."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # Architecture: the paper's one-layer transformer.
    vocab_size: int = Field(4096, ge=257)
    context_length: int = Field(256, ge=2, le=4096)
    d_model: int = Field(128, gt=0)
    n_head: int = Field(4, gt=0)
    d_mlp: int = Field(512, gt=0)
    activation: Literal["relu", "gelu", "gelu_new", "silu"] = "relu"
    # Training.
    # Small batches: at this budget the model is limited by optimizer steps, and on CPU a batch of
    # 8 x 256 runs as fast per token as larger ones (measured: ~22k tokens/s on 2 idle cores, bf16).
    batch_size: int = Field(8, gt=0)
    tokens: int = Field(8_000_000, gt=0)  # training budget in tokens, ~0.7 epoch: 6-10 min on 2 cores
    lr: float = Field(2e-3, gt=0, le=1.0)
    warmup_fraction: float = Field(0.02, ge=0, lt=1)  # linear warm-up, then cosine decay
    min_lr_fraction: float = Field(0.1, ge=0, le=1)  # the decay ends at lr * min_lr_fraction
    weight_decay: float = Field(0.1, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    seed: int = Field(0, ge=0)
    # bf16 autocast: ~1.3x the fp32 step rate on a CPU with native bf16 (fp16 is slow on CPU); on one without it
    # (an AMD EPYC without avx512_bf16) the step ran ~30x slower, 700 tok/s. Left unset it is measured
    # (monosemantic/precision.py) and the measured value is what the saved config records.
    bf16: bool = False  # replaced by the measurement when not given
    tokenizer_max_chars: int | None = Field(None, gt=0)  # train the tokenizer on a prefix of the corpus
    eval_max_tokens: int = Field(1_000_000, gt=0)  # cap on held-out tokens evaluated
    save_dtype: Literal["float32", "bfloat16"] = "float32"

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise ConfigError(_describe(exc)) from None

    @classmethod
    def model_validate(cls, obj: Any, **kwargs: Any) -> LMConfig:  # type: ignore[override]
        try:
            return super().model_validate(obj, **kwargs)
        except ValidationError as exc:
            raise ConfigError(_describe(exc)) from None

    @model_validator(mode="before")
    @classmethod
    def _measure_bf16(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("bf16") is None:
            width = cls.model_fields
            d_model, d_mlp = data.get("d_model", width["d_model"].default), data.get("d_mlp", width["d_mlp"].default)
            measurable = isinstance(d_model, int) and isinstance(d_mlp, int) and d_model > 0 and d_mlp > 0
            data = {**data, "bf16": measurable and fastest_dtype(d_model, d_mlp, "cpu") == torch.bfloat16}
        return data

    @field_validator("n_head")
    @classmethod
    def _heads_divide_width(cls, n_head: int, info: ValidationInfo) -> int:
        d_model = info.data.get("d_model")
        if d_model is not None and d_model % n_head:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_head")
        return n_head

    @field_validator("tokens")
    @classmethod
    def _at_least_one_batch(cls, tokens: int, info: ValidationInfo) -> int:
        batch, ctx = info.data.get("batch_size"), info.data.get("context_length")
        if batch and ctx and tokens < batch * ctx:
            raise ValueError(f"must cover at least one batch ({batch} x {ctx} = {batch * ctx} tokens)")
        return tokens

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.context_length

    @property
    def steps(self) -> int:
        return self.tokens // self.tokens_per_step


def _describe(exc: ValidationError) -> str:
    return describe_validation_error(exc, "LMConfig")


def build_model(cfg: LMConfig, vocab_size: int, bos_token_id: int = 0) -> GPT2LMHeadModel:
    """The paper's transformer as a HF GPT-2: one layer, one ReLU MLP, no dropout, tied embeddings.

    `bos_token_id` defaults to 0, where `train_tokenizer` puts `<|endoftext|>`.
    """
    config = GPT2Config(
        vocab_size=vocab_size,
        n_positions=cfg.context_length,
        n_embd=cfg.d_model,
        n_layer=1,
        n_head=cfg.n_head,
        n_inner=cfg.d_mlp,
        activation_function=cfg.activation,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=bos_token_id,
        eos_token_id=bos_token_id,
        pad_token_id=bos_token_id,
        tie_word_embeddings=True,
    )
    model = GPT2LMHeadModel(config)
    model.loss_type = "ForCausalLM"  # what HF would pick anyway; naming it avoids a warning per run
    return model


def _lr_lambda(cfg: LMConfig):
    steps = cfg.steps
    warmup = max(1, round(cfg.warmup_fraction * steps)) if cfg.warmup_fraction > 0 else 0

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return cfg.min_lr_fraction + (1.0 - cfg.min_lr_fraction) * cosine

    return factor


def _optimizer(model: torch.nn.Module, cfg: LMConfig) -> torch.optim.Optimizer:
    # Weight decay on matrices only; LayerNorm gains and biases are left alone, as is usual.
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8)


def fit(model: GPT2LMHeadModel, cfg: LMConfig, contexts: torch.Tensor,
        progress: bool = True) -> tuple[list[float], float]:
    """Train `model` for `cfg.steps` batches drawn from `contexts` in a seeded order; (losses, seconds)."""
    optimizer = _optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(cfg))
    generator = torch.Generator().manual_seed(cfg.seed)
    order, cursor = torch.randperm(len(contexts), generator=generator), 0
    losses: list[float] = []
    model.train()
    bar = progress_bar(total=cfg.steps, desc="reference LM", unit="step", enabled=progress)
    started = time.perf_counter()
    for step in range(cfg.steps):
        if cursor + cfg.batch_size > len(order):  # next epoch, a new seeded order
            order, cursor = torch.randperm(len(contexts), generator=generator), 0
        batch = contexts[order[cursor : cursor + cfg.batch_size]]
        cursor += cfg.batch_size
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16):
            loss = _loss(model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        losses.append(loss.item())
        tokens_per_s = (step + 1) * cfg.tokens_per_step / (time.perf_counter() - started)
        bar.set_postfix(loss=f"{losses[-1]:.3f}", tok_s=f"{tokens_per_s:,.0f}", refresh=False)
        bar.update()
        if (step + 1) % max(1, cfg.steps // 20) == 0:
            log.info("step %d/%d loss %.3f lr %.2e %.0f tokens/s", step + 1, cfg.steps, losses[-1],
                     scheduler.get_last_lr()[0], tokens_per_s)
    bar.close()
    model.eval()
    return losses, time.perf_counter() - started


def _loss(model: GPT2LMHeadModel, batch: torch.Tensor) -> torch.Tensor:
    # Packed contexts have no padding; an explicit all-ones mask says so (BOS doubles as pad id).
    return model(input_ids=batch, attention_mask=torch.ones_like(batch), labels=batch).loss


@torch.no_grad()
def evaluate_loss(model: GPT2LMHeadModel, contexts: torch.Tensor, batch_size: int = 64) -> float:
    """Mean next-token cross-entropy (nats per predicted token) over `contexts`, in fp32."""
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(contexts), batch_size):
        batch = contexts[start : start + batch_size]
        n = batch.numel() - len(batch)  # predicted tokens: all but the first of each context
        total += _loss(model, batch).item() * n
        count += n
    return total / max(1, count)


def unigram_loss(train: torch.Tensor, heldout: torch.Tensor, vocab_size: int) -> float:
    """Held-out cross-entropy of the train set's add-one-smoothed unigram distribution (a baseline)."""
    counts = torch.bincount(train[:, 1:].reshape(-1), minlength=vocab_size).double() + 1.0
    logp = torch.log(counts / counts.sum())
    return float(-logp[heldout[:, 1:].reshape(-1)].mean())


def train_language_model(cfg: LMConfig, corpus: Corpus, out_dir: Path, progress: bool = True) -> dict:
    """Train the tokenizer and the model on `corpus`, evaluate on its held-out documents, save to `out_dir`.

    `out_dir` gets the model (safetensors) and tokenizer as `save_pretrained` writes them, plus
    `training.json` (returned too). Everything is written to a temporary sibling directory and renamed
    into place, so an interrupted run leaves nothing half-written. Deterministic for a seed.
    """
    out_dir = Path(out_dir)
    started = time.perf_counter()
    tok_docs = corpus.train
    if cfg.tokenizer_max_chars is not None:
        tok_docs = _prefix(corpus.train, cfg.tokenizer_max_chars)
    tokenizer = train_tokenizer(tok_docs, cfg.vocab_size)
    tokenizer.model_max_length = cfg.context_length
    bos = tokenizer.bos_token_id
    train_ctx = token_contexts(tokenizer, corpus.train, cfg.context_length, bos)
    heldout_ctx = token_contexts(tokenizer, corpus.heldout, cfg.context_length, bos)
    max_eval = max(1, cfg.eval_max_tokens // cfg.context_length)
    heldout_ctx = heldout_ctx[:max_eval]
    if len(train_ctx) == 0 or len(heldout_ctx) == 0:
        raise ConfigError(
            f"context_length: the corpus gives {len(train_ctx)} train and {len(heldout_ctx)} held-out "
            f"contexts of {cfg.context_length} tokens; use a larger corpus or shorter contexts"
        )
    prepared = time.perf_counter()
    log.info("tokenizer trained, %d train / %d held-out contexts in %.1fs",
             len(train_ctx), len(heldout_ctx), prepared - started)

    torch.manual_seed(cfg.seed)
    model = build_model(cfg, len(tokenizer), bos)
    losses, train_seconds = fit(model, cfg, train_ctx, progress)

    heldout_loss = evaluate_loss(model, heldout_ctx)
    tail = losses[-max(1, len(losses) // 20):]
    result = {
        "config": cfg.model_dump(),
        "corpus": {"fingerprint": corpus.fingerprint, "stats": corpus.stats},
        "heldout_loss": heldout_loss,
        "unigram_loss": unigram_loss(train_ctx, heldout_ctx, len(tokenizer)),
        "uniform_loss": math.log(len(tokenizer)),
        "final_train_loss": float(np.mean(tail)),
        "train_tokens": cfg.steps * cfg.tokens_per_step,
        "steps": cfg.steps,
        "epochs": cfg.steps * cfg.batch_size / len(train_ctx),
        "corpus_tokens": {"train": int(train_ctx.numel()), "heldout_evaluated": int(heldout_ctx.numel())},
        "parameters": sum(p.numel() for p in model.parameters()),
        "seconds": {"total": 0.0, "prepare": prepared - started, "train": train_seconds},
        "tokens_per_second": cfg.steps * cfg.tokens_per_step / train_seconds,
        "torch_threads": torch.get_num_threads(),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "tokenizers": tokenizers.__version__},
    }
    result["seconds"]["total"] = time.perf_counter() - started
    _save(model.to(getattr(torch, cfg.save_dtype)), tokenizer, result, out_dir)
    log.info("held-out loss %.3f (unigram %.3f), saved to %s", heldout_loss, result["unigram_loss"], out_dir)
    return result


def _prefix(documents: list[str], max_chars: int) -> list[str]:
    out, left = [], max_chars
    for doc in documents:
        if left <= 0:
            break
        out.append(doc[:left])
        left -= len(out[-1])
    return out


def _save(model: GPT2LMHeadModel, tokenizer: PreTrainedTokenizerFast, result: dict, out_dir: Path) -> None:
    """Write into a temporary sibling, then rename it into place (replacing an older run)."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.partial-{os.getpid()}"
    old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        _make_portable(tmp)
        (tmp / "training.json").write_text(json.dumps(result, indent=2) + "\n")
        if out_dir.exists():
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def _make_portable(directory: Path) -> None:
    """Name the tokenizer class both transformers 4.x and 5.x resolve, and make files world-readable.

    transformers 5 writes `TokenizersBackend`, a name 4.x does not know; `PreTrainedTokenizerFast` is
    the same class in 5.x. save_pretrained can leave files 0600, unreadable to a service's own user.
    """
    config_path = directory / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    for path in directory.iterdir():
        path.chmod(0o644)


def main(argv: list[str] | None = None) -> None:
    """`python -m trainer.language_model [OUT_DIR] [--threads N]`: rebuild the shipped reference LM."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("out_dir", nargs="?", default="artifacts/reference-lm", type=Path)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    result = train_language_model(LMConfig(), build_corpus(), args.out_dir)
    print(json.dumps({k: result[k] for k in ("heldout_loss", "unigram_loss", "train_tokens", "seconds")}))


if __name__ == "__main__":
    main()
