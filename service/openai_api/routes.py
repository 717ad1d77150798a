"""The OpenAI-compatible API, mounted at /openai (the SDK's base_url is `http://HOST:PORT/openai/v1`): models,
completions and chat completions, steered through `extra_body`, over the engine's generation.

Who: `Authorization: Bearer KEY` with the service's keys and scopes, as on /v1 (`read` to complete, `steer` to
steer; an open server takes any key, as the SDK always sends one). Errors are OpenAI's shape, always:
`{"error": {"message", "type", "param", "code"}}`, with the statuses the SDK maps to its exception classes, and
`x-should-retry: false` on the 4xx a retry cannot mend (the SDK retries 408, 409, 429 and 5xx by itself). Every
call is counted in the request metrics as protocol "openai" with its route as the method.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from typing import Any, AsyncIterator, Callable

import orjson
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError

from monosemantic.generation import StepResult
from service.deadlines import TIMEOUT_HEADER, deadline_after, parse_timeout_header, within
from service.errors import ErrorKind, ServiceError, http_headers
from service.metrics import Call
from service.neuronpedia.sources import default_model_id
from service.openai_api import schemas as oa
from service.openai_api.choices import Choice, ChoiceRunner, Plan

log = logging.getLogger("monosemantic.serve")

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error", 404: "not_found_error",
          408: "timeout_error", 413: "invalid_request_error", 429: "rate_limit_error", 503: "server_error", 504: "timeout_error"}
_STATUS = {ErrorKind.INVALID_ARGUMENT: 400, ErrorKind.BAD_REQUEST: 400, ErrorKind.FAILED_PRECONDITION: 400}
_RETRYABLE = {408, 409, 429}


def status_of(exc: BaseException) -> int:
    if isinstance(exc, ServiceError):
        return _STATUS.get(exc.kind, exc.http_status)
    if isinstance(exc, asyncio.CancelledError):
        return 499
    return 500


def error_body(exc: BaseException) -> dict:
    status = status_of(exc)
    if not isinstance(exc, ServiceError):
        exc = ServiceError(ErrorKind.INTERNAL, "internal error; the server log has the details")
    return {"error": {"message": exc.message, "type": _TYPES.get(status, "server_error"), "param": exc.field,
                      "code": getattr(exc, "code", None) or exc.kind.value}}


def error_response(exc: BaseException) -> JSONResponse:
    status = status_of(exc)
    headers = {k: v for k, v in http_headers(exc).items()} if isinstance(exc, ServiceError) else {}
    if 400 <= status < 500 and status not in _RETRYABLE:
        headers["x-should-retry"] = "false"
    return JSONResponse(error_body(exc), status_code=status, headers=headers)


def _param(loc: tuple) -> str:
    """pydantic's location as OpenAI's `param`: `steering[0].feature`."""
    out = ""
    for part in loc:
        if part == "body" or (isinstance(part, str) and part.startswith(("int", "str", "list[", "function-", "literal["))):
            continue
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "body"


def schema_error(exc: ValidationError) -> ServiceError:
    first = exc.errors()[0]
    param = _param(first.get("loc", ()))
    message = first.get("msg", "invalid").removeprefix("Value error, ")
    named = message.split(":")[0]
    if param == "body" and named.isidentifier():  # a model-level check (schemas.py) names its field first
        param = named
    more = len(exc.errors()) - 1
    text = message if message.startswith(f"{param}:") else f"{param}: {message}"
    return ServiceError(ErrorKind.INVALID_ARGUMENT, text + (f" (and {more} more problems)" if more else ""), param)


def create_openai_app(engine: Any) -> FastAPI:
    settings = engine.settings
    runner = ChoiceRunner(engine)
    app = FastAPI(title="monosemantic: OpenAI-compatible API", version="1", openapi_url="/v1/openapi.json")
    state = {"model_id": settings.openai_model_id, "template": settings.chat_template_text()}

    def model_id() -> str:
        if not state["model_id"]:
            state["model_id"] = default_model_id(engine.loaded.model.lm.source)
        return state["model_id"]

    def identity(request: Request):
        authorizations = [v for k, v in request.headers.items() if k == "authorization"]
        found = engine.identify(authorizations)
        found.require("read")
        return found

    async def parse(request: Request, schema: type[BaseModel]) -> Any:
        try:
            body = orjson.loads(await request.body())
        except orjson.JSONDecodeError:
            raise ServiceError(ErrorKind.BAD_REQUEST, "body: cannot be parsed as JSON", "body") from None
        if not isinstance(body, dict):
            raise ServiceError(ErrorKind.BAD_REQUEST, "body: must be a JSON object", "body")
        try:
            return schema.model_validate(body)
        except ValidationError as exc:
            raise schema_error(exc) from None

    def check_model(name: str) -> None:
        if name != model_id():
            missing = ServiceError(ErrorKind.NOT_FOUND, f"model: {name!r} does not exist here; this server serves {model_id()!r}", "model")
            missing.code = "model_not_found"
            raise missing

    async def answer(request: Request, method: str, run: Callable[[float], Any]) -> Response:
        accounting = engine.metrics.call("openai", method)
        try:
            until = deadline_after(settings.request_timeout_s, parse_timeout_header(request.headers.get(TIMEOUT_HEADER)))
            result = await within(until, run(until))
        except BaseException as exc:
            status = status_of(exc)
            accounting.finish(str(status))
            if status == 500:
                log.exception("openai %s: internal error", method)
            if isinstance(exc, Exception):
                return error_response(exc)
            raise
        if isinstance(result, Stream):
            return StreamingResponse(_sse(result, accounting), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        accounting.finish("200")
        return Response(orjson.dumps(result), media_type="application/json")

    @app.get("/v1/models", name="models", tags=["openai"])
    async def models(request: Request) -> Response:
        async def run(_until: float) -> dict:
            identity(request)
            return {"object": "list", "data": [_model_card(model_id())]}
        return await answer(request, "models", run)

    @app.get("/v1/models/{name:path}", name="model", tags=["openai"])
    async def model(name: str, request: Request) -> Response:
        async def run(_until: float) -> dict:
            identity(request)
            check_model(name)
            return _model_card(name)
        return await answer(request, "models", run)

    async def completion_run(request: Request, until: float, chat: bool) -> Any:
        who = identity(request)
        req = await parse(request, oa.ChatRequest if chat else oa.CompletionRequest)
        check_model(req.model)
        if req.steering:
            who.require("steer", count=False)
        model_ = engine.loaded.model
        if chat:
            prompts = [await runner.chat_prompt(model_, req, state["template"])]
            logprobs = (req.top_logprobs or 1) if req.logprobs else 0
            limit, limit_field = req.limit(), "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        else:
            prompts = await runner.completion_prompts(model_, req)
            logprobs = req.logprobs or 0
            want_logprobs = req.logprobs is not None
            logprobs = max(logprobs, 1) if want_logprobs else 0
            limit, limit_field = req.max_tokens, "max_tokens"
        plan = await runner.plan(req, prompts, limit, limit_field, logprobs)
        shape = Shape(chat, req, plan, model_id(), engine.loaded.model)
        if req.stream:
            return Stream(shape, runner.steps(plan, until))
        async for choice, step in runner.steps(plan, until):
            shape.record(choice, step)
        return shape.whole()

    @app.post("/v1/completions", name="completions", tags=["openai"])
    async def completions(request: Request) -> Response:
        return await answer(request, "completions", lambda until: completion_run(request, until, chat=False))

    @app.post("/v1/chat/completions", name="chat_completions", tags=["openai"])
    async def chat_completions(request: Request) -> Response:
        return await answer(request, "chat_completions", lambda until: completion_run(request, until, chat=True))

    @app.exception_handler(Exception)
    async def _unexpected(_request: Request, exc: Exception) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(404)
    async def _no_route(_request: Request, _exc: Exception) -> JSONResponse:
        return error_response(ServiceError(ErrorKind.NOT_FOUND, "no such route"))

    @app.exception_handler(405)
    async def _no_method(_request: Request, _exc: Exception) -> JSONResponse:
        return error_response(ServiceError(ErrorKind.METHOD_NOT_ALLOWED, "method not allowed on this route"))

    return app


def _model_card(name: str) -> dict:
    return {"id": name, "object": "model", "created": 0, "owned_by": "monosemantic"}


class Shape:
    """One response in OpenAI's shape, filled in step by step: whole, or chunk by chunk."""

    def __init__(self, chat: bool, req: Any, plan: Plan, model_id: str, model: Any) -> None:
        self.chat, self.req, self.plan, self.model_id, self.model = chat, req, plan, model_id, model
        self.id = ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12)
        self.created = int(time.time())
        self.object = "chat.completion" if chat else "text_completion"
        self.tokens: dict[int, list[dict]] = {c.index: [] for c in plan.choices}  # monosemantic.tokens
        self.logprobs: dict[int, list] = {c.index: [] for c in plan.choices}
        self.offsets: dict[int, int] = {c.index: 0 for c in plan.choices}
        self.features = bool(req.features_top_k or req.steering)

    def record(self, choice: Choice, step: StepResult) -> dict:
        """Keep what the whole answer needs of one step; its logprobs entry (or None) for a chunk."""
        i = choice.index
        if self.features:
            self.tokens[i].append({
                "index": step.index, "id": step.token_id, "text": step.text,
                "top": [{"feature": f, "value": v} for f, v in step.top],
                "steered": [{"dictionary": s.dictionary, "feature": s.feature, "before": s.before, "after": s.after} for s in step.steered],
            })
        entry = None
        if step.logprobs is not None and step.token_id != self.model.eos_id:
            lp = step.logprobs
            text = self.model.token_text(lp.token_id)
            top = [(self.model.token_text(t), v) for t, v in lp.top]
            if self.chat:
                n = self.req.top_logprobs or 0
                entry = {"token": text, "logprob": lp.logprob, "bytes": list(text.encode()),
                         "top_logprobs": [{"token": t, "logprob": v, "bytes": list(t.encode())} for t, v in top[:n]]}
            else:
                entry = {"token": text, "logprob": lp.logprob, "top": dict(top[: self.req.logprobs]), "offset": self.offsets[i]}
                self.offsets[i] += len(text)
            self.logprobs[i].append(entry)
        return entry

    def _finish(self, choice: Choice) -> str:
        return "length" if choice.generation.finish_reason == "length" else "stop"

    def _logprobs_of(self, entries: list) -> dict | None:
        if self.chat:
            return {"content": entries} if self.req.logprobs else None
        if self.req.logprobs is None:
            return None
        return {"tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
                "top_logprobs": [e["top"] for e in entries], "text_offset": [e["offset"] for e in entries]}

    def _monosemantic(self, index: int) -> dict:
        r = self.plan.reader
        return {"dictionary": {"name": r.name, "version": r.version}, "steering": [s.model_dump() for s in self.plan.steering],
                "tokens": self.tokens[index]}

    def usage(self) -> dict:
        completion = sum(len(c.generation.generated) for c in self.plan.choices)
        return {"prompt_tokens": self.plan.prompt_tokens, "completion_tokens": completion, "total_tokens": self.plan.prompt_tokens + completion}

    def whole(self) -> dict:
        choices = []
        for c in self.plan.choices:
            body: dict[str, Any] = {"index": c.index, "finish_reason": self._finish(c), "logprobs": self._logprobs_of(self.logprobs[c.index])}
            if self.chat:
                body["message"] = {"role": "assistant", "content": c.generation.text}
            else:
                body["text"] = c.generation.text
            if self.features:
                body["monosemantic"] = self._monosemantic(c.index)
            choices.append(body)
        return {"id": self.id, "object": self.object, "created": self.created, "model": self.model_id, "choices": choices, "usage": self.usage()}

    def chunk(self, choices: list[dict], usage: dict | None = None) -> bytes:
        body = {"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion", "created": self.created,
                "model": self.model_id, "choices": choices}
        if usage is not None:
            body["usage"] = usage
        return b"data: " + orjson.dumps(body) + b"\n\n"

    def step_chunk(self, choice: Choice, step: StepResult) -> bytes | None:
        entry = self.record(choice, step)
        done = choice.generation.done
        if not step.text and not done and entry is None:
            return None
        body: dict[str, Any] = {"index": choice.index, "finish_reason": self._finish(choice) if done else None,
                                "logprobs": None if entry is None else self._logprobs_of([entry])}
        if self.chat:
            body["delta"] = {"content": step.text} if step.text else {}
        else:
            body["text"] = step.text
        if self.features:
            body["monosemantic"] = {"tokens": self.tokens[choice.index][-1:]}
        return self.chunk([body])


class Stream:
    def __init__(self, shape: Shape, steps: AsyncIterator) -> None:
        self.shape, self.steps = shape, steps


async def _sse(stream: Stream, accounting: Call) -> AsyncIterator[bytes]:
    """The SDK's stream: chat's first chunk the role, a chunk per token, the finish_reason in each choice's last,
    the usage chunk when asked, then `data: [DONE]`; an error after the start is an in-band `{"error": …}` frame
    and `[DONE]`. A client that leaves cancels this, which closes the steps: generation stops."""
    shape, code = stream.shape, "499"
    try:
        if shape.chat:
            yield shape.chunk([{"index": c.index, "delta": {"role": "assistant", "content": ""}, "finish_reason": None, "logprobs": None}
                               for c in shape.plan.choices])
        async for choice, step in stream.steps:
            frame = shape.step_chunk(choice, step)
            if frame is not None:
                yield frame
        options = shape.req.stream_options
        if options is not None and options.include_usage:
            yield shape.chunk([], shape.usage())
        code = "200"
        yield b"data: [DONE]\n\n"
    except ServiceError as exc:
        code = str(status_of(exc))
        yield b"data: " + orjson.dumps(error_body(exc)) + b"\n\n"
        yield b"data: [DONE]\n\n"
    except Exception:
        code = "500"
        raise
    finally:
        accounting.finish(code)
        await stream.steps.aclose()
