"""The model + dictionary pair a request is computed with, loaded and checked together, and text → token ids."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from monosemantic.artifact import Dictionary, load_dictionary
from monosemantic.errors import ArtifactMismatch
from monosemantic.lm import HookPoint, LoadedLM, hook_dim, load_lm, resolve_hook
from monosemantic.precision import fastest_dtype
from service.encoder import FastEncoder


@dataclass(frozen=True)
class Tokenized:
    ids: list[int]
    offsets: list[tuple[int, int]]  # character span of each token in the text; (0, 0) for BOS


@dataclass(frozen=True)
class Loaded:
    """Immutable once built: a reload builds a new one beside it and swaps the reference."""

    lm: LoadedLM
    dictionary: Dictionary
    hook: HookPoint
    max_positions: int
    encoder: FastEncoder
    # The longest token, in bytes of UTF-8 as the vocabulary spells it (which over-counts byte-level and
    # SentencePiece markers, so a bound built on it errs on the safe side): a text of B bytes has >= B / this tokens.
    max_token_bytes: int = 1
    loaded_at: float = field(default_factory=time.time)
    _token_texts: dict[int, str] = field(default_factory=dict, repr=False, compare=False)

    @property
    def name(self) -> str:
        return self.dictionary.manifest.name

    @property
    def version(self) -> int:
        return self.dictionary.manifest.version

    @property
    def d_sae(self) -> int:
        return self.dictionary.sae.cfg.d_sae

    @property
    def vocab_size(self) -> int:
        return int(self.lm.model.get_output_embeddings().weight.shape[0])

    @property
    def bos_id(self) -> int | None:
        return self.lm.tokenizer.bos_token_id

    @property
    def eos_id(self) -> int | None:
        return self.lm.tokenizer.eos_token_id

    def tokenize(self, text: str, prepend_bos: bool) -> Tokenized:
        encoded = self.lm.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(encoded["input_ids"])
        offsets = [tuple(span) for span in encoded["offset_mapping"]]
        if prepend_bos and self.bos_id is not None:
            ids, offsets = [self.bos_id, *ids], [(0, 0), *offsets]
        return Tokenized(ids, offsets)

    def token_text(self, token_id: int) -> str:
        text = self._token_texts.get(token_id)
        if text is None:  # the tokenizer's decode costs ~15 µs a call; a response has hundreds of tokens
            text = self._token_texts[token_id] = self.lm.tokenizer.decode([token_id])
        return text


def _max_positions(lm: LoadedLM) -> int:
    config = lm.model.config
    for name in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return 2048


def load_model(source: str, device: str) -> LoadedLM:
    lm = load_lm(source, device=device)
    lm.model.requires_grad_(False)  # attribution differentiates w.r.t. features only
    return lm


def load_pair(
    lm: LoadedLM, registry: Path, name: str, version: int | None, device: str, check_width: bool = True, sae_dtype: str = "float32"
) -> Loaded:
    """Load and verify a dictionary for an already loaded model; refuses one made for another model or width.

    check_width runs a one-token forward: only from the thread that owns the model (the engine's worker).
    """
    dictionary = load_dictionary(registry, name, version, expected_model_checksum=lm.checksum, device=device)
    hook = resolve_hook(lm, dictionary.manifest.hook.module_path + ":" + dictionary.manifest.hook.kind)
    width = hook_dim(lm, hook) if check_width else dictionary.sae.cfg.d_in
    if width != dictionary.sae.cfg.d_in:
        raise ArtifactMismatch(
            f"dictionary {name}:v{dictionary.manifest.version} reads d_in={dictionary.sae.cfg.d_in}, "
            f"but the model's activation at {dictionary.manifest.hook.name!r} has width {width}"
        )
    dictionary.sae.eval().requires_grad_(False)
    with torch.no_grad():
        dictionary.sae.float()
    cfg = dictionary.sae.cfg
    dtype = fastest_dtype(cfg.d_in, cfg.d_sae, device) if sae_dtype == "auto" else getattr(torch, sae_dtype)
    encoder = FastEncoder(dictionary.sae, dtype)
    longest = max((len(t.encode("utf-8", "surrogatepass")) for t in lm.tokenizer.get_vocab()), default=1)
    return Loaded(lm=lm, dictionary=dictionary, hook=hook, max_positions=_max_positions(lm), encoder=encoder, max_token_bytes=max(1, longest))
