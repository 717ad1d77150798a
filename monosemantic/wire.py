"""Conversion between the API's pydantic models (monosemantic.api) and the generated gRPC messages.

One mapping for both ends: the service reads requests and writes responses with it, the client the reverse.
The only shape differences from JSON: a token given by id or text is a TokenSpec message ({id} | {text}), and
a dictionary's metrics and an evaluation's metrics and data travel as JSON strings (metrics_json, data_json).
"""

from __future__ import annotations

import functools
import json
from typing import Any, TypeVar

from google.protobuf import json_format, message_factory
from google.protobuf.message import Message
from pydantic import BaseModel

M = TypeVar("M", bound=BaseModel)
_TOKEN_FIELDS = ("target", "contrast")
_JSON_FIELDS = {"metrics_json": "metrics", "data_json": "data", "source_json": "source"}  # free-form objects travel as one JSON string


def message_to_dict(message: Message) -> dict[str, Any]:
    """Proto field names, TokenSpecs flattened. proto3 does not send a zero of a field without presence (a
    steering value of 0.0, feature 0), so those are filled in; `optional` fields that were not set stay absent,
    and pydantic's defaults apply to them."""
    data = json_format.MessageToDict(message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
    for name in _TOKEN_FIELDS:
        if isinstance(data.get(name), dict):
            spec = data[name]
            data[name] = spec.get("id", spec.get("text"))
    return _unpack_json(data)


def _unpack_json(data: dict[str, Any]) -> dict[str, Any]:
    """``metrics_json`` / ``data_json`` strings back into the objects they carry, at any depth (a dictionary's
    evaluations sit two lists down)."""
    for wire_name, name in _JSON_FIELDS.items():
        if wire_name in data:
            data[name] = json.loads(data.pop(wire_name) or "{}")
    for value in data.values():
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, dict):
                _unpack_json(item)
    return data


def to_message(model: BaseModel | dict[str, Any], message_type: type[Message]) -> Message:
    data = model.model_dump(exclude_none=True) if isinstance(model, BaseModel) else {k: v for k, v in model.items() if v is not None}
    data.pop("stream", None)  # REST only: gRPC has a streaming method instead
    return _build(message_type, data)


def _build(message_type: type[Message], data: dict[str, Any]) -> Message:
    """A message from a dict; unknown fields raise ValueError naming them."""
    scalars, repeated = _split(message_type, data)
    message = message_type(**scalars)
    for name, sub_type, values in repeated:
        _extend(getattr(message, name), sub_type, values)
    return message


def _extend(container: Any, message_type: type[Message], values: list[dict[str, Any]]) -> None:
    """Repeated message entries appended in place with the container's `add(**fields)`. Built apart and then
    passed as a list, every entry is a message made, copied into the parent and dropped: an activations response
    (64 tokens × 10 features, ~700 messages) took 2.29 ms that way, 0.78–1.25 ms with `add`, where a loop of `add`
    calls written for that one message takes 0.71–1.02 (measured here, bench/RESULTS.md)."""
    plan, special, scalars_only = _plan(message_type)
    if scalars_only:
        for value in values:
            container.add(**value)  # protobuf skips None and names an unknown field
        return
    nested = _nested(message_type)
    if special or nested is None:
        for value in values:
            scalars, repeated = _split(message_type, value)
            entry = container.add(**scalars)
            for name, sub_type, sub_values in repeated:
                _extend(getattr(entry, name), sub_type, sub_values)
        return
    # No renamed fields and only repeated messages below (a token's `top`): the scalars go to `add` as they are.
    for value in values:
        below = [(name, value[name]) for name in nested if value.get(name)]
        entry = container.add(**({k: v for k, v in value.items() if k not in nested} if below else value))
        for name, sub_values in below:
            _extend(getattr(entry, name), nested[name], sub_values)


@functools.cache
def _nested(message_type: type[Message]) -> dict[str, type[Message]] | None:
    """A type's repeated message fields by name, or None when it has a singular message field (built by _split)."""
    plan = _plan(message_type)[0]
    if any(sub_type is not None and not repeated for sub_type, repeated in plan.values()):
        return None
    return {name: sub_type for name, (sub_type, repeated) in plan.items() if sub_type is not None}


def _split(message_type: type[Message], data: dict[str, Any]) -> tuple[dict[str, Any], list[tuple[str, type[Message], list]]]:
    """A dict's fields as keyword arguments (scalars, repeated scalars and singular messages, built here) and the
    repeated message fields, which _extend appends; TokenSpecs and free-form objects renamed on the way."""
    plan, special, _scalars_only = _plan(message_type)
    kwargs: dict[str, Any] = {}
    repeated: list[tuple[str, type[Message], list]] = []
    for name, value in data.items():
        if value is None:
            continue
        if special:
            if name in _TOKEN_FIELDS and name in plan:
                value = {"id": value} if isinstance(value, int) else {"text": value}
            if f"{name}_json" in plan and f"{name}_json" in _JSON_FIELDS:
                name, value = f"{name}_json", json.dumps(value)
        entry = plan.get(name)
        if entry is None:
            raise ValueError(f"{message_type.DESCRIPTOR.name} has no field {name!r}")
        sub_type, is_repeated = entry
        if sub_type is None:
            kwargs[name] = value
        elif is_repeated:
            repeated.append((name, sub_type, value))
        else:
            kwargs[name] = _build(sub_type, value)
    return kwargs, repeated


@functools.cache
def _plan(message_type: type[Message]) -> tuple[dict[str, tuple[type[Message] | None, bool]], bool, bool]:
    """Per message type, once: each field's message class (None for scalars) and whether it repeats, and whether
    the type has a field that is renamed on the wire (a TokenSpec, metrics_json), and whether all its fields are
    scalars. An activations response builds ~700 messages, most of them scalar-only FeatureValues."""
    fields = message_type.DESCRIPTOR.fields_by_name
    plan = {name: (message_factory.GetMessageClass(f.message_type) if f.message_type is not None else None, f.is_repeated)
            for name, f in fields.items()}
    special = any(name in fields for name in (*_TOKEN_FIELDS, *_JSON_FIELDS))
    return plan, special, not special and all(sub_type is None for sub_type, _ in plan.values())


def to_model(message: Message, model: type[M]) -> M:
    """Validates: raises pydantic.ValidationError naming the bad fields."""
    return model.model_validate(message_to_dict(message))
