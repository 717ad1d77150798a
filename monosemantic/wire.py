"""Conversion between the API's pydantic models (monosemantic.api) and the generated gRPC messages.

One mapping for both ends: the service reads requests and writes responses with it, the client the reverse.
The only shape differences from JSON: a token given by id or text is a TokenSpec message ({id} | {text}), and
a dictionary's metrics travel as one JSON string (metrics_json).
"""

from __future__ import annotations

import json
from typing import Any, TypeVar

from google.protobuf import json_format, message_factory
from google.protobuf.message import Message
from pydantic import BaseModel

M = TypeVar("M", bound=BaseModel)
_TOKEN_FIELDS = ("target", "contrast")


def message_to_dict(message: Message) -> dict[str, Any]:
    """Proto field names, TokenSpecs flattened. proto3 does not send a zero of a field without presence (a
    steering value of 0.0, feature 0), so those are filled in; `optional` fields that were not set stay absent,
    and pydantic's defaults apply to them."""
    data = json_format.MessageToDict(message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
    for name in _TOKEN_FIELDS:
        if isinstance(data.get(name), dict):
            spec = data[name]
            data[name] = spec.get("id", spec.get("text"))
    if "metrics_json" in data:
        data["metrics"] = json.loads(data.pop("metrics_json"))
    for value in data.values():  # nested messages (e.g. dictionaries in a list) get the same treatment
        if isinstance(value, list):
            for item in value:
                if isinstance(item, dict) and "metrics_json" in item:
                    item["metrics"] = json.loads(item.pop("metrics_json"))
    return data


def to_message(model: BaseModel | dict[str, Any], message_type: type[Message]) -> Message:
    data = model.model_dump(exclude_none=True) if isinstance(model, BaseModel) else {k: v for k, v in model.items() if v is not None}
    data.pop("stream", None)  # REST only: gRPC has a streaming method instead
    return _build(message_type, data)


def _build(message_type: type[Message], data: dict[str, Any]) -> Message:
    """A message from a dict by keyword construction (in C, several times faster than json_format.ParseDict on
    responses with hundreds of nested entries); unknown fields raise ValueError naming them."""
    fields = message_type.DESCRIPTOR.fields_by_name
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        if value is None:
            continue
        if name in _TOKEN_FIELDS and name in fields:
            value = {"id": value} if isinstance(value, int) else {"text": value}
        if name == "metrics" and "metrics_json" in fields:
            name, value = "metrics_json", json.dumps(value)
        field = fields.get(name)
        if field is None:
            raise ValueError(f"{message_type.DESCRIPTOR.name} has no field {name!r}")
        if field.message_type is not None:
            sub_type = _message_class(field)
            value = [_build(sub_type, v) for v in value] if field.is_repeated else _build(sub_type, value)
        kwargs[name] = value
    return message_type(**kwargs)


def _message_class(field: Any) -> type[Message]:
    return message_factory.GetMessageClass(field.message_type)


def to_model(message: Message, model: type[M]) -> M:
    """Validates: raises pydantic.ValidationError naming the bad fields."""
    return model.model_validate(message_to_dict(message))
