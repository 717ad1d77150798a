"""``monosemantic-train steer-eval`` on the shipped reference: the curves as a table and as JSON, bad input refused
with exit code 2 naming the option."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from monosemantic.shipped import reference_registry_path
from trainer.cli import app

runner = CliRunner()
SMALL = ["--contexts", "8", "--context-length", "32", "--multiples", "0,1,4", "--new-tokens", "6", "--prompts", "2"]


@pytest.mark.slow
def test_steer_eval_prints_every_methods_curve_and_its_best_strength_per_budget():
    result = runner.invoke(app, ["steer-eval", "--registry", str(reference_registry_path()), "--dictionary", "reference",
                                 "--feature", "100", *SMALL])
    assert result.exit_code == 0, result.output
    for method in ("clamp", "add", "mean_difference"):
        assert sum(line.startswith(method) for line in result.output.splitlines()) == 3
    assert "at KL <= 0.1:" in result.output and "at KL <= 0.5:" in result.output


@pytest.mark.slow
def test_steer_eval_json_holds_the_curves_at_the_dashboards_scale():
    result = runner.invoke(app, ["steer-eval", "--registry", str(reference_registry_path()), "--dictionary", "reference",
                                 "--feature", "100", "--json", "--methods", "add", *SMALL])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["feature"] == 100 and out["scale_from"] == "statistics"
    assert [c["method"] for c in out["curves"]] == ["add"]
    assert [p["multiple"] for p in out["curves"][0]["points"]] == [0.0, 1.0, 4.0]
    assert set(out["winners"]) == {"0.1", "0.5"}


@pytest.mark.parametrize("options, named", [(["--multiples", "1,x"], "--multiples"), (["--methods", "project"], "methods"),
                                            (["--feature", "4096"], "feature: 4096")])
def test_steer_eval_refuses_bad_input_naming_it(options, named):
    args = ["steer-eval", "--registry", str(reference_registry_path()), "--dictionary", "reference", "--feature", "1", *SMALL, *options]
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and named in result.output
