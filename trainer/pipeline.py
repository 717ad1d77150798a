"""The stages wired together: what each CLI subcommand runs, and ``reference``, the whole chain in one call."""

from __future__ import annotations

import platform
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from monosemantic.artifact import (
    STORAGE_DTYPES, HookRef, ModelRef, check_name, load_dictionary, parse_reference, publish, read_manifest,
    recorded_model_source,
)
from monosemantic.errors import ConfigError, WriteFailed, os_reason
from monosemantic.evaluations import carry_evaluations, new_evaluation, non_finite, record_evaluations
from monosemantic.bound import require_width, width_mismatch
from monosemantic.lm import LoadedLM, load_lm, model_source, resolve_hook, weights_dtype
from monosemantic.shipped import REFERENCE_DICTIONARY, REFERENCE_HOOK, reference_lm_path, reference_registry_path
from trainer.activations import SHARD_DTYPES, open_activation_file, open_harvest, split_tail
from trainer.checkpoint import Checkpoint, write_checkpoint
from trainer.corpus import build_corpus, pack_stream
from trainer.evaluate import model_metrics, reconstruction_metrics
from trainer.harvest import harvest_hooks, hook_directory
from trainer.paired import input_directory, is_paired, open_training_data, split_paired_tail, write_pairing
from trainer.publish import UNSPECIFIED, publish_trained, result_from_checkpoint
from trainer.text import TextSpec, packed_contexts
from trainer.train import TrainConfig, Trainer

def _model_or_reference(model: str | Path | None) -> str | Path:
    """A model directory or hub id as given (load_lm tells them apart), or the shipped reference."""
    return model if model is not None else reference_lm_path()


def _dictionary_model(registry: Path, name: str, version: int | None, model: str | Path | None,
                      model_dtype: str = "auto") -> LoadedLM:
    """The model to run a dictionary on: ``--model`` if given, else the one its manifest records (its local path or
    hub id; the checksum is checked when the dictionary loads), else the shipped reference. In `model_dtype`
    (auto: the checkpoint's own, so a bf16 model is not widened to twice its size; monosemantic.lm.resolve_dtype)."""
    if model is not None:
        return load_lm(model, dtype=model_dtype)
    return load_lm(recorded_model_source(registry, name, version) or reference_lm_path(), dtype=model_dtype)


def corpus_contexts(tokenizer: Any, split: str, context_length: int, max_chars: int | None, limit: int | None,
                    seed: int = 0, text: TextSpec | None = None) -> tuple[torch.Tensor, str]:
    """Shuffled (seeded) contexts of one split of the user's text (``text``) or of the built-in corpus, and the
    fingerprint of what made them."""
    if text is not None:
        return packed_contexts(tokenizer, text, split, context_length, limit, seed)
    corpus = build_corpus(max_chars=max_chars)
    docs, fingerprint = (corpus.train if split == "train" else corpus.heldout), corpus.fingerprint
    packed = pack_stream(tokenizer, docs, context_length)
    del corpus, docs  # the text, once its ids are taken
    order = torch.randperm(len(packed), generator=torch.Generator().manual_seed(seed))
    return packed.contexts(order[:limit] if limit else order), fingerprint


def harvest_corpus(model: str | Path | None, out: Path, *, hook: str | list[str], contexts: int, context_length: int,
                   dtype: str, max_chars: int | None, seed: int, lm: LoadedLM | None = None, text: TextSpec | None = None,
                   exclude_special_tokens: bool = False, model_dtype: str = "auto", pair: tuple[str, str] | None = None) -> dict:
    """``harvest`` on the built-in corpus or the user's text, at one hook (the manifest) or several in one pass
    (``{"hooks": {name: manifest}}``, each in ``hook_directory(out, name)``). Asking for more contexts than the text
    holds harvests them all and says so in the manifest (``contexts_requested``) and on stderr. ``pair`` (input hook,
    output hook) harvests a transcoder's paired rows: the two hooks in one pass, recorded in OUT/paired.json."""
    if pair is not None:
        if len({*pair}) < 2:
            raise ConfigError(f"--hook-in and --hook-out are both {pair[0]}: a transcoder reads one hook and writes another")
        hook = list(pair)
    if contexts < 1 or context_length < 2:
        raise ConfigError(f"contexts ({contexts}) must be at least 1 and context_length ({context_length}) at least 2")
    if dtype not in SHARD_DTYPES:
        raise ConfigError(f"dtype {dtype!r} is not supported for shards; use one of {sorted(SHARD_DTYPES)}")
    hooks = [hook] if isinstance(hook, str) else list(hook)
    lm = lm or load_lm(_model_or_reference(model), dtype=model_dtype)
    ctx, fingerprint = corpus_contexts(lm.tokenizer, "train", context_length, max_chars, contexts, seed, text)
    manifests = harvest_hooks(lm, ctx, hooks, out, dtype=dtype, data_fingerprint=fingerprint, contexts_per_shard=2048,
                              data=_data_description(text, max_chars), exclude_special_tokens=exclude_special_tokens)
    if ctx.shape[0] < contexts:
        what = f"--dataset {text.dataset}" if text is not None else "the corpus"
        print(f"warning: {what} holds {ctx.shape[0]:,} training contexts of {context_length} tokens, fewer than the "
              f"{contexts:,} asked; all of them were harvested", file=sys.stderr)
    if len(hooks) == 1:
        return {**next(iter(manifests.values())), "contexts_requested": contexts}
    described = {name: {**m, "directory": str(hook_directory(out, name))} for name, m in manifests.items()}
    result: dict[str, Any] = {"hooks": described, "contexts_requested": contexts}
    if pair is not None:
        (name_in, read), (name_out, written) = described.items()
        write_pairing(out, {"hook": name_in, "directory": Path(read["directory"]).name},
                      {"hook": name_out, "directory": Path(written["directory"]).name})
        result["paired"] = {"input": name_in, "output": name_out}
    return result


def _data_description(text: TextSpec | None, max_chars: int | None = None) -> dict:
    """What text a stage read. The built-in corpus is this Python's standard library, which differs between
    Python versions (2,214 files on 3.11.7, fewer on 3.12), so the version goes with it."""
    if text is not None:
        return {"kind": "dataset", **text.describe()}
    return {"kind": "builtin-corpus", "python": platform.python_version(), "max_chars": max_chars}


def corpus_difference(data: dict) -> str | None:
    """For a dictionary trained on the built-in corpus, a warning when this Python's corpus is not the one it was
    trained on (its metrics, and the README's, cannot then be matched here); None when it is, or when unknown."""
    text = data.get("text") if isinstance(data.get("text"), dict) else {}
    recorded = data.get("corpus_fingerprint") or (data.get("fingerprint") if text.get("kind") == "builtin-corpus" else None)
    if not recorded:
        return None
    here = build_corpus(max_chars=text.get("max_chars"))
    if here.fingerprint == recorded:
        return None
    trained_on = f"Python {data.get('python') or text.get('python')}'s" if (data.get("python") or text.get("python")) else "another"
    return (f"the built-in corpus here (Python {here.stats['python_version']}'s standard library, {here.stats['files']:,} files, "
            f"fingerprint {here.fingerprint[:12]}…) is not the one this dictionary was trained on ({trained_on}, fingerprint "
            f"{recorded[:12]}…): metrics measured on it here will not match the recorded ones")


def _require_writable(directory: Path, needed_bytes: int, what: str) -> None:
    """Before any work: ``directory`` (created if missing) accepts a file and has room for ``needed_bytes``."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as exc:
        raise WriteFailed(f"{what} {directory} is not writable: {os_reason(exc)}") from None
    free = shutil.disk_usage(directory).free
    if free < needed_bytes:
        raise WriteFailed(f"{what} {directory} has {free / 2**20:,.1f} MiB free; this run writes about {needed_bytes / 2**20:,.1f} MiB there")


def _dictionary_bytes(d_in: int, d_sae: int, dtype: str) -> int:
    itemsize = STORAGE_DTYPES[dtype].itemsize if dtype in STORAGE_DTYPES else 4
    return (2 * d_in * d_sae + 2 * d_sae + d_in) * itemsize + 64 * d_sae * 4 + (1 << 20)  # weights, statistics, manifest


def _bound_to_model(model: str | Path | None, hook: str | None, d_in: int, harvest_info: dict | None) -> tuple[ModelRef, HookRef]:
    """The model and hook a dictionary is recorded against, checked before training: a hook resolved on the model
    with the data's width; for a harvest, claims that agree with what the harvest recorded."""
    if harvest_info is not None:
        checksum = harvest_info["model_checksum"]
        lm = load_lm(_model_or_reference(model), dtype="auto") if model is not None else None
        if lm is not None and lm.checksum != checksum:
            raise ConfigError(f"--model {model} is not the model this harvest was taken from (weights checksum "
                              f"{lm.checksum[:12]}… against the harvest's {str(checksum)[:12]}…)")
        if hook is not None:
            if lm is None:
                raise ConfigError("--hook with --harvest needs --model to resolve it on (the harvest records its own hook)")
            point = resolve_hook(lm.model, hook)
            if point.module_path != harvest_info["module_path"]:
                raise ConfigError(f"--hook {hook} is {point.module_path}, but the harvest was taken at {harvest_info['module_path']}")
        source = model_source(model) if model is not None else harvest_info.get("model_source")
        return (ModelRef(name=str(model) if model else "harvest", checksum=checksum, source=source),
                HookRef(name=harvest_info["hook"], module_path=harvest_info["module_path"], kind=harvest_info["hook_kind"]))
    if model is None:
        if hook is not None:
            raise ConfigError("--hook needs --model: a hook is resolved on the model the activations came from")
        return ModelRef(name=UNSPECIFIED, checksum=UNSPECIFIED), HookRef(name=UNSPECIFIED, module_path=UNSPECIFIED)
    if hook is None:
        raise ConfigError("--model needs --hook: say where on the model these activations were read")
    return _model_and_hook(model, hook, d_in, "the activations")


def _model_and_hook(model: str | Path, hook: str, d_in: int, what: str, lm: LoadedLM | None = None,
                    option: str = "--hook") -> tuple[ModelRef, HookRef]:
    """``model`` and ``hook`` as a manifest records them: the hook resolved on the model (in the form serving
    resolves), with the width ``d_in`` of ``what``. ``lm``: the model already loaded from ``model``; ``option``: the
    flag a problem is reported against."""
    lm = lm if lm is not None else load_lm(_model_or_reference(model), dtype="auto")
    point = resolve_hook(lm.model, hook)
    if (problem := width_mismatch(lm, point, d_in, what)) is not None:
        raise ConfigError(f"{option} {hook}: {problem}")
    return (ModelRef(name=str(model), checksum=lm.checksum, source=model_source(model)),
            HookRef(name=point.name, module_path=point.module_path, alias=point.alias, kind=point.kind))


UNBOUND_WARNING = ("warning: no --model and --hook given, so the dictionary is recorded against model 'unspecified': it "
                   "cannot be served, evaluated on text or given dashboards until it is bound to one with "
                   "monosemantic-train bind --registry {registry} --dictionary {name} --model MODEL --hook HOOK")


def bind_dictionary(registry: Path, reference: str, *, model: str, hook: str) -> Path:
    """``bind``: publish a dictionary recorded against no model (trained from a bare activation matrix) as its next
    version, bound to ``model`` at ``hook`` (checked: the hook exists and has the dictionary's width). Versions are
    immutable, so the weights are republished; the new manifest says which version it was bound from."""
    name, version = parse_reference(reference)
    dictionary = load_dictionary(registry, name, version)
    m = dictionary.manifest
    if m.model.checksum != UNSPECIFIED:
        raise ConfigError(f"dictionary {name}:v{m.version} is already bound to model {m.model.name!r} at {m.hook.name}; "
                          "a dictionary is bound once, to the model its activations came from")
    model_ref, hook_ref = _model_and_hook(model, hook, m.sae.d_in, f"dictionary {name}:v{m.version}'s inputs")
    _require_writable(registry, _dictionary_bytes(m.sae.d_in, m.sae.d_sae, m.dtype), "the registry")
    return _republish(registry, dictionary, model=model_ref, hook=hook_ref, extra={"bound_from": f"{name}:v{m.version}"})


def _republish(registry: Path, dictionary: Any, *, model: ModelRef, hook: HookRef, extra: dict,
               features: dict | None = None, labels: list[str] | None = None) -> Path:
    """The same weights and training record as the next version of the dictionary, with what changed."""
    m = dictionary.manifest
    keep = {k: getattr(m, k) for k in ("training", "data", "seed", "tokens", "metrics", "sparsity_coefficient", "hook_out")}
    if features is None and "feature_statistics" in (m.model_extra or {}):  # the statistics travel with the weights
        keep["feature_statistics"] = m.model_extra["feature_statistics"]
    if "source" in (m.model_extra or {}):  # so does an imported dictionary's source
        keep["source"] = m.model_extra["source"]
    path = publish(registry, m.name, dictionary.sae, model=model, hook=hook, dtype=m.dtype,
                   features=(dictionary.features or None) if features is None else features,
                   labels=(dictionary.labels or None) if labels is None else labels,
                   extra={**keep, "derived_from": f"{m.name}:v{m.version}", **extra})
    published, digest = read_manifest(path)  # the same weights: their evaluations still hold
    carry_evaluations(dictionary.path.parent.parent, (m.name, m.version, dictionary.manifest_sha256), registry,
                      published.version, digest)
    return path


def train_and_publish(*, activations: Path | None, harvest_dir: Path | None, registry: Path | None, name: str | None,
                      checkpoint_dir: Path | None, resume: bool, model: str | Path | None, hook: str | None, dtype: str,
                      config: dict[str, Any], allow_partial: bool = False) -> dict:
    """``train``: on a user's matrix (the tail is held out for metrics) or on a harvest; publish if asked.

    Everything that can be refused is refused before training: the options, the data (read once: digests, finite
    rows), the model and hook it is recorded against, and whether the registry and checkpoint directory can take
    what will be written there."""
    cfg = TrainConfig.build(**config)  # options left as None take TrainConfig's defaults
    print(f"training {cfg.summary()}", file=sys.stderr)
    if dtype not in STORAGE_DTYPES:
        raise ConfigError(f"dtype {dtype!r} is not supported; use one of {sorted(STORAGE_DTYPES)}")
    if registry is not None and name is not None:
        check_name(name)
    written: dict[str, Any] = {}  # a transcoder's output hook, for its manifest
    if activations is not None:
        source, heldout = split_tail(open_activation_file(activations))
        model_ref, hook_ref = _bound_to_model(model, hook, source.d_in, None)
        data = {"kind": "file", "file": Path(activations).name, "rows": source.rows + heldout.rows}
    else:
        whole = open_training_data(harvest_dir)
        info = whole.description
        if not info["complete"] and not allow_partial:
            raise ConfigError(f"the harvest in {harvest_dir} is incomplete ({info['contexts_done']} of {info['contexts']} "
                              "contexts): finish it with the same harvest command, or pass --allow-partial")
        source, heldout = split_paired_tail(whole) if whole.paired else split_tail(whole)
        model_ref, hook_ref = _bound_to_model(model, hook, source.d_in, info)
        if whole.paired:  # a transcoder writes where the pair's targets were read
            written = {"hook_out": HookRef(name=info["hook_out"], module_path=info["module_path_out"], kind=info["hook_kind_out"])}
        data = {"kind": "harvest", "tokens": info["tokens"], "complete": info["complete"],
                "harvested_fraction": (info["contexts_done"] or 0) / max(1, info["contexts"] or 1),
                "text": info.get("data"), "fingerprint": info.get("data_fingerprint")}
    parameters = 2 * source.d_in * cfg.d_sae + 2 * cfg.d_sae + source.d_in
    if registry is not None:
        _require_writable(registry, _dictionary_bytes(source.d_in, cfg.d_sae, dtype), "the registry")
    if checkpoint_dir is not None:
        _require_writable(checkpoint_dir, 2 * 3 * 4 * parameters + (1 << 20), "the checkpoint directory")  # weights + Adam, twice while renaming
    result = Trainer(cfg, source, checkpoint_dir).run(resume=resume)
    metrics, statistics = reconstruction_metrics(result.sae, heldout.in_order())
    metrics["heldout"] = "tail of the activation rows"
    out: dict[str, Any] = {"metrics": metrics, "tokens": result.tokens, "seconds": result.seconds,
                           "sparsity_coefficient": result.sparsity_coefficient}
    if registry is not None and name is not None:
        if model_ref.checksum == UNSPECIFIED:
            print(UNBOUND_WARNING.format(registry=registry, name=name), file=sys.stderr)
        try:
            path = publish_trained(registry, name, result.sae, config=cfg, sparsity_coefficient=result.sparsity_coefficient,
                                   tokens=result.tokens, model=model_ref, hook=hook_ref, metrics=metrics, features=statistics,
                                   data=data, dtype=dtype, extra={"progress": {"steps": cfg.steps, "planned_steps": cfg.steps, "fraction": 1.0},
                                                                  **written})
        except WriteFailed as exc:
            kept = checkpoint_dir if checkpoint_dir is not None else _keep_unpublished(result, source, cfg, name)
            raise WriteFailed(f"{exc}; the trained weights are kept in {kept}: publish them with "
                              f"monosemantic-train publish --checkpoint-dir {kept} --registry REGISTRY --name {name}") from None
        out["published"] = str(path)
    return out


def _keep_unpublished(result: Any, source: Any, cfg: TrainConfig, name: str) -> Path:
    """A publish that failed after training (a full registry) must not lose the run: write the weights as a
    checkpoint into the working directory, so that ``publish`` can be retried."""
    kept = Path.cwd() / f"unpublished-{name}-{int(time.time())}"
    last = result.history[-1] if result.history else {}
    write_checkpoint(kept, Checkpoint(
        step=cfg.steps, planned_steps=cfg.steps, coefficient=result.sparsity_coefficient, l0_ema=None, l0_slow=None,
        input_scale=result.input_scale, variance=0.0, adam_steps={}, config=cfg.model_dump(mode="json"),
        source=source.description, data=source.identity(), history=result.history, last=last,
    ), {f"param.{n}": p.detach().contiguous() for n, p in result.sae.named_parameters()})
    return kept


def publish_checkpoint(checkpoint_dir: Path, registry: Path, name: str, dtype: str = "float32", allow_partial: bool = False) -> Path:
    """``publish``: the dictionary a checkpoint holds. A run stopped before its planned steps is refused unless
    ``allow_partial``; the manifest records the fraction of the run it holds either way."""
    if dtype not in STORAGE_DTYPES:
        raise ConfigError(f"dtype {dtype!r} is not supported; use one of {sorted(STORAGE_DTYPES)}")
    check_name(name)
    result, state = result_from_checkpoint(checkpoint_dir)
    if state.step < state.planned_steps and not allow_partial:
        raise ConfigError(f"the checkpoint in {checkpoint_dir} holds step {state.step} of {state.planned_steps} "
                          f"({state.fraction:.0%} of the run): resume it with --resume, or pass --allow-partial")
    source = state.source
    hook = source.get("hook") or UNSPECIFIED
    module_path = source.get("module_path") or hook
    last = state.last or (result.history[-1] if result.history else {})
    return publish_trained(registry, name, result.sae, config=result.config, sparsity_coefficient=result.sparsity_coefficient,
                           tokens=result.tokens, model=ModelRef(name="checkpoint", checksum=source.get("model_checksum") or UNSPECIFIED,
                                                                 source=source.get("model_source")),
                           hook=HookRef(name=hook, module_path=module_path, kind=source.get("hook_kind") or "output"),
                           metrics={"training_l0": last.get("l0"), "training_fvu": last.get("fvu"), "training_step": state.step},
                           data={**source, "identity": state.data}, dtype=dtype,
                           extra={"progress": {"steps": state.step, "planned_steps": state.planned_steps, "fraction": state.fraction},
                                  **({"hook_out": HookRef(name=source["hook_out"], module_path=source["module_path_out"],
                                                          kind=source.get("hook_kind_out") or "output")} if source.get("hook_out") else {})})


def evaluate_dictionary(registry: Path, reference: str, *, model: str | Path | None = None, activations: Path | None = None,
                        tokens: int = 200_000, context_length: int = 256, max_chars: int | None = None,
                        text: TextSpec | None = None, record: bool = False, model_dtype: str = "auto") -> dict:
    """``evaluate``: with a model, everything on held-out text; with ``activations``, reconstruction only. With
    ``record`` the headline metrics and the data they were measured on are kept beside the version
    (``monosemantic.evaluations``); the result then says where (``recorded``)."""
    name, version = parse_reference(reference)
    if activations is not None:
        dictionary = load_dictionary(registry, name, version)
        source = open_activation_file(activations)
        if source.d_in != dictionary.sae.cfg.d_in:
            raise ConfigError(f"activations: width {source.d_in} does not match the dictionary's d_in {dictionary.sae.cfg.d_in}")
        metrics, _ = reconstruction_metrics(dictionary.sae, source.in_order())
        metrics["data"] = {"kind": "activation-file", "path": str(Path(activations).resolve()), "sha256": source.identity()["sha256"]}
        checksum = None
    else:
        lm = _dictionary_model(registry, name, version, model, model_dtype)
        dictionary = load_dictionary(registry, name, version, expected_model_checksum=lm.checksum)
        hook = dictionary.manifest.hook.name
        require_width(lm, hook, dictionary.sae.cfg.d_in, f"dictionary {dictionary.ref}")
        hook_out = dictionary.manifest.hook_out.name if dictionary.manifest.hook_out is not None else None
        if hook_out is not None:  # a transcoder: its predictions replace the activation there
            require_width(lm, hook_out, dictionary.sae.d_out, f"the output of transcoder {dictionary.ref}")
        n_contexts = max(1, tokens // (context_length - 1))
        contexts, fingerprint = corpus_contexts(lm.tokenizer, "heldout", context_length, max_chars, n_contexts, text=text)
        metrics, _ = model_metrics(lm, dictionary.sae, hook, contexts, hook_out=hook_out)
        metrics["data"] = {**_data_description(text, max_chars), "split": "heldout", "fingerprint": fingerprint,
                           "model_dtype": weights_dtype(lm)}
        checksum = lm.checksum
    if record and not non_finite(metrics):  # a non-finite result is refused by the command, not kept
        evaluation = new_evaluation(dictionary.manifest_sha256, checksum, metrics["data"], metrics)
        metrics["recorded"] = str(record_evaluations(registry, name, dictionary.manifest.version, [evaluation]))
    return metrics


def dashboard_contexts(tokenizer: Any, tokens: int, context_length: int, max_chars: int | None,
                       text: TextSpec | None = None) -> tuple[torch.Tensor, str]:
    """Contexts for feature statistics: the held-out split first; when more tokens are asked than it holds
    (366k for the stdlib corpus), train-split contexts from the end of the seed-0 order, which harvests (that
    take the first N contexts of that order) leave unseen unless they took nearly all of them."""
    wanted = max(1, tokens // (context_length - 1))
    heldout, fingerprint = corpus_contexts(tokenizer, "heldout", context_length, max_chars, wanted if text else None, text=text)
    if heldout.shape[0] >= wanted:
        return heldout[:wanted], fingerprint
    train, _ = corpus_contexts(tokenizer, "train", context_length, max_chars, None, text=text)
    extra = train[-(wanted - heldout.shape[0]):] if wanted - heldout.shape[0] <= train.shape[0] else train
    return torch.cat([heldout, extra]), fingerprint


def features_and_publish(registry: Path, reference: str, *, model: str | Path | None, tokens: int, cfg: Any = None,
                         max_chars: int | None = None, context_length: int = 256, lm: LoadedLM | None = None,
                         out_registry: Path | None = None, text: TextSpec | None = None, harvest: Path | None = None,
                         model_dtype: str = "auto") -> Path:
    """``features``: compute the dashboard statistics of a dictionary version and publish them, with the same
    weights and manifest fields, as the next version of that dictionary (versions are immutable) in
    `out_registry` (default: the same registry). With `harvest`, over that harvest's first contexts, read from its
    shards (the model only gives the logit effects and the tokenizer)."""
    from trainer.feature_activations import HarvestActivations, check_harvest_matches
    from trainer.features import feature_statistics

    if harvest is not None and (text is not None or max_chars is not None):
        raise ConfigError("--harvest: the dashboards then read the harvest's own contexts; drop --dataset / --max-chars")
    name, version = parse_reference(reference)
    lm = lm or _dictionary_model(registry, name, version, model, model_dtype)
    dictionary = load_dictionary(registry, name, version, expected_model_checksum=lm.checksum)
    m = dictionary.manifest
    hook = m.hook.module_path + ":" + m.hook.kind
    written = m.hook_out.module_path + ":" + m.hook_out.kind if m.hook_out is not None else None  # a transcoder's logit effects start there
    _require_writable(out_registry or registry, _dictionary_bytes(m.sae.d_in, m.sae.d_sae, m.dtype) + 4 * m.sae.d_sae * 1024, "the registry")
    if harvest is not None:
        if is_paired(harvest):  # a transcoder's paired harvest: its features are read from the input side
            harvest = input_directory(harvest)
        activations = HarvestActivations(harvest, tokens=tokens)
        check_harvest_matches(activations, lm, hook)
        tensors, labels = feature_statistics(lm, dictionary.sae, hook, cfg=cfg, activations=activations, hook_out=written)
        described = {"corpus_fingerprint": activations.data_fingerprint,
                     "text": {"kind": "harvest", "directory": str(harvest), "data": activations.manifest.get("data")}}
    else:
        contexts, fingerprint = dashboard_contexts(lm.tokenizer, tokens, context_length, max_chars, text)
        tensors, labels = feature_statistics(lm, dictionary.sae, hook, contexts, cfg, hook_out=written)
        described = {"corpus_fingerprint": fingerprint, "text": _data_description(text, max_chars)}
    return _republish(out_registry or registry, dictionary, model=m.model, hook=m.hook, features=tensors, labels=labels,
                      extra={"feature_statistics": {"tokens": int(tensors["stats_tokens"]), "model_dtype": weights_dtype(lm), **described}})


@dataclass
class ReferencePlan:
    out: Path = Path("artifacts")
    work_dir: Path = Path("runs/reference")
    retrain_lm: bool = False
    harvest_contexts: int = 40_000
    tokens: int = 40_000_000
    target_l0: float = 27.0
    d_sae: int = 4096
    eval_tokens: int = 300_000
    max_chars: int | None = None
    lm_tokens: int | None = None
    seed: int = 0
    context_length: int = 256
    batch_size: int = 4096
    lr: float = 4e-4
    name: str = REFERENCE_DICTIONARY
    hook: str = REFERENCE_HOOK
    dtype: str = "bfloat16"
    feature_tokens: int = 1_000_000


def run_reference(plan: ReferencePlan) -> dict:
    """corpus → LM (unless present) → harvest → train (ReLU+L1, the paper's) → evaluate → publish."""
    started = time.perf_counter()
    lm_dir = Path(plan.out) / "reference-lm"
    timings: dict[str, float] = {}
    if plan.retrain_lm or not (lm_dir / "config.json").exists():
        from trainer.language_model import LMConfig, train_language_model

        t = time.perf_counter()
        lm_cfg = LMConfig(**({"tokens": plan.lm_tokens} if plan.lm_tokens else {}), seed=plan.seed)
        train_language_model(lm_cfg, build_corpus(max_chars=plan.max_chars), lm_dir)
        timings["lm_seconds"] = time.perf_counter() - t
    lm = load_lm(lm_dir)
    t = time.perf_counter()
    harvest_dir = Path(plan.work_dir) / "harvest"
    manifest = harvest_corpus(None, harvest_dir, hook=plan.hook, contexts=plan.harvest_contexts, context_length=plan.context_length,
                              dtype="float16", max_chars=plan.max_chars, seed=plan.seed, lm=lm)
    timings["harvest_seconds"] = time.perf_counter() - t
    source = open_harvest(harvest_dir)
    cfg = TrainConfig.build(architecture="relu", d_sae=plan.d_sae, target_l0=plan.target_l0, tokens=plan.tokens,
                            batch_size=min(plan.batch_size, source.rows), lr=plan.lr, seed=plan.seed)
    t = time.perf_counter()
    result = Trainer(cfg, source, Path(plan.work_dir) / "checkpoint").run(resume=True)
    timings["train_seconds"] = time.perf_counter() - t
    t = time.perf_counter()
    contexts, fingerprint = corpus_contexts(lm.tokenizer, "heldout", plan.context_length, plan.max_chars,
                                            max(1, plan.eval_tokens // (plan.context_length - 1)))
    metrics, _ = model_metrics(lm, result.sae, plan.hook, contexts)
    timings["evaluate_seconds"] = time.perf_counter() - t
    t = time.perf_counter()
    from trainer.features import feature_statistics

    feature_contexts, _ = dashboard_contexts(lm.tokenizer, plan.feature_tokens, plan.context_length, plan.max_chars)
    statistics, labels = feature_statistics(lm, result.sae, plan.hook, feature_contexts)
    timings["features_seconds"] = time.perf_counter() - t
    point = resolve_hook(lm.model, plan.hook)
    path = publish_trained(
        Path(plan.out) / "registry", plan.name, result.sae, config=cfg, sparsity_coefficient=result.sparsity_coefficient,
        tokens=result.tokens, model=ModelRef(name="reference-lm", checksum=lm.checksum),
        hook=HookRef(name=point.name, module_path=point.module_path, alias=point.alias, kind=point.kind),
        metrics=metrics, features=statistics, labels=labels, dtype=plan.dtype,
        data={"corpus_fingerprint": fingerprint, "python": platform.python_version(), "harvest_tokens": manifest["tokens"],
              "heldout": "stdlib files held out by path hash"},
        extra={"feature_statistics": {"tokens": int(statistics["stats_tokens"]), "corpus_fingerprint": fingerprint}},
    )
    timings["total_seconds"] = time.perf_counter() - started
    return {"published": str(path), "metrics": {k: v for k, v in metrics.items() if k != "density_histogram"}, "timings": timings}


def verify_pair(registry: Path | None, reference: str, model: str | Path | None) -> dict:
    """``verify``: load model + dictionary, check every checksum and that they belong together."""
    registry = Path(registry) if registry else reference_registry_path()
    name, version = parse_reference(reference)
    lm = _dictionary_model(registry, name, version, model)
    dictionary = load_dictionary(registry, name, version, expected_model_checksum=lm.checksum)
    require_width(lm, dictionary.manifest.hook.name, dictionary.sae.cfg.d_in, f"dictionary {dictionary.ref}")
    m = dictionary.manifest  # load_dictionary has already checked every file's sha256
    return {
        "dictionary": f"{m.name}:v{m.version}", "architecture": m.architecture, "d_in": m.sae.d_in, "d_sae": m.sae.d_sae,
        "hook": m.hook.name, "model": {"source": lm.source, "checksum": lm.checksum}, "checksums": "ok",
        "metrics": {k: v for k, v in m.metrics.items() if k != "density_histogram"},
        "warnings": [w for w in [corpus_difference(m.data or {})] if w],
    }
