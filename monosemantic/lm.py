"""The language model side: loading a causal LM, naming hook points, reading and replacing activations there.

Hook points are named by their HF module path (the source of truth) or by the TransformerLens alias that
researchers know (``blocks.{L}.mlp.hook_post`` ...), resolved per model family. Activations are always taken
with forward hooks on named modules, never by indexing ``output_hidden_states`` (whose last entry is after the
final norm in GPT-2, so it is not the residual stream).
"""

from __future__ import annotations

import difflib
import json
import hashlib
import re
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from importlib.metadata import version
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, NamedTuple, Sequence

import torch
from packaging.version import Version
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from monosemantic.errors import HookError, ModelLoadError, MonosemanticError
from monosemantic.checksum_cache import remembered_checksum

if TYPE_CHECKING:  # transformers' model classes are imported where a model is loaded: ~5 s of imports on 2 cores
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "HookPoint",
    "LoadedLM",
    "direct_logit_effects",
    "direct_logit_residual",
    "direct_logit_extremes",
    "final_norm",
    "norm_at_scale",
    "norm_inverse_scale",
    "hook_dim",
    "hooked_replacement",
    "linear_to_logits",
    "load_lm",
    "weights_dtype",
    "logits_with_replacement",
    "read_activations",
    "resolve_hook",
    "weights_checksum",
]

# ---------------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class LoadedLM:
    """A causal LM in eval mode, its tokenizer, where it came from and the checksum of its weights."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    source: str  # the path or hub id it came from
    checksum: str  # sha256 hex of the weights, see weights_checksum


# transformers renamed `torch_dtype` to `dtype` in 4.56 (PR #39782); the old name still works there but warns.
_DTYPE_KWARG = "dtype" if Version(version("transformers")) >= Version("4.56") else "torch_dtype"

# What a hub id looks like ("gpt2", "EleutherAI/pythia-70m"); anything else that does not exist is a missing path.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def _one_line(exc: BaseException) -> str:
    """An exception as one short line, so a load failure reads as a message rather than a library traceback."""
    text = str(exc).strip().splitlines()
    first = text[0] if text else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model", "spiece.model")


def _local_dir(source: str | Path) -> Path | None:
    """The local directory `source` names, None for a hub id; a missing or wrong path raises ModelLoadError."""
    text = str(source)
    path = Path(text).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelLoadError(f"model path is not a directory: {path}")
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"model directory {path} has no config.json (expected a folder written by save_pretrained)")
        return path
    # A Path object, or a string that cannot be a hub id, was meant as a local folder: say so instead of
    # letting transformers report a confusing hub error.
    if isinstance(source, Path) or not _HUB_ID.match(text):
        raise ModelLoadError(f"model directory not found: {text}")
    return None


def _from_pretrained_model(name: str, local: bool, dtype: torch.dtype) -> PreTrainedModel:
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {_DTYPE_KWARG: dtype, "trust_remote_code": False}
    if local:
        kwargs["local_files_only"] = True  # a local folder must never trigger a hub call
    try:
        return AutoModelForCausalLM.from_pretrained(name, **kwargs)
    except Exception as exc:  # I/O boundary: any failure (bad json, bad weights, remote code) becomes one message
        where = "directory" if local else "hub id (not a local directory)"
        raise ModelLoadError(f"could not load a causal LM from {where} {name}: {_one_line(exc)}") from None


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(source: str | Path, requested: str, device: str = "cpu") -> torch.dtype:
    """The dtype to load a model in: `float32` or `bfloat16` as asked, or `auto`: the checkpoint's own (its config's
    `dtype` / `torch_dtype`), so a bf16 checkpoint is not widened to fp32 (twice its size in memory). A float16
    checkpoint loads as float32 on CPU (fp16 matmuls there are unusable) and as float16 on CUDA; a checkpoint that
    records none, or a hub id, loads as float32."""
    if requested != "auto":
        if requested not in ("float32", "bfloat16"):
            raise ModelLoadError(f"dtype {requested!r}: expected auto, bfloat16 or float32")
        return _DTYPES[requested]
    local = _local_dir(source) if Path(source).expanduser().exists() else None
    recorded = None
    if local is not None:
        try:
            config = json.loads((local / "config.json").read_text())
            recorded = config.get("dtype") or config.get("torch_dtype")
        except (OSError, ValueError):
            recorded = None
    dtype = _DTYPES.get(str(recorded).removeprefix("torch."), torch.float32)
    if dtype is torch.float16 and not str(device).startswith("cuda"):
        return torch.float32
    return dtype


def weights_dtype(model: nn.Module | LoadedLM) -> str:
    """The dtype a model's weights are in, by name ("bfloat16"), as manifests record it."""
    return str(next(_unwrap(model).parameters()).dtype).removeprefix("torch.")


def load_lm(source: str | Path, device: str = "cpu", dtype: torch.dtype | str = torch.float32) -> LoadedLM:
    """Load a causal LM and its tokenizer from a local save_pretrained folder or a hub id, in eval mode, with its
    weights checksum (a local folder's remembered while its files are unchanged). `dtype` is a torch dtype or a
    name resolve_dtype takes (`auto`: the checkpoint's own).

    The dtype is always passed explicitly because transformers otherwise applies the one recorded in the
    checkpoint's config. Remote code is never trusted.
    """
    if isinstance(dtype, str):
        dtype = resolve_dtype(source, dtype, device)
    local_dir = _local_dir(source)
    name = str(local_dir) if local_dir is not None else str(source)
    local = local_dir is not None
    if local and not any((local_dir / f).is_file() for f in TOKENIZER_FILES):
        raise ModelLoadError(f"model directory {local_dir} has no tokenizer (looked for {', '.join(TOKENIZER_FILES)}); "
                             "save the tokenizer beside the model with tokenizer.save_pretrained")
    model = _from_pretrained_model(name, local, dtype)
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(
            name, trust_remote_code=False, **({"local_files_only": True} if local else {})
        )
    except Exception as exc:  # same boundary as above, for the tokenizer files
        raise ModelLoadError(f"could not load a tokenizer from {name}: {_one_line(exc)}") from None
    try:
        model.to(device)
    except (RuntimeError, ValueError, AssertionError) as exc:  # bad device string, or CUDA absent
        raise ModelLoadError(f"could not place the model on device {device!r}: {_one_line(exc)}") from None
    model.eval()
    # Batched reads pad; many causal LM tokenizers (GPT-2's) ship without a pad token.
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    if local:  # hashed once per unchanged set of files (monosemantic/checksum_cache.py)
        checksum = remembered_checksum(local_dir, str(dtype), lambda: weights_checksum(model))
    else:
        checksum = weights_checksum(model)
    return LoadedLM(model=model, tokenizer=tokenizer, source=str(source), checksum=checksum)


def model_source(source: str | Path) -> str:
    """How a manifest records where a model loads from: a local folder as its absolute path (found again from any
    working directory), a hub id as it is."""
    return str(Path(source).resolve()) if Path(source).exists() else str(source)


_HASH_CHUNK = 1 << 20  # elements per slice hashed


def weights_checksum(model_or_dir: nn.Module | LoadedLM | str | Path) -> str:
    """sha256 hex over a model's weights, identical for a model and the same model after save_pretrained + load.

    Hashes every state_dict tensor sorted by name (name, shape and values; floats as float32, other types as
    int64), so neither the file layout nor a lossless dtype change (bf16 -> fp32) alters it. A directory is
    loaded as a model first (in float32, on CPU) because its files name and tie tensors differently from the
    loaded module.
    """
    if isinstance(model_or_dir, LoadedLM):
        model: nn.Module = model_or_dir.model
    elif isinstance(model_or_dir, (str, Path)):
        path = Path(model_or_dir).expanduser()
        if not path.is_dir():
            raise ModelLoadError(f"model directory not found: {path}")
        _local_dir(path)  # same checks (config.json present) and messages as load_lm
        model = _from_pretrained_model(str(path), local=True, dtype=torch.float32)
    else:
        model = model_or_dir
    digest = hashlib.sha256()
    state = model.state_dict()
    for name in sorted(state):
        tensor = state[name].detach()
        as_type = torch.float32 if tensor.is_floating_point() else torch.int64
        digest.update(name.encode())
        digest.update(b"\0" + repr(tuple(tensor.shape)).encode() + b"\0" + str(as_type).encode() + b"\0")
        # The same bytes as the whole tensor cast at once, a few MB at a time: a bf16 model's 50k-token embedding
        # cast whole (and copied by tobytes) once raised a start's high-water by 2.5x its own size.
        flat = tensor.reshape(-1)
        for start in range(0, flat.numel(), _HASH_CHUNK):
            digest.update(flat[start : start + _HASH_CHUNK].to(device="cpu", dtype=as_type).contiguous().numpy().data)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------------------------
# Hook points
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HookPoint:
    """A place to read or replace an activation: a named module's output, or its input (forward pre-hook)."""

    module_path: str  # e.g. "transformer.h.0.mlp.act"
    alias: str | None  # e.g. "blocks.0.mlp.hook_post"
    kind: str  # "output" (forward hook on the module output) or "input" (forward pre-hook on the module input)

    @property
    def key(self) -> str:
        """The HF name that resolves back to exactly this point: the module path, plus ":input" for an input."""
        return f"{self.module_path}:input" if self.kind == "input" else self.module_path

    @property
    def name(self) -> str:
        """The name to show a user: the TransformerLens alias where there is one, else `key`."""
        return self.alias or self.key


@dataclass(frozen=True)
class _Layout:
    """Where one model family keeps its blocks and which (module, kind) each TransformerLens alias means."""

    family: str
    containers: tuple[str, ...]  # paths of the ModuleList of blocks, with and without the LM-head wrapper
    points: Mapping[str, tuple[str, str]]  # alias suffix -> (module path relative to the block, kind)
    final_norm: tuple[str, ...] = ()  # paths of the norm before the unembedding, with and without the wrapper
    mlp_out: str = ""  # the MLP's output projection, relative to the block (neurons → residual stream)
    direct_path: bool = True  # a hook's direct path to the logits is the projection, the final norm, the unembedding


_GPT2 = _Layout(
    "gpt2",
    ("transformer.h", "h"),
    {
        "hook_resid_pre": ("", "input"),
        "hook_resid_post": ("", "output"),
        "hook_attn_out": ("attn", "output"),
        "ln2.hook_normalized": ("mlp", "input"),  # the MLP's input (after ln_2): where a transcoder reads
        "mlp.hook_pre": ("mlp.c_fc", "output"),
        "mlp.hook_post": ("mlp.act", "output"),
        "hook_mlp_out": ("mlp", "output"),
    },
    ("transformer.ln_f", "ln_f"),
    "mlp.c_proj",
)
_NEOX = _Layout(
    "gpt_neox",
    ("gpt_neox.layers", "layers"),
    {
        "hook_resid_pre": ("", "input"),
        "hook_resid_post": ("", "output"),
        "hook_attn_out": ("attention", "output"),
        "ln2.hook_normalized": ("mlp", "input"),
        "mlp.hook_pre": ("mlp.dense_h_to_4h", "output"),
        "mlp.hook_post": ("mlp.act", "output"),
        "hook_mlp_out": ("mlp", "output"),
    },
    ("gpt_neox.final_layer_norm", "final_layer_norm"),
    "mlp.dense_4h_to_h",
)
# Gated MLP: down_proj(act_fn(gate_proj(x)) * up_proj(x)). The act_fn output is only the gate, so the neurons
# (TransformerLens' hook_post) are the input of down_proj; hook_pre is the gate pre-activation, as in TL.
_LLAMA = _Layout(
    "llama",
    ("model.layers", "layers"),
    {
        "hook_resid_pre": ("", "input"),
        "hook_resid_post": ("", "output"),
        "hook_attn_out": ("self_attn", "output"),
        "ln2.hook_normalized": ("mlp", "input"),
        "mlp.hook_pre": ("mlp.gate_proj", "output"),
        "mlp.hook_post": ("mlp.down_proj", "input"),
        "hook_mlp_out": ("mlp", "output"),
    },
    ("model.norm", "norm"),
    "mlp.down_proj",
)
# Gemma 2 and 3: the llama layout plus a norm after attention and after the MLP, inside the residual branch.
# TransformerLens's hook_attn_out / hook_mlp_out are after those norms (ln1_post / ln2_post), and Gemma Scope's
# attention and MLP dictionaries read them there. The direct path to the logits passes the MLP's post-norm and a tanh
# logit soft-cap (and Gemma's norms scale by 1 + w), so no direct logit effect is claimed.
_GEMMA2 = replace(
    _LLAMA,
    family="gemma2",
    points={**_LLAMA.points, "hook_attn_out": ("post_attention_layernorm", "output"),
            "hook_mlp_out": ("post_feedforward_layernorm", "output")},
    direct_path=False,
)
# Points of the last block after which the path to the logits is linear once the final norm's scale is frozen
# (the MLP's down projection, the residual add, the norm, the unembedding): attribution there is exact.
_LINEAR_TO_LOGITS = ("mlp.hook_post", "hook_mlp_out", "hook_resid_post")
_LAYOUT_BY_MODEL_TYPE = {
    "gpt2": _GPT2,
    "gpt_neox": _NEOX,
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": _LLAMA,
    "gemma2": _GEMMA2,
    "gemma3_text": _GEMMA2,
}
_ALIAS = re.compile(r"^blocks\.(\d+)\.(.+)$")
_KINDS = ("output", "input")


def _unwrap(lm_or_model: nn.Module | LoadedLM) -> nn.Module:
    return lm_or_model.model if isinstance(lm_or_model, LoadedLM) else lm_or_model


def _submodule(model: nn.Module, path: str) -> nn.Module | None:
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


def _layout(model: nn.Module) -> tuple[_Layout, str, int] | None:
    """The model's layout, the path of its block list and the number of blocks; None if no layout fits.

    Known model types use their table; an unknown one gets the first layout whose block 0 has every module
    the table names, so a close relative (a Llama-style model under another name) still gets the aliases.
    """
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    known = _LAYOUT_BY_MODEL_TYPE.get(model_type)
    for layout in [known] if known is not None else [_GPT2, _NEOX, _LLAMA]:
        for container in layout.containers:
            blocks = _submodule(model, container)
            if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
                continue
            if all(_submodule(blocks[0], rel) is not None for rel, _ in layout.points.values() if rel):
                return layout, container, len(blocks)
    return None


def final_norm(model: nn.Module | LoadedLM) -> nn.Module | None:
    """The normalisation applied just before the unembedding, or None for an unknown family."""
    model = _unwrap(model)
    found = _layout(model)
    if found is None:
        return None
    for path in found[0].final_norm:
        if (module := _submodule(model, path)) is not None:
            return module
    return None


def linear_to_logits(model: nn.Module | LoadedLM, hook: str | HookPoint) -> bool:
    """True when everything between `hook` and the logits is linear given a frozen final-norm scale."""
    model = _unwrap(model)
    point, _ = _as_hook(model, hook)
    found = _layout(model)
    if found is None or point.alias is None or not found[0].direct_path:
        return False
    n_layers = found[2]
    return any(point.alias == f"blocks.{n_layers - 1}.{suffix}" for suffix in _LINEAR_TO_LOGITS)


@torch.no_grad()
def direct_logit_residual(model: nn.Module | LoadedLM, hook: str | HookPoint, directions: Tensor) -> Tensor | None:
    """What each direction [n, d] at `hook` becomes just before the unembedding, through the direct path alone
    [n, d_model]: into the residual stream (through the MLP's output projection for the neurons), then through the
    final norm with its scale held fixed (γ ⊙ centred for LayerNorm, γ ⊙ x for RMSNorm). None where the hook has no
    known direct path."""
    model = _unwrap(model)
    point, _ = _as_hook(model, hook)
    found = _layout(model)
    if found is None or point.alias is None or not found[0].direct_path:
        return None
    layout, container, _ = found
    layer, suffix = _ALIAS.match(point.alias).groups()
    directions = directions.float()
    if suffix == "mlp.hook_post":
        projection = _submodule(model, f"{container}.{layer}.{layout.mlp_out}")
        if projection is None:
            return None
        weight_dtype = next(projection.parameters()).dtype
        zeros = torch.zeros_like(directions[:1]).to(weight_dtype)
        residual = (projection(directions.to(weight_dtype)) - projection(zeros)).float()
    elif suffix in ("hook_resid_pre", "hook_resid_post", "hook_mlp_out", "hook_attn_out"):
        residual = directions
    else:
        return None
    norm = final_norm(model)
    if norm is not None:
        residual = norm_at_scale(norm, residual, 1.0, with_bias=False)
    return residual


@torch.no_grad()
def direct_logit_effects(model: nn.Module | LoadedLM, hook: str | HookPoint, directions: Tensor) -> Tensor | None:
    """How each direction [n, d] at `hook` moves every logit through the direct path alone [n, vocab]
    (direct_logit_residual, then the unembedding) — Bricken et al. 2023's "logit weights". Later blocks are
    skipped, so this is exact for the last block only; the values are up to the norm's positive 1/σ, so rankings
    are what to read. None where the hook has no known direct path."""
    residual = direct_logit_residual(model, hook, directions)
    if residual is None:
        return None
    return residual @ _unwrap(model).get_output_embeddings().weight.float().T


class LogitExtremes(NamedTuple):
    """Per direction, the k tokens whose logits it raises most and the k it lowers most (ids and effects)."""

    up_ids: Tensor  # [n, k] long
    up_values: Tensor  # [n, k], largest first
    down_ids: Tensor  # [n, k] long
    down_values: Tensor  # [n, k], most negative first


# The [chunk, vocab] block of logit effects held at once: a GPT-2 dictionary of 24,576 features over 50,257 tokens
# is a 4.9 GB fp32 matrix whole, and Gemma-2's 256,000-token vocabulary makes 16,384 features 16.8 GB.
LOGIT_CHUNK_BYTES = 256 << 20


@torch.no_grad()
def direct_logit_extremes(model: nn.Module | LoadedLM, hook: str | HookPoint, directions: Tensor, k: int,
                          chunk_bytes: int = LOGIT_CHUNK_BYTES, screen_dtype: torch.dtype = torch.float32) -> LogitExtremes | None:
    """`direct_logit_effects`' k largest and k smallest per direction, computed over chunks of directions so that
    memory holds one [chunk, vocab] block (``chunk_bytes``) whatever the dictionary's width and the vocabulary: the
    same ids and values as the top-k of the whole matrix (with `screen_dtype` bf16, found in bf16 and made exact in
    float32: monosemantic/top_products.py). None where the hook has no known direct path."""
    from monosemantic.top_products import extreme_products

    residual = direct_logit_residual(model, hook, directions)
    if residual is None:
        return None
    unembedding = _unwrap(model).get_output_embeddings().weight
    up, down = extreme_products(residual, unembedding, k, screen_dtype=screen_dtype, chunk_bytes=chunk_bytes)
    return LogitExtremes(up.indices, up.values, down.indices, down.values)


def norm_inverse_scale(module: nn.Module, x: Tensor) -> Tensor:
    """1/σ of a LayerNorm or RMSNorm at each position: the one non-linear part of a final norm, which attribution
    and the direct logit effects hold fixed."""
    eps = getattr(module, "eps", None) or getattr(module, "variance_epsilon", None) or 1e-5
    if isinstance(module, nn.LayerNorm):
        return torch.rsqrt(x.var(-1, keepdim=True, unbiased=False) + eps)
    return torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def norm_at_scale(module: nn.Module, x: Tensor, inv_scale: Tensor | float, with_bias: bool = True) -> Tensor:
    """A LayerNorm (γ ⊙ (x − mean(x))·s + β) or RMSNorm (γ ⊙ x·s) with its 1/σ fixed at `inv_scale`: linear in x.
    Without the bias, what a difference of two inputs (a direction) becomes."""
    weight = getattr(module, "weight", None)
    if isinstance(module, nn.LayerNorm):
        y = (x - x.mean(-1, keepdim=True)) * inv_scale
        if isinstance(weight, Tensor):
            y = y * weight.to(y.dtype)
            if with_bias and module.bias is not None:
                y = y + module.bias.to(y.dtype)
        return y
    y = x * inv_scale
    return y * weight.to(y.dtype) if isinstance(weight, Tensor) else y


def _alias_table(model: nn.Module) -> dict[str, tuple[str, str]]:
    """Every alias of the model -> (module path, kind)."""
    found = _layout(model)
    if found is None:
        return {}
    layout, container, n_layers = found
    table = {}
    for layer in range(n_layers):
        for suffix, (rel, kind) in layout.points.items():
            path = f"{container}.{layer}" + (f".{rel}" if rel else "")
            table[f"blocks.{layer}.{suffix}"] = (path, kind)
    return table


def _unknown(model: nn.Module, name: str, why: str) -> HookError:
    """A HookError naming the valid hook names nearest to `name`."""
    candidates = [n for n, _ in model.named_modules() if n] + list(_alias_table(model))
    near = difflib.get_close_matches(name, candidates, n=5, cutoff=0.6)
    if not near:  # nothing close: show a few real names so the user sees the shape of valid ones
        near = [a for a in _alias_table(model) if a.startswith("blocks.0.")] or candidates[:5]
    return HookError(f"unknown hook point {name!r}: {why}; nearest valid names: {', '.join(near)}")


def resolve_hook(model: nn.Module | LoadedLM, name: str) -> HookPoint:
    """Resolve an HF module path (optionally suffixed ":input" or ":output") or a TransformerLens alias.

    Aliases: blocks.{L}.hook_resid_pre, blocks.{L}.hook_resid_post, blocks.{L}.hook_attn_out,
    blocks.{L}.ln2.hook_normalized (the MLP's input), blocks.{L}.mlp.hook_pre, blocks.{L}.mlp.hook_post,
    blocks.{L}.hook_mlp_out, for GPT-2, GPT-NeoX and
    Llama-style models. An HF path that some alias means gets that alias filled in.
    """
    model = _unwrap(model)
    name = name.strip()
    aliases = _alias_table(model)
    if name in aliases:
        path, kind = aliases[name]
        return HookPoint(module_path=path, alias=name, kind=kind)
    match = _ALIAS.match(name)
    if match is not None:
        if not aliases:
            model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
            raise _unknown(model, name, f"no TransformerLens aliases are known for model type {model_type!r}, use an HF module path")
        n_layers = len({k.split(".")[1] for k in aliases})
        if int(match.group(1)) >= n_layers:
            raise _unknown(model, name, f"layer {match.group(1)} is out of range, the model has {n_layers} blocks")
        raise _unknown(model, name, "not a known alias")
    path, kind = name, "output"
    head, sep, tail = name.rpartition(":")
    if sep and tail in _KINDS:
        path, kind = head, tail
    if not path or _submodule(model, path) is None:
        raise _unknown(model, name, "no such module or alias")
    reverse = {target: alias for alias, target in aliases.items()}
    return HookPoint(module_path=path, alias=reverse.get((path, kind)), kind=kind)


def _as_hook(model: nn.Module, hook: str | HookPoint) -> tuple[HookPoint, nn.Module]:
    """The hook point and the module it sits on; a HookPoint is checked against this model."""
    point = resolve_hook(model, hook) if isinstance(hook, str) else hook
    if point.kind not in _KINDS:
        raise HookError(f"hook kind must be one of {_KINDS}, got {point.kind!r}")
    module = _submodule(model, point.module_path) if point.module_path else None
    if module is None:
        raise _unknown(model, point.module_path, "no such module in this model")
    return point, module


# ---------------------------------------------------------------------------------------------------------------
# Reading and replacing activations
# ---------------------------------------------------------------------------------------------------------------

# Decoder layers may receive hidden_states by keyword (transformers 5, gradient checkpointing); these are the
# keyword names under which a module's main input arrives, most likely first.
_INPUT_KWARGS = ("hidden_states", "x", "input", "hidden_state", "inputs_embeds")


def _input_slot(args: tuple, kwargs: dict) -> tuple[Tensor, int | str]:
    """The module's main input tensor and where it is: a position in args or a keyword."""
    if args and isinstance(args[0], Tensor):
        return args[0], 0
    for key in _INPUT_KWARGS:
        if isinstance(kwargs.get(key), Tensor):
            return kwargs[key], key
    for key, value in kwargs.items():
        if isinstance(value, Tensor):
            return value, key
    raise MonosemanticError("the hooked module received no tensor input")


def _output_tensor(output: Any) -> Tensor:
    """The activation in a module output: the tensor itself, or element 0 of a tuple / ModelOutput."""
    if isinstance(output, Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    if isinstance(output, Mapping) and output and isinstance(next(iter(output.values())), Tensor):
        return next(iter(output.values()))
    raise MonosemanticError(f"the hooked module returned {type(output).__name__}, which holds no activation tensor")


def _with_output(output: Any, new: Tensor) -> Any:
    """`output` with its activation replaced by `new`, every other element kept."""
    if isinstance(output, Tensor):
        return new
    if isinstance(output, (tuple, list)):
        return type(output)([new, *output[1:]]) if type(output) in (tuple, list) else output.__class__(new, *output[1:])
    first = next(iter(output.keys()))
    output[first] = new  # ModelOutput: a dict-like dataclass, replaced in place
    return output


def _register(module: nn.Module, kind: str, on_activation: Callable[[Tensor], Tensor | None]) -> RemovableHandle:
    """Hook `module` so that `on_activation` sees its activation; a tensor it returns replaces the activation."""
    if kind == "output":

        def forward_hook(_module: nn.Module, _args: tuple, output: Any) -> Any:
            new = on_activation(_output_tensor(output))
            return None if new is None else _with_output(output, new)

        return module.register_forward_hook(forward_hook)

    def pre_hook(_module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        value, slot = _input_slot(args, kwargs)
        new = on_activation(value)
        if new is None:
            return None
        if isinstance(slot, int):
            return (new, *args[1:]), kwargs
        return args, {**kwargs, slot: new}

    # with_kwargs: transformers may pass hidden_states by keyword, which a plain pre-hook never sees.
    return module.register_forward_pre_hook(pre_hook, with_kwargs=True)


class _StopForward(Exception):
    """Raised inside a hook to abandon the rest of the forward once the activation is captured."""


def _device(model: nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def read_activations(
    model: nn.Module | LoadedLM,
    input_ids: Tensor,
    hook: str | HookPoint,
    attention_mask: Tensor | None = None,
    stop_at_hook: bool = True,
) -> Tensor:
    """The activation at `hook` for a batch of token ids, [batch, seq, d], without gradients.

    stop_at_hook abandons the forward as soon as the hook fires, so later layers and the unembedding are not
    computed. If the module runs more than once per forward, the first call is the one returned.
    """
    return _capture(_unwrap(model), input_ids, [hook], attention_mask, stop_at_hook)[0]


def read_activations_at(
    model: nn.Module | LoadedLM, input_ids: Tensor, hooks: Sequence[str | HookPoint], attention_mask: Tensor | None = None
) -> list[Tensor]:
    """The activations at several hooks from one forward, in the order given: the forward runs up to the deepest
    of them (it is abandoned once every hook has fired), so harvesting N layers costs one pass, not N."""
    return _capture(_unwrap(model), input_ids, hooks, attention_mask, stop=True)


def _capture(model: nn.Module, input_ids: Tensor, hooks: Sequence[str | HookPoint], attention_mask: Tensor | None,
             stop: bool) -> list[Tensor]:
    placed = [_as_hook(model, hook) for hook in hooks]
    captured: list[Tensor | None] = [None] * len(placed)
    waiting = [len(placed)]

    def capture_into(slot: int) -> Callable[[Tensor], None]:
        def capture(activation: Tensor) -> None:
            if captured[slot] is None:
                # Without stopping, later in-place ops could still write to this tensor, so keep our own copy;
                # with several hooks the forward runs on past the earlier ones, so they are copied too.
                captured[slot] = activation.detach() if stop and len(placed) == 1 else activation.detach().clone()
                waiting[0] -= 1
            if stop and waiting[0] == 0:
                raise _StopForward
        return capture

    device = _device(model)
    handles = [_register(module, point.kind, capture_into(i)) for i, (point, module) in enumerate(placed)]
    try:
        # no_grad, not inference_mode: inference tensors cannot be saved for backward, and callers (the SAE
        # trainer, attribution) feed these activations into modules that need gradients.
        with torch.no_grad():
            model(
                input_ids=input_ids.to(device),
                attention_mask=None if attention_mask is None else attention_mask.to(device),
                use_cache=False,
            )
    except _StopForward:
        pass
    finally:
        for handle in handles:
            handle.remove()
    for (point, _), activation in zip(placed, captured):
        if activation is None:
            raise HookError(f"hook point {point.name!r} was not reached during the forward pass")
    return captured  # type: ignore[return-value]


def hook_dim(lm_or_model: nn.Module | LoadedLM, hook: str | HookPoint) -> int:
    """Width of the activation at `hook`, measured with a one-token forward that stops at the hook."""
    model = _unwrap(lm_or_model)
    token = torch.zeros((1, 1), dtype=torch.long, device=_device(model))
    return int(read_activations(model, token, hook, attention_mask=torch.ones_like(token), stop_at_hook=True).shape[-1])


@contextmanager
def hooked_replacement(
    model: nn.Module | LoadedLM, hook: str | HookPoint, fn: Callable[[Tensor], Tensor]
) -> Iterator[None]:
    """Within the context every forward replaces the activation at `hook` with fn(activation) and runs on.

    Gradients flow through fn (no grad mode is set here). Under generate() with a KV cache fn sees only the new
    positions, [batch, new_seq, d]. The result is cast back to the activation's dtype, so an SAE kept in float32
    can be spliced into a bf16 model. The hook is removed on exit, also when the body raises.
    """
    model = _unwrap(model)
    point, module = _as_hook(model, hook)

    def replace(activation: Tensor) -> Tensor:
        new = fn(activation)
        if not isinstance(new, Tensor) or new.shape != activation.shape:
            got = tuple(new.shape) if isinstance(new, Tensor) else type(new).__name__
            raise MonosemanticError(
                f"replacement at {point.name!r} must return a tensor of shape {tuple(activation.shape)}, got {got}"
            )
        return new.to(activation.dtype)

    handle = _register(module, point.kind, replace)
    try:
        yield
    finally:
        handle.remove()


def logits_with_replacement(
    model: nn.Module | LoadedLM,
    input_ids: Tensor,
    hook: str | HookPoint,
    fn: Callable[[Tensor], Tensor],
    attention_mask: Tensor | None = None,
) -> Tensor:
    """Logits [batch, seq, vocab] of a forward with the activation at `hook` replaced by fn(activation).

    Runs in the caller's grad mode, so attribution can differentiate through it.
    """
    model = _unwrap(model)
    device = _device(model)
    with hooked_replacement(model, hook, fn):
        out = model(
            input_ids=input_ids.to(device),
            attention_mask=None if attention_mask is None else attention_mask.to(device),
            use_cache=False,
        )
    return out.logits
