"""The service's one error model: each kind of failure maps to one HTTP status and one gRPC code.

REST and gRPC adapters both translate a ServiceError with ERROR_TABLE, so a bad request gets the matching pair
on either transport. Messages name the field or setting at fault and never carry a path, a stack trace or an
address.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from enum import Enum

import grpc


class ErrorKind(str, Enum):
    INVALID_ARGUMENT = "invalid_argument"
    NOT_FOUND = "not_found"
    TOO_LARGE = "too_large"
    OVERLOADED = "overloaded"
    UNAVAILABLE = "unavailable"
    FAILED_PRECONDITION = "failed_precondition"
    UNAUTHENTICATED = "unauthenticated"
    PERMISSION_DENIED = "permission_denied"
    DEADLINE_EXCEEDED = "deadline_exceeded"
    # HTTP-level refusals before any operation runs (a body that is not JSON, two Authorization headers, a route
    # or method that does not exist): the same error shape as everything else.
    BAD_REQUEST = "bad_request"
    METHOD_NOT_ALLOWED = "method_not_allowed"
    TIMEOUT = "request_timeout"  # the client took too long to send its request
    INTERNAL = "internal"


@dataclass(frozen=True)
class ErrorMapping:
    http_status: int
    grpc_code: grpc.StatusCode


ERROR_TABLE: dict[ErrorKind, ErrorMapping] = {
    ErrorKind.INVALID_ARGUMENT: ErrorMapping(422, grpc.StatusCode.INVALID_ARGUMENT),
    ErrorKind.NOT_FOUND: ErrorMapping(404, grpc.StatusCode.NOT_FOUND),
    ErrorKind.TOO_LARGE: ErrorMapping(413, grpc.StatusCode.RESOURCE_EXHAUSTED),
    # RESOURCE_EXHAUSTED, not UNAVAILABLE: a full queue is not a broken server (gitaly MR 4470).
    ErrorKind.OVERLOADED: ErrorMapping(429, grpc.StatusCode.RESOURCE_EXHAUSTED),
    ErrorKind.UNAVAILABLE: ErrorMapping(503, grpc.StatusCode.UNAVAILABLE),
    ErrorKind.FAILED_PRECONDITION: ErrorMapping(409, grpc.StatusCode.FAILED_PRECONDITION),
    ErrorKind.UNAUTHENTICATED: ErrorMapping(401, grpc.StatusCode.UNAUTHENTICATED),
    ErrorKind.PERMISSION_DENIED: ErrorMapping(403, grpc.StatusCode.PERMISSION_DENIED),
    ErrorKind.DEADLINE_EXCEEDED: ErrorMapping(504, grpc.StatusCode.DEADLINE_EXCEEDED),
    ErrorKind.BAD_REQUEST: ErrorMapping(400, grpc.StatusCode.INVALID_ARGUMENT),
    ErrorKind.METHOD_NOT_ALLOWED: ErrorMapping(405, grpc.StatusCode.UNIMPLEMENTED),
    ErrorKind.TIMEOUT: ErrorMapping(408, grpc.StatusCode.DEADLINE_EXCEEDED),
    ErrorKind.INTERNAL: ErrorMapping(500, grpc.StatusCode.INTERNAL),
}


class ServiceError(Exception):
    """A failure with a message meant for the client; `field` names the request field or setting at fault."""

    def __init__(self, kind: ErrorKind, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.field = field

    @property
    def http_status(self) -> int:
        return ERROR_TABLE[self.kind].http_status

    @property
    def grpc_code(self) -> grpc.StatusCode:
        return ERROR_TABLE[self.kind].grpc_code

    def body(self) -> dict:
        error = {"kind": self.kind.value, "message": self.message}
        if self.field is not None:
            error["field"] = self.field
        return {"error": error}


def invalid(field: str, message: str) -> ServiceError:
    return ServiceError(ErrorKind.INVALID_ARGUMENT, f"{field}: {message}", field)


def not_found(field: str, message: str) -> ServiceError:
    return ServiceError(ErrorKind.NOT_FOUND, f"{field}: {message}", field)


def over_limit(field: str, value: int, limit: int, setting: str) -> ServiceError:
    return ServiceError(
        ErrorKind.INVALID_ARGUMENT,
        f"{field}: {value} is over the limit of {limit} (setting MONOSEMANTIC_{setting.upper()})",
        field,
    )


# A message names at most this many problems, then counts the rest: 1,000 bad steering entries once made a gRPC
# status message past the 16 KB metadata limit (the client saw RESOURCE_EXHAUSTED, a code it retries, without the
# error-kind trailer), and 150k bad feature ids a 13.5 MB REST error body.
MAX_PROBLEMS_NAMED = 5
MAX_PROBLEM_CHARS = 200  # one problem's text; pydantic quotes the input in some messages


def from_validation_errors(errors: list[dict]) -> ServiceError:
    """pydantic's error list → one INVALID_ARGUMENT naming the first bad fields (``steering.0.value: …``) and
    counting the others, so the message stays small whatever the request holds."""
    parts: dict[str, None] = {}
    fields = []
    for err in errors:
        # drop the "body" root of a REST request and the branch names pydantic adds inside a union (int | str)
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        loc = [p for p in loc if not p.startswith(("int", "str", "list[", "function-"))]
        where = ".".join(loc) or "request"
        fields.append(where)
        part = f"{where}: {err.get('msg', 'invalid').removeprefix('Value error, ')}"
        parts[part[:MAX_PROBLEM_CHARS] + ("…" if len(part) > MAX_PROBLEM_CHARS else "")] = None
    named = list(parts)[:MAX_PROBLEMS_NAMED]
    message = "; ".join(named)
    if len(parts) > len(named):
        message += f"; and {len(parts) - len(named)} more problems"
    return ServiceError(ErrorKind.INVALID_ARGUMENT, message, fields[0] if fields else None)


def retry_after_s(exc: ServiceError) -> int:
    """Whole seconds an overloaded client should wait: the refusal's own estimate where it has one (a long queue
    wait), else 1 (slots free as fast as requests finish)."""
    return int(getattr(exc, "retry_after_s", 1))


def http_headers(exc: ServiceError) -> dict[str, str]:
    """The headers an HTTP refusal carries, decided once for every path that writes one: when to retry an overload
    (RFC 9110 §10.2.3), and the scheme a missing key should use (RFC 6750 §3)."""
    headers = {}
    if exc.kind is ErrorKind.OVERLOADED:
        headers["Retry-After"] = str(retry_after_s(exc))
    if exc.kind is ErrorKind.UNAUTHENTICATED:
        headers["WWW-Authenticate"] = "Bearer"
    return headers


def outcome_code(exc: BaseException | None) -> str:
    """A call's `code` label in the request metrics, the same on both transports: the HTTP status of its outcome
    (a gRPC call's status maps to it through ERROR_TABLE), 499 for a client that left, 500 for a bug."""
    if exc is None:
        return "200"
    if isinstance(exc, ServiceError):
        return str(exc.http_status)
    if isinstance(exc, asyncio.CancelledError):
        return "499"
    return "500"
