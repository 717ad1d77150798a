"""Specifications of the registry as the root of trust: the ledger's manifest digests, numbers never reused,
directories holding only what their manifest lists, byte-identical files, no NaN dictionaries, and temporary
directories of killed publishers cleaned up (never one still being written)."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from monosemantic.artifact import (
    FEATURES_FILE,
    MANIFEST_FILE,
    SAE_FILE,
    HookRef,
    ModelRef,
    list_versions,
    load_dictionary,
    publish,
    resolve_version,
    save_safetensors,
    seal,
    verify,
)
from monosemantic.errors import ArtifactError, ArtifactNotFound
from monosemantic.ledger import LEDGER_FILE, TEMPORARY_PREFIX, held_directory
from monosemantic.sae import SAEConfig, build_sae

REPO = Path(__file__).resolve().parents[1]
MODEL = ModelRef(name="tiny", checksum=hashlib.sha256(b"tiny").hexdigest())
HOOK = HookRef(name="blocks.0.mlp.hook_post", module_path="transformer.h.0.mlp.act")


def tiny_sae(seed: int = 0):
    return build_sae(SAEConfig.build(architecture="relu", d_in=8, d_sae=16, input_scale=1.5), seed=seed)


def publish_tiny(registry: Path, name: str = "dict", **kwargs) -> Path:
    return publish(registry, name, tiny_sae(), model=MODEL, hook=HOOK, features={"density": torch.rand(16)}, **kwargs)


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def edit_manifest(version_dir: Path, change) -> None:
    manifest = json.loads((version_dir / MANIFEST_FILE).read_text())
    change(manifest)
    (version_dir / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2))


# ---- the manifest is covered by a digest checked on every read ---------------------------------------------------

HAND_EDITS = {
    "input_scale_times_ten": lambda m: m.update(input_scale=m["input_scale"] * 10, sae={**m["sae"], "input_scale": m["input_scale"] * 10}),
    "a_file_dropped_from_files": lambda m: m["files"].pop(FEATURES_FILE),
    "hook_moved_to_a_same_width_module": lambda m: m.update(hook={**m["hook"], "module_path": "transformer.h.0.mlp.c_fc"}),
}


@pytest.mark.parametrize("edit", sorted(HAND_EDITS))
def test_a_hand_edited_manifest_is_refused_by_verify_and_load(tmp_path, edit):
    version_dir = publish_tiny(tmp_path)
    edit_manifest(version_dir, HAND_EDITS[edit])

    for read in (lambda: verify(version_dir), lambda: load_dictionary(tmp_path, "dict", 1)):
        with pytest.raises(ArtifactError, match="digest recorded when it was published"):
            read()


def test_a_file_in_the_version_directory_that_the_manifest_does_not_list_is_refused(tmp_path):
    version_dir = publish_tiny(tmp_path)
    (version_dir / "extra.safetensors").write_bytes(b"not listed")

    with pytest.raises(ArtifactError, match="extra.safetensors, which its manifest does not list"):
        load_dictionary(tmp_path, "dict")


def test_a_copy_of_v1_at_v3_is_refused_not_reported_as_v1(tmp_path):
    publish_tiny(tmp_path)
    shutil.copytree(tmp_path / "dict" / "v1", tmp_path / "dict" / "v3")

    with pytest.raises(ArtifactError, match="dict/v3 was not published into this registry"):
        load_dictionary(tmp_path, "dict", "latest")


def test_a_copied_version_with_a_forged_ledger_entry_is_still_refused_by_its_name_and_number(tmp_path):
    publish_tiny(tmp_path)
    shutil.copytree(tmp_path / "dict" / "v1", tmp_path / "dict" / "v3")
    ledger = json.loads((tmp_path / "dict" / LEDGER_FILE).read_text())
    ledger["versions"]["3"] = ledger["versions"]["1"]
    (tmp_path / "dict" / LEDGER_FILE).write_text(json.dumps(ledger))

    with pytest.raises(ArtifactError, match="the manifest calls itself dict/v1"):
        verify(tmp_path / "dict" / "v3")


def test_a_registry_without_a_ledger_is_refused_until_sealed_and_sealing_checks_every_file(tmp_path):
    publish_tiny(tmp_path)
    publish_tiny(tmp_path)
    (tmp_path / "dict" / LEDGER_FILE).unlink()  # as a release before the ledger left it
    with pytest.raises(ArtifactError, match="monosemantic-train seal"):
        load_dictionary(tmp_path, "dict")

    data = bytearray((tmp_path / "dict" / "v2" / SAE_FILE).read_bytes())
    data[-1] ^= 1
    (tmp_path / "dict" / "v2" / SAE_FILE).write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="v2: sae.safetensors does not match its sha256"):
        seal(tmp_path, "dict")
    assert not (tmp_path / "dict" / LEDGER_FILE).exists()  # nothing recorded while one version is bad

    shutil.rmtree(tmp_path / "dict" / "v2")
    assert seal(tmp_path, "dict") == [1]
    assert load_dictionary(tmp_path, "dict").manifest.version == 1
    assert seal(tmp_path, "dict") == []  # recorded versions are never re-recorded


# ---- version numbers are never reused ------------------------------------------------------------------------------


def test_a_deleted_version_number_is_never_given_again(tmp_path):
    publish_tiny(tmp_path)
    shutil.rmtree(publish_tiny(tmp_path))

    assert publish_tiny(tmp_path).name == "v3"
    with pytest.raises(ArtifactNotFound, match="no version 2"):  # a client pinned to name:2 fails loudly
        resolve_version(tmp_path, "dict", 2)
    assert list_versions(tmp_path, "dict") == [1, 3]


def test_every_loaded_dictionary_carries_the_manifest_digest_the_ledger_recorded(tmp_path):
    version_dir = publish_tiny(tmp_path)
    ledger = json.loads((tmp_path / "dict" / LEDGER_FILE).read_text())

    assert load_dictionary(tmp_path, "dict").manifest_sha256 == ledger["versions"]["1"]["manifest_sha256"] == sha256_of(version_dir / MANIFEST_FILE)


# ---- identical input, identical bytes ------------------------------------------------------------------------------


def test_saving_the_same_tensors_and_metadata_gives_the_same_bytes_every_time(tmp_path):
    tensors = {"W_enc": torch.arange(12.0).reshape(3, 4), "b_enc": torch.ones(4)}
    metadata = {"format": "monosemantic-v1", "architecture": "relu", "a": "1", "b": "2"}
    digests = set()
    for i in range(20):  # the library's own metadata map comes out in a per-call order: 20 draws catch it
        save_safetensors(tensors, tmp_path / f"{i}.safetensors", metadata)
        digests.add(sha256_of(tmp_path / f"{i}.safetensors"))
    assert len(digests) == 1


_PUBLISH_ONCE = """
import sys, torch
from monosemantic.artifact import HookRef, ModelRef, publish
from monosemantic.sae import SAEConfig, build_sae
sae = build_sae(SAEConfig.build(architecture="jumprelu", d_in=8, d_sae=16, input_scale=1.5), seed=3)
path = publish(sys.argv[1], "dict", sae, model=ModelRef(name="m", checksum="c"), hook=HookRef(name="h", module_path="h"),
               features={"density": torch.linspace(0, 1, 16), "max_activation": torch.ones(16)})
print(path)
"""


@pytest.mark.slow
def test_publishing_the_same_dictionary_in_separate_processes_gives_byte_identical_tensor_files(tmp_path):
    paths = []
    for _ in range(4):
        out = subprocess.run([sys.executable, "-c", _PUBLISH_ONCE, str(tmp_path)], capture_output=True, text=True, cwd=REPO, check=True)
        paths.append(Path(out.stdout.strip()))
    for file in (SAE_FILE, FEATURES_FILE):
        assert len({sha256_of(p / file) for p in paths}) == 1, file


# ---- nothing non-finite is published -------------------------------------------------------------------------------


def test_publish_refuses_weights_that_are_not_finite_and_publishes_nothing(tmp_path):
    sae = tiny_sae()
    with torch.no_grad():
        sae.W_dec[3, 2] = float("nan")
    with pytest.raises(ArtifactError, match="weights are not finite .W_dec"):
        publish(tmp_path, "dict", sae, model=MODEL, hook=HOOK)
    assert list_versions(tmp_path, "dict") == []


@pytest.mark.parametrize("metrics", [{"mse": float("nan")}, {"fvu": float("inf")}, {"nested": {"values": [1.0, float("nan")]}}])
def test_publish_refuses_metrics_that_are_not_finite(tmp_path, metrics):
    with pytest.raises(ArtifactError, match="metrics are not finite"):
        publish(tmp_path, "dict", tiny_sae(), model=MODEL, hook=HOOK, extra={"metrics": metrics})
    assert list_versions(tmp_path, "dict") == []


# ---- temporary directories of killed publishers ---------------------------------------------------------------------


def test_the_next_publish_removes_abandoned_temporary_directories_but_not_one_being_written(tmp_path):
    publish_tiny(tmp_path)
    abandoned = tmp_path / "dict" / f"{TEMPORARY_PREFIX}abandoned"
    abandoned.mkdir()
    (abandoned / SAE_FILE).write_bytes(b"half a file")
    with held_directory(tmp_path / "dict" / f"{TEMPORARY_PREFIX}in-progress") as in_progress:
        publish_tiny(tmp_path)
        assert not abandoned.exists()
        assert in_progress.exists()


def test_a_temporary_directory_removed_before_its_writer_locks_it_is_made_again(tmp_path, monkeypatch):
    # The interleaving two publishers hit in CI: B makes its temporary directory, and before B's flock A's
    # publish (holding the publishing lock) finds it unlocked and removes it as abandoned. Forced here by running
    # A's sweep, the real remove_abandoned, just before B's first flock on its directory.
    import fcntl

    from monosemantic import ledger

    real_flock = fcntl.flock
    swept = []

    def flock_after_a_sweep(fd, operation):
        if not swept and operation == fcntl.LOCK_EX:
            swept.append(ledger.remove_abandoned(tmp_path / "dict"))
        return real_flock(fd, operation)

    (tmp_path / "dict").mkdir()
    monkeypatch.setattr(ledger.fcntl, "flock", flock_after_a_sweep)
    with held_directory(tmp_path / "dict" / f"{TEMPORARY_PREFIX}b") as written:
        (written / "part").write_bytes(b"B's file")
        assert (written / "part").read_bytes() == b"B's file"
    assert swept == [[f"{TEMPORARY_PREFIX}b"]]
