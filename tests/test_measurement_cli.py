"""``monosemantic-train steer-eval`` and ``compare`` on the shipped reference: curves and matches as a table and as JSON, bad input refused
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


def test_compare_by_cosine_matches_the_reference_with_itself_one_to_one():
    result = runner.invoke(app, ["compare", "--registry", str(reference_registry_path()), "reference", "reference", "--by", "cosine", "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["one_to_one"][:3] == [{"a": 0, "b": 0, "score": pytest.approx(1.0)}, {"a": 1, "b": 1, "score": pytest.approx(1.0)},
                                     {"a": 2, "b": 2, "score": pytest.approx(1.0)}]
    counts = out["counts"]
    assert (counts["features_a"], counts["split"], counts["merged"], counts["unmatched_a"], out["unmatched_a"]) == (4096, 0, 0, 0, [])


@pytest.mark.slow
def test_compare_by_correlation_prints_the_counts_on_the_text_it_read():
    result = runner.invoke(app, ["compare", "--registry", str(reference_registry_path()), "reference", "reference", "--contexts", "8",
                                 "--context-length", "64"])
    assert result.exit_code == 0, result.output
    assert "by correlation >= 0.5, on 504 tokens" in result.stdout and "one-to-one:" in result.stdout and "too rare:" in result.stdout


@pytest.mark.parametrize("options, named", [(["--threshold", "2"], "threshold"), (["--by", "jaccard"], "--by"),
                                            (["--by", "cosine", "--registry-b", "/nonexistent"], "nonexistent")])
def test_compare_refuses_bad_input_naming_it(options, named):
    result = runner.invoke(app, ["compare", "--registry", str(reference_registry_path()), "reference", "reference", *options])
    assert result.exit_code == 2 and named in result.output
