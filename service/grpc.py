"""gRPC adapter: monosemantic.v1.FeatureService over service.engine, plus grpc.health.v1 and reflection.

Messages are converted to the same pydantic requests REST uses (service.schemas), so field rules, limits and
errors are the engine's on both transports; ServiceError maps to a status code through service.errors.
"""

from __future__ import annotations

import time
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Awaitable, Callable

import grpc
from google.protobuf.message import Message
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from pydantic import BaseModel, ValidationError

from monosemantic.v1 import feature_service_pb2 as pb
from monosemantic.wire import to_message, to_model
from monosemantic.v1 import feature_service_pb2_grpc as pb_grpc
from monosemantic import api as schemas
from service.engine import Engine
from service.errors import ServiceError, from_validation_errors

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["FeatureService"].full_name


def request_model(message: Message, model: type[BaseModel]) -> Any:
    try:
        return to_model(message, model)
    except ValidationError as exc:
        raise from_validation_errors(exc.errors()) from None


def _deadline(context: grpc.aio.ServicerContext) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


def _authorization(context: grpc.aio.ServicerContext) -> str | None:
    return dict(context.invocation_metadata() or ()).get("authorization")


async def _abort(context: grpc.aio.ServicerContext, exc: ServiceError) -> None:
    """The status code and message; the error kind and field also travel as trailing metadata."""
    trailing = [("error-kind", exc.kind.value)] + ([("error-field", exc.field)] if exc.field else [])
    await context.abort(exc.grpc_code, exc.message, trailing_metadata=tuple(trailing))


class FeatureService(pb_grpc.FeatureServiceServicer):
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.metrics = engine.metrics

    @asynccontextmanager
    async def _accounting(self, method: str, context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
        """Metrics for one call, and its failures turned into status codes (unary and streaming alike)."""
        started, code = time.perf_counter(), grpc.StatusCode.OK
        self.metrics.inflight.inc()
        try:
            yield
        except ServiceError as exc:
            code = exc.grpc_code
            await _abort(context, exc)
        except Exception:
            code = grpc.StatusCode.INTERNAL
            await context.abort(grpc.StatusCode.INTERNAL, "internal error; the server log has the details")
        finally:
            self.metrics.inflight.dec()
            self.metrics.requests.labels("grpc", method, code.name).inc()
            self.metrics.duration.labels("grpc", method).observe(time.perf_counter() - started)

    async def _observed(self, method: str, context: grpc.aio.ServicerContext, call: Callable[[], Awaitable[Message]], scope: str = "read") -> Message:
        async with self._accounting(method, context):
            self.engine.authorize(_authorization(context), scope)
            return await call()

    async def Activations(self, request: pb.ActivationsRequest, context: grpc.aio.ServicerContext) -> pb.ActivationsResponse:
        async def call() -> Message:
            req = request_model(request, schemas.ActivationsRequest)
            return to_message(await self.engine.activations(req, _deadline(context)), pb.ActivationsResponse)

        return await self._observed("activations", context, call)

    async def Attributions(self, request: pb.AttributionsRequest, context: grpc.aio.ServicerContext) -> pb.AttributionsResponse:
        async def call() -> Message:
            req = request_model(request, schemas.AttributionsRequest)
            return to_message(await self.engine.attributions(req, _deadline(context)), pb.AttributionsResponse)

        return await self._observed("attributions", context, call)

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext) -> pb.GenerateResponse:
        async def call() -> Message:
            req = request_model(request, schemas.GenerateRequest)
            self.engine.authorize_generate(_authorization(context), req)
            return to_message(await self.engine.generate(req, _deadline(context)), pb.GenerateResponse)

        return await self._observed("generate", context, call)

    async def GenerateStream(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext) -> AsyncIterator[pb.GenerateEvent]:
        events = None
        async with self._accounting("generate", context):
            try:
                self.engine.authorize(_authorization(context), "read")
                req = request_model(request, schemas.GenerateRequest)
                self.engine.authorize_generate(_authorization(context), req)
                events = self.engine.generate_events(req, _deadline(context))
                async for event in events:
                    if isinstance(event, schemas.GenerateResponse):
                        yield pb.GenerateEvent(done=to_message(event, pb.GenerateResponse))
                    else:
                        yield pb.GenerateEvent(token=to_message(event, pb.GeneratedToken))
            finally:
                if events is not None:
                    await events.aclose()  # a cancelled stream stops asking the worker for steps

    async def GetFeature(self, request: pb.GetFeatureRequest, context: grpc.aio.ServicerContext) -> pb.FeatureResponse:
        async def call() -> Message:
            return to_message(self.engine.feature(request.feature), pb.FeatureResponse)

        return await self._observed("feature", context, call)

    async def SearchFeatures(self, request: pb.SearchFeaturesRequest, context: grpc.aio.ServicerContext) -> pb.SearchFeaturesResponse:
        async def call() -> Message:
            req = request_model(request, schemas.SearchFeaturesRequest)
            return to_message(await self.engine.search_features(req, _deadline(context)), pb.SearchFeaturesResponse)

        return await self._observed("search_features", context, call)

    async def Observe(self, request: pb.ObserveRequest, context: grpc.aio.ServicerContext) -> pb.ObserveResponse:
        async def call() -> Message:
            req = request_model(request, schemas.ObserveRequest)
            return to_message(await self.engine.observe(req), pb.ObserveResponse)

        return await self._observed("observe", context, call)

    async def ListDictionaries(self, request: pb.ListDictionariesRequest, context: grpc.aio.ServicerContext) -> pb.ListDictionariesResponse:
        async def call() -> Message:
            return to_message(self.engine.dictionaries(), pb.ListDictionariesResponse)

        return await self._observed("dictionaries", context, call)

    async def Reload(self, request: pb.ReloadRequest, context: grpc.aio.ServicerContext) -> pb.ReloadResponse:
        async def call() -> Message:
            req = request_model(request, schemas.ReloadRequest)
            return to_message(await self.engine.reload(req), pb.ReloadResponse)

        return await self._observed("reload", context, call, scope="admin")


def build_server(
    engine: Engine, address: str, max_message_bytes: int, tls: tuple[bytes, bytes] | None = None
) -> tuple[grpc.aio.Server, health.aio.HealthServicer, int]:
    """The gRPC server (not started), its health servicer, and the bound port (address may end in :0).
    tls: (certificate chain, private key) in PEM."""
    options = [("grpc.max_receive_message_length", max_message_bytes), ("grpc.max_send_message_length", 64 << 20)]
    server = grpc.aio.server(options=options)
    pb_grpc.add_FeatureServiceServicer_to_server(FeatureService(engine), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    if tls is not None:
        port = server.add_secure_port(address, grpc.ssl_server_credentials([(tls[1], tls[0])]))
    else:
        port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"cannot bind the gRPC port at {address}")
    return server, health_servicer, port


async def set_serving(health_servicer: health.aio.HealthServicer, serving: bool) -> None:
    status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, status)
