"""`monosemantic-train export --to delphi` writes the reference's feature activations as EleutherAI delphi's latent
cache, and delphi's own loader (eai-delphi 0.1.3's LatentDataset, installed without its vLLM dependency: README,
"Tools the tests use") reads it back: the same activations at the same places, and the examples delphi's
explainers and scorers are built from."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.numpy import load_file
from typer.testing import CliRunner

from monosemantic.artifact import load_dictionary
from monosemantic.lm import read_activations
from monosemantic.shipped import REFERENCE_DICTIONARY, reference_registry_path
from trainer.cli import app

pytestmark = pytest.mark.slow  # reads 48 contexts through the model and imports delphi (sentence-transformers, faiss)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("delphi")
    registry = root / "registry"
    shutil.copytree(reference_registry_path() / REFERENCE_DICTIONARY, registry / REFERENCE_DICTIONARY)
    result = CliRunner().invoke(app, ["export", "--to", "delphi", "--registry", str(registry), "--dictionary", REFERENCE_DICTIONARY,
                                      "--out", str(root / "latents"), "--contexts", "48", "--context-length", "64", "--splits", "4"])
    assert result.exit_code == 0, result.output
    return registry, root / "latents"


def test_the_cache_holds_every_activation_the_dictionary_gives_on_those_contexts(cache, reference_model):
    registry, out = cache
    (module,) = [p for p in out.iterdir()]
    files = sorted(module.glob("*.safetensors"), key=lambda p: int(p.stem.split("_")[0]))
    assert [p.name for p in files] == ["0_1023.safetensors", "1024_2047.safetensors", "2048_3071.safetensors", "3072_4095.safetensors"]
    dictionary = load_dictionary(registry, REFERENCE_DICTIONARY, 1)
    tokens = torch.from_numpy(load_file(str(files[0]))["tokens"])
    assert tokens.shape == (48, 64)
    x = read_activations(reference_model.lm, tokens, dictionary.manifest.hook.name, attention_mask=torch.ones_like(tokens)).float()
    expected = dictionary.sae.encode(x.reshape(-1, x.shape[-1])).reshape(48, 64, -1)
    expected[:, 0] = 0
    rebuilt = torch.zeros_like(expected)
    for path in files:
        data = load_file(str(path))
        first = int(path.stem.split("_")[0])
        where = torch.from_numpy(data["locations"].astype("int64"))
        rebuilt[where[:, 0], where[:, 1], where[:, 2] + first] = torch.from_numpy(data["activations"]).float()
    assert (rebuilt != 0).sum() == (expected != 0).sum() > 0
    assert torch.allclose(rebuilt, expected, rtol=1e-3, atol=1e-3)  # float16, as delphi stores them


def test_delphis_own_loader_builds_its_examples_from_the_cache(cache, reference_model):
    from delphi.config import ConstructorConfig, SamplerConfig
    from delphi.latents import LatentDataset

    _, out = cache
    (module,) = [p.name for p in out.iterdir()]
    features = torch.tensor([f for f in range(4096)])
    dataset = LatentDataset(out, SamplerConfig(n_examples_train=5, n_examples_test=5, n_quantiles=5),
                            ConstructorConfig(min_examples=20, n_non_activating=5, example_ctx_len=16),
                            tokenizer=reference_model.lm.tokenizer, modules=[module], latents={module: features})
    records = list(dataset)
    assert records, "no feature had delphi's minimum of 20 examples"
    record = records[0]
    assert record.latent.module_name == module and record.train and record.not_active
    example = record.train[0]
    assert example.tokens.shape == (16,) and float(example.activations.max()) > 0
