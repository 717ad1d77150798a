"""The service's one error model: each kind of failure maps to one HTTP status and one gRPC code.

REST and gRPC adapters both translate a ServiceError with ERROR_TABLE, so a bad request gets the matching pair
on either transport. Messages name the field or setting at fault and never carry a path, a stack trace or an
address.
"""

from __future__ import annotations

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


def from_validation_errors(errors: list[dict]) -> ServiceError:
    """pydantic's error list → one INVALID_ARGUMENT naming every bad field (``steering.0.value: …``)."""
    parts, fields = [], []
    for err in errors:
        # drop the "body" root of a REST request and the branch names pydantic adds inside a union (int | str)
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        loc = [p for p in loc if not p.startswith(("int", "str", "list[", "function-"))]
        where = ".".join(loc) or "request"
        fields.append(where)
        parts.append(f"{where}: {err.get('msg', 'invalid').removeprefix('Value error, ')}")
    return ServiceError(ErrorKind.INVALID_ARGUMENT, "; ".join(dict.fromkeys(parts)), fields[0] if fields else None)
