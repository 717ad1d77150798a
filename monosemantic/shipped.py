"""Where the shipped reference model and dictionary live: the checkout's artifacts/ or the installed copy."""

from __future__ import annotations

from pathlib import Path

REFERENCE_DICTIONARY = "reference"
REFERENCE_HOOK = "blocks.0.mlp.hook_post"


def artifacts_root() -> Path:
    """``artifacts/`` of a source checkout (editable install), else the copy packaged as ``monosemantic/_shipped``."""
    packaged = Path(__file__).resolve().parent / "_shipped"
    checkout = Path(__file__).resolve().parent.parent / "artifacts"
    return packaged if packaged.is_dir() else checkout


def reference_lm_path() -> Path:
    return artifacts_root() / "reference-lm"


def reference_registry_path() -> Path:
    return artifacts_root() / "registry"
