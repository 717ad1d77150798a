"""REST adapter: FastAPI routes over service.engine, typed requests and responses, one error shape."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable, Literal

import orjson
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel

from monosemantic import api as schemas
from service.engine import Engine
from service.deadlines import TIMEOUT_HEADER, deadline_after, parse_timeout_header, within
from service.errors import ErrorKind, ServiceError, from_validation_errors, http_headers, outcome_code
from service.http_limits import BodySizeLimit, RequestLifecycle, send_error
from service.http_methods import ProbeMethods
from service.metrics import METHODS, Call
from starlette.routing import Match

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"description": description, "content": {"application/json": {"example": {"error": {"kind": kind, "message": "…", "field": "…"}}}}}
    for status, description, kind in [
        (400, "the body cannot be parsed as JSON", "bad_request"),
        (404, "an unknown id", "not_found"),
        (413, "the body is too large", "too_large"),
        (422, "a field is invalid or over a limit (the message names it)", "invalid_argument"),
        (429, "the request queue is full", "overloaded"),
        (503, "not ready or shutting down", "unavailable"),
        (504, "the request's deadline passed (MONOSEMANTIC_REQUEST_TIMEOUT_S or the client's X-Request-Timeout)", "deadline_exceeded"),
    ]
}


class AccessCheck:
    """ASGI middleware: every /v1 request needs a key with `read` (`admin` under /v1/admin) before its body is
    even parsed, so an anonymous caller learns nothing from validation errors. The caller's identity is decided
    here, once, from every Authorization header (two are refused), and kept in the request's state: generation
    with steering checks `steer` in its route, where the body is known, on that same identity."""

    def __init__(self, app: Any, engine: Engine, routes: list) -> None:
        self.app, self.engine, self.routes = app, engine, routes

    def method(self, scope: dict) -> str:
        """The operation a request addresses, by the route it matches (each route is named after its method in
        service.metrics.METHODS), so a refusal is counted where the same request, let in, would have been."""
        for route in self.routes:
            if route.matches(scope)[0] is Match.FULL:
                return route.name if route.name in METHODS else "other"
        return "other"

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        path = scope.get("path", "")
        if scope["type"] == "http" and (path.startswith("/v1/") or (path == "/metrics" and self.engine.settings.metrics_need_key)):
            authorizations = [v.decode("latin-1") for k, v in scope.get("headers") or () if k == b"authorization"]
            try:
                identity = self.engine.identify(authorizations)
                identity.require("admin" if path.startswith("/v1/admin/") else "read")
            except ServiceError as exc:
                self.engine.metrics.call("rest", self.method(scope)).finish(outcome_code(exc))
                return await send_error(send, exc)
            scope.setdefault("state", {})["identity"] = identity
        await self.app(scope, receive, send)


def build_asgi(engine: Engine) -> Any:
    """The whole REST application as the server runs it: the routes inside access, body-size and disconnect
    handling, and HEAD / OPTIONS for every route."""
    app = create_app(engine)
    return RequestLifecycle(ProbeMethods(AccessCheck(BodySizeLimit(app, engine.settings.max_body_bytes), engine, app.router.routes), app.router.routes))


def create_app(engine: Engine) -> FastAPI:
    metrics = engine.metrics
    app = FastAPI(
        title="monosemantic",
        version="1",
        summary="Sparse-autoencoder features of a language model: activations, attributions, steered generation.",
        responses=ERROR_RESPONSES,
    )

    def error_response(exc: ServiceError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.http_status, headers=http_headers(exc))

    @app.exception_handler(ServiceError)
    async def _service_error(_request: Request, exc: ServiceError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(from_validation_errors(exc.errors()))

    @app.exception_handler(HTTPException)
    async def _http_refusal(_request: Request, exc: HTTPException) -> JSONResponse:
        # Starlette's own refusals (an unknown route or method, a body FastAPI cannot parse, such as JSON nested
        # deeper than the decoder's recursion limit) in the one error shape instead of {"detail": …}.
        kind = {404: ErrorKind.NOT_FOUND, 405: ErrorKind.METHOD_NOT_ALLOWED}.get(exc.status_code, ErrorKind.BAD_REQUEST)
        if kind is ErrorKind.BAD_REQUEST:
            error = ServiceError(kind, "body: cannot be parsed as JSON", "body")
        else:
            error = ServiceError(kind, "no such route" if kind is ErrorKind.NOT_FOUND else "method not allowed on this route")
        response = error_response(error)
        if exc.headers:
            response.headers.update(exc.headers)
        return response

    @app.exception_handler(ClientDisconnect)
    async def _gone(_request: Request, _exc: ClientDisconnect) -> Response:
        return Response(status_code=499)  # nobody reads it: the client left while sending its body

    @app.exception_handler(Exception)
    async def _unexpected(_request: Request, _exc: Exception) -> JSONResponse:
        return error_response(ServiceError(ErrorKind.INTERNAL, "internal error; the server log has the details"))

    def deadline(request: Request) -> float:
        """The request's deadline: the server's request timeout, or the client's X-Request-Timeout if shorter."""
        return deadline_after(engine.settings.request_timeout_s, parse_timeout_header(request.headers.get(TIMEOUT_HEADER)))

    async def observed(method: str, call: Callable[[], Awaitable[Any]], until: float | None = None, stream: bool = False) -> Any:
        """Run one operation with its metrics (service.metrics.Call): duration, and the outcome by status code
        (499: the client left); bounded by the request's deadline when one is given. With stream=True the answer
        is the stream's first event and the open Call, which the stream finishes at its end."""
        accounting = metrics.call("rest", method)
        try:
            first = await (call() if until is None else within(until, call()))
        except BaseException as exc:
            accounting.finish(outcome_code(exc))
            raise
        if stream:
            return first, accounting
        accounting.finish(outcome_code(None))
        return first

    if engine.settings.neuronpedia_secret is not None:
        from service.neuronpedia.routes import create_neuronpedia_app

        app.mount("/neuronpedia", create_neuronpedia_app(engine), name="neuronpedia")
    from service.openai_api.routes import create_openai_app

    app.mount("/openai", create_openai_app(engine), name="openai")

    static = Path(__file__).resolve().parent / "static"
    app.mount("/static", StaticFiles(directory=static), name="static")

    @app.get("/", include_in_schema=False)
    async def browser() -> FileResponse:
        """The web feature browser (static files shipped in the package; works offline)."""
        return FileResponse(static / "index.html")

    @app.get("/healthz", tags=["health"])
    async def healthz() -> dict:
        """The process is up and its event loop answers."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"], responses={503: ERROR_RESPONSES[503]})
    async def readyz() -> Response:
        """The model and every configured dictionary are loaded and the server is not draining."""
        if engine.ready:
            return JSONResponse({"status": "ready"})
        return error_response(ServiceError(ErrorKind.UNAVAILABLE, "not ready: loading or shutting down"))

    @app.get("/metrics", tags=["health"], response_class=PlainTextResponse)
    async def prometheus() -> Response:
        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/activations", response_model=schemas.ActivationsResponse, tags=["features"])
    async def activations(req: schemas.ActivationsRequest, request: Request) -> Response:
        """Per-token top-k features, L0 and reconstruction error of a text or a list of token ids."""
        until = deadline(request)
        return _json(await observed("activations", lambda: engine.activations(req, until), until))

    @app.post("/v1/attributions", response_model=schemas.AttributionsResponse, tags=["features"])
    async def attributions(req: schemas.AttributionsRequest, request: Request) -> Response:
        """Which features drive the target logit (or logit difference) at a position."""
        until = deadline(request)
        return _json(await observed("attributions", lambda: engine.attributions(req, until), until))

    @app.post(
        "/v1/generate",
        response_model=schemas.GenerateResponse,
        tags=["generate"],
        responses={200: {"content": {"text/event-stream": {"description": "with stream: true, events `token` (GeneratedToken) then `done` (GenerateResponse)"}}}},
    )
    async def generate(req: schemas.GenerateRequest, request: Request) -> Any:
        """Feature-steered generation; with `stream: true`, server-sent events token by token. Steering needs a key
        with the `steer` scope when keys are configured."""
        until = deadline(request)
        events = engine.generate_events(req, until) if req.stream else None

        async def start() -> Any:
            # One request, counted once: the steer check on the identity AccessCheck decided, then the whole
            # answer or (streaming) its first event, pulled before answering 200 so that a bad request still gets
            # its 4xx status. The rest of a stream is bounded by its jobs' deadline (an `error` event).
            engine.authorize_generate(request.state.identity, req)
            return await (anext(events) if events is not None else engine.generate(req, until))

        if not req.stream:
            return _json(await observed("generate", start, until))
        first, accounting = await observed("generate", start, until, stream=True)
        return StreamingResponse(_sse(first, events, accounting), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @app.post("/v1/steer-eval", response_model=schemas.SteerEvalResponse, tags=["features"], responses={409: {"description": "the feature never fires on the text and has no statistics"}})
    async def steer_eval(req: schemas.SteerEvalRequest, request: Request) -> Response:
        """Steering curves of one feature: for clamp, add and a difference-in-means baseline over a range of strengths,
        the effect (its reading on steered continuations, its promoted tokens' probability) against the cost (KL from
        the unsteered model, loss), and each method's best strength within each KL budget. Cached per dictionary version.
        It steers the model, so it needs a key with the `steer` scope when keys are configured."""
        until = deadline(request)
        return _json(await observed("steer_eval", lambda: engine.steer_eval(req, until, request.state.identity), until))

    @app.get("/v1/features", response_model=schemas.ListFeaturesResponse, tags=["features"], responses={409: {"description": "the dictionary has no feature statistics"}})
    async def list_features(
        dictionary: str | None = Query(None, description=schemas.DICTIONARY_FIELD),
        order: Literal["density", "label", "id", "random"] = "density",
        page: int = Query(1, ge=1),
        page_size: int = Query(20, ge=1),
        seed: int | None = Query(None, ge=0, le=2**63 - 1),
        below: int | None = Query(None, ge=1, description="only features whose id is below this (a Matryoshka prefix's width)"),
    ) -> Response:
        """A dictionary's features in a browsing order: by density, by label, by id, or a random sample of live ones;
        `below` keeps a leading block (a Matryoshka prefix)."""
        def call() -> Any:
            req = _query(schemas.ListFeaturesRequest, dictionary=dictionary, order=order, page=page, page_size=page_size, seed=seed,
                         below=below)
            return engine.list_features(req)

        return _json(await observed("list_features", _as_async(call)))

    @app.get("/v1/features/search", response_model=schemas.SearchFeaturesResponse, tags=["features"], responses={409: {"description": "the dictionary has no feature statistics"}})
    async def search_features(
        request: Request,
        q: str = Query(description="a token (by=token), a text snippet (by=snippet), a feature id of dictionary `of` (by=feature), "
                                   "or words an explanation contains (by=explanation)"),
        by: schemas.SearchBy = "snippet",
        page: int = Query(1, ge=1),
        page_size: int = Query(20, ge=1),
        dictionary: str | None = Query(None, description=schemas.DICTIONARY_FIELD),
        of: str | None = Query(None, description="by=feature: the loaded dictionary whose feature q is (default: the one searched)"),
    ) -> Response:
        """Features by a token (their top examples peak on it, or they raise its logit), by a snippet (ranked by
        their activation on it relative to their own max), by a feature of another loaded dictionary at the same
        hook (ranked by decoder cosine with it), or by the words of their explanations (best-scoring first)."""
        until = deadline(request)

        async def call() -> Any:
            req = _query(schemas.SearchFeaturesRequest, q=q, by=by, page=page, page_size=page_size, dictionary=dictionary, of=of)
            return await engine.search_features(req, until)

        return _json(await observed("search_features", call, until))

    @app.get("/v1/features/{feature}", response_model=schemas.FeatureResponse, tags=["features"], responses={409: {"description": "the dictionary has no feature statistics"}})
    async def feature(feature: int, dictionary: str | None = Query(None, description=schemas.DICTIONARY_FIELD)) -> Response:
        """One feature's dashboard: density, activation histogram, top and quantile examples, logit effects,
        neighbours and label."""
        return _json(await observed("feature", _as_async(lambda: engine.feature(feature, dictionary))))

    @app.post("/v1/observe", response_model=schemas.ObserveResponse, status_code=202, tags=["monitoring"])
    async def observe(req: schemas.ObserveRequest, request: Request) -> Response:
        """Texts for feature monitoring alone (watched features' Prometheus series): accepted at once with 202,
        read in the background in batches with other work."""
        result = await observed("observe", lambda: engine.observe(req, request.state.identity))
        return Response(result.model_dump_json(), status_code=202, media_type="application/json")

    @app.get("/v1/dictionaries", response_model=schemas.DictionariesResponse, tags=["dictionaries"])
    async def dictionaries() -> schemas.DictionariesResponse:
        """Every loaded dictionary (name, version, metrics, hook, model; the default first) and the versions available to load."""
        return await observed("dictionaries", engine.dictionaries)

    @app.post("/v1/admin/reload", response_model=schemas.ReloadResponse, tags=["dictionaries"], responses={401: {"description": "no admin key given"}, 403: {"description": "wrong key, or admin disabled"}, 409: {"description": "the version cannot serve this model (corrupted, another model, another width)"}})
    async def reload(req: schemas.ReloadRequest) -> schemas.ReloadResponse:
        """Load a dictionary version beside the serving ones, then swap it in under its name (or add it when the name
        is not loaded); a failure leaves everything serving as it was. Needs a key with the `admin` scope (AccessCheck)."""
        return await observed("reload", lambda: engine.reload(req))

    @app.post("/v1/admin/unload", response_model=schemas.UnloadResponse, tags=["dictionaries"], responses={401: {"description": "no admin key given"}, 403: {"description": "wrong key, or admin disabled"}, 404: {"description": "the name is not loaded"}, 409: {"description": "it is the only loaded dictionary"}})
    async def unload(req: schemas.UnloadRequest) -> schemas.UnloadResponse:
        """Stop serving one dictionary; the others serve on. Needs the `admin` scope."""
        return await observed("unload", lambda: engine.unload(req))

    return app


def _json(response: BaseModel | dict[str, Any]) -> Response:
    """A response model serialised by pydantic-core directly (FastAPI would validate it once more first), or the
    engine's plain-dict form of one (activations) by orjson."""
    if isinstance(response, BaseModel):
        return Response(response.model_dump_json(), media_type="application/json")
    return Response(orjson.dumps(response), media_type="application/json")


def _query(model: type[BaseModel], **fields: Any) -> Any:
    """A request model from query parameters, refused in the one error shape."""
    try:
        return model(**fields)
    except ValidationError as exc:
        raise from_validation_errors(exc.errors()) from None


def _as_async(fn: Callable[[], Any]) -> Callable[[], Awaitable[Any]]:
    async def call() -> Any:
        return fn()

    return call


def _event(name: str, model: Any) -> str:
    return f"event: {name}\ndata: {model.model_dump_json()}\n\n"


async def _sse(first: Any, events: AsyncIterator[Any], accounting: Call) -> AsyncIterator[str]:
    """token … done; an error after the stream started is sent as an `error` event (the status is already 200).
    A client that disconnects cancels this generator, which closes `events`: no further steps are run. The call
    is accounted to its end: its code is 200, the error's status, or 499 for a client that left."""
    code = "499"  # until the stream ends by itself
    try:
        event = first
        while True:
            yield _event("done" if isinstance(event, schemas.GenerateResponse) else "token", event)
            if isinstance(event, schemas.GenerateResponse):
                code = "200"
                return
            event = await anext(events)
    except ServiceError as exc:
        code = str(exc.http_status)
        yield f"event: error\ndata: {json.dumps(exc.body())}\n\n"
    except Exception:
        code = "500"
        raise
    finally:
        accounting.finish(code)
        await events.aclose()
