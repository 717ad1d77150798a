"""Specifications of the dictionary artifact format (v1): publish, versions, references, verification, loading.

Every dictionary here is a real, tiny SAE (d_in 8, d_sae 16) written to a real registry under tmp_path.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import monosemantic.artifact as artifact
from monosemantic.artifact import (
    FEATURES_FILE,
    MANIFEST_FILE,
    SAE_FILE,
    HookRef,
    ModelRef,
    list_dictionaries,
    list_versions,
    load_dictionary,
    parse_reference,
    publish,
    read_manifest,
    resolve_version,
    verify,
)
from monosemantic.errors import ArtifactError, ArtifactMismatch, ArtifactNotFound, ConfigError, WriteFailed
from monosemantic.ledger import LEDGER_FILE, LOCK_FILE
from monosemantic.sae import SAEConfig, build_sae

D_IN, D_SAE = 8, 16
MODEL = ModelRef(name="tiny-gpt2", checksum=hashlib.sha256(b"tiny-gpt2 weights").hexdigest())
HOOK = HookRef(name="blocks.0.mlp.hook_post", module_path="transformer.h.0.mlp.act", alias="blocks.0.mlp.hook_post")
ARCH_FIELDS = {"relu": {}, "topk": {"k": 4}, "jumprelu": {}}
REPO = Path(__file__).resolve().parents[1]


def make_sae(architecture: str = "relu", seed: int = 0):
    """A dictionary whose every tensor (biases and thresholds included) holds distinct non-default values."""
    cfg = SAEConfig.build(architecture=architecture, d_in=D_IN, d_sae=D_SAE, input_scale=1.7, **ARCH_FIELDS[architecture])
    sae = build_sae(cfg, seed=seed)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        sae.b_enc.copy_(0.1 * torch.randn(D_SAE, generator=generator))
        sae.b_dec.copy_(0.1 * torch.randn(D_IN, generator=generator))
        if architecture == "jumprelu":
            sae.log_threshold.copy_(torch.log(0.05 + 0.2 * torch.rand(D_SAE, generator=generator)))
    return sae


def publish_one(registry: Path, name: str = "dict", architecture: str = "relu", **kwargs) -> Path:
    return publish(registry, name, make_sae(architecture), model=MODEL, hook=HOOK, **kwargs)


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def registry(tmp_path: Path) -> Path:
    return tmp_path / "registry"


# ---- round trip ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("architecture", sorted(ARCH_FIELDS))
def test_publish_then_load_round_trips_every_tensor_and_the_encoding(registry, architecture):
    sae = make_sae(architecture)
    publish(registry, "dict", sae, model=MODEL, hook=HOOK)

    loaded = load_dictionary(registry, "dict").sae

    original, restored = sae.tensors(), loaded.tensors()
    expected_names = {"W_enc", "b_enc", "W_dec", "b_dec"} | ({"threshold"} if architecture == "jumprelu" else set())
    assert set(original) == set(restored) == expected_names
    for name in expected_names:
        assert restored[name].dtype == torch.float32
        torch.testing.assert_close(restored[name], original[name], rtol=1e-6, atol=0)
    assert loaded.cfg == sae.cfg
    x = torch.randn(32, D_IN, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(loaded.encode(x), sae.encode(x))


def test_tensors_are_stored_with_saelens_names_and_orientation(registry):
    version_dir = publish_one(registry, architecture="jumprelu")
    with safe_open(str(version_dir / SAE_FILE), framework="pt") as fh:
        shapes = {key: tuple(fh.get_slice(key).get_shape()) for key in fh.keys()}
    assert shapes == {"W_enc": (D_IN, D_SAE), "W_dec": (D_SAE, D_IN), "b_enc": (D_SAE,), "b_dec": (D_IN,), "threshold": (D_SAE,)}


def test_publish_then_load_round_trips_the_manifest_fields(registry):
    features = {"density": torch.rand(D_SAE), "max_activation": torch.rand(D_SAE)}
    extra = {
        "metrics": {"l0": 12.5, "explained_variance": 0.91},
        "training": {"lr": 3e-4, "batch_size": 64},
        "data": {"fingerprint": "abc123"},
        "seed": 3,
        "tokens": 4096,
        "sparsity_coefficient": 5.0,
    }
    version_dir = publish_one(registry, architecture="topk", features=features, extra=extra)

    dictionary = load_dictionary(registry, "dict", expected_model_checksum=MODEL.checksum, expected_d_in=D_IN)
    manifest = dictionary.manifest

    assert dictionary.path == version_dir
    assert dictionary.ref == "dict:v1"
    assert (manifest.format_version, manifest.name, manifest.version) == (1, "dict", 1)
    assert manifest.architecture == "topk" and manifest.sae.k == 4
    assert (manifest.sae.d_in, manifest.sae.d_sae, manifest.dtype) == (D_IN, D_SAE, "float32")
    assert manifest.model == MODEL
    assert manifest.hook == HOOK
    assert manifest.input_scale == 1.7
    assert manifest.metrics == extra["metrics"]
    assert manifest.training == extra["training"] and manifest.data == extra["data"]
    assert (manifest.seed, manifest.tokens, manifest.sparsity_coefficient) == (3, 4096, 5.0)
    assert manifest.created
    assert manifest.files == {SAE_FILE: sha256_of(version_dir / SAE_FILE), FEATURES_FILE: sha256_of(version_dir / FEATURES_FILE)}
    assert set(dictionary.features) == set(features)
    for key, value in features.items():
        assert torch.equal(dictionary.features[key], value)


def test_the_feature_statistics_load_as_a_typed_object_checked_against_the_dictionary(registry):
    required = {"density": torch.rand(D_SAE), "mean_activation": torch.rand(D_SAE), "max_activation": torch.rand(D_SAE)}
    publish_one(registry, features=required)
    publish_one(registry, features={**required, "density": torch.rand(D_SAE + 1)})
    publish_one(registry)

    statistics = load_dictionary(registry, "dict", 1).statistics
    assert torch.equal(statistics.density, required["density"]) and statistics.top_tokens is None
    assert not statistics.has_pages
    with pytest.raises(ArtifactError, match=r"dict/v2/features.safetensors: tensor density has shape \[17\], expected \[d_sae=16\]"):
        load_dictionary(registry, "dict", 2).statistics  # noqa: B018
    assert load_dictionary(registry, "dict", 2).features["density"].shape == (D_SAE + 1,)  # the raw tensors as stored
    assert load_dictionary(registry, "dict", 3).statistics is None


def test_publish_with_bfloat16_stores_bf16_tensors_and_loads_float32_close_to_the_original(registry):
    sae = make_sae("jumprelu")
    version_dir = publish(registry, "dict", sae, model=MODEL, hook=HOOK, dtype="bfloat16")

    with safe_open(str(version_dir / SAE_FILE), framework="pt") as fh:
        stored = {key: fh.get_tensor(key).dtype for key in fh.keys()}
    assert stored and set(stored.values()) == {torch.bfloat16}
    dictionary = load_dictionary(registry, "dict")
    assert dictionary.manifest.dtype == "bfloat16"
    for name, original in sae.tensors().items():
        restored = dictionary.sae.tensors()[name]
        assert restored.dtype == torch.float32
        torch.testing.assert_close(restored, original, rtol=1e-2, atol=1e-3)


def test_an_unsupported_storage_dtype_is_a_config_error_and_publishes_nothing(registry):
    with pytest.raises(ConfigError, match="dtype"):
        publish_one(registry, dtype="int8")
    assert list_versions(registry, "dict") == []


# ---- versions and references -------------------------------------------------------------------------------------


def test_versions_increment_and_latest_resolves_to_the_highest(registry):
    paths = [publish_one(registry) for _ in range(3)]

    assert [p.name for p in paths] == ["v1", "v2", "v3"]
    assert list_versions(registry, "dict") == [1, 2, 3]
    assert resolve_version(registry, "dict") == paths[2]
    assert resolve_version(registry, "dict", "latest") == paths[2]
    assert resolve_version(registry, "dict", 2) == resolve_version(registry, "dict", "v2") == resolve_version(registry, "dict", "2") == paths[1]
    assert load_dictionary(registry, "dict").manifest.version == 3


def test_list_dictionaries_names_every_dictionary_with_its_versions(registry):
    publish_one(registry, "alpha")
    publish_one(registry, "alpha")
    publish_one(registry, "beta")
    assert list_dictionaries(registry) == {"alpha": [1, 2], "beta": [1]}
    assert list_dictionaries(registry / "absent") == {}


@pytest.mark.parametrize(
    "reference, expected",
    [("dict", ("dict", None)), ("dict:latest", ("dict", None)), ("dict:3", ("dict", 3)), ("dict:v3", ("dict", 3)),
     ("gpt2-small.mlp_0.v2", ("gpt2-small.mlp_0.v2", None)), ("d_1:v12", ("d_1", 12))],
)
def test_parse_reference_reads_a_name_and_an_optional_version(reference, expected):
    assert parse_reference(reference) == expected


@pytest.mark.parametrize("reference", ["dict:abc", "dict:v", "dict:0", "dict:v0", "dict:-1", "dict:3.0", "dict:vv3"])
def test_parse_reference_rejects_a_bad_version_naming_it(reference):
    with pytest.raises(ConfigError, match="version") as info:
        parse_reference(reference)
    assert repr(reference.partition(":")[2]) in str(info.value)


@pytest.mark.parametrize("reference", ["", "../dict", "a b", ".hidden", "dict/v1", "x" * 101 + ":1"])
def test_parse_reference_rejects_a_bad_name_naming_it(reference):
    with pytest.raises(ConfigError, match="name") as info:
        parse_reference(reference)
    assert repr(reference.partition(":")[0]) in str(info.value)


def test_an_unknown_dictionary_name_is_not_found(registry):
    publish_one(registry, "dict")
    with pytest.raises(ArtifactNotFound, match="other"):
        load_dictionary(registry, "other")


@pytest.mark.parametrize("version", [7, "v7", "7"])
def test_an_unknown_version_is_not_found(registry, version):
    publish_one(registry, "dict")
    with pytest.raises(ArtifactNotFound, match="7"):
        load_dictionary(registry, "dict", version)


@pytest.mark.parametrize("version", ["abc", "vv1", ".tmp-1", "1.0"])
def test_a_malformed_version_is_a_config_error_not_a_library_error(registry, version):
    publish_one(registry, "dict")
    with pytest.raises(ConfigError, match="version"):
        resolve_version(registry, "dict", version)


# ---- refusing a corrupted or foreign version --------------------------------------------------------------------


def _flip_last_byte(version_dir: Path, file: str = SAE_FILE) -> None:
    path = version_dir / file
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01  # inside the tensor data, so the file still parses as safetensors
    path.write_bytes(bytes(data))


def _record_in_ledger(version_dir: Path) -> None:
    """Record the version's present manifest in the ledger, as a release that wrote it would have: the edits
    below then reach the manifest's own checks instead of stopping at the ledger's digest."""
    ledger_path = version_dir.parent / LEDGER_FILE
    ledger = json.loads(ledger_path.read_text())
    ledger["versions"][version_dir.name[1:]]["manifest_sha256"] = sha256_of(version_dir / MANIFEST_FILE)
    ledger_path.write_text(json.dumps(ledger))


def _edit_manifest(version_dir: Path, **changes) -> None:
    path = version_dir / MANIFEST_FILE
    manifest = json.loads(path.read_text())
    manifest.update(changes)
    path.write_text(json.dumps(manifest))
    _record_in_ledger(version_dir)


def _write_manifest(version_dir: Path, data: bytes) -> None:
    (version_dir / MANIFEST_FILE).write_bytes(data)
    _record_in_ledger(version_dir)


def _replace_tensors_with_wrong_shapes(version_dir: Path) -> None:
    """A well-formed file with a matching sha256 in the manifest, but tensors of the wrong shape."""
    tensors = {"W_enc": torch.zeros(D_IN + 1, D_SAE), "b_enc": torch.zeros(D_SAE), "W_dec": torch.zeros(D_SAE, D_IN), "b_dec": torch.zeros(D_IN)}
    save_file(tensors, str(version_dir / SAE_FILE))
    manifest = json.loads((version_dir / MANIFEST_FILE).read_text())
    manifest["files"][SAE_FILE] = sha256_of(version_dir / SAE_FILE)
    (version_dir / MANIFEST_FILE).write_text(json.dumps(manifest))
    _record_in_ledger(version_dir)


CORRUPTIONS = {
    "flipped_byte_in_sae": (_flip_last_byte, [SAE_FILE, "sha256"]),
    "flipped_byte_in_features": (lambda d: _flip_last_byte(d, FEATURES_FILE), [FEATURES_FILE, "sha256"]),
    "missing_sae_file": (lambda d: (d / SAE_FILE).unlink(), [SAE_FILE, "missing"]),
    "missing_manifest": (lambda d: (d / MANIFEST_FILE).unlink(), [MANIFEST_FILE, "missing"]),
    "format_version_2": (lambda d: _edit_manifest(d, format_version=2), ["format_version", "2"]),
    "unknown_architecture": (lambda d: _edit_manifest(d, architecture="quantum"), ["architecture", "quantum"]),
    "manifest_not_json": (lambda d: _write_manifest(d, b"{not json"), [MANIFEST_FILE, "JSON"]),
    "manifest_not_utf8": (lambda d: _write_manifest(d, b"\xff\xfe\x00"), [MANIFEST_FILE, "JSON"]),
    "manifest_a_list": (lambda d: _write_manifest(d, b"[1, 2]"), [MANIFEST_FILE, "object"]),
    "manifest_bad_field": (lambda d: _edit_manifest(d, input_scale="big"), ["input_scale"]),
    "manifest_lists_no_sae_file": (lambda d: _edit_manifest(d, files={}), [SAE_FILE]),
    "tensor_of_wrong_shape": (_replace_tensors_with_wrong_shapes, ["W_enc", "shape"]),
}


@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_a_tampered_version_is_refused_with_an_artifact_error_naming_the_problem(registry, corruption):
    corrupt, words = CORRUPTIONS[corruption]
    version_dir = publish_one(registry, features={"density": torch.rand(D_SAE)})
    corrupt(version_dir)

    with pytest.raises(ArtifactError) as info:
        load_dictionary(registry, "dict", "latest")

    assert type(info.value) is ArtifactError  # the project's own type, never a library exception
    message = str(info.value)
    for word in words:
        assert word in message
    assert "dict/v1" in message and str(registry) not in message


def test_verify_passes_an_untouched_version_and_returns_its_manifest(registry):
    version_dir = publish_one(registry)
    assert verify(version_dir) == read_manifest(version_dir)[0]


def test_load_refuses_a_dictionary_trained_on_another_model(registry):
    publish_one(registry)
    other = hashlib.sha256(b"another model").hexdigest()
    with pytest.raises(ArtifactMismatch, match="tiny-gpt2"):
        load_dictionary(registry, "dict", expected_model_checksum=other)


def test_load_refuses_a_dictionary_of_another_input_width(registry):
    publish_one(registry)
    with pytest.raises(ArtifactMismatch, match="d_in=8"):
        load_dictionary(registry, "dict", expected_model_checksum=MODEL.checksum, expected_d_in=D_IN * 2)


# ---- atomicity and concurrency ----------------------------------------------------------------------------------


def _entries(registry: Path, name: str = "dict") -> list[str]:
    """The dictionary directory's entries other than its ledger and lock."""
    return sorted(p.name for p in (registry / name).iterdir() if p.name not in (LEDGER_FILE, LOCK_FILE))


def test_a_publish_that_fails_while_writing_leaves_no_version_and_no_temporary_directory(registry, monkeypatch):
    publish_one(registry)
    real_save_file, calls = artifact.save_file, []

    def save_file_crashing_on_the_features_file(*args, **kwargs):
        calls.append(args[1])
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real_save_file(*args, **kwargs)

    monkeypatch.setattr(artifact, "save_file", save_file_crashing_on_the_features_file)
    with pytest.raises(WriteFailed, match="No space left on device"):
        publish_one(registry, features={"density": torch.rand(D_SAE)})
    monkeypatch.undo()

    assert calls[1].endswith(FEATURES_FILE)
    assert _entries(registry) == ["v1"]
    assert publish_one(registry).name == "v2"


_PUBLISHER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    import torch
    from monosemantic.artifact import HookRef, ModelRef, publish
    from monosemantic.sae import SAEConfig, build_sae

    registry, name, writer, count = Path(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4])
    sae = build_sae(SAEConfig.build(architecture="relu", d_in=8, d_sae=16), seed=0)
    features = {"density": torch.rand(16)}
    model = ModelRef(name="tiny-gpt2", checksum="0" * 64)
    hook = HookRef(name="blocks.0.mlp.hook_post", module_path="transformer.h.0.mlp.act")
    print("ready", flush=True)
    sys.stdin.readline()  # wait for "go", so that concurrent publishers really overlap
    for i in range(count):
        path = publish(registry, name, sae, model=model, hook=hook, features=features, extra={"training": {"writer": writer, "i": i}})
        print(path.name, flush=True)
    """
)


def _start_publisher(registry: Path, writer: str, count: int) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen(
        [sys.executable, "-c", _PUBLISHER, str(registry), "dict", writer, str(count)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=REPO,
    )
    assert process.stdout.readline().strip() == "ready"
    return process


def _assert_every_listed_version_verifies(registry: Path) -> list[int]:
    versions = list_versions(registry, "dict")
    assert versions == list(range(1, len(versions) + 1))
    for number in versions:
        manifest = verify(registry / "dict" / f"v{number}")
        assert manifest.version == number
    return versions


def test_a_publisher_killed_mid_way_leaves_only_complete_versions(registry):
    process = _start_publisher(registry, "killed", 10_000)
    try:
        process.stdin.write("go\n")
        process.stdin.flush()
        published = [process.stdout.readline().strip() for _ in range(3)]
        deadline = time.monotonic() + 10
        while not any(p.name.startswith(".tmp-") for p in (registry / "dict").iterdir()) and time.monotonic() < deadline:
            pass  # spin until the next publish has started writing, then kill it there
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.kill()
        process.wait(timeout=30)
        process.stdout.close()
        process.stdin.close()

    assert published == ["v1", "v2", "v3"]
    versions = _assert_every_listed_version_verifies(registry)
    assert len(versions) >= 3
    for entry in _entries(registry):
        assert entry in {f"v{n}" for n in versions} or entry.startswith(".tmp-")
        if entry.startswith(".tmp-"):  # a partial write is never listed and never resolves
            with pytest.raises((ConfigError, ArtifactNotFound)):
                resolve_version(registry, "dict", entry)
    assert resolve_version(registry, "dict") == registry / "dict" / f"v{versions[-1]}"
    assert load_dictionary(registry, "dict").manifest.version == versions[-1]


@pytest.mark.slow
def test_two_concurrent_publishers_produce_distinct_complete_versions(registry):
    processes = [_start_publisher(registry, writer, 5) for writer in ("a", "b")]
    for process in processes:
        process.stdin.write("go\n")
        process.stdin.flush()
    outputs = []
    for process in processes:
        out, _ = process.communicate(timeout=60)
        assert process.returncode == 0
        outputs.append(out.split())

    assert sorted(outputs[0] + outputs[1], key=lambda v: int(v[1:])) == [f"v{n}" for n in range(1, 11)]
    assert _assert_every_listed_version_verifies(registry) == list(range(1, 11))
    written = {(m.training["writer"], m.training["i"]) for m in (verify(registry / "dict" / f"v{n}") for n in range(1, 11))}
    assert written == {(w, i) for w in "ab" for i in range(5)}
    assert _entries(registry) == sorted(f"v{n}" for n in range(1, 11))
