"""Dictionaries in other tools' formats (SAELens, sparsify, Gemma Scope): a name → format registry, one module each.

A format reads what the other tool wrote into an ``Imported``: a monosemantic dictionary that encodes and decodes
exactly as the source does (monosemantic/interop/folding.py), the hook and model the source records, and the
source's own config for the manifest. Formats that other tools read also write: a monosemantic dictionary in that
tool's layout, loadable by the tool itself. What a layout cannot say exactly is refused with the field named.
Adding a format is one module with a ``@register``-ed class, imported at the end of this file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, NamedTuple

from torch import Tensor

from monosemantic.artifact import HookRef
from monosemantic.errors import InteropError
from monosemantic.sae import SparseAutoencoder

PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".pkl", ".pickle")
PICKLE_REFUSED = (
    "monosemantic reads no pickle: unpickling runs code from the file, and torch.load(weights_only=True) has itself "
    "been bypassed (CVE-2025-32434, torch < 2.6). Convert it to safetensors with the tool that wrote it")


class Imported(NamedTuple):
    """A dictionary read from another tool's files."""

    sae: SparseAutoencoder
    dtype: str  # the storage dtype that keeps it exact: the source's, or float32 where a fold changed the weights
    hook: str | None  # the hook the source records (None: it records none)
    hook_relative_to_base_model: bool  # sparsify: a module path under the model's base_model (GPT-2: h.0.mlp.act)
    model_name: str | None  # the model the source says it was trained on (for the manifest; the checksum decides)
    source: dict[str, Any]  # format, location and the source's own config, recorded in the manifest
    hook_out: str | None = None  # a transcoder's: the hook it writes (``hook`` is the one it reads), as the source records it


class ExportAbout(NamedTuple):
    """What an exported config records beside the weights."""

    reference: str  # NAME:vN
    model_name: str
    hook_alias: str | None  # the TransformerLens name, where the hook has one
    hook_module_path: str
    hook_kind: str  # output | input
    density: Tensor | None  # per-feature firing fraction, from the dictionary's statistics
    context_length: int | None
    dataset: str | None
    hook_out: HookRef | None = None  # a transcoder's: where it writes (the manifest's hook_out)


class Written(NamedTuple):
    """An export: its directory, the files written, and what a user of the other tool should know."""

    path: Path
    files: list[str]
    notes: list[str]


class Format:
    """One tool's on-disk layout. ``read`` takes a local directory (or file); ``write`` a fresh directory."""

    name: ClassVar[str]
    writes: ClassVar[bool] = False

    def read(self, location: Path) -> Imported:
        raise NotImplementedError

    def write(self, sae: SparseAutoencoder, out: Path, about: ExportAbout) -> Written:
        raise InteropError(f"monosemantic does not write the {self.name} format")


FORMATS: dict[str, Format] = {}


def register(cls: type[Format]) -> type[Format]:
    FORMATS[cls.name] = cls()
    return cls


def get_format(name: str, *, writing: bool = False) -> Format:
    known = sorted(n for n, f in FORMATS.items() if f.writes or not writing)
    if name not in FORMATS or (writing and not FORMATS[name].writes):
        raise InteropError(f"unknown format {name!r} to {'write' if writing else 'read'}; known: {', '.join(known)}")
    return FORMATS[name]


def refuse_pickles(location: Path) -> None:
    """A release that is a pickle (dictionary_learning's ae.pt, Goodfire's and others' .pt) is refused by name."""
    candidates = [location] if location.is_file() else sorted(location.iterdir()) if location.is_dir() else []
    pickles = [p.name for p in candidates if p.suffix in PICKLE_SUFFIXES]
    if pickles:
        raise InteropError(f"{', '.join(pickles)}: a pickle. {PICKLE_REFUSED}")


def read_json(path: Path, what: str) -> dict[str, Any]:
    import json

    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise InteropError(f"{what}: {path.name} is missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InteropError(f"{what}: {path.name} cannot be read as JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise InteropError(f"{what}: {path.name} must hold a JSON object")
    return raw


def read_safetensors(path: Path, what: str) -> dict[str, Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise InteropError(f"{what}: {path.name} is missing")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, RuntimeError) as exc:
        raise InteropError(f"{what}: {path.name} is not a readable safetensors file ({exc})") from None


def dtype_name(tensors: dict[str, Tensor]) -> str:
    names = {str(t.dtype).removeprefix("torch.") for t in tensors.values()}
    for name in ("float32", "bfloat16", "float16"):
        if names == {name}:
            return name
    return "float32"


def require(condition: bool, message: str) -> None:
    if not condition:
        raise InteropError(message)



# The formats register themselves on import.
from monosemantic.interop import gemma_scope, saelens, sparsify  # noqa: E402,F401
