"""The reference corpus: the stdlib's own text (sources and data files), packed into token contexts."""

from __future__ import annotations

import hashlib
import os
import sys
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from monosemantic.errors import ConfigError

BOS_TOKEN = "<|endoftext|>"

# Directories that are not the standard library's own text: third-party packages, bytecode, and the
# build configuration (its Makefile records this machine's paths, so it would make the corpus local).
_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}
_SKIP_DIR_PREFIXES = ("config-",)
# Per-build generated module: the same content differs between installations of one Python version.
_SKIP_NAME_PREFIXES = ("_sysconfigdata",)
# Binary formats that never decode as text; skipping them by name saves reading them.
_BINARY_SUFFIXES = {
    ".pyc", ".so", ".a", ".o", ".dll", ".exe", ".whl", ".zip", ".egg", ".tar", ".xz", ".gz", ".bz2",
    ".pickle", ".pck", ".png", ".gif", ".jpg", ".jpeg", ".bmp", ".ico", ".tiff", ".webp", ".exr",
    ".wav", ".au", ".aif", ".aiff", ".aifc", ".ras", ".sgi", ".pbm", ".pgm", ".ppm", ".xbm",
}
# A file larger than this is a bundled artifact, not text written for people.
_MAX_FILE_BYTES = 2_000_000
_MIN_HELDOUT_FILES = 3

_CODE_SUFFIXES = {".py", ".pyw", ".pyi", ".c", ".cpp", ".h", ".sh", ".bat", ".ps1", ".csh", ".fish",
                  ".vbs", ".d", ".stp"}
_MARKUP_SUFFIXES = {".html", ".htm", ".xml", ".xsl", ".dtd", ".css", ".out"}
_TEXT_SUFFIXES = {".txt", ".rst", ".md"}
_TEXT_NAMES = ("readme", "license", "news", "changelog", "history", "todo", "credits")
KINDS = ("code", "email", "markup", "text", "data")


@dataclass
class Corpus:
    """Documents (one per file) split into train and held-out, with what went in."""

    train: list[str]
    heldout: list[str]
    fingerprint: str
    stats: dict
    train_paths: list[str] = field(default_factory=list)  # relative paths, aligned with `train`
    heldout_paths: list[str] = field(default_factory=list)


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def kind_of(relpath: str) -> str:
    """The kind of text a file holds, by its path: code, email, markup, text (prose) or data."""
    path = Path(relpath)
    name = path.name.lower()
    if "test_email/data/msg_" in relpath:
        return "email"
    if path.suffix in _CODE_SUFFIXES or name in {"activate", "makesetup", "install-sh", "fetch_macholib"}:
        return "code"
    if path.suffix in _MARKUP_SUFFIXES:
        return "markup"
    if path.suffix in _TEXT_SUFFIXES or name.startswith(_TEXT_NAMES):
        if "testcases" not in name and not name.startswith(("floating_points", "ieee754")):
            return "text"
    return "data"


def is_heldout(relpath: str, heldout_fraction: float) -> bool:
    """Whether a file belongs to the held-out split: a function of its path alone, never random."""
    return _path_hash(relpath) < heldout_fraction


def _path_hash(relpath: str, salt: str = "heldout") -> float:
    digest = hashlib.sha256(f"{salt}:{relpath}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def _candidate_files(root: Path) -> list[Path]:
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        # Pruning in place keeps the walk out of site-packages (often far larger than the stdlib).
        dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS and not d.startswith(_SKIP_DIR_PREFIXES)]
        for name in filenames:
            path = Path(dirpath, name)
            if name.startswith(_SKIP_NAME_PREFIXES) or path.suffix.lower() in _BINARY_SUFFIXES:
                continue
            if path.is_file() and not path.is_symlink():
                files.append(path)
    return files


def _read_text(path: Path) -> str | None:
    """The file's text, or None for binary, undecodable, empty or oversized files."""
    if path.stat().st_size > _MAX_FILE_BYTES:
        return None
    data = path.read_bytes()
    if not data.strip() or b"\x00" in data:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _cap(docs: dict[str, str], max_chars: int) -> dict[str, str]:
    """A deterministic slice of at most `max_chars` characters that still mixes every kind.

    The budget is shared between kinds (a kind with less text than its share passes the rest on);
    within a kind, files are taken in the order of a hash of their path (a spread across the
    library rather than its alphabetically first package), the last one cut at a line boundary.
    """
    by_kind: dict[str, list[str]] = {}
    # Salted apart from the held-out hash, so a slice is not biased towards held-out files.
    for rel in sorted(docs, key=lambda r: _path_hash(r, salt="slice")):
        by_kind.setdefault(kind_of(rel), []).append(rel)
    totals = {k: sum(len(docs[r]) for r in rels) for k, rels in by_kind.items()}
    remaining, taken = max_chars, {}
    kinds = sorted(by_kind, key=lambda k: (totals[k], k))
    for i, kind in enumerate(kinds):
        budget = min(totals[kind], remaining // (len(kinds) - i))
        remaining -= budget
        for rel in by_kind[kind]:
            if budget <= 0:
                break
            text = docs[rel]
            if len(text) > budget:
                cut = text.rfind("\n", 0, budget)
                text = text[: cut + 1] if cut >= budget // 2 else text[:budget]
            taken[rel] = text
            budget -= len(text)
    return taken


def build_corpus(max_chars: int | None = None, heldout_fraction: float = 0.03,
                 root: Path | None = None) -> Corpus:
    """Build the reference corpus from the running Python's standard library (or `root`).

    One document per text file, in sorted relative-path order. A file is held out when a hash of its
    relative path falls below `heldout_fraction` (if that leaves fewer than three, the files with the
    lowest hashes are). `max_chars` caps the total for quick runs, taken across kinds.
    """
    if max_chars is not None and max_chars <= 0:
        raise ConfigError(f"max_chars must be positive, got {max_chars}")
    if not 0.0 < heldout_fraction < 1.0:
        raise ConfigError(f"heldout_fraction must be between 0 and 1, got {heldout_fraction}")
    root = Path(root) if root is not None else stdlib_root()
    if not root.is_dir():
        raise ConfigError(f"root is not a directory: {root.name!r}")

    docs: dict[str, str] = {}
    for path in _candidate_files(root):
        text = _read_text(path)
        if text is not None:
            docs[path.relative_to(root).as_posix()] = text
    if max_chars is not None:
        docs = _cap(docs, max_chars)
    if len(docs) < 2:
        raise ConfigError(f"root holds {len(docs)} text files; a corpus needs at least 2")

    paths = sorted(docs)
    heldout = {p for p in paths if is_heldout(p, heldout_fraction)}
    n_min = min(_MIN_HELDOUT_FILES, len(paths) - 1)
    if len(heldout) < n_min:
        heldout = set(sorted(paths, key=_path_hash)[:n_min])

    fingerprint = hashlib.sha256()
    fingerprint.update(f"python {sys.version_info.major}.{sys.version_info.minor}."
                       f"{sys.version_info.micro}\n".encode())
    stats: dict = {
        "python_version": ".".join(map(str, sys.version_info[:3])),
        "files": len(paths),
        "chars": 0,
        "heldout_files": len(heldout),
        "heldout_fraction": heldout_fraction,
        "max_chars": max_chars,
        "kinds": {k: {"files": 0, "chars": 0} for k in KINDS},
    }
    for rel in paths:
        text = docs[rel]
        data = text.encode("utf-8")
        fingerprint.update(f"{rel}\0{len(data)}\0{hashlib.sha256(data).hexdigest()}\n".encode())
        stats["chars"] += len(text)
        stats["kinds"][kind_of(rel)]["files"] += 1
        stats["kinds"][kind_of(rel)]["chars"] += len(text)

    train_paths = [p for p in paths if p not in heldout]
    heldout_paths = [p for p in paths if p in heldout]
    return Corpus(
        train=[docs[p] for p in train_paths],
        heldout=[docs[p] for p in heldout_paths],
        fingerprint=fingerprint.hexdigest(),
        stats=stats,
        train_paths=train_paths,
        heldout_paths=heldout_paths,
    )


ENCODE_CHUNK = 64  # documents per encode_batch call


@dataclass(frozen=True)
class PackedStream:
    """The token stream doc₁ BOS doc₂ BOS … of a list of documents, cut into contexts of ``context_length`` on
    demand: context i is BOS + the stream's i-th piece of ``context_length - 1`` tokens (the ragged tail dropped).

    Kept as int32 ids, and only the contexts asked for are built: a harvest of 64 contexts of the standard library
    (10M tokens) built every context as int64 and then a shuffled copy, 574 MB over the tokenizer for 64 × 128
    ids (bench/RESULTS.md)."""

    stream: np.ndarray
    context_length: int
    bos_token_id: int

    def __len__(self) -> int:
        return len(self.stream) // (self.context_length - 1)

    def contexts(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """LongTensor [len(rows), context_length] of the contexts at ``rows`` (all of them, in order, when None)."""
        body = self.context_length - 1
        index = np.arange(len(self)) if rows is None else rows.numpy()
        contexts = np.empty((len(index), self.context_length), dtype=np.int64)
        contexts[:, 0] = self.bos_token_id
        contexts[:, 1:] = self.stream[: len(self) * body].reshape(-1, body)[index]
        return torch.from_numpy(contexts)


def pack_stream(tokenizer, documents: list[str], context_length: int, bos_token_id: int | None = None) -> PackedStream:
    """Tokenise `documents` into a PackedStream (see token_contexts)."""
    if context_length < 2:
        raise ConfigError(f"context_length must be at least 2, got {context_length}")
    backend = getattr(tokenizer, "backend_tokenizer", tokenizer)  # a fast tokenizer or a raw one
    if bos_token_id is None:
        bos_token_id = getattr(tokenizer, "bos_token_id", None)
        if bos_token_id is None:
            bos_token_id = backend.token_to_id(BOS_TOKEN)
        if bos_token_id is None:
            raise ConfigError(f"bos_token_id: the tokenizer has no BOS token and no {BOS_TOKEN!r}")
    # In chunks: an Encoding holds offsets, token strings and masks beside its ids, so encoding the standard library
    # in one call held 1.4 GB of them (bench/RESULTS.md); a chunk's are dropped once its ids are taken.
    pieces, separator = [], np.asarray([bos_token_id], dtype=np.int32)
    for start in range(0, len(documents), ENCODE_CHUNK):
        for enc in backend.encode_batch(list(documents[start : start + ENCODE_CHUNK]), add_special_tokens=False):
            pieces.append(np.asarray(enc.ids, dtype=np.int32))
            pieces.append(separator)
    stream = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int32)
    return PackedStream(stream=stream, context_length=context_length, bos_token_id=int(bos_token_id))


def token_contexts(tokenizer, documents: list[str], context_length: int,
                   bos_token_id: int | None = None) -> torch.Tensor:
    """Tokenise `documents` and pack them into a LongTensor [n_contexts, context_length].

    The token stream is doc₁ BOS doc₂ BOS …; it is cut into pieces of `context_length - 1` tokens and
    each context is BOS + piece, so every context starts with BOS and BOS also separates documents
    (as in the paper's setup). The ragged tail is dropped.
    """
    return pack_stream(tokenizer, documents, context_length, bos_token_id).contexts()
