"""Text a user brings, as packed token contexts: files, a folder or glob of them, a ``save_to_disk`` dataset or a
hub dataset, read through HF ``datasets`` (memory-mapped Arrow, or streamed) and packed as the built-in corpus is.

Packing (trainer/corpus.py's ``token_contexts``): documents are joined with the BOS token, the stream is cut into
``context_length - 1`` tokens and every context starts with BOS. Documents are split into train and held-out by a
hash of their content (3%, as the built-in corpus holds out by path hash), so the split does not depend on order;
contexts are drawn in a seeded order. Only as many documents are read as the contexts asked for need, so memory
follows the request, not the dataset's size.
"""

from __future__ import annotations

import glob
import hashlib
import json
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from pydantic import BaseModel

from monosemantic.errors import ConfigError
from trainer.corpus import BOS_TOKEN

HELDOUT_PER_MILLE = 30  # 3% of documents, by content hash
TEXT_SUFFIXES = {".txt": "text", ".md": "text", ".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
DOCUMENTS_PER_BATCH = 256


class TextSpec(BaseModel):
    """Where the text comes from: ``dataset`` is a file, a folder, a glob, a ``save_to_disk`` folder or a hub id."""

    dataset: str
    text_field: str = "text"
    split: str = "train"
    revision: str | None = None

    def describe(self) -> dict[str, Any]:
        return self.model_dump()


def _files(spec: str) -> list[Path] | None:
    """The files ``spec`` names (a file, a folder of text files, a glob), or None when it names no local path."""
    path = Path(spec)
    if path.is_file():
        return [path]
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
    if any(ch in spec for ch in "*?["):
        return sorted(Path(p) for p in glob.glob(spec, recursive=True) if Path(p).is_file())
    return None


def open_dataset(spec: TextSpec):
    """The documents as a ``datasets`` Dataset (local) or IterableDataset (hub, streamed)."""
    import datasets

    datasets.disable_progress_bars()
    path = Path(spec.dataset)
    try:
        if path.is_dir() and ((path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()):
            loaded = datasets.load_from_disk(str(path))
            if isinstance(loaded, datasets.DatasetDict):
                if spec.split not in loaded:
                    raise ConfigError(f"--split {spec.split!r}: the dataset at {path} has splits {sorted(loaded)}")
                loaded = loaded[spec.split]
            return loaded
        files = _files(spec.dataset)
        if files is not None:
            if not files:
                raise ConfigError(f"--dataset {spec.dataset}: no text files there (looked for {', '.join(sorted(TEXT_SUFFIXES))})")
            builders = {TEXT_SUFFIXES.get(p.suffix, "text") for p in files}
            if len(builders) != 1:
                raise ConfigError(f"--dataset {spec.dataset}: mixes file kinds ({', '.join(sorted(builders))}); give one kind")
            builder = builders.pop()
            options = {"sample_by": "document"} if builder == "text" else {}
            return datasets.load_dataset(builder, data_files=[str(p) for p in files], split="train", **options)
        return datasets.load_dataset(spec.dataset, split=spec.split, revision=spec.revision, streaming=True)
    except ConfigError:
        raise
    except FileNotFoundError as exc:
        raise ConfigError(f"--dataset {spec.dataset}: not found ({exc})") from None
    except Exception as exc:  # datasets raises many types (DatasetNotFoundError, ConnectionError, ArrowInvalid…)
        raise ConfigError(f"--dataset {spec.dataset}: cannot be read ({type(exc).__name__}: {str(exc)[:300]})") from None


def _heldout(key: bytes) -> bool:
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "big") % 1000 < HELDOUT_PER_MILLE


def documents(spec: TextSpec, split: str, seed: int = 0) -> Iterator[str | list[int]]:
    """The train or held-out documents (text, or token ids for a pre-tokenized ``input_ids`` column), in a seeded
    order for local data (a hub dataset streams in a seeded buffer order)."""
    dataset = open_dataset(spec)
    columns = set(dataset.column_names or [])
    field = "input_ids" if "input_ids" in columns else spec.text_field
    if columns and field not in columns:
        raise ConfigError(f"--text-field {spec.text_field!r}: the dataset has columns {sorted(columns)}")
    dataset = dataset.shuffle(seed=seed) if hasattr(dataset, "flatten_indices") else dataset.shuffle(seed=seed, buffer_size=10_000)
    for row in dataset:
        value = row[field]
        if field == "input_ids":
            key = np.asarray(value, dtype=np.int64).tobytes()
        elif isinstance(value, str):
            key = value.encode("utf-8", "surrogatepass")
        else:
            raise ConfigError(f"--text-field {field!r} holds {type(value).__name__}, not text")
        if _heldout(key) == (split == "heldout"):
            yield value


def _bos(tokenizer) -> int:
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        bos = getattr(tokenizer, "eos_token_id", None)  # GPT-2 style models separate documents with their EOS
    if bos is None:
        backend = getattr(tokenizer, "backend_tokenizer", tokenizer)
        bos = backend.token_to_id(BOS_TOKEN)
    if bos is None:
        raise ConfigError("the tokenizer has neither a BOS nor an EOS token to start contexts and separate documents")
    return int(bos)


def packed_contexts(tokenizer, spec: TextSpec, split: str, context_length: int, limit: int | None,
                    seed: int = 0) -> tuple[torch.Tensor, str]:
    """Up to ``limit`` contexts [n, context_length] of one split, and the fingerprint of what made them."""
    if context_length < 2:
        raise ConfigError(f"context_length must be at least 2, got {context_length}")
    bos, body = _bos(tokenizer), context_length - 1
    backend = getattr(tokenizer, "backend_tokenizer", tokenizer)
    carry, contexts, batch, packed = np.zeros(0, dtype=np.int64), [], [], 0
    wanted = limit if limit is not None else 1 << 62

    def pack(docs: list) -> None:
        nonlocal carry, packed
        texts = [d for d in docs if isinstance(d, str)]
        encoded = iter(backend.encode_batch(texts, add_special_tokens=False))
        pieces = [carry]
        for d in docs:
            ids = next(encoded).ids if isinstance(d, str) else d
            pieces += [np.asarray(ids, dtype=np.int64), np.asarray([bos], dtype=np.int64)]
        stream = np.concatenate(pieces)
        n = min(len(stream) // body, wanted - packed)
        if n > 0:
            block = np.empty((n, context_length), dtype=np.int64)
            block[:, 0] = bos
            block[:, 1:] = stream[: n * body].reshape(n, body)
            contexts.append(block)
            packed += n
        carry = stream[n * body :]

    for doc in documents(spec, split, seed):
        batch.append(doc)
        if len(batch) == DOCUMENTS_PER_BATCH:
            pack(batch)
            batch = []
            if packed >= wanted:
                break
    if batch and packed < wanted:
        pack(batch)
    if not contexts:
        raise ConfigError(f"--dataset {spec.dataset}: its {split} split gives no context of {context_length} tokens")
    out = torch.from_numpy(np.concatenate(contexts))
    order = torch.randperm(out.shape[0], generator=torch.Generator().manual_seed(seed))
    return out[order], fingerprint(spec, tokenizer, context_length)


def fingerprint(spec: TextSpec, tokenizer, context_length: int) -> str:
    """What decides the contexts: the dataset's identity (local files by size and mtime, a hub id by revision),
    the text field, the tokenizer's vocabulary and the packing."""
    identity: dict[str, Any] = {**spec.describe(), "context_length": context_length, "packing": "bos-joined-v1"}
    path = Path(spec.dataset)
    if path.exists() or _files(spec.dataset):  # local: every file by name, size and modification time
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else (_files(spec.dataset) or [])
        identity["files"] = [[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in files[:10_000]]
    backend = getattr(tokenizer, "backend_tokenizer", tokenizer)
    vocabulary = backend.get_vocab() if hasattr(backend, "get_vocab") else {}
    identity["tokenizer"] = hashlib.sha256(json.dumps(sorted(vocabulary.items())).encode()).hexdigest()[:16]
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
