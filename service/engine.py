"""The inference engine: every operation over the model and its loaded dictionaries, addressed by name, run on the
worker thread and answered in the API's shapes. No HTTP and no gRPC here: service.rest and service.grpc are thin
adapters over Engine, so both transports give the same results and the same errors.

Its parts live beside it: the repository of loaded dictionaries (service/repository.py), admission to the worker's
queue (service/admission.py), generations batched across requests (service/decoder.py), request checks
(service/validation.py), key-file reloads (service/keys.py); the maths
is the core's (monosemantic/readout.py, steering.py, attribution.py, generation.py, dashboards.py).
"""

from __future__ import annotations

import asyncio
import logging
import math
import secrets
import time
from contextlib import ExitStack
from typing import Any, AsyncIterator, NamedTuple

import torch
from torch import Tensor

from monosemantic import api as schemas
from monosemantic import compare, dashboards
from monosemantic.artifact import list_dictionaries, parse_reference, recorded_model_source
from monosemantic.attribution import Attribution, FeatureScore, attribute
from monosemantic.bound import BoundDictionary, load_bound, width_mismatch
from monosemantic.errors import ArtifactError, ArtifactUnreadable, ConfigError
from monosemantic.evaluations import read_evaluations
from monosemantic.explanations import ExplanationIndex, explanation_index, version_digest
from monosemantic.generation import DictionarySteering, Generation, NonFiniteOutput, SamplingConfig, StepResult
from monosemantic.model import Model, load_model
from monosemantic.readout import Read, SequenceReadout, hook_activations, read_features
from monosemantic.shipped import reference_lm_path
from monosemantic.steering import SteeringSpec
from service.access import AccessControl, Identity
from service.admission import Admission
from service.batcher import Job, Worker
from service.decoder import Decoder
from service.blocking_io import BlockingIO
from service.errors import ErrorKind, ServiceError, invalid, not_found, over_limit
from service.keys import KeyFileWatcher
from service.metrics import Metrics
from service.repository import DictionaryRepository, bound_to_model
from service.settings import ServiceSettings
from service.steer_evals import SteerEvaluations
from service.tokenizing import Tokenizing
from service.validation import Limits

log = logging.getLogger("monosemantic.serve")


# ---- the jobs the worker runs, typed ----------------------------------------------------------------------------
class ReadJob(NamedTuple):
    ids: list[int]
    reads: tuple[Read, ...]  # one per dictionary read, in the request's order
    skip_first: bool = False  # position 0 is a BOS the request added: left out of the monitoring metrics
    counted: bool = True  # in the token and monitoring metrics (not the warm-up's reads)


class ReadResult(NamedTuple):
    readout: SequenceReadout  # the tensors (rankings, active pairs for the Neuronpedia API)
    l0: list[int]
    recon_error: list[float]
    top_values: list[list[float]]
    top_ids: list[list[int]]
    values: list[list[float]] | None


class SnippetJob(NamedTuple):
    ids: list[int]
    dictionary: BoundDictionary


class AttributionJob(NamedTuple):
    ids: list[int]
    dictionary: BoundDictionary
    position: int
    target: int
    contrast: int | None


class SamplingExtras(NamedTuple):
    """Sampling settings beyond /v1/generate's, for the adapters that speak other APIs (Neuronpedia, OpenAI)."""

    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logprobs: int = 0
    logit_bias: tuple[tuple[int, float], ...] = ()


class AttributionResult(NamedTuple):
    attribution: Attribution
    strongest: list[FeatureScore]


def _ref(entry: BoundDictionary) -> schemas.DictionaryRef:
    return schemas.DictionaryRef(name=entry.name, version=entry.version)


def _joined(parts: list[tuple[SequenceReadout, int]]) -> SequenceReadout:
    """The monitored series of several readouts as one, each from its own first counted position on."""
    def cat(name: str) -> Tensor | None:
        pieces = [(getattr(readout, name), start) for readout, start in parts]
        return None if pieces[0][0] is None else torch.cat([piece[start:] for piece, start in pieces])

    empty = torch.empty(0)
    return SequenceReadout(cat("l0"), cat("recon_error"), empty, empty, None, cat("watched"), cat("squared_error"), cat("squared_norm"))


class Engine:
    def __init__(self, settings: ServiceSettings, metrics: Metrics | None = None) -> None:
        self.settings = settings
        self.metrics = metrics or Metrics()
        self._background: set[asyncio.Task] = set()  # observe jobs nobody awaits
        self.steer_evals = SteerEvaluations(self)
        self.metrics.queue_capacity.set(settings.max_queue)
        self.metrics.ready.set_function(lambda: 1.0 if self.ready else 0.0)
        admin = settings.admin_key.get_secret_value() if settings.admin_key is not None else None
        self.access = AccessControl.from_settings(settings.api_keys_file, admin)
        self.repository: DictionaryRepository | None = None
        self._draining = False
        self._change_lock = asyncio.Lock()  # one load / reload / unload at a time
        self._tokenizing = Tokenizing()
        self.limits = Limits(settings, self._tokenizing)
        self._registry_io = BlockingIO(settings.registry_timeout_s, "MONOSEMANTIC_REGISTRY_TIMEOUT_S")
        self.keys = KeyFileWatcher(self.access, self.metrics, self._registry_io, settings.api_keys_poll_s)
        self._worker = Worker(
            max_batch_requests=settings.max_batch_requests,
            max_batch_tokens=settings.max_batch_tokens,
            max_wait_s=settings.max_wait_ms / 1000,
            max_queue=settings.max_queue,
            max_queue_wait_s=settings.max_queue_wait_s,
            on_batch=self._record_batch,
            on_idle=self._release_buffers,
        )
        self.admission = Admission(self._worker, self.metrics)
        self.decoder = Decoder(self._worker, settings.max_batch_requests, settings.max_batch_tokens, self.metrics.generation_rows.observe)
        self.metrics.generations_running.set_function(lambda: self.decoder.rows)

    # ---- lifecycle ---------------------------------------------------------------------------------------------
    def load(self) -> None:
        """Load the model and every configured dictionary (blocking; call before start). The model is the
        `model` setting, else the one the first named dictionary's manifest records, else the shipped one."""
        s = self.settings
        configured = s.configured_dictionaries()
        first = next((parse_reference(r) for r in configured if r != "all"), None)
        source = s.model or (first and recorded_model_source(s.registry, *first)) or str(reference_lm_path())
        model = load_model(source, s.device, s.dtype)
        repository = DictionaryRepository(model, s.registry, s.device, s.sae_dtype)
        wanted: list[tuple[str, int | None]] = []
        for reference in configured:
            if reference == "all":
                named = {name for name, _ in wanted} | {parse_reference(r)[0] for r in configured if r != "all"}
                wanted += [(name, None) for name in bound_to_model(s.registry, model.checksum) if name not in named]
            else:
                wanted.append(parse_reference(reference))
        if not wanted:
            raise ConfigError(f"MONOSEMANTIC_DICTIONARIES=all: no dictionary in the registry is bound to the model {source!r}")
        for name, version in wanted:
            repository.put(load_bound(model, s.registry, name, version, s.device, s.sae_dtype))
        default = repository.default.name
        for watched in s.watch_features:
            if watched.of(default) not in repository:
                raise ConfigError(f"MONOSEMANTIC_WATCH_FEATURES: dictionary {watched.dictionary!r} is not loaded (loaded: {repository.refs()})")
        for entry in repository:
            if (problem := self._unwatchable(entry, default)) is not None:
                raise ConfigError(problem)
        self.repository = repository
        for entry in repository:
            self._exported(entry)
        self.metrics.set_dictionaries(list(repository), model.checksum)
        self._warm_up(repository)

    def _warm_up(self, repository: DictionaryRepository) -> None:
        """Two short reads before ready: the first pages the weights in (a memory-mapped checkpoint is read from disk
        on first touch: seconds at Gemma-2-2B's shape), the second times a read, so the wait bound knows the cost
        of reads before the first burst of clients (service/batcher.py) and nobody's first request pays the page-in."""
        ids = [repository.model.bos_id or 0] * 64
        job = Job(run=self._run_reads, payload=ReadJob(ids, (Read(repository.default, 0),), counted=False), batch_key="activations", tokens=len(ids))
        for _ in range(2):
            started = time.monotonic()
            self._run_reads([job])
        self._worker.learn([job], time.monotonic() - started)

    def _watched(self, entry: BoundDictionary, default: str) -> list:
        return [w for w in self.settings.watch_features if w.of(default) == entry.name]

    def _unwatchable(self, entry: BoundDictionary, default: str) -> str | None:
        beyond = [w.id for w in self._watched(entry, default) if w.id >= entry.d_sae]
        if beyond:
            return (f"MONOSEMANTIC_WATCH_FEATURES: features {beyond} do not exist in dictionary {entry.name} v{entry.version} "
                    f"(d_sae {entry.d_sae})")
        return None

    def _exported(self, entry: BoundDictionary) -> None:
        m = entry.dictionary.manifest
        self.metrics.monitor.set_dictionary(m.name, m.version, m.metrics, None if entry.statistics is None else entry.statistics.density,
                                            self._watched(entry, self.repository.default.name))

    def start(self) -> None:
        # No global grad switch: grad mode is per thread, and the caller's thread may be a notebook's or a test's
        # (an engine started in-process once left every later training step without gradients). Each job sets its
        # own: the readouts run under inference_mode, attribution enables grad for itself.
        self._worker.start()

    def begin_drain(self) -> None:
        """Stop admitting new requests (readiness goes false); admitted ones run to the end."""
        self._draining = True

    def stop(self) -> None:
        self._worker.stop()
        self._tokenizing.close()

    @property
    def ready(self) -> bool:
        return self.repository is not None and not self._draining

    @property
    def loaded(self) -> DictionaryRepository:
        """The repository, for a new request: 503 while loading or draining."""
        if self._draining:
            raise self.admission.refuse_draining()
        if self.repository is None:
            raise ServiceError(ErrorKind.UNAVAILABLE, "the model and dictionaries are not loaded yet")
        return self.repository

    def _release_buffers(self) -> None:
        for entry in self.repository or ():
            entry.encoder.release()

    def _record_batch(self, requests: int, tokens: int) -> None:
        self.metrics.batch_requests.observe(requests)
        self.metrics.batch_tokens.observe(tokens)
        self.metrics.queue_depth.set(self._worker.depth)

    def _resolve(self, repository: DictionaryRepository, named: list[str | None], many: bool) -> list[BoundDictionary]:
        return [repository.get(name, f"dictionaries[{i}]" if many else "dictionary") for i, name in enumerate(named)]

    # ---- activations -------------------------------------------------------------------------------------------
    async def activations(self, req: schemas.ActivationsRequest, deadline: float | None = None) -> dict[str, Any]:
        """The ActivationsResponse, as the plain dict that the adapters serialise (its shape is the model's; the
        OpenAPI document and every client validate it). On the service's hot path, pydantic validation and
        serialisation of 64 tokens × top_k cost 0.86 ms against 0.04 ms for orjson on the dict (measured here)."""
        with self.admission.arriving() as arrival:
            repository = self.loaded
            model = repository.model
            entries = self._resolve(repository, req.named(), bool(req.dictionaries))
            tokenized = await self.limits.token_ids(model, "text", req.text, req.token_ids, req.prepend_bos)
            top_k = self.limits.top_k("top_k", req.top_k)
            if req.feature_ids and len(entries) > 1:
                raise invalid("feature_ids", "name one dictionary to read dense feature values from (with several, ids would be ambiguous)")
            wanted = self.limits.feature_ids(entries[0], req.feature_ids)
            reads = tuple(Read(entry, top_k, wanted if i == 0 else None) for i, entry in enumerate(entries))
            skip_first = req.text is not None and req.prepend_bos and model.bos_id is not None
            results = await self.read(tokenized.ids, reads, deadline, skip_first, arrival)
        readouts = [{"dictionary": {"name": entry.name, "version": entry.version}, "tokens": self._tokens(model, tokenized, result)}
                    for entry, result in zip(entries, results)]
        return {**readouts[0], "readouts": readouts if req.dictionaries else []}

    async def read(self, ids: list[int], reads: tuple[Read, ...], deadline: float | None, skip_first: bool, arrival: Any = None) -> list[ReadResult]:
        """One sequence read by one or several dictionaries: admitted, batched with every other read, and counted
        in the token and monitoring metrics (position 0 left out of monitoring with `skip_first`, as a BOS)."""
        job = Job(run=self._run_reads, payload=ReadJob(ids, reads, skip_first), batch_key="activations", tokens=len(ids), deadline=deadline)
        with self.admission.admitted():
            return await self.admission.submit(job, arrival=arrival)

    async def run(self, job: Job) -> Any:
        """Any job on the worker, admitted (a slot for its life) and bounded by its deadline."""
        with self.admission.admitted():
            return await self.admission.submit(job)

    @staticmethod
    def _tokens(model: Model, tokenized, result: ReadResult) -> list[dict]:
        token_text, offsets = model.token_text, tokenized.offsets
        l0, errors, top_values, top_ids, values = result.l0, result.recon_error, result.top_values, result.top_ids, result.values
        return [
            {
                "id": token_id, "text": token_text(token_id), "start": offsets[t][0], "end": offsets[t][1], "l0": l0[t],
                "recon_error": errors[t], "values": [] if values is None else values[t],
                "top": [{"feature": f, "value": v} for f, v in zip(top_ids[t], top_values[t]) if v > 0],
            }
            for t, token_id in enumerate(tokenized.ids)
        ]

    def _run_reads(self, jobs: list[Job]) -> list[list[ReadResult]]:
        monitor = self.metrics.monitor
        payloads: list[ReadJob] = [j.payload for j in jobs]
        watch = {read.dictionary.name: monitor.watched(read.dictionary.name) for p in payloads for read in p.reads}
        with torch.inference_mode():
            readouts = read_features(self.repository.model, [p.ids for p in payloads], [p.reads for p in payloads], watch)
            self._count(payloads, readouts)
        return [
            [ReadResult(r, r.l0.tolist(), r.recon_error.tolist(), r.top_values.tolist(), r.top_ids.tolist(),
                        None if r.values is None else r.values.tolist()) for r in per_job]
            for per_job in readouts
        ]

    def _count(self, payloads: list[ReadJob], readouts: list[list[SequenceReadout]]) -> None:
        """A batch's reads in the token and monitoring metrics, one record per dictionary over all its rows. Counted
        per request after the reply, the monitor's dozen small tensor operations ran on the event loop's thread for
        every request, each handing the GIL to the worker and waiting to get it back: 12% of that thread's samples
        under 32 gRPC clients (py-spy)."""
        merged: dict[int, tuple[BoundDictionary, list[tuple[SequenceReadout, int]]]] = {}
        for payload, per_job in zip(payloads, readouts):
            if payload.counted:
                for read, readout in zip(payload.reads, per_job):
                    merged.setdefault(id(read.dictionary), (read.dictionary, []))[1].append((readout, int(payload.skip_first)))
        for entry, parts in merged.values():
            self.metrics.tokens_processed.labels(entry.name).inc(sum(readout.l0.shape[0] for readout, _ in parts))
            self.metrics.monitor.record(entry.name, entry.version, _joined(parts), False, self.metrics.l0)

    # ---- observe (monitoring only) ---------------------------------------------------------------------------
    async def observe(self, req: schemas.ObserveRequest, identity: Identity | None = None) -> schemas.ObserveResponse:
        """Read texts for the feature-monitoring metrics alone: validated and queued now, read in the background
        (batched with other activations work); the caller does not wait for the model. Each window counts against
        the caller's rate limit, as a request would."""
        repository = self.loaded
        model = repository.model
        entries = self._resolve(repository, req.named(), bool(req.dictionaries))
        s = self.settings
        share = max(1, int(s.max_queue * s.max_request_share))
        if len(req.texts) > s.max_observe_texts:
            raise over_limit("texts", len(req.texts), s.max_observe_texts, "max_observe_texts")
        step = self.limits.max_tokens(model) - 1  # long texts are read in windows, each starting with BOS as in training
        for i, text in enumerate(req.texts):
            if len(text) > s.max_text_chars:
                raise over_limit(f"texts[{i}]", len(text), s.max_text_chars, "max_text_chars")
        # Before any tokenization, a bound that costs nothing: no token is longer than the vocabulary's longest,
        # so a text makes at least ceil(bytes / longest / step) windows. Past the queue, refused now.
        at_least = sum(math.ceil(math.ceil(len(t.encode("utf-8", "surrogatepass")) / model.max_token_bytes) / step) for t in req.texts)
        if at_least > share:
            raise self._over_share(at_least, step, share, "at least ")
        chunks = []
        bos = [model.bos_id] if model.bos_id is not None else []
        for tokenized in await self._tokenizing.tokenize(model, list(req.texts), prepend_bos=False):
            ids = tokenized.ids
            chunks.extend(bos + ids[c : c + step] for c in range(0, len(ids), step))
        if len(chunks) > share:  # could never be admitted: a 429 would be retried for ever
            raise self._over_share(len(chunks), step, share)
        if identity is not None:
            identity.charge(len(chunks) - 1)
        # Take one slot per window now (429 at once when they are not free); the background task gives them back.
        slots = ExitStack()
        slots.enter_context(self.admission.admitted(len(chunks)))
        task = asyncio.create_task(self._observe_all(model, entries, chunks, slots))
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return schemas.ObserveResponse(accepted=len(req.texts), tokens=sum(len(c) for c in chunks) - (len(chunks) if model.bos_id is not None else 0))

    def _over_share(self, windows: int, step: int, share: int, bound: str = "") -> ServiceError:
        s = self.settings
        return invalid("texts", f"the texts make {bound}{windows} windows of up to {step + 1} tokens, more than the {share} one request may "
                                f"hold of the {s.max_queue} the server admits at once (settings MONOSEMANTIC_MAX_QUEUE, "
                                "MONOSEMANTIC_MAX_REQUEST_SHARE); send fewer or shorter texts")

    async def _observe_all(self, model: Model, entries: list[BoundDictionary], chunks: list[list[int]], slots: ExitStack) -> None:
        reads = tuple(Read(entry) for entry in entries)
        with slots:
            skip_first = model.bos_id is not None
            jobs = [Job(run=self._run_reads, payload=ReadJob(chunk, reads, skip_first), batch_key="activations", tokens=len(chunk)) for chunk in chunks]
            # fire-and-forget: failures are counted, never raised into the loop
            results = await asyncio.gather(*(self.admission.submit(job) for job in jobs), return_exceptions=True)
        self.metrics.observe_dropped.inc(sum(isinstance(result, BaseException) for result in results))

    # ---- attributions ------------------------------------------------------------------------------------------
    async def attributions(self, req: schemas.AttributionsRequest, deadline: float | None = None) -> schemas.AttributionsResponse:
        repository = self.loaded
        model = repository.model
        entry = repository.get(req.dictionary)
        ids = (await self.limits.token_ids(model, "text", req.text, None, req.prepend_bos)).ids
        position = req.position if req.position is not None else len(ids) - 1
        if position < 0:
            position += len(ids)
        if not 0 <= position < len(ids):
            raise invalid("position", f"{req.position} is outside the text's {len(ids)} tokens")
        target = self.limits.single_token(model, "target", req.target)
        contrast = None if req.contrast is None else self.limits.single_token(model, "contrast", req.contrast)
        if contrast == target:
            raise invalid("contrast", "is the target token itself; the difference would be 0")
        top_k = self.limits.top_k("top_k", req.top_k)
        job = Job(run=self._run_attribution, payload=AttributionJob(ids, entry, position, target, contrast), tokens=len(ids), deadline=deadline)
        with self.admission.admitted():
            result: AttributionResult = await self.admission.submit(job)
        self.metrics.tokens_processed.labels(entry.name).inc(len(ids))
        a = result.attribution
        return schemas.AttributionsResponse(
            dictionary=_ref(entry), value=a.value, exact=a.exact, features_total=a.features_total,
            error=a.error, rest=a.rest, remainder=a.remainder, position=position, target_id=target, contrast_id=contrast,
            features=[schemas.FeatureAttribution(**s._asdict()) for s in result.strongest[:top_k]],
        )

    def _run_attribution(self, jobs: list[Job]) -> list[AttributionResult]:
        job: AttributionJob = jobs[0].payload
        result = attribute(self.repository.model, job.dictionary, job.ids, job.position, job.target, job.contrast)
        return [AttributionResult(result, result.strongest(self.settings.max_top_k))]

    # ---- generate ----------------------------------------------------------------------------------------------
    def resolve_steering(self, repository: DictionaryRepository, reader: BoundDictionary,
                         req: schemas.GenerateRequest) -> tuple[list[DictionarySteering], dict[tuple[str, int], int]]:
        """The steering list resolved to its dictionaries, grouped by dictionary in order of first mention, and
        each (dictionary name, feature)'s place in the request (steered values are reported in that order)."""
        groups: dict[str, DictionarySteering] = {}
        seen: dict[tuple[str, int], int] = {}
        for i, entry in enumerate(req.steering):
            dictionary = reader if entry.dictionary is None else repository.get(entry.dictionary, f"steering[{i}].dictionary")
            self.limits.feature(dictionary, f"steering[{i}].feature", entry.feature)
            if (dictionary.name, entry.feature) in seen:
                raise invalid(f"steering[{i}].feature", f"feature {entry.feature} of {dictionary.name} is steered twice; give it once")
            seen[(dictionary.name, entry.feature)] = i
            group = groups.setdefault(dictionary.name, DictionarySteering(dictionary, []))
            group.specs.append(SteeringSpec(entry.feature, entry.mode, entry.value))
        return list(groups.values()), seen

    async def new_generation(self, model: Model, reader: BoundDictionary, req: schemas.GenerateRequest, steering: list[DictionarySteering],
                             seed: int, extras: SamplingExtras = SamplingExtras(), prompt_ids: list[int] | None = None,
                             field: str = "prompt") -> Generation:
        """One generation of `req` (checked by Limits.generation, its steering resolved): its prompt tokenized
        (or `prompt_ids` as given, a chat template's rendering), the sampling settings it and `extras` ask for."""
        ids = prompt_ids if prompt_ids is not None else (await self.limits.token_ids(model, field, req.prompt, None, req.prepend_bos)).ids
        if len(ids) >= model.max_positions:
            raise invalid(field, f"{len(ids)} tokens leave no room to generate in the model's context of {model.max_positions}")
        cfg = SamplingConfig(req.max_new_tokens, req.temperature, req.top_p, req.top_k, seed, tuple(req.stop), req.features_top_k,
                             extras.frequency_penalty, extras.presence_penalty, extras.logprobs, extras.logit_bias)
        return Generation(model, reader, ids, cfg, steering, req.steer_prompt)

    async def generate_events(self, req: schemas.GenerateRequest, deadline: float | None = None) -> AsyncIterator[schemas.GeneratedToken | schemas.GenerateResponse]:
        """Yields one GeneratedToken per step, then the complete GenerateResponse."""
        repository = self.loaded
        model = repository.model
        reader = repository.get(req.dictionary)
        self.limits.generation(model, req)
        steering, order = self.resolve_steering(repository, reader, req)
        seed = req.seed if req.seed is not None else secrets.randbits(63)
        steered = await self.new_generation(model, reader, req, steering, seed)
        tokens: list[schemas.GeneratedToken] = []
        unsteered = None
        with self.admission.admitted():  # held for the whole stream; a client that leaves closes the generator and frees it
            plain, comparing = None, None
            if req.compare_unsteered:  # a second row of the same batch, beside the steered one
                plain = await self.new_generation(model, reader, req, [], seed)
                comparing = asyncio.ensure_future(self._collect(self._run_generation(plain, order, deadline)))
            try:
                async for token in self._run_generation(steered, order, deadline):
                    tokens.append(token)
                    yield token
                if comparing is not None:
                    plain_tokens = await comparing
                    unsteered = schemas.Continuation(text=plain.text, tokens=plain_tokens, finish_reason=plain.finish_reason)
            finally:
                if comparing is not None:
                    if not comparing.done():
                        comparing.cancel()
                    elif not comparing.cancelled():
                        comparing.exception()  # retrieved: the steered stream's own error is the one raised
        yield schemas.GenerateResponse(
            dictionary=_ref(reader), text=steered.text, tokens=tokens, finish_reason=steered.finish_reason,
            unsteered=unsteered, seed=seed,
        )

    async def steps(self, generation: Generation, deadline: float | None, field: str = "steering") -> AsyncIterator[StepResult]:
        """A generation's steps, batched with every other running generation (service/decoder.py), until it is
        done; the caller holds an admission slot for the whole of it. A steered output that is not finite is the
        steering's fault: INVALID_ARGUMENT on `field`."""
        try:
            async for step in self.decoder.steps(generation, deadline):
                self.metrics.tokens_generated.inc()
                yield step
        except NonFiniteOutput as exc:
            raise invalid(field, str(exc)) from None
        except ServiceError as exc:
            if exc.kind is ErrorKind.DEADLINE_EXCEEDED:  # counted as the per-step jobs' deadline was (service/admission.py)
                self.metrics.rejected.labels("deadline").inc()
            raise

    async def interleaved(self, generations: list[Generation], deadline: float | None,
                          field: str = "steering") -> AsyncIterator[tuple[int, StepResult]]:
        """Several generations' steps as (index, step), one of each unfinished generation in turn: they run side
        by side as rows of the decode batch; the caller holds their admission slots."""
        running = [(i, self.steps(g, deadline, field)) for i, g in enumerate(generations)]
        try:
            while running:
                still = []
                for i, steps in running:
                    try:
                        step = await anext(steps)
                    except StopAsyncIteration:
                        continue
                    still.append((i, steps))
                    yield i, step
                running = still
        finally:
            for _, steps in running:
                await steps.aclose()

    async def _run_generation(self, generation: Generation, order: dict, deadline: float | None) -> AsyncIterator[schemas.GeneratedToken]:
        async for step in self.steps(generation, deadline):
            steered = sorted(step.steered, key=lambda s: order[(s.dictionary, s.feature)])
            yield schemas.GeneratedToken(
                index=step.index, id=step.token_id, text=step.text,
                top=[schemas.FeatureValue(feature=f, value=v) for f, v in step.top],
                steered=[schemas.SteeredValue(dictionary=s.dictionary, feature=s.feature, before=s.before, after=s.after) for s in steered],
            )

    @staticmethod
    async def _collect(tokens: AsyncIterator[schemas.GeneratedToken]) -> list[schemas.GeneratedToken]:
        return [t async for t in tokens]

    async def generate(self, req: schemas.GenerateRequest, deadline: float | None = None) -> schemas.GenerateResponse:
        final = None
        async for event in self.generate_events(req, deadline):
            final = event
        return final

    # ---- features ----------------------------------------------------------------------------------------------
    @staticmethod
    def _with_statistics(entry: BoundDictionary) -> None:
        if not dashboards.has_statistics(entry):
            raise ServiceError(ErrorKind.FAILED_PRECONDITION, dashboards.how_to_compute(entry))

    def _explained(self, entry: BoundDictionary) -> ExplanationIndex | None:
        """The version's explanation runs (kept beside it, REGISTRY/NAME/explanations/vN/), re-read when a run file
        changes; a damaged record hides the explanations, not the feature."""
        m = entry.dictionary.manifest
        try:
            return explanation_index(self.settings.registry, m.name, m.version, version_digest(entry.dictionary))
        except (ArtifactError, OSError) as exc:
            log.warning("explanations of %s: %s", entry.ref, exc)
            return None

    def feature(self, feature: int, dictionary: str | None = None) -> schemas.FeatureResponse:
        repository = self.loaded
        entry = repository.get(dictionary)
        self.limits.feature(entry, "feature", feature, missing=not_found)
        self._with_statistics(entry)
        page = dashboards.feature_page(repository.model, entry, feature)
        page["counterparts"] = [
            {"dictionary": other.ref, "feature": p.b, "cosine": p.score, "label": other.labels[p.b] if other.labels else ""}
            for other in repository if other is not entry for p in compare.counterparts(entry, feature, other)]
        page["explanations"] = dashboards.explanations(self._explained(entry), feature)
        return schemas.FeatureResponse.model_validate({"dictionary": _ref(entry).model_dump(), **page})

    def list_features(self, req: schemas.ListFeaturesRequest) -> schemas.ListFeaturesResponse:
        entry = self.loaded.get(req.dictionary)
        page_size = self.limits.page_size(req.page_size)
        d_sae = entry.dictionary.manifest.sae.d_sae
        if req.below is not None and req.below > d_sae:
            raise invalid("below", f"is {req.below}: dictionary {entry.dictionary.manifest.name} has {d_sae} features")
        self._with_statistics(entry)
        order = dashboards.feature_order(entry, req.order, req.seed if req.seed is not None else secrets.randbits(63))
        if req.below is not None:
            order = order[order < req.below]
        first = (req.page - 1) * page_size
        return schemas.ListFeaturesResponse.model_validate({
            "dictionary": _ref(entry).model_dump(), "order": req.order, "total": int(order.numel()), "page": req.page,
            "page_size": page_size, "results": dashboards.summaries(entry, order[first : first + page_size], self._explained(entry)),
        })

    async def search_features(self, req: schemas.SearchFeaturesRequest, deadline: float | None = None) -> schemas.SearchFeaturesResponse:
        repository = self.loaded
        model = repository.model
        entry = repository.get(req.dictionary)
        page_size = self.limits.page_size(req.page_size)
        self._with_statistics(entry)
        explained = self._explained(entry)
        if req.by == "feature":
            scores = self._like_feature(repository, entry, req)
        elif req.by == "explanation":
            if not req.q.split():
                raise invalid("q", "is empty: give words an explanation should contain")
            hits = explained.search(req.q) if explained is not None else []
            scores = torch.zeros(entry.d_sae, dtype=torch.float64)
            scores[[f for f, _ in hits]] = torch.tensor([score for _, score in hits], dtype=torch.float64)
            matched = torch.zeros(entry.d_sae, dtype=torch.bool)
            matched[[f for f, _ in hits]] = True  # an unscored explanation (score 0) is a hit too
        elif req.by == "token":
            if len(req.q) > 200:
                raise invalid("q", "a token search takes one token (at most 200 characters)")
            token_ids = model.tokenize(req.q, prepend_bos=False).ids
            if not token_ids:
                raise invalid("q", "is empty: give a token")
            scores = dashboards.token_scores(entry, token_ids)
        else:
            ids = (await self.limits.token_ids(model, "q", req.q, None, prepend_bos=True)).ids
            if len(ids) < 2:
                raise invalid("q", "is empty: give a text snippet")
            job = Job(run=self._run_snippet_peaks, payload=SnippetJob(ids, entry), tokens=len(ids), deadline=deadline)
            with self.admission.admitted():
                peaks = await self.admission.submit(job)
            scores = dashboards.snippet_scores(entry, peaks)
        if req.by != "explanation":
            matched = scores > 0
        ranked = scores.argsort(descending=True, stable=True)
        ranked = ranked[matched[ranked]]
        first = (req.page - 1) * page_size
        shown = ranked[first : first + page_size]
        results = [{**summary, "score": float(scores[summary["feature"]])} for summary in dashboards.summaries(entry, shown, explained)]
        return schemas.SearchFeaturesResponse.model_validate({
            "dictionary": _ref(entry).model_dump(), "by": req.by, "total": int(ranked.numel()),
            "page": req.page, "page_size": page_size, "results": results,
        })

    def _like_feature(self, repository, entry: BoundDictionary, req: schemas.SearchFeaturesRequest):
        """by=feature: every feature of `entry` scored by its decoder cosine with feature q of dictionary `of`."""
        source = repository.get(req.of, field="of") if req.of is not None else entry
        if not req.q.strip().isdigit():
            raise invalid("q", f"by=feature takes a feature id of {source.ref}, got {req.q[:40]!r}")
        feature = int(req.q)
        if feature >= source.d_sae:
            raise invalid("q", f"feature {feature} is not a feature of {source.ref} (0 to {source.d_sae - 1})")
        if not compare.same_space(source, entry):
            raise invalid("of", f"{source.ref} and {entry.ref} do not write into one space (another model, hook or width): "
                                "their features cannot be matched by direction")
        return compare.cosine_to(source.sae.W_dec[feature], entry)

    def _run_snippet_peaks(self, jobs: list[Job]) -> list:
        job: SnippetJob = jobs[0].payload
        with torch.inference_mode():
            x = hook_activations(self.repository.model, [job.ids], [job.dictionary.hook])[0][0][1:]  # BOS is not part of the snippet
            return [job.dictionary.sae.encode(x).max(0).values]

    # ---- steering evaluation (service/steer_evals.py) ------------------------------------------------------------
    async def steer_eval(self, req: schemas.SteerEvalRequest, deadline: float | None = None, identity: Identity | None = None) -> schemas.SteerEvalResponse:
        """Steers the model (its generations), so it needs `steer` where keys are configured, as steered generation does."""
        if identity is not None:
            identity.require("steer", count=False)
        return await self.steer_evals.evaluate(req, deadline)

    # ---- access --------------------------------------------------------------------------------------------------
    def identify(self, authorizations: list[str]) -> Identity:
        """The caller, decided once per request from its Authorization headers (401 before any work); the
        adapters then require the operation's scope on it."""
        return self.access.identify(authorizations)

    @staticmethod
    def authorize_generate(identity: Identity, req: schemas.GenerateRequest) -> None:
        """Generation is a query (`read`, already counted against the key's rate); steering it needs `steer`."""
        if req.steering:
            identity.require("steer", count=False)

    # ---- dictionaries: list, reload, unload ----------------------------------------------------------------------
    async def dictionaries(self) -> schemas.DictionariesResponse:
        repository = self.loaded
        entries = list(repository)
        registry = self.settings.registry
        try:
            listing = await self._registry_io.run(lambda: list_dictionaries(registry), "available")
        except ArtifactUnreadable as exc:
            raise ServiceError(ErrorKind.UNAVAILABLE, f"available: {exc}; the serving dictionaries are unaffected") from None

        def evaluations_of(entry: BoundDictionary) -> list:
            m = entry.dictionary.manifest
            try:  # read on each call: a user may evaluate a serving version while it serves
                return read_evaluations(registry, m.name, m.version, entry.dictionary.manifest_sha256)
            except ArtifactError as exc:  # a damaged record hides the evaluations, not the dictionary
                log.warning("%s", exc)
                return []

        evaluations = await self._registry_io.run(lambda: [evaluations_of(e) for e in entries], "evaluations")
        explained = await self._registry_io.run(lambda: [self._explained(e) for e in entries], "explanations")
        infos = []
        for i, (entry, evaluated) in enumerate(zip(entries, evaluations)):
            m = entry.dictionary.manifest
            infos.append(schemas.DictionaryInfo(
                name=m.name, version=m.version, architecture=m.architecture, d_in=m.sae.d_in, d_sae=m.sae.d_sae,
                hook=entry.hook.name, model_name=m.model.name, model_checksum=repository.model.checksum, metrics=m.metrics,
                serving=True, default=i == 0, statistics=dashboards.has_statistics(entry),
                matryoshka_widths=list(m.sae.matryoshka_widths or ()),
                hook_out=entry.hook_out.name if entry.hook_out is not None else "", d_out=entry.sae.d_out,
                evaluations=[schemas.EvaluationInfo(**e.model_dump(exclude={"manifest_sha256"})) for e in evaluated],
                explained=explained[i].explained if explained[i] is not None else 0,
                explanation_median_score=explained[i].median_score if explained[i] is not None else None,
                source=(m.model_extra or {}).get("source") or {},
            ))
        available = [schemas.DictionaryRef(name=name, version=v) for name, versions in listing.items() for v in versions]
        return schemas.DictionariesResponse(dictionaries=infos, available=available)

    async def reload(self, req: schemas.ReloadRequest) -> schemas.ReloadResponse:
        """Load `name:version` beside the serving dictionaries, check it on the worker, then swap it in under its
        name (or add it); on any failure everything serving stays, the failure is counted, and the error says why."""
        self.loaded  # 503 while draining or not loaded, before waiting for the lock
        async with self._change_lock:
            repository = self.loaded
            try:
                candidate = await self._registry_io.run(lambda: repository.read(req.name, req.version), "name")
                if (problem := repository.changed_on_disk(candidate)) is not None:
                    raise ServiceError(ErrorKind.FAILED_PRECONDITION, problem, "version")
                await self.admission.submit(Job(run=self._check_width, payload=candidate))
                if (problem := self._unwatchable(candidate, repository.default.name)) is not None:
                    raise ServiceError(ErrorKind.FAILED_PRECONDITION, problem, "name")
            except BaseException:
                self.metrics.reloads.labels("failure").inc()
                raise
            previous = repository.put(candidate)
            self._exported(candidate)
            self.metrics.set_dictionaries(list(repository), repository.model.checksum)
            self.metrics.reloads.labels("success").inc()
        log.info("dictionary %s loaded%s", candidate.ref, f" in place of {previous.ref}" if previous else "")
        return schemas.ReloadResponse(dictionary=_ref(candidate), previous=None if previous is None else _ref(previous))

    async def unload(self, req: schemas.UnloadRequest) -> schemas.UnloadResponse:
        """Stop serving one dictionary (requests already running on it finish on it); the others serve on."""
        self.loaded
        async with self._change_lock:
            repository = self.loaded
            removed = repository.remove(req.name)
            self.metrics.monitor.remove_dictionary(removed.name)
            self.metrics.set_dictionaries(list(repository), repository.model.checksum)
        log.info("dictionary %s unloaded", removed.ref)
        return schemas.UnloadResponse(dictionary=_ref(removed), default=_ref(repository.default))

    def _check_width(self, jobs: list[Job]) -> list:
        entry: BoundDictionary = jobs[0].payload
        problem = width_mismatch(self.repository.model.lm, entry.hook, entry.sae.cfg.d_in, f"dictionary {entry.ref}")
        if problem is None and entry.hook_out is not None:
            problem = width_mismatch(self.repository.model.lm, entry.hook_out, entry.sae.d_out, f"the output of transcoder {entry.ref}")
        if problem is not None:
            raise ServiceError(ErrorKind.FAILED_PRECONDITION, problem, "name")
        return [None]

