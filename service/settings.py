"""Service settings: every flag of `monosemantic-serve` is also a MONOSEMANTIC_* environment variable."""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from monosemantic.errors import ConfigError
from monosemantic.shipped import REFERENCE_DICTIONARY, reference_registry_path


MAX_WATCHED_FEATURES = 64  # each watched feature adds a few series per dictionary version: keep them few


class WatchedFeature(BaseModel):
    dictionary: str | None = None  # its dictionary's name; None: the default (the first configured)
    id: int = Field(ge=0)
    name: str = Field("", max_length=64, pattern=r"^[A-Za-z0-9_.-]*$")

    def of(self, default: str) -> str:
        return self.dictionary or default


class ServiceSettings(BaseSettings):
    """Where to listen, what to load, and the limits every request is held to."""

    model_config = SettingsConfigDict(env_prefix="MONOSEMANTIC_", extra="forbid")

    host: str = "127.0.0.1"
    http_port: int = Field(8000, ge=0, le=65535)
    grpc_port: int = Field(50051, ge=0, le=65535)  # 0 picks a free port (tests)
    registry: Path = Field(default_factory=reference_registry_path)
    dictionary: str = REFERENCE_DICTIONARY  # NAME or NAME:VERSION (vN or N); no version means latest
    # Several at once: "A,B:3" (the first is the default of every operation); "all" adds every dictionary of the
    # registry bound to the loaded model (its latest version). Give this or `dictionary`, not both.
    dictionaries: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # HF directory (or hub id if online); None: the model the dictionary's manifest records, else the shipped one.
    model: str | None = None
    device: Literal["cpu", "cuda"] = "cpu"
    # The model's dtype: auto keeps the checkpoint's (a bf16 checkpoint is served in bf16, not widened to fp32 at twice
    # its size; monosemantic.lm.resolve_dtype); the activations are read in float32 either way.
    dtype: Literal["auto", "bfloat16", "float32"] = "auto"
    log_level: Literal["debug", "info", "warning", "error"] = "info"  # the startup line and reloads are info
    # The dtype of the activations readout's encoder matmul; auto: bfloat16 where this machine runs it faster than
    # float32 (monosemantic/precision.py has the measurements).
    sae_dtype: Literal["auto", "bfloat16", "float32"] = "auto"

    # Limits: each is named in the error a request gets when it goes past it.
    max_text_chars: int = Field(20_000, ge=1)
    max_tokens: int | None = Field(None, ge=1)  # None: the model's context length
    max_top_k: int = Field(100, ge=1)
    max_feature_ids: int = Field(256, ge=1)
    max_new_tokens: int = Field(256, ge=1)
    max_steering: int = Field(16, ge=1)
    max_stop_strings: int = Field(8, ge=1)
    max_page_size: int = Field(100, ge=1)
    max_body_bytes: int = Field(1 << 20, ge=1024)

    # Dynamic batching of activations requests: one forward for everything waiting, up to these bounds.
    max_batch_tokens: int = Field(8192, ge=1)
    max_batch_requests: int = Field(64, ge=1)  # 1 turns batching off
    max_wait_ms: float = Field(2.0, ge=0)
    # The share of those slots one request may hold (an observe takes one per window): 4 texts of 20k characters
    # once held 221 of 256.
    max_request_share: float = Field(0.25, gt=0, le=1)
    max_queue: int = Field(256, ge=1)  # requests admitted at once (waiting or running); more are refused at once (429 / RESOURCE_EXHAUSTED)
    # A request that would wait longer than this for the work queued ahead of it is refused at once (429 with
    # Retry-After: the predicted wait past the bound; service/batcher.py learns each kind of job's cost); 0: no bound.
    max_queue_wait_s: float = Field(2.0, ge=0)

    # Access (service/access.py): API keys with scopes from a JSON file (or a mounted Kubernetes Secret), and an
    # admin key. Clients send "Authorization: Bearer KEY" (gRPC metadata "authorization"). No key at all: the query
    # operations are open and admin is off.
    api_keys_file: Path | None = None
    # The keys file is re-read when it changes (checked this often) and on SIGHUP: a rotated Kubernetes Secret
    # takes effect without a restart. A file that fails to parse keeps the previous keys (logged, and counted in
    # monosemantic_api_keys_reloads_total{result="failure"}).
    api_keys_poll_s: float = Field(2.0, gt=0)
    admin_key: SecretStr | None = None
    # /metrics is open like /healthz (vLLM's convention: Prometheus scrapes it inside the cluster); true makes it
    # need a key with the `read` scope once keys exist (Prometheus: `authorization: {credentials: KEY}`).
    metrics_need_key: bool = False
    # The Neuronpedia-compatible API under /neuronpedia (service/neuronpedia/), on when its secret is given: clients
    # send it as X-SECRET-KEY, and it carries the read and steer scopes. The model id it answers to defaults to
    # the model directory's name.
    neuronpedia_secret: SecretStr | None = None
    neuronpedia_model_id: str | None = None
    # The OpenAI-compatible API under /openai/v1 (service/openai_api/), always on, behind the same keys as /v1: the
    # model id it answers to (default: the model directory's name), and a Jinja chat template for a model whose
    # tokenizer has none (a file; a request's own `chat_template` wins).
    openai_model_id: str | None = None
    chat_template: Path | None = None
    # TLS for both protocols when both files are given (PEM).
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None

    # Feature monitoring: "[DICTIONARY:]ID[:NAME],…" (e.g. 12,873:imports,attn-l3:40:quotes; no dictionary: the
    # default one). Every text the service reads (activations, observe) counts these features' firings into
    # Prometheus series labelled by dictionary and feature, never by user input.
    watch_features: Annotated[list[WatchedFeature], NoDecode] = Field(default_factory=list)
    max_observe_texts: int = Field(64, ge=1)

    shutdown_grace_s: float = Field(20.0, ge=0)
    # Every operation's answer is due within this (gRPC: or the client's deadline; REST: or its X-Request-Timeout
    # header, when shorter); past it, 504 / DEADLINE_EXCEEDED and the work is dropped.
    request_timeout_s: float = Field(120.0, gt=0)
    # Reading the registry while serving (listing it; loading a version for reload, hashing its files) must finish
    # within this, or the call fails and the old version serves on; a hung file system (or a FIFO in place of a
    # file) cannot block later reloads or shutdown (service/blocking_io.py).
    registry_timeout_s: float = Field(60.0, gt=0)
    # HTTP connections: a request must arrive whole within http_read_timeout_s of its first byte (408 otherwise),
    # an idle keep-alive connection is closed after http_keepalive_timeout_s, and beyond max_connections a new
    # connection is refused (503) and closed.
    http_read_timeout_s: float = Field(10.0, gt=0)
    http_keepalive_timeout_s: float = Field(5.0, gt=0)
    max_connections: int = Field(1024, ge=1)

    @field_validator("dictionary")
    @classmethod
    def _dictionary_reference(cls, value: str) -> str:
        from monosemantic.artifact import parse_reference

        parse_reference(value)  # raises ValueError with the reason
        return value

    @field_validator("dictionaries", mode="before")
    @classmethod
    def _split_dictionaries(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("dictionaries")
    @classmethod
    def _dictionary_references(cls, value: list[str]) -> list[str]:
        from monosemantic.artifact import parse_reference

        names = []
        for reference in value:
            if reference != "all":
                names.append(parse_reference(reference)[0])  # raises ValueError with the reason
        if len(set(names)) != len(names):
            raise ValueError("a dictionary is named twice; one version of each name serves at a time")
        return value

    @field_validator("watch_features", mode="before")
    @classmethod
    def _parse_watch_list(cls, value: object) -> object:
        if isinstance(value, str):
            entries = [part.strip() for part in value.split(",") if part.strip()]
            parsed = []
            for entry in entries:
                parts = [p.strip() for p in entry.split(":")]
                dictionary = None if parts[0].isdigit() else parts.pop(0)
                if not parts or not parts[0].isdigit() or len(parts) > 2:
                    raise ValueError(f"{entry!r} is not ID, ID:NAME, DICTIONARY:ID or DICTIONARY:ID:NAME")
                parsed.append({"dictionary": dictionary, "id": int(parts[0]), "name": parts[1] if len(parts) > 1 else ""})
            return parsed
        return value

    @model_validator(mode="after")
    def _tls_pair(self) -> "ServiceSettings":
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file: give both or neither")
        return self

    @model_validator(mode="after")
    def _watch_list_bounded(self) -> "ServiceSettings":
        if len(self.watch_features) > MAX_WATCHED_FEATURES:
            raise ValueError(f"watch_features: at most {MAX_WATCHED_FEATURES} features can be watched, got {len(self.watch_features)}")
        ids = [(w.dictionary, w.id) for w in self.watch_features]
        if len(set(ids)) != len(ids):
            raise ValueError("watch_features: a feature is listed twice")
        return self

    @model_validator(mode="after")
    def _one_way_to_name_dictionaries(self) -> "ServiceSettings":
        if self.dictionaries and "dictionary" in self.model_fields_set and self.dictionaries[0] != self.dictionary:
            raise ValueError("dictionary and dictionaries: give one (dictionaries=A,B lists several; its first is the default)")
        return self

    def configured_dictionaries(self) -> list[str]:
        """What to load, in order: `dictionaries`, else the one `dictionary`."""
        return list(self.dictionaries) or [self.dictionary]

    def chat_template_text(self) -> str | None:
        """The chat template file's text, read and checked before the model loads (None without one)."""
        if self.chat_template is None:
            return None
        try:
            return Path(self.chat_template).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
            raise ConfigError(f"MONOSEMANTIC_CHAT_TEMPLATE: cannot read {self.chat_template} ({reason})") from None

    def tls_pair(self) -> tuple[bytes, bytes] | None:
        """The PEM certificate chain and private key, read and checked to be a matching pair; None without TLS.
        Called before the model loads, so a wrong file stops startup at once with one line naming the setting
        (it used to surface after the load as ~100 lines of traceback ending "Failed to bind to address")."""
        if self.tls_cert_file is None or self.tls_key_file is None:
            return None
        pem = {}
        for setting, path in (("MONOSEMANTIC_TLS_CERT_FILE", self.tls_cert_file), ("MONOSEMANTIC_TLS_KEY_FILE", self.tls_key_file)):
            try:
                pem[setting] = Path(path).read_bytes()
            except OSError as exc:
                raise ConfigError(f"{setting}: cannot read {path} ({exc.strerror or type(exc).__name__})") from None
        try:
            ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(self.tls_cert_file, self.tls_key_file)
        except ssl.SSLError as exc:
            raise ConfigError(
                "MONOSEMANTIC_TLS_CERT_FILE / MONOSEMANTIC_TLS_KEY_FILE: not a PEM certificate and the private key that "
                f"matches it ({exc.reason or exc})"
            ) from None
        return pem["MONOSEMANTIC_TLS_CERT_FILE"], pem["MONOSEMANTIC_TLS_KEY_FILE"]
