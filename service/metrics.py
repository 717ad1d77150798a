"""Prometheus metrics of one server (its own registry), named by Prometheus conventions.

Label values come from fixed sets (protocol, method, code, reason) or from the loaded dictionaries (their names and
versions), never from user input, so the series count stays bounded however the service is used.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from monosemantic.bound import BoundDictionary
from service.bulk_histogram import BulkHistogram
from service.monitoring import FeatureMonitor

PROTOCOLS = ("rest", "grpc")
METHODS = ("activations", "attributions", "generate", "feature", "search_features", "list_features", "observe", "dictionaries", "steer_eval",
           "reload", "unload")
# The Neuronpedia-compatible API (service/neuronpedia/), counted as its own protocol under its own method names.
NEURONPEDIA_METHODS = ("activation_all", "activation_all_batch", "activation_single", "activation_single_batch",
                       "activation_topk_by_token", "activation_topk_by_token_batch", "activation_source", "steer_completion",
                       "tokenize", "sae_vector", "sae_topk_by_decoder_cossim", "capabilities", "other")
# The OpenAI-compatible API (service/openai_api/), likewise.
OPENAI_METHODS = ("models", "completions", "chat_completions", "other")
# Every (protocol, method) label pair a request can be counted under: a fixed set.
METHODS_BY_PROTOCOL = {"rest": (*METHODS, "other"), "grpc": (*METHODS, "other"), "neuronpedia": NEURONPEDIA_METHODS, "openai": OPENAI_METHODS}
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("monosemantic_requests", "Requests answered, by protocol, method and status code.", ("protocol", "method", "code"), registry=r)
        self.duration = Histogram("monosemantic_request_duration_seconds", "Time to answer a request.", ("protocol", "method"), buckets=LATENCY_BUCKETS, registry=r)
        self.inflight = Gauge("monosemantic_inflight_requests", "Requests being answered now.", registry=r)
        self.queue_depth = Gauge("monosemantic_queue_depth", "Jobs waiting for the engine's worker.", registry=r)
        self.queue_capacity = Gauge("monosemantic_queue_capacity", "Waiting jobs beyond which requests are refused (MONOSEMANTIC_MAX_QUEUE).", registry=r)
        self.ready = Gauge("monosemantic_ready", "1 when the model and dictionary are loaded and the server is not draining (as /readyz).", registry=r)
        self.rejected = Counter("monosemantic_rejected_requests", "Requests refused before running, by reason.", ("reason",), registry=r)
        self.batch_requests = Histogram("monosemantic_batch_requests", "Requests per forward (dynamic batching).", buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=r)
        self.batch_tokens = Histogram("monosemantic_batch_tokens", "Tokens per forward.", buckets=(16, 64, 256, 1024, 4096, 16384), registry=r)
        self.tokens_processed = Counter("monosemantic_tokens_processed", "Tokens read by a dictionary in activations and attributions.", ("dictionary",), registry=r)
        self.tokens_generated = Counter("monosemantic_tokens_generated", "Tokens generated.", registry=r)
        self.generation_rows = Histogram("monosemantic_generation_batch_rows", "Generations stepped together in one decode step (continuous batching).",
                                         buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=r)
        self.generations_running = Gauge("monosemantic_generations_running", "Generations running or waiting to join the decode batch.", registry=r)
        self.l0 = BulkHistogram("monosemantic_active_features_per_token", "Features active per served token (L0).", ("dictionary",), buckets=(0, 1, 2, 5, 10, 20, 50, 100, 200, 500), registry=r)
        self.dictionary_info = Gauge("monosemantic_dictionary_info", "A loaded dictionary (value 1; default=\"true\" for the default one).", ("name", "version", "architecture", "model_checksum", "hook", "default"), registry=r)
        self.dictionary_loaded = Gauge("monosemantic_dictionary_loaded_timestamp_seconds", "When a loaded dictionary was loaded.", ("name",), registry=r)
        self.reloads = Counter("monosemantic_dictionary_reloads", "Dictionary reloads, by result.", ("result",), registry=r)
        self.key_reloads = Counter("monosemantic_api_keys_reloads", "Re-reads of MONOSEMANTIC_API_KEYS_FILE after it changed (or SIGHUP), by result; a failure keeps the previous keys.", ("result",), registry=r)
        self.keys_loaded = Gauge("monosemantic_api_keys_loaded_timestamp_seconds", "When the keys in use were read.", registry=r)
        self.monitor = FeatureMonitor(r)
        self.observe_dropped = Counter("monosemantic_observe_dropped", "Observed texts accepted but not read (engine error or shutdown).", registry=r)
        for reason in ("queue_full", "queue_wait", "deadline", "shutting_down"):
            self.rejected.labels(reason)
        for result in ("success", "failure"):
            self.reloads.labels(result)
            self.key_reloads.labels(result)
        self.keys_loaded.set_to_current_time()
        for protocol in PROTOCOLS:
            for method in METHODS:
                self.duration.labels(protocol, method)
        for protocol in ("neuronpedia", "openai"):
            for method in METHODS_BY_PROTOCOL[protocol]:
                self.duration.labels(protocol, method)

    def call(self, protocol: str, method: str) -> "Call":
        return Call(self, protocol, method)

    def set_dictionaries(self, loaded: list[BoundDictionary], model_checksum: str) -> None:
        """The info series describe exactly what is loaded now (the first is the default)."""
        self.dictionary_info.clear()
        self.dictionary_loaded.clear()
        for i, entry in enumerate(loaded):
            m = entry.dictionary.manifest
            self.dictionary_info.labels(m.name, str(m.version), m.architecture, model_checksum[:12], entry.hook.name, "true" if i == 0 else "false").set(1)
            self.dictionary_loaded.labels(m.name).set(entry.loaded_at)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class Call:
    """One call's metrics, from its start to its end, a stream's last event included: in flight while it runs,
    then its duration and its code. REST and gRPC both account through this; a REST stream once counted only up
    to its first event (in flight 0-1 with 32 streams running)."""

    __slots__ = ("metrics", "protocol", "method", "started", "finished")

    def __init__(self, metrics: Metrics, protocol: str, method: str) -> None:
        self.metrics, self.protocol, self.method = metrics, protocol, method
        self.started, self.finished = time.perf_counter(), False
        metrics.inflight.inc()

    def finish(self, code: str) -> None:
        if self.finished:
            return
        self.finished = True
        m = self.metrics
        m.inflight.dec()
        m.requests.labels(self.protocol, self.method, code).inc()
        m.duration.labels(self.protocol, self.method).observe(time.perf_counter() - self.started)
