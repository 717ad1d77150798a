"""/v1/steer-eval and gRPC SteerEval: the steering curves of a feature of the served reference, the same over both
transports, cached per dictionary version, bounded by limits, bad input refused naming the field."""

from __future__ import annotations

import pytest

from monosemantic.client import ServiceCallError

SMALL = {"multiples": [0.0, 1.0, 4.0], "new_tokens": 4, "prompts": 2}
TEXTS = ["import os\nimport sys\n\ndef main(argv):\n    return 0\n", "class Point:\n    def __init__(self, x, y):\n        self.x = x\n",
         "for i in range(10):\n    print(i * i, end=' ')\n", "with open(path) as f:\n    data = f.read().split()\n"]


def test_the_curves_of_a_feature_come_back_with_every_methods_best_strength(client):
    result = client.steer_eval(100, dictionary="reference:1", texts=TEXTS, **SMALL)
    assert result.feature == 100 and result.scale_from == "statistics" and result.text == "given"
    assert [c.method for c in result.curves] == ["clamp", "add", "mean_difference"]
    for curve in result.curves:
        assert [p.multiple for p in curve.points] == [0.0, 1.0, 4.0]
        kl = [p.kl for p in curve.points]
        assert kl == sorted(kl) and kl[-1] > 0
    assert {(b.budget, b.method) for b in result.best} == {(budget, m) for budget in (0.1, 0.5) for m in ("clamp", "add", "mean_difference")}
    assert [w.budget for w in result.winners] == [0.1, 0.5]
    assert result.promoted_from == "logit_effects" and len(result.promoted) == 10 and result.promoted[0].token


def test_rest_and_grpc_give_the_same_curves(server):
    from monosemantic.client import GrpcClient, RestClient

    with RestClient(server.http_url) as rest, GrpcClient(server.grpc_target) as grpc:
        a = rest.steer_eval(7, texts=TEXTS, methods=["add"], **SMALL)
        b = grpc.steer_eval(7, texts=TEXTS, methods=["add"], **SMALL)
    assert [p.kl for p in a.curves[0].points] == pytest.approx([p.kl for p in b.curves[0].points])
    assert a.unsteered.loss == pytest.approx(b.unsteered.loss)


def test_the_same_question_twice_is_answered_from_the_cache(client):
    first = client.steer_eval(2508, texts=TEXTS, methods=["clamp"], **SMALL)
    again = client.steer_eval(2508, texts=TEXTS, methods=["clamp"], **SMALL)
    assert again.cached and again.curves == first.curves


@pytest.mark.slow
def test_without_text_the_model_samples_its_own(client):
    result = client.steer_eval(3329, methods=["add"], multiples=[0.0, 2.0], new_tokens=4, prompts=2)
    assert result.text == "model_samples" and result.measured_tokens == 8 * 64


@pytest.mark.parametrize("request_, field", [
    ({"feature": 4096}, "feature"),
    ({"feature": 1, "multiples": [1e9]}, "multiples"),
    ({"feature": 1, "methods": ["project"]}, "methods"),
    ({"feature": 1, "kl_budgets": [0.0]}, "kl_budgets"),
    ({"feature": 1, "texts": ["only one"]}, "texts"),
    ({"feature": 1, "texts": ["x", TEXTS[0]]}, "texts[0]"),
    ({"feature": 1, "new_tokens": 1000}, "new_tokens"),
    ({"feature": 1, "dictionary": "missing"}, "dictionary"),
])
def test_bad_input_is_refused_naming_the_field(client, request_, field):
    request_ = dict(request_)
    feature = request_.pop("feature")
    with pytest.raises(ServiceCallError) as caught:
        client.steer_eval(feature, **request_)
    assert (caught.value.field or "").split(".")[0] == field.split(".")[0] and caught.value.status in (400, 404, 422, "INVALID_ARGUMENT", "NOT_FOUND")
