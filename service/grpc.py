"""gRPC adapter: monosemantic.v1.FeatureService over service.engine, plus grpc.health.v1 and reflection.

Messages are converted to the same pydantic requests REST uses (monosemantic/api.py), so field rules, limits and
errors are the engine's on both transports; ServiceError maps to a status code through service.errors.
"""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, AsyncIterator, Awaitable, Callable, NamedTuple

import grpc
from google.protobuf import message_factory
from google.protobuf.message import DecodeError, Message
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from pydantic import BaseModel, ValidationError

from monosemantic.v1 import feature_service_pb2 as pb
from monosemantic.wire import to_message, to_model
from monosemantic.v1 import feature_service_pb2_grpc as pb_grpc
from monosemantic import api as schemas
from service.access import Identity
from service.deadlines import deadline_after, within
from service.engine import Engine
from service.errors import ErrorKind, ServiceError, from_validation_errors, invalid, outcome_code, retry_after_s

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["FeatureService"].full_name


@dataclass(frozen=True)
class Undecodable:
    """What a request's bytes decoded to when they are not a message of its type (invalid UTF-8 in a string
    field, garbage, another message): refused with INVALID_ARGUMENT and counted, like every bad request, where
    grpcio's own deserializer failure would answer UNKNOWN before any of our code ran."""

    type_name: str
    reason: str


def _deserializer(message_class: type[Message]) -> Callable[[bytes], Message | Undecodable]:
    def decode(data: bytes) -> Message | Undecodable:
        try:
            return message_class.FromString(data)
        except DecodeError as exc:
            return Undecodable(message_class.DESCRIPTOR.full_name, str(exc)[:200])

    return decode


def method_handlers(servicer: "FeatureService") -> dict[str, grpc.RpcMethodHandler]:
    """FeatureService's handlers, built from the proto's descriptor as the generated add_…_to_server does, but
    with deserializers that never raise."""
    handlers = {}
    for method in pb.DESCRIPTOR.services_by_name["FeatureService"].methods:
        make = grpc.unary_stream_rpc_method_handler if method.server_streaming else grpc.unary_unary_rpc_method_handler
        handlers[method.name] = make(
            getattr(servicer, method.name),
            request_deserializer=_deserializer(message_factory.GetMessageClass(method.input_type)),
            response_serializer=message_factory.GetMessageClass(method.output_type).SerializeToString,
        )
    return handlers


def request_model(message: Message, model: type[BaseModel]) -> Any:
    try:
        return to_model(message, model)
    except ValidationError as exc:
        raise from_validation_errors(exc.errors()) from None


def _authorizations(context: grpc.aio.ServicerContext) -> list[str]:
    return [value for key, value in context.invocation_metadata() or () if key == "authorization"]


async def _abort(context: grpc.aio.ServicerContext, exc: ServiceError) -> None:
    """The status code and message; the error kind and field also travel as trailing metadata."""
    trailing = [("error-kind", exc.kind.value)] + ([("error-field", exc.field)] if exc.field else [])
    if exc.kind is ErrorKind.OVERLOADED:  # gRPC's retry pushback (gRFC A6): honoured by clients' retry policies
        trailing.append(("grpc-retry-pushback-ms", str(1000 * retry_after_s(exc))))
    await context.abort(exc.grpc_code, exc.message, trailing_metadata=tuple(trailing))


class Rpc(NamedTuple):
    """One unary method: its name in the metrics, the request model its message is validated as (None: the message's
    own fields are enough), the engine call, the response message, and the scope it needs."""

    method: str
    request: type[BaseModel] | None
    call: Callable[[Engine, Any, Message, Identity, float], Awaitable[Any]]
    response: type[Message]
    scope: str = "read"


def _optional(message: Message, name: str) -> Any:
    return getattr(message, name) if message.HasField(name) else None


async def _generate(engine: Engine, req: schemas.GenerateRequest, _m: Message, identity: Identity, deadline: float) -> Any:
    engine.authorize_generate(identity, req)
    return await engine.generate(req, deadline)


async def _feature(engine: Engine, _req: None, message: Message, _i: Identity, _d: float) -> Any:
    return engine.feature(message.feature, _optional(message, "dictionary"))


async def _list_features(engine: Engine, req: schemas.ListFeaturesRequest, _m: Message, _i: Identity, _d: float) -> Any:
    return engine.list_features(req)


async def _observe(engine: Engine, req: schemas.ObserveRequest, _m: Message, identity: Identity, _d: float) -> Any:
    return await engine.observe(req, identity)


async def _dictionaries(engine: Engine, _req: None, _m: Message, _i: Identity, _d: float) -> Any:
    return await engine.dictionaries()


UNARY: dict[str, Rpc] = {
    "Activations": Rpc("activations", schemas.ActivationsRequest, lambda e, r, m, i, d: e.activations(r, d), pb.ActivationsResponse),
    "Attributions": Rpc("attributions", schemas.AttributionsRequest, lambda e, r, m, i, d: e.attributions(r, d), pb.AttributionsResponse),
    "Generate": Rpc("generate", schemas.GenerateRequest, _generate, pb.GenerateResponse),
    "GetFeature": Rpc("feature", None, _feature, pb.FeatureResponse),
    "SearchFeatures": Rpc("search_features", schemas.SearchFeaturesRequest, lambda e, r, m, i, d: e.search_features(r, d), pb.SearchFeaturesResponse),
    "ListFeatures": Rpc("list_features", schemas.ListFeaturesRequest, _list_features, pb.ListFeaturesResponse),
    "SteerEval": Rpc("steer_eval", schemas.SteerEvalRequest, lambda e, r, m, i, d: e.steer_eval(r, d, i), pb.SteerEvalResponse),
    "Observe": Rpc("observe", schemas.ObserveRequest, _observe, pb.ObserveResponse),
    "ListDictionaries": Rpc("dictionaries", None, _dictionaries, pb.ListDictionariesResponse),
    "Reload": Rpc("reload", schemas.ReloadRequest, lambda e, r, m, i, d: e.reload(r), pb.ReloadResponse, "admin"),
    "Unload": Rpc("unload", schemas.UnloadRequest, lambda e, r, m, i, d: e.unload(r), pb.UnloadResponse, "admin"),
}


class FeatureService(pb_grpc.FeatureServiceServicer):
    """Every unary method from UNARY through one path (identity, scope, validation, deadline, accounting, status);
    the streaming one beside it."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.metrics = engine.metrics
        for name, rpc in UNARY.items():
            setattr(self, name, self._unary(rpc))

    def _deadline(self, context: grpc.aio.ServicerContext) -> float:
        """The client's deadline, or the server's request timeout when that is sooner (or the client set none)."""
        return deadline_after(self.engine.settings.request_timeout_s, context.time_remaining())

    @asynccontextmanager
    async def _accounting(self, method: str, context: grpc.aio.ServicerContext, request: Message | Undecodable, scope: str = "read") -> AsyncIterator[Identity]:
        """One call's identity (its scope required), metrics, and failures turned into status codes (unary and
        streaming alike); the metrics' code is service.errors.outcome_code's, as REST's."""
        accounting, failure = self.metrics.call("grpc", method), None
        try:
            identity = self.engine.identify(_authorizations(context))
            identity.require(scope)
            if isinstance(request, Undecodable):
                raise invalid("request", f"cannot be decoded as {request.type_name} ({request.reason})")
            yield identity
        except ServiceError as exc:
            failure = exc
            await _abort(context, exc)
        except asyncio.CancelledError as exc:  # the client cancelled, or its deadline passed
            failure = exc
            raise
        except Exception as exc:
            failure = exc
            await context.abort(grpc.StatusCode.INTERNAL, "internal error; the server log has the details")
        finally:
            accounting.finish(outcome_code(failure))

    def _unary(self, rpc: Rpc) -> Callable[[Message, grpc.aio.ServicerContext], Awaitable[Message]]:
        async def handle(request: Message, context: grpc.aio.ServicerContext) -> Message:
            deadline = self._deadline(context)
            async with self._accounting(rpc.method, context, request, rpc.scope) as identity:
                async def run() -> Message:
                    req = None if rpc.request is None else request_model(request, rpc.request)
                    return to_message(await rpc.call(self.engine, req, request, identity, deadline), rpc.response)

                return await within(deadline, run())

        return handle

    async def GenerateStream(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext) -> AsyncIterator[pb.GenerateEvent]:
        events = None
        async with self._accounting("generate", context, request) as identity:
            try:
                req = request_model(request, schemas.GenerateRequest)
                self.engine.authorize_generate(identity, req)
                events = self.engine.generate_events(req, self._deadline(context))
                async for event in events:
                    if isinstance(event, schemas.GenerateResponse):
                        yield pb.GenerateEvent(done=to_message(event, pb.GenerateResponse))
                    else:
                        yield pb.GenerateEvent(token=to_message(event, pb.GeneratedToken))
            finally:
                if events is not None:
                    await events.aclose()  # a cancelled stream stops asking the worker for steps


def build_server(
    engine: Engine, address: str, max_message_bytes: int, tls: tuple[bytes, bytes] | None = None
) -> tuple[grpc.aio.Server, health.aio.HealthServicer, int]:
    """The gRPC server (not started), its health servicer, and the bound port (address may end in :0).
    tls: (certificate chain, private key) in PEM."""
    # No SO_REUSEPORT (grpcio sets it by default): a second server on the same port must fail to start, not
    # silently take half of the connections while serving another dictionary.
    options = [("grpc.max_receive_message_length", max_message_bytes), ("grpc.max_send_message_length", 64 << 20), ("grpc.so_reuseport", 0)]
    server = grpc.aio.server(options=options)
    handlers = method_handlers(FeatureService(engine))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    try:
        if tls is not None:
            port = server.add_secure_port(address, grpc.ssl_server_credentials([(tls[1], tls[0])]))
        else:
            port = server.add_insecure_port(address)
    except RuntimeError:  # grpcio's "Failed to bind"
        port = 0
    if port == 0:
        raise OSError(f"cannot bind the gRPC port {address}: address already in use, or not permitted; another process may be serving there (setting MONOSEMANTIC_GRPC_PORT)")
    return server, health_servicer, port


async def set_serving(health_servicer: health.aio.HealthServicer, serving: bool) -> None:
    status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, status)
