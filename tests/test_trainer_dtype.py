"""The trainer's stages run a model in its checkpoint's dtype (--model-dtype auto): a bf16 checkpoint is harvested,
evaluated and given dashboards in bf16, not widened to fp32 at twice its size; each records the dtype it ran in, and
the figures stay within bf16's tolerance of the widened model's."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from monosemantic.artifact import ModelRef, load_dictionary, publish
from monosemantic.errors import MonosemanticError
from monosemantic.lm import load_lm
from monosemantic.shipped import REFERENCE_DICTIONARY, REFERENCE_HOOK, reference_lm_path, reference_registry_path
from trainer.activations import from_storage, open_harvest
from trainer.cli import app
from trainer.harvest import harvest

pytestmark = pytest.mark.slow
runner = CliRunner()
HARVEST = ["--hook", REFERENCE_HOOK, "--contexts", "6", "--context-length", "64", "--max-chars", "200000", "--dtype", "float32"]


@pytest.fixture(scope="module")
def bf16(tmp_path_factory):
    """The reference LM saved in bfloat16, and a registry binding the shipped dictionary to it."""
    root = tmp_path_factory.mktemp("bf16")
    lm = load_lm(reference_lm_path())
    lm.model.to(torch.bfloat16).save_pretrained(root / "model")
    lm.tokenizer.save_pretrained(root / "model")
    shipped = load_dictionary(reference_registry_path(), REFERENCE_DICTIONARY, None)
    rounded = load_lm(root / "model", dtype="auto")  # the bf16 weights are other weights than the fp32 ones
    publish(root / "registry", REFERENCE_DICTIONARY, shipped.sae, model=ModelRef(name="reference-bf16", checksum=rounded.checksum,
                                                                                 source=str(root / "model")), hook=shipped.manifest.hook)
    return root / "model", root / "registry"


def rows(directory) -> torch.Tensor:
    source = open_harvest(directory)
    return torch.cat([from_storage(part, source.dtype) for part in source.parts])


def test_harvest_runs_a_bf16_checkpoint_in_bf16_unless_asked_otherwise(bf16, tmp_path):
    model_dir, _ = bf16
    for name, extra in (("auto", []), ("wide", ["--model-dtype", "float32"])):
        result = runner.invoke(app, ["harvest", "--out", str(tmp_path / name), "--model", str(model_dir), *HARVEST, *extra])
        assert result.exit_code == 0, result.output
    manifests = {n: json.loads((tmp_path / n / "harvest.json").read_text()) for n in ("auto", "wide")}
    assert (manifests["auto"]["model_dtype"], manifests["wide"]["model_dtype"]) == ("bfloat16", "float32")
    narrow, wide = rows(tmp_path / "auto"), rows(tmp_path / "wide")
    assert not torch.equal(narrow, wide)  # it really ran in bf16
    assert torch.allclose(narrow, wide, atol=0.1 * float(wide.abs().max()))  # bf16 keeps 8 bits of mantissa


def test_a_harvest_resumed_in_another_model_dtype_is_refused(bf16, tmp_path):
    model_dir, _ = bf16
    contexts = torch.randint(1, 500, (4, 16), generator=torch.Generator().manual_seed(0))
    harvest(load_lm(model_dir, dtype="auto"), contexts, REFERENCE_HOOK, tmp_path, contexts_per_shard=2, progress=False)
    with pytest.raises(MonosemanticError, match="different data, model, hook or settings"):
        harvest(load_lm(model_dir, dtype="float32"), contexts, REFERENCE_HOOK, tmp_path, contexts_per_shard=2, progress=False)


def test_evaluate_and_features_run_in_the_checkpoints_dtype_and_record_it(bf16, tmp_path):
    model_dir, registry = bf16
    figures = {}
    for dtype in ("auto", "float32"):
        result = runner.invoke(app, ["evaluate", "--registry", str(registry), "--dictionary", REFERENCE_DICTIONARY, "--tokens", "2000",
                                     "--json", "--no-record", "--model-dtype", dtype])
        assert result.exit_code == 0, result.output
        figures[dtype] = json.loads(result.stdout)
    assert (figures["auto"]["data"]["model_dtype"], figures["float32"]["data"]["model_dtype"]) == ("bfloat16", "float32")
    assert figures["auto"]["fvu"] == pytest.approx(figures["float32"]["fvu"], abs=0.02)
    assert figures["auto"]["l0"] == pytest.approx(figures["float32"]["l0"], rel=0.05)

    result = runner.invoke(app, ["features", "--registry", str(registry), "--dictionary", REFERENCE_DICTIONARY, "--tokens", "2000",
                                 "--max-chars", "200000", "--out-registry", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert load_dictionary(tmp_path / "out", REFERENCE_DICTIONARY).manifest.feature_statistics["model_dtype"] == "bfloat16"


def test_an_unknown_model_dtype_is_refused_naming_the_choices(tmp_path):
    result = runner.invoke(app, ["harvest", "--out", str(tmp_path / "h"), "--model-dtype", "float16"])
    assert result.exit_code == 2 and "--model-dtype" in result.output and "bfloat16" in result.output
