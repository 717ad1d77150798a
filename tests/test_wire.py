"""monosemantic.wire builds the same messages as protobuf's own dict parser (json_format.ParseDict), field for field."""

import asyncio

import pytest
from google.protobuf import json_format

from monosemantic import api as schemas
from monosemantic.v1 import feature_service_pb2 as pb
from monosemantic.wire import message_to_dict, to_message


def _activations(tokens: int = 3, readouts: int = 0) -> dict:
    def token(t: int) -> dict:
        return {"id": 100 + t, "text": f"tok{t}", "start": 2 * t, "end": 2 * t + 1, "l0": t, "recon_error": 0.25 * t,
                "values": [0.5 * t, 0.0], "top": [{"feature": f, "value": 1.0 / (f + 1)} for f in range(t)]}

    ref = {"name": "reference", "version": 2}
    return {"dictionary": ref, "tokens": [token(t) for t in range(tokens)],
            "readouts": [{"dictionary": {"name": f"d{i}", "version": i}, "tokens": [token(t) for t in range(tokens)]} for i in range(readouts)]}


@pytest.mark.parametrize("readouts", [0, 2])
def test_an_activations_response_is_the_message_protobufs_parser_builds(readouts):
    data = _activations(tokens=5, readouts=readouts)
    assert to_message(data, pb.ActivationsResponse) == json_format.ParseDict(data, pb.ActivationsResponse())


def test_a_response_served_by_the_engine_is_the_message_protobufs_parser_builds(server):
    request = schemas.ActivationsRequest(text="def main():\n    return 1", top_k=10, feature_ids=[3, 7])
    # the engine's own answer, as the gRPC adapter converts it
    data = asyncio.run_coroutine_threadsafe(server.engine.activations(request), server.loop).result(60)
    built = to_message(data, pb.ActivationsResponse)
    assert built == json_format.ParseDict(data, pb.ActivationsResponse())
    assert len(built.tokens) == len(data["tokens"]) and built.tokens[1].top[0].feature == data["tokens"][1]["top"][0]["feature"]


def test_token_specs_and_json_fields_travel_renamed():
    request = to_message({"text": "a b", "target": 5, "contrast": " b", "top_k": 3}, pb.AttributionsRequest)
    assert request.target.id == 5 and request.contrast.text == " b"
    assert message_to_dict(request)["target"] == 5 and message_to_dict(request)["contrast"] == " b"


def test_an_unknown_field_is_named():
    with pytest.raises(ValueError, match="bogus"):
        to_message({"dictionary": {"name": "x", "version": 1}, "tokens": [{"id": 1, "bogus": 2}]}, pb.ActivationsResponse)
    with pytest.raises(ValueError, match="bogus"):
        to_message({"tokens": [{"id": 1, "top": [{"feature": 1, "bogus": 2}]}]}, pb.ActivationsResponse)


def test_none_fields_are_left_unset():
    message = to_message({"dictionary": None, "tokens": [{"id": 1, "text": None, "top": [{"feature": 2, "value": None}]}]}, pb.ActivationsResponse)
    assert not message.HasField("dictionary") and message.tokens[0].text == "" and message.tokens[0].top[0].value == 0.0
