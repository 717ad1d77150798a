"""The Neuronpedia API's read operations over the engine: each request becomes the engine's own reads (batched with
every other activations request, counted in the same metrics) and is answered as Neuronpedia's server answers it.

Semantics are those of Neuronpedia apps/inference (endpoints/activation/*.py, endpoints/tokenize.py,
endpoints/util/*.py), checked against the published client's models:
- The prompt gets the BOS text in front unless it starts with it, so positions count from the BOS.
- activation/all ranks features by their max over the tokens (or the sum at `sort_by_token_indexes`), stable;
  `ignore_bos` zeroes the BOS column first. activation/single drops the BOS (its indices are one lower).
- activation/topk-by-token reports a token's active features only: where fewer than `top_k` are active,
  Neuronpedia pads with zero-valued features in an arbitrary order; nothing is made up here.
- util/sae-vector is the encoder column and sae-topk-by-decoder-cossim ranks decoder rows, both in the model's
  raw activation units (a dictionary trained on scaled inputs has its scale folded in, as an SAELens export has).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch

from monosemantic.bound import BoundDictionary
from monosemantic.feature_ranking import SourceRanking, merge_rankings
from monosemantic.lm import resolve_hook
from monosemantic.model import Model, Tokenized
from monosemantic.readout import Ranking, Read, hook_activations
from service.batcher import Job
from service.errors import invalid
from service.neuronpedia import schemas as np
from service.neuronpedia.sources import Naming, source_id

MAX_NUM_RESULTS = 1000  # activation/all's cap, as Neuronpedia's server caps it
DEFAULT_TOP_K = 5
MAX_COSSIM_RESULTS = 128


class VectorJob(NamedTuple):
    ids: list[int]
    hook: Any  # HookPoint
    vector: torch.Tensor


class NeuronpediaOperations:
    def __init__(self, engine: Any, model_id: str) -> None:
        self.engine, self.model_id = engine, model_id

    def naming(self) -> Naming:
        return Naming(self.model_id, self.engine.loaded)

    # ---- prompts --------------------------------------------------------------------------------------------------
    async def prompt(self, model: Model, field: str, prompt: str) -> Tokenized:
        bos = model.lm.tokenizer.bos_token
        prepend = model.bos_id is not None and not (bos and prompt.startswith(bos))
        return await self.engine.limits.token_ids(model, field, prompt, None, prepend)

    @staticmethod
    def texts(model: Model, ids: list[int]) -> list[str]:
        return [model.token_text(i) for i in ids]

    @staticmethod
    def special(model: Model, ids: list[int]) -> list[bool]:
        special = set(model.lm.tokenizer.all_special_ids)
        return [i in special for i in ids]

    # ---- activation/all -----------------------------------------------------------------------------------------
    def _selected(self, naming: Naming, req: np.ActivationAllRequest | np.ActivationAllBatchRequest) -> list[BoundDictionary]:
        members = naming.source_set("source_set", req.source_set)
        if not req.selected_sources:
            return members
        chosen = []
        for i, source in enumerate(req.selected_sources):
            entry = naming.source(f"selected_sources[{i}]", source)
            if entry not in members:
                raise invalid(f"selected_sources[{i}]", f"{source!r} is not in the source set {req.source_set!r}")
            if entry not in chosen:
                chosen.append(entry)
        return chosen

    async def activation_all(self, req: np.ActivationAllRequest, deadline: float | None, prompt: str | None = None,
                             field: str = "prompt") -> dict:
        naming = self.naming()
        naming.check_model("model", req.model)
        entries = self._selected(naming, req)
        n = min(req.num_results if req.num_results is not None else 25, MAX_NUM_RESULTS)
        model = naming.repository.model
        tokenized = await self.prompt(model, field, req.prompt if prompt is None else prompt)
        for i, position in enumerate(req.sort_by_token_indexes):
            if not 0 <= position < len(tokenized.ids):
                raise invalid(f"sort_by_token_indexes[{i}]", f"{position} is out of range for the prompt's {len(tokenized.ids)} tokens (BOS included)")
        ranking = Ranking(n, tuple(req.sort_by_token_indexes), req.ignore_bos)
        reads = tuple(Read(entry, rank=ranking) for entry in entries)
        results = await self.engine.read(tokenized.ids, reads, deadline, skip_first=True)
        rankings = [SourceRanking(source_id(entry), result.readout.ranked) for entry, result in zip(entries, results)]
        merged = merge_rankings(rankings, n, by_sum=bool(req.sort_by_token_indexes))
        return {
            "activations": [
                {"source": source, "index": f.feature, "values": f.values, "sum_values": f.sum_at, "max_value": f.max_value,
                 "max_value_index": f.max_position}
                for source, f in merged
            ],
            "tokens": self.texts(model, tokenized.ids),
        }

    # ---- activation/single -------------------------------------------------------------------------------------
    async def activation_single(self, req: np.ActivationSingleRequest | np.ActivationSingleBatchRequest, deadline: float | None,
                                prompt: str, field: str = "prompt") -> dict:
        naming = self.naming()
        naming.check_model("model", req.model)
        by_feature = req.source is not None and req.index is not None
        by_vector = req.vector is not None and req.hook is not None
        if by_feature == by_vector:
            raise invalid("source", "give exactly one of source with index, or vector with hook")
        model = naming.repository.model
        if by_feature:
            entry = naming.source("source", req.source)
            index = _index(req.index)
            self.engine.limits.feature(entry, "index", index)
            tokenized = await self.prompt(model, field, prompt)
            [result] = await self.engine.read(tokenized.ids, (Read(entry, 0, [index]),), deadline, skip_first=True)
            values = [row[0] for row in result.values]
            ids = tokenized.ids
            if model.bos_id is not None and ids and ids[0] == model.bos_id:  # the BOS column is dropped
                values, ids = values[1:], ids[1:]
        else:
            hook = self.hook(model, req.hook)
            vector = finite_vector("vector", req.vector)
            tokenized = await self.engine.limits.token_ids(model, field, prompt, None, prepend_bos=False)
            ids = tokenized.ids
            values = await self.engine.run(Job(run=self._run_vector, payload=VectorJob(ids, hook, vector), tokens=len(ids), deadline=deadline))
        if not values:
            raise invalid(field, "has no token after the BOS to read")
        top = max(values)
        return {
            "activation": {"values": values, "max_value": top, "max_value_index": values.index(top)},
            "tokens": self.texts(model, ids),
            "tokens_is_special": self.special(model, ids),
        }

    def hook(self, model: Model, name: str):
        try:
            return resolve_hook(model.lm, name)
        except Exception as exc:  # resolve_hook explains what it accepts
            raise invalid("hook", str(exc)) from None

    def _run_vector(self, jobs: list[Job]) -> list[list[float]]:
        job: VectorJob = jobs[0].payload
        with torch.inference_mode():
            acts = hook_activations(self.engine.repository.model, [job.ids], [job.hook])[0][0]
        if acts.shape[-1] != job.vector.numel():
            raise invalid("vector", f"has {job.vector.numel()} values; the activation at {job.hook.name} has {acts.shape[-1]}")
        return [(acts @ job.vector).tolist()]

    # ---- activation/topk-by-token --------------------------------------------------------------------------------
    async def topk_by_token(self, req: np.ActivationTopkByTokenRequest | np.ActivationTopkByTokenBatchRequest, deadline: float | None,
                            prompt: str, field: str = "prompt") -> dict:
        naming = self.naming()
        naming.check_model("model", req.model)
        entry = naming.source("source", req.source)
        model = naming.repository.model
        top_k = min(self.engine.limits.top_k("top_k", req.top_k if req.top_k is not None else DEFAULT_TOP_K), entry.d_sae)
        tokenized = await self.prompt(model, field, prompt)
        [result] = await self.engine.read(tokenized.ids, (Read(entry, top_k),), deadline, skip_first=True)
        offset = 1 if req.ignore_bos else 0
        texts, special = self.texts(model, tokenized.ids), self.special(model, tokenized.ids)
        results = [
            {"token_position": t, "token": texts[t], "is_special": special[t],
             "top_features": [{"feature_index": f, "activation_value": v} for f, v in zip(result.top_ids[t], result.top_values[t]) if v > 0]}
            for t in range(offset, len(tokenized.ids))
        ]
        return {"results": results, "tokens": texts[offset:]}

    # ---- activation/source ---------------------------------------------------------------------------------------
    async def activation_source(self, req: np.ActivationSourceRequest, deadline: float | None) -> dict:
        naming = self.naming()
        naming.check_model("model", req.model)
        entry = naming.source("source", req.source)
        model = naming.repository.model
        out = []
        for i, prompt in enumerate(req.prompts):
            tokenized = await self.prompt(model, f"prompts[{i}]", prompt)
            [result] = await self.engine.read(tokenized.ids, (Read(entry, active=True),), deadline, skip_first=True)
            out.append({"tokens": self.texts(model, tokenized.ids),
                        "activeFeatures": {str(f): [[t, v] for t, v in pairs] for f, pairs in result.readout.active.items()}})
        return {"results": out}

    # ---- tokenize, util ----------------------------------------------------------------------------------------
    async def tokenize(self, req: np.TokenizeRequest) -> dict:
        naming = self.naming()
        naming.check_model("model", req.model)
        model = naming.repository.model
        prepend = req.prepend_bos if req.prepend_bos is not None else True
        tokenized = await self.engine.limits.token_ids(model, "text", req.text, None, prepend)
        return {"tokens": tokenized.ids, "token_strings": self.texts(model, tokenized.ids), "prepend_bos": prepend and model.bos_id is not None}

    def sae_vector(self, req: np.SaeVectorRequest) -> dict:
        naming = self.naming()
        naming.check_model("model", req.model)
        entry = naming.source("source", req.source)
        self.engine.limits.feature(entry, "index", req.index)
        sae = entry.sae
        # raw units: pre = W_enc·(s·x) + …, so the encoder column that reads x itself is s·W_enc[:, i]
        column = sae.W_enc[:, req.index].detach().float() * sae.cfg.input_scale
        return {"vector": column.tolist(), "hookName": entry.hook.name}

    def topk_by_decoder_cossim(self, req: np.TopkByDecoderCossimRequest) -> dict:
        naming = self.naming()
        naming.check_model("model", req.model)
        target = naming.source("source", req.source)
        if (req.feature is None) == (req.vector is None):
            raise invalid("feature", "give exactly one of feature and vector")
        decoder = target.sae.W_dec.detach().float()  # cosines do not depend on the input scale
        if req.feature is not None:
            naming.check_model("feature.model", req.feature.model)
            of = naming.source("feature.source", req.feature.source)
            self.engine.limits.feature(of, "feature.index", req.feature.index)
            query = of.sae.W_dec[req.feature.index].detach().float()
            field = "feature.source"
        else:
            query, field = finite_vector("vector", req.vector), "vector"
        if query.numel() != decoder.shape[1]:
            raise invalid(field, f"is {query.numel()} wide; the decoder rows of {req.source!r} are {decoder.shape[1]} wide")
        cosines = (decoder @ query) / (decoder.norm(dim=1) * query.norm()).clamp_min(1e-8)
        cosines = torch.nan_to_num(cosines, nan=float("-inf"))
        k = max(1, min(req.num_results, MAX_COSSIM_RESULTS, decoder.shape[0]))
        values, ids = cosines.topk(k)
        return {
            "feature": None if req.feature is None else req.feature.model_dump(),
            "topk_decoder_cossim_features": [
                {"feature": {"model": self.model_id, "source": req.source, "index": int(i)}, "cosine_similarity": float(v) if math.isfinite(v) else 0.0}
                for v, i in zip(values.tolist(), ids.tolist())
            ],
        }

    def capabilities(self) -> dict:
        naming = self.naming()
        model = naming.repository.model
        s = self.engine.settings
        return {
            "model": self.model_id,
            "backend": "monosemantic",
            "device": s.device,
            "max_tokens": self.engine.limits.max_tokens(model),
            "token_limit": self.engine.limits.max_tokens(model),
            "activation_token_limit": self.engine.limits.max_tokens(model),
            "max_num_results": MAX_NUM_RESULTS,
            "sae_sets": sorted(naming.sets()),
            "sources": {source: {"set": entry.name, "version": entry.version, "hook": entry.hook.name, "d_sae": entry.d_sae}
                        for source, entry in naming.sources().items()},
            "steer_methods": [m.value for m in np.SteerMethod],
            "endpoints": {
                "tokenize": True, "activation_single": True, "activation_all": True, "activation_source": True,
                "activation_topk_by_token": True, "activation_raw": False, "activation_attention": False, "dfa": False,
                "steer_completion": True, "steer_completion_chat": False, "lens_logit": False, "lens_jacobian": False,
                "neurons": False,
            },
        }


def _index(value: str | int) -> int:
    """activation/single's index travels as a string in the client ("14057")."""
    if isinstance(value, int):
        return value
    if not value.strip().isdigit():
        raise invalid("index", f"{value!r} is not a feature index")
    return int(value)


def finite_vector(field: str, values: list[float]) -> torch.Tensor:
    vector = torch.tensor([float(v) for v in values], dtype=torch.float32)
    if vector.numel() == 0 or not torch.isfinite(vector).all():
        raise invalid(field, "must be a non-empty list of finite numbers")
    return vector
