"""Conversion between the API's pydantic models (monosemantic.api) and the generated gRPC messages.

One mapping for both ends: the service reads requests and writes responses with it, the client the reverse.
The only shape differences from JSON: a token given by id or text is a TokenSpec message ({id} | {text}), and
a dictionary's metrics travel as one JSON string (metrics_json).
"""

from __future__ import annotations

import json
from typing import Any, TypeVar

from google.protobuf import json_format
from google.protobuf.message import Message
from pydantic import BaseModel

M = TypeVar("M", bound=BaseModel)
_TOKEN_FIELDS = ("target", "contrast")


def message_to_dict(message: Message, fill_defaults: bool = False) -> dict[str, Any]:
    """Proto field names, TokenSpecs flattened. A request keeps only the fields that are set (so pydantic's
    defaults apply); a response (fill_defaults) also has its zero-valued fields, which proto3 does not send."""
    data = json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=fill_defaults
    )
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
    for name in _TOKEN_FIELDS:
        if name in data:
            data[name] = {"id": data[name]} if isinstance(data[name], int) else {"text": data[name]}
    if "metrics" in data:
        data["metrics_json"] = json.dumps(data.pop("metrics"))
    for value in data.values():
        if isinstance(value, list):
            for item in value:
                if isinstance(item, dict) and "metrics" in item:
                    item["metrics_json"] = json.dumps(item.pop("metrics"))
    data.pop("stream", None)  # REST only: gRPC has a streaming method instead
    return json_format.ParseDict(data, message_type())


def to_model(message: Message, model: type[M], fill_defaults: bool = False) -> M:
    """Validates: raises pydantic.ValidationError naming the bad fields."""
    return model.model_validate(message_to_dict(message, fill_defaults))
