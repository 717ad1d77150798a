"""``import`` and ``export``: other tools' dictionaries published into a registry, and ours written in their formats.

The formats themselves (reading, writing, the exact folds) are monosemantic/interop/; this module finds the source
(a local directory, or a hub repository and subfolder where the network allows), binds an import to the model it
reads (weights checksum, the hook resolved on the model with the dictionary's width) and publishes it as the next
version of a name, with the source recorded in the manifest.
"""

from __future__ import annotations

import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any

from monosemantic.artifact import load_dictionary, parse_reference, publish
from monosemantic.errors import ConfigError, InteropError, WriteFailed, os_reason
from monosemantic.interop import ExportAbout, get_format
from monosemantic.lm import load_lm
from trainer.pipeline import _model_and_hook, _model_or_reference, _require_writable, _dictionary_bytes

_HUB_LOCATION = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(/(?P<sub>.+))?$")


def locate(source: str, revision: str | None = None) -> tuple[Path, dict[str, Any]]:
    """A local directory or file as it is; else a hub location ``OWNER/REPO[/SUBFOLDER]``, fetched (only the
    subfolder) into the hub cache, which offline (HF_HUB_OFFLINE=1) is all that is read."""
    path = Path(source).expanduser()
    if path.exists():
        return path, {"location": str(path.resolve())}
    match = _HUB_LOCATION.match(source)
    if match is None:
        raise ConfigError(f"SRC {source!r}: no such file or directory, and not a hub location OWNER/REPO[/SUBFOLDER]")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    repo, sub = match["repo"], match["sub"]
    try:
        root = Path(snapshot_download(repo, revision=revision, allow_patterns=[f"{sub}/*"] if sub else None))
    except LocalEntryNotFoundError:
        raise InteropError(f"SRC {source!r}: not a local path, and {repo} is not in the hub cache while the hub is "
                           "unreachable or offline (HF_HUB_OFFLINE)") from None
    except (RepositoryNotFoundError, RevisionNotFoundError, HFValidationError) as exc:
        raise InteropError(f"SRC {source!r}: {type(exc).__name__}: {str(exc).splitlines()[0]}") from None
    location = root / sub if sub else root
    if not location.exists():
        raise InteropError(f"SRC {source!r}: {sub!r} is not in {repo} at revision {revision or 'main'}")
    return location, {"location": source, "hub_repo": repo, "subfolder": sub, "revision": root.name}


def import_dictionary(fmt: str, source: str, *, model: str | None, hook: str | None, registry: Path, name: str,
                      revision: str | None = None) -> dict[str, Any]:
    """Read ``source`` in format ``fmt`` and publish it as the next version of ``name``, bound to ``model``."""
    reader = get_format(fmt)
    location, where = locate(source, revision)
    imported = reader.read(location)
    lm = load_lm(_model_or_reference(model))
    hook_name = hook or imported.hook
    if hook_name is None:
        raise ConfigError(f"the {fmt} source records no hook: give --hook (a TransformerLens name or an HF module path)")
    if hook is None and imported.hook_relative_to_base_model:
        prefix = getattr(lm.model, "base_model_prefix", "")
        hook_name = f"{prefix}.{hook_name}" if prefix and hasattr(lm.model, prefix) else hook_name
    d_in = imported.sae.cfg.d_in
    model_ref, hook_ref = _model_and_hook(model or str(_model_or_reference(None)), hook_name, d_in,
                                          f"the {fmt} dictionary's inputs (d_in)", lm=lm)
    _require_writable(registry, _dictionary_bytes(d_in, imported.sae.cfg.d_sae, imported.dtype), "the registry")
    source_record = {**imported.source, **where, "model_name": imported.model_name, "hook_given": hook is not None}
    path = publish(registry, name, imported.sae, model=model_ref, hook=hook_ref, dtype=imported.dtype,
                   extra={"source": source_record, "training": {"imported": fmt}})
    return {"published": str(path), "architecture": imported.sae.cfg.architecture, "d_in": d_in,
            "d_sae": imported.sae.cfg.d_sae, "hook": hook_ref.name, "dtype": imported.dtype}


def export_dictionary(fmt: str, *, registry: Path, dictionary: str, out: Path) -> dict[str, Any]:
    """Write ``dictionary`` (NAME[:VERSION]) to ``out`` in format ``fmt``; ``out`` must not hold files already."""
    writer = get_format(fmt, writing=True)
    name, version = parse_reference(dictionary)
    loaded = load_dictionary(registry, name, version)
    m = loaded.manifest
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"--out {out}: exists and is not an empty directory (an export never overwrites)")
    density = loaded.features.get("density")
    about = ExportAbout(
        reference=f"{m.name}:v{m.version}", model_name=m.model.source or m.model.name, hook_alias=m.hook.alias,
        hook_module_path=m.hook.module_path, hook_kind=m.hook.kind, density=density,
        context_length=(m.training or {}).get("context_length") or (m.data or {}).get("context_length"),
        dataset=((m.data or {}).get("text") or {}).get("dataset") if isinstance((m.data or {}).get("text"), dict) else None,
    )
    # Written beside and renamed: a failed export leaves no half-written directory that a tool might load.
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex}"
    try:
        written = writer.write(loaded.sae, tmp, about)
        if out.exists():
            out.rmdir()
        os.rename(tmp, out)
    except OSError as exc:
        raise WriteFailed(f"cannot export to {out}: {os_reason(exc)} (nothing was written)") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"exported": f"{m.name}:v{m.version}", "format": fmt, "out": str(out), "files": written.files,
            "notes": written.notes}
