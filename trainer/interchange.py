"""``import`` and ``export``: other tools' dictionaries published into a registry, and ours written in their formats.

The formats themselves (reading, writing, the exact folds) are monosemantic/interop/; this module finds the source
(a local directory, or a hub repository and subfolder where the network allows), binds an import to the model it
reads (weights checksum, the hook resolved on the model with the dictionary's width) and publishes it as the next
version of a name, with the source recorded in the manifest.
"""

from __future__ import annotations

import difflib
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any, NamedTuple

from monosemantic.artifact import load_dictionary, parse_reference, publish
from monosemantic.errors import ConfigError, InteropError, WriteFailed, os_reason
from monosemantic.interop import ExportAbout, get_format
from monosemantic.interop.folding import RESIDUAL_WRITES, centre_inputs
from monosemantic.lm import load_lm
from monosemantic.sae import sae_from_tensors
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


# SAELens's conversion loaders whose files a monosemantic format reads (None: SAELens's own layout).
RELEASE_FORMATS = {None: "saelens", "gemma_2": "gemma-scope", "gemma_3": "gemma-scope", "sparsify": "sparsify"}


class Release(NamedTuple):
    """A SAELens release's SAE, found and fetched."""

    format: str  # the monosemantic format its files are in
    location: Path
    where: dict[str, Any]  # recorded in the manifest's source
    centred: bool  # trained on a TransformerLens model loaded with center_writing_weights
    norm_scaling_factor: float | None  # SAELens folds it in when the cfg says expected_average_only_in


def locate_release(release: str, sae_id: str, revision: str | None = None) -> Release:
    """A SAELens release and SAE id, resolved through SAELens's own directory of releases (pretrained_saes.yaml) to
    a hub repository and folder, with what SAELens's from_pretrained applies on top of the files."""
    try:
        from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory
    except ImportError:
        raise InteropError("--sae-id resolves a SAELens release through SAELens's directory of releases: "
                           "pip install 'monosemantic[interop]'") from None
    lookup = get_pretrained_saes_directory().get(release)
    if lookup is None:
        close = difflib.get_close_matches(release, get_pretrained_saes_directory(), n=3)
        raise InteropError(f"SAELens has no release {release!r}" + (f"; did you mean {', '.join(close)}?" if close else ""))
    if sae_id not in lookup.saes_map:
        ids = list(lookup.saes_map)
        raise InteropError(f"release {release} has no SAE id {sae_id!r}; it has {len(ids)}: {', '.join(ids[:8])}{' …' if len(ids) > 8 else ''}")
    if lookup.conversion_func not in RELEASE_FORMATS:
        raise InteropError(f"release {release} is read by SAELens's {lookup.conversion_func} loader, a format monosemantic "
                           f"does not read (it reads {', '.join(sorted(set(RELEASE_FORMATS.values())))})")
    location, where = locate(f"{lookup.repo_id}/{lookup.saes_map[sae_id]}", revision)
    overrides = (lookup.config_overrides or {}).get("model_from_pretrained_kwargs") or {}
    where.update(release=release, sae_id=sae_id, release_model=lookup.model)
    return Release(RELEASE_FORMATS[lookup.conversion_func], location, where, bool(overrides.get("center_writing_weights")),
                   lookup.norm_scaling_factor.get(sae_id))


def import_dictionary(fmt: str, source: str, *, model: str | None, hook: str | None, registry: Path, name: str,
                      revision: str | None = None, sae_id: str | None = None, hook_out: str | None = None) -> dict[str, Any]:
    """Read ``source`` in format ``fmt`` (with ``sae_id``: ``source`` is a SAELens release) and publish it as the
    next version of ``name``, bound to ``model`` (a transcoder at ``hook`` and ``hook_out``)."""
    found = None
    if sae_id is not None:
        if fmt != "saelens":
            raise ConfigError("--sae-id names an SAE in a SAELens release: use it with --from saelens")
        found = locate_release(source, sae_id, revision)
        fmt, location, where = found.format, found.location, found.where
    else:
        location, where = locate(source, revision)
    imported = get_format(fmt).read(location)
    lm = load_lm(_model_or_reference(model), dtype="auto")
    hook_name = hook or imported.hook
    if hook_name is None:
        raise ConfigError(f"the {fmt} source records no hook: give --hook (a TransformerLens name or an HF module path)")
    if hook is None and imported.hook_relative_to_base_model:
        hook_name = _under_base_model(lm, hook_name)
    pairs = imported.sae.reads_pairs
    if hook_out is not None and not pairs:
        raise ConfigError(f"--hook-out is a transcoder's output hook; this {fmt} dictionary ({imported.sae.cfg.architecture}) "
                          "reads and reconstructs one hook")
    out_name = hook_out or imported.hook_out
    if pairs and out_name is None:
        raise ConfigError(f"the {fmt} transcoder records no output hook: give --hook-out (where its predictions are written)")
    if hook_out is None and out_name is not None and imported.hook_relative_to_base_model:
        out_name = _under_base_model(lm, out_name)
    sae, folded = imported.sae, list(imported.source.get("folded", []))
    if found is not None and found.centred and hook_name.endswith(RESIDUAL_WRITES):
        sae, folded = centre_inputs(sae), [*folded, "center_writing_weights: inputs centred in the encoder"]
    normalisation = (imported.source.get("config") or {}).get("normalize_activations")
    if found is not None and found.norm_scaling_factor is not None and normalisation == "expected_average_only_in":
        # SAELens's from_pretrained multiplies W_enc by it and divides W_dec and b_dec: monosemantic's input scale.
        sae = sae_from_tensors(sae.cfg.model_copy(update={"input_scale": float(found.norm_scaling_factor)}), sae.tensors())
        folded = [*folded, f"norm_scaling_factor {found.norm_scaling_factor} as the input scale"]
    d_in = sae.cfg.d_in
    model_ref, hook_ref = _model_and_hook(model or str(_model_or_reference(None)), hook_name, d_in,
                                          f"the {fmt} dictionary's inputs (d_in)", lm=lm)
    written = {}
    if pairs:  # resolved on the model with the transcoder's output width, as a paired harvest records it
        _, written["hook_out"] = _model_and_hook(model or str(_model_or_reference(None)), out_name, sae.d_out,
                                                 f"the {fmt} transcoder's outputs (d_out)", lm=lm, option="--hook-out")
    dtype = "float32" if sae is not imported.sae else imported.dtype
    _require_writable(registry, _dictionary_bytes(d_in, sae.cfg.d_sae, dtype), "the registry")
    source_record = {**imported.source, **where, "folded": folded, "model_name": imported.model_name, "hook_given": hook is not None}
    path = publish(registry, name, sae, model=model_ref, hook=hook_ref, dtype=dtype,
                   extra={"source": source_record, "training": {"imported": fmt}, **written})
    return {"published": str(path), "architecture": sae.cfg.architecture, "d_in": d_in, "d_sae": sae.cfg.d_sae,
            "hook": hook_ref.name, **({"hook_out": written["hook_out"].name, "d_out": sae.d_out} if pairs else {}),
            "dtype": dtype, "folded": folded}


def _under_base_model(lm: Any, hook: str) -> str:
    """A sparsify hookpoint (a module path under the model's base_model) as a path from the model itself."""
    prefix = getattr(lm.model, "base_model_prefix", "")
    return f"{prefix}.{hook}" if prefix and hasattr(lm.model, prefix) else hook


def export_dictionary(fmt: str, *, registry: Path, dictionary: str, out: Path) -> dict[str, Any]:
    """Write ``dictionary`` (NAME[:VERSION]) to ``out`` in format ``fmt``; ``out`` must not hold files already."""
    writer = get_format(fmt, writing=True)
    name, version = parse_reference(dictionary)
    loaded = load_dictionary(registry, name, version)
    m = loaded.manifest
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"--out {out}: exists and is not an empty directory (an export never overwrites)")
    text = m.data.get("text") if isinstance(m.data.get("text"), dict) else {}  # a harvest's record of its text
    about = ExportAbout(
        reference=f"{m.name}:v{m.version}", model_name=m.model.source or m.model.name, hook_alias=m.hook.alias,
        hook_module_path=m.hook.module_path, hook_kind=m.hook.kind, density=loaded.features.get("density"),
        context_length=m.data.get("context_length"), dataset=text.get("dataset"), hook_out=m.hook_out,
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
