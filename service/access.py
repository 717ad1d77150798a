"""Access control: API keys with scopes (`read`, `steer`, `admin`) and a request-rate limit per key.

Keys come from a JSON file (a Kubernetes Secret mounted as a file works the same) and from MONOSEMANTIC_ADMIN_KEY:

    {"keys": [{"name": "dashboards", "key": "…", "scopes": ["read"], "requests_per_second": 20},
              {"name": "ops", "key": "…", "scopes": ["read", "steer", "admin"]}]}

With no key configured the query operations are open (the default bind address is localhost) and admin is off.
Once any key exists, every /v1 operation needs one with its scope. Keys are compared as sha256 digests in
constant time against every configured key, never logged, and a refusal says nothing about which keys exist.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal, Sequence

from pydantic import AfterValidator, BaseModel, Field, ValidationError

from monosemantic.errors import ConfigError
from service.errors import ErrorKind, ServiceError

Scope = Literal["read", "steer", "admin"]


# What a client can send after "Bearer ": RFC 6750's b64token is narrower; any visible ASCII character is allowed
# here. A key with a space, a control character or a non-ASCII one could never match what a client sends (HTTP
# header values are Latin-1 at best, and a surrounding space is stripped), so it is refused at startup.
_SENDABLE = re.compile(r"[\x21-\x7e]+")


def sendable_key(value: str) -> str:
    if not _SENDABLE.fullmatch(value):
        raise ValueError("a key can hold only visible ASCII characters (no spaces, no accents): no client could send it")
    return value


class ApiKey(BaseModel):
    name: str = Field(min_length=1, max_length=64)
    key: Annotated[str, AfterValidator(sendable_key)] = Field(min_length=16, description="at least 16 visible ASCII characters")
    scopes: list[Scope] = Field(min_length=1)
    requests_per_second: float | None = Field(None, gt=0, description="sustained rate; bursts up to 2 s worth")


class ApiKeyFile(BaseModel):
    # At least one: an empty list once started a fully open server (steering included) with no warning.
    keys: list[ApiKey] = Field(min_length=1)


@dataclass
class _Bucket:
    """Token bucket: `rate` requests per second, holding up to two seconds' worth."""

    rate: float
    tokens: float = 0.0
    stamp: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        self.tokens = self.capacity

    @property
    def capacity(self) -> float:
        return max(1.0, 2 * self.rate)

    def take(self) -> bool:
        now = time.monotonic()
        self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False

    def charge(self, cost: float) -> None:
        """Work beyond the one request already taken (an observe's windows): the bucket may go below zero, and the
        key's next requests wait until it has refilled."""
        self.tokens -= cost


@dataclass(frozen=True)
class _Entry:
    name: str
    digest: bytes
    scopes: frozenset[str]
    bucket: _Bucket | None


def load_key_file(path: Path) -> list[ApiKey]:
    try:
        raw = json.loads(Path(path).read_text())
        return ApiKeyFile.model_validate(raw).keys
    except OSError as exc:
        raise ConfigError(f"MONOSEMANTIC_API_KEYS_FILE: cannot read the key file ({exc.strerror})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        reason = f"{exc.msg} at line {exc.lineno}" if isinstance(exc, json.JSONDecodeError) else "not UTF-8"
        raise ConfigError(f"MONOSEMANTIC_API_KEYS_FILE: not JSON ({reason})") from None
    except ValidationError as exc:
        # the field, the entry's name and the reason only: a key file's values are secrets and must not reach a log
        raise ConfigError(f"MONOSEMANTIC_API_KEYS_FILE: {'; '.join(_problem(raw, e) for e in exc.errors())}") from None


def _problem(raw: object, error: dict) -> str:
    loc = error["loc"]
    where = ".".join(str(p) for p in loc) or "the file"
    if len(loc) >= 2 and loc[0] == "keys" and isinstance(loc[1], int) and isinstance(raw, dict):
        entry = raw["keys"][loc[1]] if isinstance(raw.get("keys"), list) else None
        if isinstance(entry, dict) and isinstance(entry.get("name"), str):
            where += f" (key {entry['name'][:64]!r})"
    return f"{where}: {error['msg'].removeprefix('Value error, ')}"


def _file_state(path: Path) -> tuple | None:
    try:
        st = Path(path).stat()
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


class AccessControl:
    def __init__(self, keys: list[ApiKey], admin_key: str | None = None, keys_file: Path | None = None) -> None:
        if admin_key:
            try:
                sendable_key(admin_key)
            except ValueError as exc:
                raise ConfigError(f"MONOSEMANTIC_ADMIN_KEY: {exc}") from None
        self._admin_key, self.keys_file = admin_key, keys_file
        self._lock = threading.Lock()
        self._entries: tuple[_Entry, ...] = self._build(keys, {})
        self._file_state = _file_state(keys_file) if keys_file is not None else None

    def _build(self, keys: list[ApiKey], buckets: dict[tuple[bytes, float], _Bucket]) -> tuple[_Entry, ...]:
        """The entries for `keys` (and the admin key), checked; a key kept at the same rate keeps its bucket."""
        names = [k.name for k in keys]
        if len(set(names)) != len(names):
            raise ConfigError("MONOSEMANTIC_API_KEYS_FILE: key names must be unique")
        # The same value twice would make the last entry win (one read-only at 1 request/s, again with admin and no
        # limit): compared as digests, so no value reaches a message.
        seen: dict[bytes, str] = {}
        admin = [("MONOSEMANTIC_ADMIN_KEY", self._admin_key)] if self._admin_key else []
        for name, key in [(k.name, k.key) for k in keys] + admin:
            digest = _digest(key)
            if digest in seen:
                raise ConfigError(f"MONOSEMANTIC_API_KEYS_FILE: keys {seen[digest]!r} and {name!r} have the same value; give each its own")
            seen[digest] = name
        entries = []
        for k in keys:
            digest, rate = _digest(k.key), k.requests_per_second
            bucket = (buckets.get((digest, rate)) or _Bucket(rate)) if rate else None
            entries.append(_Entry(k.name, digest, frozenset(k.scopes), bucket))
        if self._admin_key:
            entries.append(_Entry("MONOSEMANTIC_ADMIN_KEY", _digest(self._admin_key), frozenset(("read", "steer", "admin")), None))
        return tuple(entries)

    @classmethod
    def from_settings(cls, api_keys_file: Path | None, admin_key: str | None) -> "AccessControl":
        return cls(load_key_file(api_keys_file) if api_keys_file is not None else [], admin_key, api_keys_file)

    def file_changed(self) -> bool:
        """Whether the keys file is not the one last read (a Kubernetes Secret rotates by swapping a symlink, so the
        path is followed: device, inode, size and modification time)."""
        return self.keys_file is not None and _file_state(self.keys_file) != self._file_state

    def reload(self) -> int:
        """Read the keys file again and swap the keys in at once; the number of keys now. On any problem the old
        keys stay and ConfigError says why (naming no value)."""
        if self.keys_file is None:
            raise ConfigError("MONOSEMANTIC_API_KEYS_FILE is not set: there is no keys file to read")
        state = _file_state(self.keys_file)
        self._file_state = state  # a file that fails is reported once, not at every poll
        keys = load_key_file(self.keys_file)
        old = {(e.digest, e.bucket.rate): e.bucket for e in self._entries if e.bucket is not None}
        self._entries = self._build(keys, old)  # one assignment: a request sees the old keys or the new ones
        return len(keys)

    @property
    def open(self) -> bool:
        return not self._entries

    def _match(self, given: str) -> _Entry | None:
        digest = _digest(given)
        found = None
        for entry in self._entries:  # every entry is compared, so the time does not depend on which one matches
            if hmac.compare_digest(entry.digest, digest):
                found = entry
        return found

    def identify(self, authorizations: Sequence[str]) -> "Identity":
        """Who a request is, decided once from every Authorization header (gRPC `authorization` entry) it carries;
        raises 401. More than one is refused: a middleware and a route reading different ones let a limited key
        be counted while another key's scope was checked."""
        if len(authorizations) > 1:
            raise ServiceError(ErrorKind.UNAUTHENTICATED, f"authorization: send one Authorization header, not {len(authorizations)}", "authorization")
        if self.open:
            return Identity(self, None)
        scheme, _, given = (authorizations[0] if authorizations else "").partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            raise ServiceError(ErrorKind.UNAUTHENTICATED, "authorization: send an API key as 'Authorization: Bearer KEY'", "authorization")
        entry = self._match(given.strip())
        if entry is None:
            raise ServiceError(ErrorKind.UNAUTHENTICATED, "authorization: the key is not valid", "authorization")
        return Identity(self, entry)

    def check(self, authorization: str | None, scope: Scope, count: bool = True) -> str | None:
        """identify + require in one call: the name of the key allowed to do `scope`, or None on an open server."""
        identity = self.identify([] if authorization is None else [authorization])
        identity.require(scope, count)
        return identity.name

    def _take(self, entry: _Entry) -> bool:
        with self._lock:
            return entry.bucket.take()


@dataclass(frozen=True)
class Identity:
    """One request's caller: a configured key, or nobody on an open server. Every scope check of the request goes
    through this one object."""

    access: AccessControl
    entry: _Entry | None

    @property
    def name(self) -> str | None:
        return None if self.entry is None else self.entry.name

    def charge(self, cost: int) -> None:
        """Count `cost` more requests' worth against the key's rate (a request that is several units of work)."""
        if cost > 0 and self.entry is not None and self.entry.bucket is not None:
            with self.access._lock:
                self.entry.bucket.charge(cost)

    def require(self, scope: Scope, count: bool = True) -> None:
        """Raise 403 without `scope`, 429 over the key's rate. count=False checks an extra scope of a request
        already counted against the key's rate."""
        if self.entry is None:
            if scope == "admin":
                raise ServiceError(ErrorKind.PERMISSION_DENIED, "admin operations are disabled: set MONOSEMANTIC_ADMIN_KEY or give a key the admin scope in MONOSEMANTIC_API_KEYS_FILE")
            return
        if scope not in self.entry.scopes:
            raise ServiceError(ErrorKind.PERMISSION_DENIED, f"authorization: the key lacks the {scope!r} scope", "authorization")
        if count and self.entry.bucket is not None and not self.access._take(self.entry):
            raise ServiceError(ErrorKind.OVERLOADED, "authorization: this key's request rate limit is reached; retry shortly")
