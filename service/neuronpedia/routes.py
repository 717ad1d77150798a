"""The Neuronpedia-compatible inference API: a FastAPI application mounted at /neuronpedia beside /v1, so that a
self-hosted Neuronpedia (or any script using `neuronpedia-inference-client`, host `http://HOST:PORT/neuronpedia/v1`)
reads and steers the served dictionaries.

Who: the shared secret MONOSEMANTIC_NEURONPEDIA_SECRET, sent as `X-SECRET-KEY` (compared in constant time; it
carries the read and steer scopes). `GET /neuronpedia/health` needs none. Errors are Neuronpedia's shape,
`{"error": "…"}`: 400 for a request that cannot be served as asked (unknown model, source or set, a value out of
range), 422 for one that does not match the schema, 401 for a wrong or missing secret, and the service's own
statuses otherwise (413, 429 with Retry-After, 503, 504). Every call is counted in the request metrics as
protocol "neuronpedia" with its endpoint as the method; field spelling follows service/neuronpedia/schemas.py.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from typing import Any, AsyncIterator, Awaitable, Callable

import orjson
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError

from service.deadlines import TIMEOUT_HEADER, deadline_after, parse_timeout_header, within
from service.errors import ErrorKind, ServiceError, from_validation_errors, http_headers, outcome_code
from service.metrics import Call
from service.neuronpedia import schemas as np
from service.neuronpedia.operations import NeuronpediaOperations
from service.neuronpedia.sources import default_model_id
from service.neuronpedia.steering import FrameStream, NeuronpediaSteering

log = logging.getLogger("monosemantic.serve")

SECRET_HEADER = "x-secret-key"
# Neuronpedia answers a request it cannot serve as asked with 400, whatever the reason (service/errors.py maps
# these kinds to 404 and 409 on /v1).
_AS_BAD_REQUEST = {ErrorKind.INVALID_ARGUMENT, ErrorKind.NOT_FOUND, ErrorKind.FAILED_PRECONDITION, ErrorKind.BAD_REQUEST}


class SchemaError(Exception):
    """A body that does not match the endpoint's schema: 422, as FastAPI answers one in Neuronpedia's server."""

    def __init__(self, error: ServiceError) -> None:
        super().__init__(error.message)
        self.error = error


def status_of(exc: BaseException) -> int:
    if isinstance(exc, SchemaError):
        return 422
    if isinstance(exc, ServiceError):
        return 400 if exc.kind in _AS_BAD_REQUEST else exc.http_status
    if isinstance(exc, asyncio.CancelledError):
        return 499
    return 500


def error_response(exc: BaseException) -> JSONResponse:
    status = status_of(exc)
    if isinstance(exc, SchemaError):
        exc = exc.error
    if isinstance(exc, ServiceError):
        headers = {k: v for k, v in http_headers(exc).items() if k != "WWW-Authenticate"}  # the scheme is the header, not Bearer
        return JSONResponse({"error": exc.message}, status_code=status, headers=headers)
    return JSONResponse({"error": "internal error; the server log has the details"}, status_code=500)


def create_neuronpedia_app(engine: Any) -> FastAPI:
    settings = engine.settings
    secret = settings.neuronpedia_secret.get_secret_value().encode()
    ops = NeuronpediaOperations(engine, settings.neuronpedia_model_id or "")
    steering = NeuronpediaSteering(engine, ops)
    app = FastAPI(
        title="monosemantic: Neuronpedia inference API",
        version="1",
        summary="Neuronpedia's inference server API (neuronpedia-inference-client 1.10.1) over the served dictionaries.",
        openapi_url="/openapi.json",
    )

    def model_id() -> str:
        if not ops.model_id:  # known once the model is loaded
            ops.model_id = default_model_id(engine.loaded.model.lm.source)
        return ops.model_id

    def check_secret(request: Request) -> None:
        given = request.headers.get(SECRET_HEADER)
        if given is None or not hmac.compare_digest(given.encode("utf-8", "surrogatepass"), secret):
            raise ServiceError(ErrorKind.UNAUTHENTICATED, "Invalid or missing X-SECRET-KEY header")

    async def parse(request: Request, schema: type[BaseModel]) -> tuple[Any, bool]:
        try:
            body = orjson.loads(await request.body())
        except orjson.JSONDecodeError:
            raise ServiceError(ErrorKind.BAD_REQUEST, "body: cannot be parsed as JSON", "body") from None
        camel = np.caller_spells_camel(body, request.headers.get("user-agent"))
        if not isinstance(body, dict):
            raise SchemaError(ServiceError(ErrorKind.INVALID_ARGUMENT, "body: must be a JSON object", "body"))
        try:
            return schema.model_validate(body), camel
        except ValidationError as exc:
            raise SchemaError(from_validation_errors(exc.errors())) from None

    async def answer(request: Request, method: str, schema: type[BaseModel] | None,
                     operation: Callable[[Any, float], Awaitable[Any]]) -> Response:
        """One call: the secret, the body in either spelling, the operation within the request's deadline, and
        the answer (or the error) in the caller's spelling, counted once with the status sent."""
        accounting = engine.metrics.call("neuronpedia", method)
        try:
            check_secret(request)
            model_id()
            req, camel = (await parse(request, schema)) if schema is not None else (None, False)
            until = deadline_after(settings.request_timeout_s, parse_timeout_header(request.headers.get(TIMEOUT_HEADER)))
            result = await within(until, operation(req, until))
        except BaseException as exc:
            status = status_of(exc)
            accounting.finish(str(status))
            if status == 500:
                log.exception("neuronpedia %s: internal error", method)
            if isinstance(exc, (ServiceError, SchemaError)) or status == 500 and isinstance(exc, Exception):
                return error_response(exc)
            raise
        if isinstance(result, FrameStream):  # counted when the stream ends
            return StreamingResponse(_sse(result, camel, accounting), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        accounting.finish(outcome_code(None))
        return Response(orjson.dumps(np.spelled(result, camel)), media_type="application/json")

    def batch(one: Callable[..., Awaitable[dict]]) -> Callable[[Any, float], Awaitable[dict]]:
        """A -batch endpoint: each prompt as its own request, all submitted at once (the worker batches them into
        one forward), answered in order."""
        async def run(req: Any, until: float) -> dict:
            return {"results": list(await asyncio.gather(*(one(req, until, prompt, f"prompts[{i}]") for i, prompt in enumerate(req.prompts))))}
        return run

    def route(path: str, method: str, schema: type[BaseModel], operation: Callable[[Any, float], Awaitable[Any]]) -> None:
        async def endpoint(request: Request) -> Response:
            return await answer(request, method, schema, operation)
        endpoint.__doc__ = f"Neuronpedia `{path}` (body: {schema.__name__})."
        app.add_api_route(path, endpoint, methods=["POST"], name=method, tags=["neuronpedia"])

    async def sync(fn: Callable[[Any], Any], req: Any) -> Any:
        return fn(req)

    route("/v1/activation/all", "activation_all", np.ActivationAllRequest, lambda req, until: ops.activation_all(req, until))
    route("/v1/activation/all-batch", "activation_all_batch", np.ActivationAllBatchRequest,
          batch(lambda req, until, prompt, field: ops.activation_all(req, until, prompt, field)))
    route("/v1/activation/single", "activation_single", np.ActivationSingleRequest, lambda req, until: ops.activation_single(req, until, req.prompt))
    route("/v1/activation/single-batch", "activation_single_batch", np.ActivationSingleBatchRequest, batch(ops.activation_single))
    route("/v1/activation/topk-by-token", "activation_topk_by_token", np.ActivationTopkByTokenRequest,
          lambda req, until: ops.topk_by_token(req, until, req.prompt))
    route("/v1/activation/topk-by-token-batch", "activation_topk_by_token_batch", np.ActivationTopkByTokenBatchRequest, batch(ops.topk_by_token))
    route("/v1/activation/source", "activation_source", np.ActivationSourceRequest, lambda req, until: ops.activation_source(req, until))
    route("/v1/steer/completion", "steer_completion", np.SteerCompletionRequest, lambda req, until: steering.completion(req, until))
    route("/v1/tokenize", "tokenize", np.TokenizeRequest, lambda req, until: ops.tokenize(req))
    route("/v1/util/sae-vector", "sae_vector", np.SaeVectorRequest, lambda req, until: sync(ops.sae_vector, req))
    route("/v1/util/sae-topk-by-decoder-cossim", "sae_topk_by_decoder_cossim", np.TopkByDecoderCossimRequest,
          lambda req, until: sync(ops.topk_by_decoder_cossim, req))

    @app.get("/v1/capabilities", name="capabilities", tags=["neuronpedia"])
    async def capabilities(request: Request) -> Response:
        """What this server serves: the model id, the source sets and sources, limits and endpoints."""
        return await answer(request, "capabilities", None, lambda _req, _until: sync(lambda _: ops.capabilities(), None))

    @app.get("/health", tags=["neuronpedia"])
    async def health() -> dict:
        """Liveness, without a secret (readiness is the service's /readyz)."""
        return {"status": "healthy"}

    @app.exception_handler(Exception)
    async def _unexpected(_request: Request, exc: Exception) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(404)
    async def _no_route(_request: Request, _exc: Exception) -> JSONResponse:
        return JSONResponse({"error": "no such route"}, status_code=404)

    @app.exception_handler(405)
    async def _no_method(_request: Request, _exc: Exception) -> JSONResponse:
        return JSONResponse({"error": "method not allowed on this route"}, status_code=405)

    return app


async def _sse(stream: FrameStream, camel: bool, accounting: Call) -> AsyncIterator[bytes]:
    """`data:` frames, each the whole answer so far (Neuronpedia's stream); an error after the start is a last
    frame `{"error": …}` (the status is already 200). A client that leaves cancels this generator, which closes
    the frames: no further steps run. The call is counted when the stream ends (499: the client left)."""
    code = "499"
    try:
        frame = stream.first
        while True:
            yield b"data: " + orjson.dumps(np.spelled(frame, camel)) + b"\n\n"
            try:
                frame = await anext(stream.rest)
            except StopAsyncIteration:
                code = "200"
                return
    except ServiceError as exc:
        code = str(status_of(exc))
        yield b"data: " + orjson.dumps({"error": exc.message}) + b"\n\n"
    except Exception:
        code = "500"
        raise
    finally:
        accounting.finish(code)
        await stream.rest.aclose()
