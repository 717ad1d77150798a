"""The stages wired together: what each CLI subcommand runs, and ``reference``, the whole chain in one call."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from monosemantic.artifact import HookRef, ModelRef, load_dictionary, parse_reference, publish
from monosemantic.errors import ConfigError
from monosemantic.lm import LoadedLM, hook_dim, load_lm, resolve_hook, weights_checksum
from monosemantic.shipped import REFERENCE_DICTIONARY, REFERENCE_HOOK, reference_lm_path, reference_registry_path
from trainer.activations import open_activation_file, open_harvest, split_tail
from trainer.corpus import build_corpus, token_contexts
from trainer.evaluate import model_metrics, reconstruction_metrics
from trainer.harvest import harvest
from trainer.publish import UNSPECIFIED, publish_trained, result_from_checkpoint
from trainer.train import TrainConfig, Trainer

def _model_source(model: Path | None) -> Path:
    return Path(model) if model is not None else reference_lm_path()


def corpus_contexts(tokenizer: Any, split: str, context_length: int, max_chars: int | None, limit: int | None,
                    seed: int = 0) -> tuple[torch.Tensor, str]:
    """Shuffled (seeded) contexts of one corpus split, and the corpus fingerprint."""
    corpus = build_corpus(max_chars=max_chars)
    docs = corpus.train if split == "train" else corpus.heldout
    contexts = token_contexts(tokenizer, docs, context_length)
    order = torch.randperm(contexts.shape[0], generator=torch.Generator().manual_seed(seed))
    contexts = contexts[order]
    return (contexts[:limit] if limit else contexts), corpus.fingerprint


def harvest_corpus(model: Path | None, out: Path, *, hook: str, contexts: int, context_length: int, dtype: str,
                   max_chars: int | None, seed: int, lm: LoadedLM | None = None) -> dict:
    lm = lm or load_lm(_model_source(model))
    ctx, fingerprint = corpus_contexts(lm.tokenizer, "train", context_length, max_chars, contexts, seed)
    return harvest(lm, ctx, hook, out, dtype=dtype, data_fingerprint=fingerprint, contexts_per_shard=2048)


def train_and_publish(*, activations: Path | None, harvest_dir: Path | None, registry: Path | None, name: str | None,
                      checkpoint_dir: Path | None, resume: bool, model: Path | None, hook: str | None, dtype: str,
                      config: dict[str, Any]) -> dict:
    """``train``: on a user's matrix (the tail is held out for metrics) or on a harvest; publish if asked."""
    if activations is not None:
        source, heldout = split_tail(open_activation_file(activations))
        model_ref = ModelRef(name=str(model) if model else UNSPECIFIED, checksum=weights_checksum(model) if model else UNSPECIFIED)
        hook_name = hook or UNSPECIFIED
        hook_ref = HookRef(name=hook_name, module_path=hook_name)
        data = {"kind": "file", "file": Path(activations).name, "rows": source.rows + heldout.rows}
    else:
        source, heldout = split_tail(open_harvest(harvest_dir))
        info = source.description
        model_ref = ModelRef(name=str(model) if model else "harvest", checksum=info["model_checksum"])
        hook_ref = HookRef(name=info["hook"], module_path=info["module_path"])
        data = {"kind": "harvest", "tokens": info["tokens"]}
    cfg = TrainConfig.build(**config)  # options left as None take TrainConfig's defaults
    result = Trainer(cfg, source, checkpoint_dir).run(resume=resume)
    metrics, statistics = reconstruction_metrics(result.sae, heldout.in_order())
    metrics["heldout"] = "tail of the activation rows"
    out: dict[str, Any] = {"metrics": metrics, "tokens": result.tokens, "seconds": result.seconds,
                           "sparsity_coefficient": result.sparsity_coefficient}
    if registry is not None and name is not None:
        path = publish_trained(registry, name, result.sae, config=cfg, sparsity_coefficient=result.sparsity_coefficient,
                               tokens=result.tokens, model=model_ref, hook=hook_ref, metrics=metrics, features=statistics,
                               data=data, dtype=dtype)
        out["published"] = str(path)
    return out


def publish_checkpoint(checkpoint_dir: Path, registry: Path, name: str, dtype: str = "float32") -> Path:
    result, source = result_from_checkpoint(checkpoint_dir)
    hook = source.get("hook", UNSPECIFIED)
    module_path = source.get("module_path", hook)
    last = result.history[-1] if result.history else {}
    return publish_trained(registry, name, result.sae, config=result.config, sparsity_coefficient=result.sparsity_coefficient,
                           tokens=result.tokens, model=ModelRef(name="checkpoint", checksum=source.get("model_checksum", UNSPECIFIED)),
                           hook=HookRef(name=hook, module_path=module_path),
                           metrics={"training_l0": last.get("l0"), "training_fvu": last.get("fvu")}, data=source, dtype=dtype)


def evaluate_dictionary(registry: Path, reference: str, *, model: Path | None = None, activations: Path | None = None,
                        tokens: int = 200_000, context_length: int = 256, max_chars: int | None = None) -> dict:
    """``evaluate``: with a model, everything on held-out corpus text; with ``activations``, reconstruction only."""
    name, version = parse_reference(reference)
    if activations is not None:
        dictionary = load_dictionary(registry, name, version)
        source = open_activation_file(activations)
        if source.d_in != dictionary.sae.cfg.d_in:
            raise ConfigError(f"activations: width {source.d_in} does not match the dictionary's d_in {dictionary.sae.cfg.d_in}")
        metrics, _ = reconstruction_metrics(dictionary.sae, source.in_order())
        return metrics
    lm = load_lm(_model_source(model))
    dictionary = load_dictionary(registry, name, version, expected_model_checksum=lm.checksum)
    hook = dictionary.manifest.hook.name
    if hook_dim(lm.model, hook) != dictionary.sae.cfg.d_in:
        raise ConfigError(f"model activation width at {hook} is not the dictionary's d_in {dictionary.sae.cfg.d_in}")
    n_contexts = max(1, tokens // (context_length - 1))
    contexts, _ = corpus_contexts(lm.tokenizer, "heldout", context_length, max_chars, n_contexts)
    metrics, _ = model_metrics(lm, dictionary.sae, hook, contexts)
    return metrics


def dashboard_contexts(tokenizer: Any, tokens: int, context_length: int, max_chars: int | None) -> tuple[torch.Tensor, str]:
    """Contexts for feature statistics: the held-out split first; when more tokens are asked than it holds
    (366k for the stdlib corpus), train-split contexts from the end of the seed-0 order, which harvests (that
    take the first N contexts of that order) leave unseen unless they took nearly all of them."""
    wanted = max(1, tokens // (context_length - 1))
    heldout, fingerprint = corpus_contexts(tokenizer, "heldout", context_length, max_chars, None)
    if heldout.shape[0] >= wanted:
        return heldout[:wanted], fingerprint
    train, _ = corpus_contexts(tokenizer, "train", context_length, max_chars, None)
    extra = train[-(wanted - heldout.shape[0]):] if wanted - heldout.shape[0] <= train.shape[0] else train
    return torch.cat([heldout, extra]), fingerprint


def features_and_publish(registry: Path, reference: str, *, model: Path | None, tokens: int, cfg: Any = None,
                         max_chars: int | None = None, context_length: int = 256, lm: LoadedLM | None = None,
                         out_registry: Path | None = None) -> Path:
    """``features``: compute the dashboard statistics of a dictionary version and publish them, with the same
    weights and manifest fields, as the next version of that dictionary (versions are immutable) in
    `out_registry` (default: the same registry)."""
    from trainer.features import feature_statistics

    name, version = parse_reference(reference)
    lm = lm or load_lm(_model_source(model))
    dictionary = load_dictionary(registry, name, version, expected_model_checksum=lm.checksum)
    m = dictionary.manifest
    contexts, fingerprint = dashboard_contexts(lm.tokenizer, tokens, context_length, max_chars)
    tensors, labels = feature_statistics(lm, dictionary.sae, m.hook.module_path + ":" + m.hook.kind, contexts, cfg)
    keep = {k: getattr(m, k) for k in ("training", "data", "seed", "tokens", "metrics", "sparsity_coefficient")}
    return publish(
        out_registry or registry, name, dictionary.sae, model=m.model, hook=m.hook, dtype=m.dtype, features=tensors, labels=labels,
        extra={**keep, "derived_from": f"{name}:v{m.version}",
               "feature_statistics": {"tokens": int(tensors["stats_tokens"]), "corpus_fingerprint": fingerprint}},
    )


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
        data={"corpus_fingerprint": fingerprint, "harvest_tokens": manifest["tokens"], "heldout": "stdlib files held out by path hash"},
        extra={"feature_statistics": {"tokens": int(statistics["stats_tokens"]), "corpus_fingerprint": fingerprint}},
    )
    timings["total_seconds"] = time.perf_counter() - started
    return {"published": str(path), "metrics": {k: v for k, v in metrics.items() if k != "density_histogram"}, "timings": timings}


def verify_pair(registry: Path | None, reference: str, model: Path | None) -> dict:
    """``verify``: load model + dictionary, check every checksum and that they belong together."""
    registry = Path(registry) if registry else reference_registry_path()
    name, version = parse_reference(reference)
    lm = load_lm(_model_source(model))
    dictionary = load_dictionary(registry, name, version, expected_model_checksum=lm.checksum)
    d_in = hook_dim(lm.model, dictionary.manifest.hook.name)
    if d_in != dictionary.sae.cfg.d_in:
        raise ConfigError(f"dictionary d_in {dictionary.sae.cfg.d_in} does not match the model's width {d_in} at {dictionary.manifest.hook.name}")
    m = dictionary.manifest  # load_dictionary has already checked every file's sha256
    return {
        "dictionary": f"{m.name}:v{m.version}", "architecture": m.architecture, "d_in": m.sae.d_in, "d_sae": m.sae.d_sae,
        "hook": m.hook.name, "model": {"source": lm.source, "checksum": lm.checksum}, "checksums": "ok",
        "metrics": {k: v for k, v in m.metrics.items() if k != "density_histogram"},
    }
