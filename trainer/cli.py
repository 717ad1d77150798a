"""``monosemantic-train``: one subcommand per stage of the pipeline (typer), plus ``reference`` and ``verify``."""

from __future__ import annotations

import json
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from monosemantic.errors import ConfigError, MonosemanticError

app = typer.Typer(add_completion=False, no_args_is_help=True, help=(
    "Train, evaluate and publish sparse autoencoders.\n\n"
    "Exit codes: 0 success; 2 bad input or refused (the message says why; nothing partial was left behind); "
    "1 a bug (a traceback: please report it)."))

Registry = Annotated[Path, typer.Option("--registry", help="registry directory holding <name>/v<N>/")]
Dataset = Annotated[Optional[str], typer.Option(
    help="your text instead of the built-in corpus: a .txt/.jsonl/.json/.csv/.parquet file, a folder or glob of them, "
         "a datasets save_to_disk folder, or a hub dataset id")]
TextField = Annotated[str, typer.Option(help="the column holding the text (an input_ids column is used as it is)")]
Split = Annotated[str, typer.Option(help="the dataset's split (a save_to_disk DatasetDict or a hub dataset)")]
Revision = Annotated[Optional[str], typer.Option(help="the hub dataset's revision")]
# --model-dtype, not --dtype: harvest's --dtype is its shards' and train's the dictionary's storage dtype.
class _ModelDtype(str, Enum):
    auto = "auto"
    bfloat16 = "bfloat16"
    float32 = "float32"


ModelDtype = Annotated[_ModelDtype, typer.Option(help="the model's dtype; auto: the checkpoint's own (a bf16 model is not widened to fp32)")]


def _text(dataset: str | None, text_field: str, split: str, revision: str | None):
    from trainer.text import TextSpec

    return TextSpec(dataset=dataset, text_field=text_field, split=split, revision=revision) if dataset else None


def _fail(exc: Exception) -> None:
    typer.echo(f"error: {exc}", err=True)
    raise typer.Exit(code=2)


def _floats(text: str, option: str) -> tuple[float, ...]:
    try:
        return tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise ConfigError(f"{option}: comma-separated numbers, got {text!r}") from None


def _print_json(data: dict) -> None:
    typer.echo(json.dumps(data, indent=2, sort_keys=True, default=float))


@app.command()
def corpus(
    out: Annotated[Optional[Path], typer.Option(help="write the documents as JSON lines here")] = None,
    max_chars: Annotated[Optional[int], typer.Option(help="cap the total characters (a mixed slice)")] = None,
) -> None:
    """Build the reference corpus from the Python standard library; print its fingerprint and stats."""
    from trainer.corpus import build_corpus

    c = build_corpus(max_chars=max_chars)
    if out:
        with open(out, "w") as fh:
            for split, docs in (("train", c.train), ("heldout", c.heldout)):
                for d in docs:
                    fh.write(json.dumps({"split": split, "text": d}) + "\n")
    _print_json({"fingerprint": c.fingerprint, "stats": c.stats})


@app.command()
def lm(
    out: Annotated[Path, typer.Option(help="directory for the model + tokenizer")] = Path("runs/reference-lm"),
    tokens: Annotated[Optional[int], typer.Option(help="training tokens")] = None,
    max_chars: Annotated[Optional[int], typer.Option(help="train on a corpus slice")] = None,
    seed: int = 0,
    overwrite_shipped: Annotated[bool, typer.Option(help="allow --out to be the shipped artifacts/reference-lm")] = False,
) -> None:
    """Train the BPE tokenizer and the one-layer reference transformer (d_model 128, MLP 512 ReLU)."""
    from monosemantic.shipped import reference_lm_path
    from trainer.corpus import build_corpus
    from trainer.language_model import LMConfig, train_language_model

    # The shipped dictionary is bound to the shipped model's checksum: retraining it in place breaks the README's
    # first command ("trained on model 'reference-lm' … not on the loaded model").
    if out.resolve() == reference_lm_path().resolve() and not overwrite_shipped:
        _fail(MonosemanticError(f"--out {out} is the shipped reference model, which the shipped dictionary is bound to; "
                                "choose another directory, or pass --overwrite-shipped"))
    try:
        cfg = LMConfig(**{k: v for k, v in {"tokens": tokens, "seed": seed}.items() if v is not None})
        result = train_language_model(cfg, build_corpus(max_chars=max_chars), out)
    except MonosemanticError as exc:
        _fail(exc)
    _print_json({k: result[k] for k in result if k in ("heldout_loss", "unigram_loss", "train_tokens", "seconds")})


@app.command("harvest")
def harvest_cmd(
    out: Annotated[Path, typer.Option(help="directory for the shards (resumable)")],
    model: Annotated[Optional[str], typer.Option(help="HF model directory or hub id (default: the model the dictionary records, else the shipped reference)")] = None,
    hook: Annotated[Optional[list[str]], typer.Option(help="hook point: HF module path or TransformerLens alias; repeat it to "
                                                       "harvest several in one forward, each into OUT/<hook>/ "
                                                       "(default: blocks.0.mlp.hook_post)")] = None,
    contexts: Annotated[int, typer.Option(min=1, help="number of corpus contexts to harvest")] = 4096,
    context_length: Annotated[int, typer.Option(min=2)] = 256,
    dtype: Annotated[str, typer.Option(help="float16 | bfloat16 | float32")] = "float16",
    max_chars: Annotated[Optional[int], typer.Option(min=1, help="use a corpus slice")] = None,
    seed: Annotated[int, typer.Option(min=0)] = 0,
    dataset: Dataset = None,
    text_field: TextField = "text",
    split: Split = "train",
    revision: Revision = None,
    exclude_special_tokens: Annotated[bool, typer.Option(
        help="keep every BOS/EOS/PAD position out of the rows, not only each context's first")] = False,
    model_dtype: ModelDtype = _ModelDtype.auto,
    hook_in: Annotated[Optional[str], typer.Option(help="a transcoder's input hook (with --hook-out): paired rows, both "
                                                   "hooks in one forward (e.g. blocks.0.ln2.hook_normalized)")] = None,
    hook_out: Annotated[Optional[str], typer.Option(help="a transcoder's output hook (with --hook-in), e.g. "
                                                    "blocks.0.hook_mlp_out")] = None,
) -> None:
    """Run the model over training contexts and store the activations at one or several hooks (the forward runs
    once, up to the deepest hook); with --hook-in and --hook-out, a transcoder's paired rows."""
    from monosemantic.shipped import REFERENCE_HOOK
    from trainer.pipeline import harvest_corpus

    try:
        if (hook_in is None) != (hook_out is None):
            raise ConfigError("--hook-in and --hook-out go together: a transcoder's rows pair an input with an output")
        if hook_in is not None and hook:
            raise ConfigError("--hook cannot go with --hook-in/--hook-out: a paired harvest reads exactly those two hooks")
        manifest = harvest_corpus(model, out, hook=hook or [REFERENCE_HOOK], contexts=contexts,
                                  context_length=context_length, dtype=dtype, max_chars=max_chars, seed=seed,
                                  text=_text(dataset, text_field, split, revision), exclude_special_tokens=exclude_special_tokens,
                                  model_dtype=model_dtype.value, pair=(hook_in, hook_out) if hook_in is not None else None)
    except MonosemanticError as exc:
        _fail(exc)
    summary = ("tokens", "contexts_done", "hook", "dtype", "complete")
    if "hooks" in manifest:
        _print_json({"contexts_requested": manifest["contexts_requested"],
                     "hooks": {name: {k: m[k] for k in (*summary, "directory")} for name, m in manifest["hooks"].items()},
                     **({"paired": manifest["paired"]} if "paired" in manifest else {})})
    else:
        _print_json({k: manifest[k] for k in (*summary, "contexts_requested")})


@app.command()
def train(
    registry: Annotated[Optional[Path], typer.Option(help="publish the result into this registry")] = None,
    name: Annotated[Optional[str], typer.Option(help="dictionary name (published as its next version)")] = None,
    activations: Annotated[Optional[Path], typer.Option(help="a \\[rows, d_in] matrix: .npy or .safetensors")] = None,
    harvest: Annotated[Optional[Path], typer.Option(help="a harvest directory (from `harvest`)")] = None,
    arch: Annotated[str, typer.Option(help="relu | topk | jumprelu | batchtopk | matryoshka | gated, or any architecture registered in monosemantic/sae.py")] = "relu",
    d_sae: Annotated[int, typer.Option(min=1, help="number of features")] = 4096,
    k: Annotated[Optional[int], typer.Option(min=1, help="TopK: active features per token; BatchTopK, Matryoshka: per token on average over a batch")] = None,
    matryoshka_widths: Annotated[Optional[str], typer.Option(help="matryoshka: nested prefix widths W1,W2,… ending at --d-sae (default d-sae/16, d-sae/4, d-sae)")] = None,
    l1: Annotated[Optional[float], typer.Option(help="sparsity coefficient λ (L1 for relu and gated, L0 for jumprelu)")] = None,
    target_l0: Annotated[Optional[float], typer.Option(help="steer λ towards this L0 (default 20 unless --l1 is given)")] = None,
    tokens: Annotated[int, typer.Option(min=1, help="training tokens")] = 20_000_000,
    batch_size: Annotated[int, typer.Option(min=1)] = 4096,
    lr: Annotated[Optional[float], typer.Option(help="Adam learning rate (default: 2e-4·√(16384/d-sae)·√(8000/steps), at most 1.6e-3)")] = None,
    seed: Annotated[int, typer.Option(min=0)] = 0,
    bf16: Annotated[Optional[bool], typer.Option("--bf16/--no-bf16", help="bf16 mixed precision (default: on where this machine multiplies bf16 faster than fp32)")] = None,
    sparse_step_density: Annotated[Optional[float], typer.Option(
        help="take the support-only step while L0 < this share of d_sae (default 0.04; 0: always dense)")] = None,
    initial_firing_rate: Annotated[Optional[float], typer.Option(
        help="relu, jumprelu, batchtopk, matryoshka (and the relu/jumprelu transcoders): each feature starts firing on this share of the data (default 2·target-l0/d-sae or 2k/d-sae, or 1%)")] = None,
    checkpoint_dir: Annotated[Optional[Path], typer.Option(help="checkpoints (enables --resume)")] = None,
    resume: Annotated[bool, typer.Option(help="continue from --checkpoint-dir")] = False,
    model: Annotated[Optional[str], typer.Option(help="the model the activations came from: a directory or hub id (recorded in the manifest)")] = None,
    hook: Annotated[Optional[str], typer.Option(help="the hook the activations came from (recorded in the manifest)")] = None,
    dtype: Annotated[str, typer.Option(help="stored weights: float32 | bfloat16 | float16")] = "float32",
    allow_partial: Annotated[bool, typer.Option(help="train on a harvest that is not complete")] = False,
    json_output: Annotated[bool, typer.Option("--json", help="print the result as JSON")] = False,
) -> None:
    """Train a dictionary on activations and publish it as the next version of NAME."""
    from monosemantic.sae import SAE_REGISTRY
    from trainer.allocator import keep_freed_memory
    from trainer.pipeline import train_and_publish

    keep_freed_memory()  # the steps' large temporaries reuse mapped pages: 20-30% of a step at 24k latents

    if (activations is None) == (harvest is None):
        _fail(MonosemanticError("give exactly one of --activations FILE or --harvest DIR"))
    if (registry is None) != (name is None):
        _fail(MonosemanticError("--registry and --name go together"))
    if resume and checkpoint_dir is None:
        _fail(MonosemanticError("--resume needs --checkpoint-dir"))
    widths = None
    if matryoshka_widths is not None:
        try:
            widths = tuple(int(part) for part in matryoshka_widths.split(","))
        except ValueError:
            _fail(MonosemanticError(f"--matryoshka-widths {matryoshka_widths!r}: give integers separated by commas, e.g. 128,512,2048"))
    # The default target L0 is for the controller steering λ; an architecture without a λ (TopK: its k) gets none.
    # An unknown name is left to the training config to refuse, with the registered names.
    steers_l0 = getattr(SAE_REGISTRY.get(arch), "has_sparsity_coefficient", True)
    try:
        out = train_and_publish(
            activations=activations, harvest_dir=harvest, registry=registry, name=name, checkpoint_dir=checkpoint_dir,
            resume=resume, model=model, hook=hook, dtype=dtype, allow_partial=allow_partial,
            config=dict(architecture=arch, d_sae=d_sae, k=k, sparsity_coefficient=l1,
                        target_l0=target_l0 if (target_l0 is not None or l1 is not None or not steers_l0) else min(20.0, d_sae / 2),
                        tokens=tokens, batch_size=batch_size, lr=lr, seed=seed, bf16=bf16,
                        sparse_step_density=sparse_step_density, initial_firing_rate=initial_firing_rate,
                        matryoshka_widths=widths),
        )
    except MonosemanticError as exc:
        _fail(exc)
    if json_output:
        _print_json(out)
    else:
        typer.echo(out.get("published", "trained (not published)"))
        for key in ("l0", "fvu", "mse", "dead_fraction", "dense_fraction", "tokens"):
            if key in out["metrics"]:
                typer.echo(f"{key:>16}: {out['metrics'][key]:.6g}")


@app.command()
def evaluate(
    registry: Registry,
    dictionary: Annotated[str, typer.Option(help="NAME[:VERSION]")],
    model: Annotated[Optional[str], typer.Option(help="HF model directory or hub id (default: the model the dictionary records, else the shipped reference)")] = None,
    activations: Annotated[Optional[Path], typer.Option(help="evaluate reconstruction on this matrix instead (no model)")] = None,
    tokens: Annotated[int, typer.Option(min=1, help="held-out tokens to evaluate on")] = 200_000,
    json_output: Annotated[bool, typer.Option("--json", help="print the metrics as one JSON object")] = False,
    dataset: Dataset = None,
    text_field: TextField = "text",
    split: Split = "train",
    revision: Revision = None,
    record: Annotated[bool, typer.Option(help="keep the metrics and the data they were measured on beside the version "
                                              "(shown by /v1/dictionaries and the browser)")] = True,
    model_dtype: ModelDtype = _ModelDtype.auto,
) -> None:
    """Metrics on held-out tokens: MSE, FVU, L0, loss recovered, dead and dense fractions, density histogram."""
    from trainer.pipeline import evaluate_dictionary

    try:
        metrics = evaluate_dictionary(registry, dictionary, model=model, activations=activations, tokens=tokens,
                                      text=_text(dataset, text_field, split, revision), record=record,
                                      model_dtype=model_dtype.value)
    except MonosemanticError as exc:
        _fail(exc)
    if json_output:
        typer.echo(json.dumps(metrics, default=float))
    else:
        for key in ("l0", "fvu", "mse", "loss_recovered", "dead_fraction", "dense_fraction", "tokens"):
            if key in metrics:
                typer.echo(f"{key:>16}: {metrics[key]:.6g}")
        if "recorded" in metrics:
            typer.echo(f"{'recorded':>16}: {metrics['recorded']}")
    from monosemantic.evaluations import non_finite

    if bad := non_finite(metrics):
        _fail(MonosemanticError(f"metrics are not finite: {', '.join(bad)} (a NaN dictionary, or data it cannot reconstruct)"))


@app.command()
def features(
    registry: Registry,
    dictionary: Annotated[str, typer.Option(help="NAME[:VERSION]")],
    model: Annotated[Optional[str], typer.Option(help="HF model directory or hub id (default: the model the dictionary records, else the shipped reference)")] = None,
    tokens: Annotated[int, typer.Option(min=1, help="tokens to compute the statistics over (held-out first)")] = 1_000_000,
    top_k: Annotated[int, typer.Option(min=1, help="top activating examples per feature")] = 10,
    out_registry: Annotated[Optional[Path], typer.Option(help="publish here instead of --registry")] = None,
    max_chars: Annotated[Optional[int], typer.Option(help="use a corpus slice")] = None,
    dataset: Dataset = None,
    text_field: TextField = "text",
    split: Split = "train",
    revision: Revision = None,
    harvest: Annotated[Optional[Path], typer.Option(help="read the activations from this harvest's shards (no model forward; "
                                                         "its contexts are the examples) instead of running the model")] = None,
    model_dtype: ModelDtype = _ModelDtype.auto,
) -> None:
    """Feature dashboards: density, activation histogram, top and quantile examples, logit effects, neighbours
    and labels, published with the same weights as the next version of the dictionary."""
    from trainer.features import FeatureStatsConfig
    from trainer.pipeline import features_and_publish

    try:
        path = features_and_publish(registry, dictionary, model=model, tokens=tokens, cfg=FeatureStatsConfig(top_k=top_k),
                                    max_chars=max_chars, out_registry=out_registry, text=_text(dataset, text_field, split, revision),
                                    harvest=harvest, model_dtype=model_dtype.value)
    except MonosemanticError as exc:
        _fail(exc)
    typer.echo(str(path))


@app.command("steer-eval")
def steer_eval(
    registry: Registry,
    dictionary: Annotated[str, typer.Option(help="NAME[:VERSION]")],
    feature: Annotated[int, typer.Option(help="the feature to steer")],
    model: Annotated[Optional[str], typer.Option(help="HF model directory or hub id (default: the model the dictionary records, else the shipped reference)")] = None,
    contexts: Annotated[int, typer.Option(min=2, help="held-out contexts: the first half gives the prompts and the baseline's direction, the second the KL and loss")] = 32,
    context_length: Annotated[int, typer.Option(min=8, help="tokens per context")] = 64,
    multiples: Annotated[str, typer.Option(help="strengths, comma-separated, in units of the feature's max activation")] = "0,0.25,0.5,1,2,3,4,8,16",
    methods: Annotated[str, typer.Option(help="comma-separated: clamp, add, mean_difference (the baseline)")] = "clamp,add,mean_difference",
    kl_budgets: Annotated[str, typer.Option(help="comma-separated KL budgets to pick each method's best strength at")] = "0.1,0.5",
    effect: Annotated[str, typer.Option(help="what the best strength maximises: reading (the feature on steered continuations) or promoted (its tokens' probability)")] = "reading",
    new_tokens: Annotated[int, typer.Option(min=1, help="tokens generated per continuation")] = 24,
    prompts: Annotated[int, typer.Option(min=1, help="continuations generated per strength")] = 8,
    json_output: Annotated[bool, typer.Option("--json", help="print the curves as one JSON object")] = False,
    dataset: Dataset = None,
    text_field: TextField = "text",
    split: Split = "train",
    revision: Revision = None,
    model_dtype: ModelDtype = _ModelDtype.auto,
) -> None:
    """Steering curves of one feature: for clamp, add and a difference-in-means baseline over a range of strengths,
    the effect (the feature's reading on steered continuations, the probability of the tokens it promotes) against
    the cost (KL from the unsteered model and loss on held-out text), and each method's best strength at a KL budget."""
    from monosemantic.steer_eval import SteerEvalConfig
    from trainer.measurements import steer_eval_dictionary, steering_table

    try:
        cfg = SteerEvalConfig(multiples=_floats(multiples, "--multiples"), methods=tuple(m.strip() for m in methods.split(",") if m.strip()),
                              kl_budgets=_floats(kl_budgets, "--kl-budgets"), effect=effect, new_tokens=new_tokens, prompts=prompts)
        result, label = steer_eval_dictionary(registry, dictionary, feature, model=model, contexts=contexts, context_length=context_length,
                                              text=_text(dataset, text_field, split, revision), cfg=cfg, model_dtype=model_dtype.value)
    except MonosemanticError as exc:
        _fail(exc)
    if json_output:
        typer.echo(json.dumps({"label": label, **result.as_dict()}, default=float))
    else:
        typer.echo(steering_table(result, label))


@app.command("explain")
def explain_cmd(
    registry: Registry,
    dictionary: Annotated[str, typer.Option(help="NAME[:VERSION] (it needs feature statistics: `monosemantic-train features`)")],
    explainer_url: Annotated[str, typer.Option(help="an OpenAI-compatible base URL, e.g. http://localhost:8000/v1 (vLLM) or http://localhost:11434/v1 (Ollama)")],
    explainer_model: Annotated[str, typer.Option(help="the model that writes the explanations")],
    scorer_model: Annotated[Optional[str], typer.Option(help="the model that scores them (default: the explainer)")] = None,
    scorer_url: Annotated[Optional[str], typer.Option(help="the scorer's OpenAI-compatible base URL (default: --explainer-url)")] = None,
    features: Annotated[Optional[str], typer.Option(help="feature ids and ranges, e.g. 0-99,512")] = None,
    sample: Annotated[Optional[int], typer.Option(help="a seeded random sample of this many features")] = None,
    every: Annotated[bool, typer.Option("--all", help="every feature")] = False,
    api_key_env: Annotated[Optional[str], typer.Option(help="the environment variable holding the endpoint's key (never logged or stored)")] = None,
    concurrency: Annotated[int, typer.Option(min=1, help="requests in flight at once")] = 4,
    shown: Annotated[int, typer.Option(min=1, help="top examples shown to the explainer, beside every other interval sample; the other examples are scored")] = 6,
    retries: Annotated[int, typer.Option(min=0, help="retries of a request answered 408/409/429/5xx (backoff, honouring Retry-After)")] = 8,
    max_tokens: Annotated[int, typer.Option(min=16, help="the longest answer asked for")] = 200,
    chat_template: Annotated[Optional[Path], typer.Option(help="a Jinja chat template sent with each request (for a server whose model has none, as this project's /openai/v1 accepts)")] = None,
    model: Annotated[Optional[str], typer.Option(help="HF model directory or hub id (default: the model the dictionary records, else the shipped reference)")] = None,
    seed: Annotated[int, typer.Option(min=0)] = 0,
    model_dtype: ModelDtype = _ModelDtype.auto,
) -> None:
    """Explain and score features with any OpenAI-compatible model: an explainer reads each feature's top examples and
    writes an explanation; a scorer given only the explanation tells the feature's other examples from text where it
    is silent (detection) and its own marked tokens from wrong ones (fuzzing); each score is a balanced accuracy.
    Kept beside the version in REGISTRY/NAME/explanations/vN/ (one file per explainer, scorer and prompt version);
    run again, it continues where it stopped."""
    import os

    from trainer.explain import Endpoint, ExplainSettings, explain_dictionary

    key = None
    if api_key_env is not None:
        key = os.environ.get(api_key_env)
        if not key:
            _fail(ConfigError(f"--api-key-env: the environment variable {api_key_env} is not set"))
    try:
        template = chat_template.read_text(encoding="utf-8") if chat_template is not None else None
    except OSError as exc:
        _fail(ConfigError(f"--chat-template: cannot read {chat_template}: {exc.strerror}"))
    endpoint = Endpoint(url=explainer_url, explainer_model=explainer_model, scorer_model=scorer_model or explainer_model,
                        api_key=key, extra_body={"chat_template": template} if template else {}, scorer_url=scorer_url)
    settings = ExplainSettings(shown=shown, concurrency=concurrency, retries=retries, max_tokens=max_tokens, seed=seed)
    try:
        result = explain_dictionary(registry, dictionary, endpoint, features=features, sample=sample, every=every, model=model,
                                    settings=settings, model_dtype=model_dtype.value)
    except MonosemanticError as exc:
        _fail(exc)
    except Exception as exc:  # the endpoint's own failures (refused connection, 4xx) after the SDK's retries
        if type(exc).__module__.split(".")[0] != "openai":
            raise
        _fail(ConfigError(f"the endpoint {explainer_url} failed: {exc}"))
    u = result.usage
    if result.skipped:
        typer.echo(f"note: {result.skipped} features were not explained (never fired, or the explainer refused the prompt: "
                   f"each one's reason is in {result.path})", err=True)
    typer.echo(f"{result.done} features done ({result.parsed} explained), {result.resumed} already done; "
               f"{u.requests} requests, {u.prompt_tokens:,} prompt and {u.completion_tokens:,} completion tokens; {result.path}")


@app.command("explanations")
def explanations_cmd(
    registry: Registry,
    dictionary: Annotated[str, typer.Option(help="NAME[:VERSION]")],
    out: Annotated[Path, typer.Option(help="the file to write: JSON lines, gzipped when it ends in .gz")],
    model_id: Annotated[Optional[str], typer.Option(help="Neuronpedia's model id (default: the model name the dictionary records)")] = None,
) -> None:
    """Export every run's explanations of a version in the shape of Neuronpedia's explanation export: one JSON object
    per explanation (modelId, layer = the source id `{layer}-{name}`, index, description, explanationModelName,
    typeName, scores), features in order, each feature's best-scoring first."""
    import gzip

    from monosemantic.artifact import load_dictionary, parse_reference
    from monosemantic.explanations import explanation_index, version_digest
    from monosemantic.interop.neuronpedia import explanation_records, source_id

    try:
        name, version = parse_reference(dictionary)
        loaded = load_dictionary(registry, name, version)
        m = loaded.manifest
        index = explanation_index(registry, m.name, m.version, version_digest(loaded))
        records = list(explanation_records(index, model_id or m.model.name, source_id(m.name, m.hook)))
        data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode()
        try:
            out.write_bytes(gzip.compress(data) if out.name.endswith(".gz") else data)
        except OSError as exc:
            raise ConfigError(f"--out: cannot write {out}: {exc.strerror}") from None
    except MonosemanticError as exc:
        _fail(exc)
    typer.echo(f"{len(records)} explanations of {index.explained} features of {m.name} v{m.version} written to {out}")


class _By(str, Enum):
    correlation = "correlation"
    cosine = "cosine"


@app.command("compare")
def compare_cmd(
    registry: Registry,
    a: Annotated[str, typer.Argument(help="dictionary A: NAME[:VERSION]")],
    b: Annotated[str, typer.Argument(help="dictionary B: NAME[:VERSION]")],
    registry_b: Annotated[Optional[Path], typer.Option(help="B's registry (default: --registry)")] = None,
    model: Annotated[Optional[str], typer.Option(help="A's model (default: the model A records, else the shipped reference)")] = None,
    model_b: Annotated[Optional[str], typer.Option(help="B's model, for two models that share a tokenizer (default: the model B records)")] = None,
    by: Annotated[_By, typer.Option(help="correlation: of activations on the same text (also across models); cosine: of decoder rows (same model and hook, no text)")] = _By.correlation,
    threshold: Annotated[float, typer.Option(help="the score a counterpart needs")] = 0.5,
    min_firing: Annotated[int, typer.Option(min=1, help="by correlation: a feature firing on fewer tokens of the text has no correlation (reported as too rare)")] = 5,
    contexts: Annotated[int, typer.Option(min=1, help="held-out contexts to correlate on")] = 64,
    context_length: Annotated[int, typer.Option(min=2, help="tokens per context")] = 128,
    json_output: Annotated[bool, typer.Option("--json", help="print every match as one JSON object")] = False,
    dataset: Dataset = None,
    text_field: TextField = "text",
    split: Split = "train",
    revision: Revision = None,
    model_dtype: ModelDtype = _ModelDtype.auto,
) -> None:
    """Match the features of two dictionaries: one-to-one, split (one of A into several of B), merged, or without a
    counterpart, by activation correlation on the same text or by decoder cosine."""
    from trainer.measurements import compare_dictionaries, comparison_dict, comparison_table

    try:
        result, da, db = compare_dictionaries(registry, a, b, registry_b=registry_b, model_a=model, model_b=model_b, by=by.value,
                                              threshold=threshold, min_firing=min_firing, contexts=contexts, context_length=context_length,
                                              text=_text(dataset, text_field, split, revision), model_dtype=model_dtype.value)
    except MonosemanticError as exc:
        _fail(exc)
    typer.echo(json.dumps(comparison_dict(result, da, db)) if json_output else comparison_table(result, da, db))


@app.command("publish")
def publish_cmd(
    checkpoint_dir: Annotated[Path, typer.Option(help="a training checkpoint directory")],
    registry: Registry,
    name: Annotated[str, typer.Option(help="dictionary name")],
    dtype: str = "float32",
    allow_partial: Annotated[bool, typer.Option(help="publish a run stopped before its planned steps")] = False,
) -> None:
    """Publish the dictionary held in a training checkpoint as the next version of NAME."""
    from trainer.pipeline import publish_checkpoint

    try:
        path = publish_checkpoint(checkpoint_dir, registry, name, dtype=dtype, allow_partial=allow_partial)
    except MonosemanticError as exc:
        _fail(exc)
    typer.echo(str(path))


@app.command()
def reference(
    out: Annotated[Path, typer.Option(help="where reference-lm/ and registry/ go")] = Path("artifacts"),
    work_dir: Annotated[Path, typer.Option(help="harvest shards and checkpoints (resumable)")] = Path("runs/reference"),
    retrain_lm: Annotated[bool, typer.Option(help="train the language model too, even if OUT/reference-lm exists")] = False,
    harvest_contexts: Annotated[int, typer.Option(min=1, help="training contexts to harvest (255 tokens each)")] = 40_000,
    tokens: Annotated[int, typer.Option(min=1, help="SAE training tokens")] = 40_000_000,
    target_l0: float = 27.0,
    d_sae: Annotated[int, typer.Option(min=1)] = 4096,
    eval_tokens: Annotated[int, typer.Option(min=1)] = 300_000,
    feature_tokens: Annotated[int, typer.Option(min=1, help="tokens for the feature dashboards (held-out first)")] = 1_000_000,
    max_chars: Annotated[Optional[int], typer.Option(min=1, help="a corpus slice (for quick end-to-end runs)")] = None,
    lm_tokens: Annotated[Optional[int], typer.Option(min=1, help="LM training tokens when the LM is (re)trained")] = None,
    seed: Annotated[int, typer.Option(min=0)] = 0,
) -> None:
    """The whole chain with one command: corpus → LM → harvest → train → evaluate → publish."""
    from trainer.pipeline import ReferencePlan, run_reference

    try:
        result = run_reference(ReferencePlan(out=out, work_dir=work_dir, retrain_lm=retrain_lm, harvest_contexts=harvest_contexts,
                                             tokens=tokens, target_l0=target_l0, d_sae=d_sae, eval_tokens=eval_tokens, feature_tokens=feature_tokens,
                                             max_chars=max_chars, lm_tokens=lm_tokens, seed=seed))
    except MonosemanticError as exc:
        _fail(exc)
    _print_json(result)


@app.command()
def verify(
    registry: Annotated[Optional[Path], typer.Option(help="registry (default: the shipped one)")] = None,
    dictionary: Annotated[str, typer.Option(help="NAME[:VERSION]")] = "reference",
    model: Annotated[Optional[str], typer.Option(help="model directory or hub id (default: the model the dictionary records, else the shipped reference LM)")] = None,
) -> None:
    """Load a model and a dictionary, verify checksums and that they match, and print the dictionary's metrics."""
    from trainer.pipeline import verify_pair

    try:
        report = verify_pair(registry, dictionary, model)
    except MonosemanticError as exc:
        _fail(exc)
    for warning in report["warnings"]:
        typer.echo(f"warning: {warning}", err=True)
    _print_json(report)


@app.command()
def bind(
    registry: Registry,
    dictionary: Annotated[str, typer.Option(help="NAME[:VERSION] of a dictionary recorded against model 'unspecified'")],
    model: Annotated[str, typer.Option(help="the model its activations came from: a directory or hub id")],
    hook: Annotated[str, typer.Option(help="where on the model they were read: HF module path or TransformerLens alias")],
) -> None:
    """Bind a dictionary trained on a bare activation matrix to its model and hook, as its next version (the hook
    is checked on the model and must have the dictionary's width); it can then be served, evaluated and browsed."""
    from trainer.pipeline import bind_dictionary

    try:
        path = bind_dictionary(registry, dictionary, model=model, hook=hook)
    except MonosemanticError as exc:
        _fail(exc)
    _print_json({"published": str(path)})


@app.command("import")
def import_cmd(
    source: Annotated[str, typer.Argument(metavar="SRC", help="the other tool's dictionary: a local directory (a params.npz "
                                          "for Gemma Scope), or a hub location OWNER/REPO or OWNER/REPO/SUBFOLDER")],
    from_: Annotated[str, typer.Option("--from", help="saelens | sparsify | gemma-scope")],
    registry: Registry,
    name: Annotated[str, typer.Option(help="publish as the next version of this dictionary")],
    model: Annotated[Optional[str], typer.Option(help="the model it reads: a directory or hub id (default: the shipped reference LM)")] = None,
    hook: Annotated[Optional[str], typer.Option(help="where on the model (default: the hook the source records: SAELens "
                                                "metadata.hook_name, a sparsify folder's hookpoint, a Gemma Scope path)")] = None,
    hook_out: Annotated[Optional[str], typer.Option(help="a transcoder's: where on the model it writes (default: the hook the "
                                                    "source records: SAELens metadata.hook_name_out, a sparsify "
                                                    "transcoder's hookpoint, whose input it reads)")] = None,
    revision: Annotated[Optional[str], typer.Option(help="the hub revision of a hub SRC")] = None,
    sae_id: Annotated[Optional[str], typer.Option(help="with --from saelens: SRC is a SAELens release (gpt2-small-res-jb) and "
                                                  "this the SAE's id in it (blocks.8.hook_resid_pre), found through SAELens's "
                                                  "directory of releases")] = None,
) -> None:
    """Publish another tool's dictionary as the next version of NAME, bound to MODEL: encoding and decoding exactly
    as the source does (its conventions folded into the weights), or refused with the field that cannot be."""
    from trainer.interchange import import_dictionary

    try:
        result = import_dictionary(from_, source, model=model, hook=hook, hook_out=hook_out, registry=registry, name=name,
                                   revision=revision, sae_id=sae_id)
    except MonosemanticError as exc:
        _fail(exc)
    _print_json(result)


@app.command("export")
def export_cmd(
    to: Annotated[str, typer.Option("--to", help="saelens | sparsify | delphi")],
    registry: Registry,
    dictionary: Annotated[str, typer.Option(help="NAME or NAME:VERSION (default version: the latest)")],
    out: Annotated[Path, typer.Option(help="a new (or empty) directory to write")],
    contexts: Annotated[int, typer.Option(min=1, help="delphi: held-out contexts the activations are read on")] = 256,
    context_length: Annotated[int, typer.Option(min=8, help="delphi: tokens per context")] = 64,
    splits: Annotated[int, typer.Option(min=1, help="delphi: files the features are split across")] = 4,
    model: Annotated[Optional[str], typer.Option(help="delphi: HF model directory or hub id (default: the model the dictionary records)")] = None,
) -> None:
    """Write a dictionary for SAELens (sae_lens.SAE.load_from_disk(OUT)) or sparsify (sparsify.Sae.load_from_disk(OUT)),
    in float32 with the input scale folded into the weights, so the tool encodes and decodes as monosemantic does; or
    its feature activations on held-out text as EleutherAI delphi's latent cache (delphi.latents.LatentDataset(OUT, …)),
    so delphi's explainers and scorers run on it."""
    from trainer.interchange import export_dictionary

    try:
        if to == "delphi":
            from trainer.delphi_cache import export_latent_cache

            result = {**export_latent_cache(registry, dictionary, out, contexts=contexts, context_length=context_length,
                                            splits=splits, model=model), "notes": []}
        else:
            result = export_dictionary(to, registry=registry, dictionary=dictionary, out=out)
    except MonosemanticError as exc:
        _fail(exc)
    for note in result["notes"]:
        typer.echo(f"note: {note}", err=True)
    _print_json(result)


@app.command("seal")
def seal_cmd(
    registry: Registry,
    name: Annotated[str, typer.Option(help="dictionary name")],
) -> None:
    """Record in the version ledger the versions of NAME published by a release before the ledger, after checking
    each of their files against its manifest (recorded versions are never changed)."""
    from monosemantic.artifact import seal

    try:
        recorded = seal(registry, name)
    except MonosemanticError as exc:
        _fail(exc)
    _print_json({"dictionary": name, "recorded": recorded})


def main() -> None:  # pragma: no cover - console entry
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
