"""Model packages and MONAI Bundles: what loads, and the clear errors for what does not."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pacsnode.analysis.cnn.package import BUILTIN_MODELS, load_package
from pacsnode.analysis.errors import ModelError
from tests.support.helpers import sha256_file
from tests.support.models import TINY_UNET_3D, make_bundle, make_package


def _edit(root: Path, **changes: object) -> None:
    manifest = json.loads((root / "manifest.json").read_text())
    manifest.update(changes)
    (root / "manifest.json").write_text(json.dumps(manifest))


def test_a_good_package_loads_and_builds(tmp_path: Path) -> None:
    package = load_package(make_package(tmp_path / "m"))
    assert package.manifest.name == "tiny"
    assert package.manifest.weights.sha256 == sha256_file(tmp_path / "m" / "model.pt")
    net = package.build("cpu")
    assert not net.training


def test_wrong_checksum_is_refused_naming_both_values(tmp_path: Path) -> None:
    root = make_package(tmp_path / "m")
    _edit(root, weights={"file": "model.pt", "format": "state_dict", "sha256": "0" * 64})
    with pytest.raises(ModelError, match=r"SHA-256 of model.pt is [0-9a-f]{64}, the manifest states 0{64}"):
        load_package(root)


def test_damaged_weights_are_refused(tmp_path: Path) -> None:
    root = make_package(tmp_path / "m")
    with (root / "model.pt").open("ab") as f:
        f.write(b"\0")
    with pytest.raises(ModelError, match="wrong or damaged weights"):
        load_package(root)


def test_missing_weights_are_refused(tmp_path: Path) -> None:
    root = make_package(tmp_path / "m")
    (root / "model.pt").unlink()
    with pytest.raises(ModelError, match="weights file model.pt is missing"):
        load_package(root)


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ({"input": {"dims": "2d", "channels": 2}}, "input"),
        ({"output": {"kind": "segmentation", "labels": []}}, "output"),
        ({"weights": {"file": "../model.pt", "format": "state_dict", "sha256": "0" * 64}}, "weights.file"),
        ({"weights": {"file": "model.pt", "format": "onnx", "sha256": "0" * 64}}, "weights.format"),
        ({"surprise": 1}, "surprise"),
        ({"name": "bad name/../x"}, "name"),
    ],
)
def test_bad_manifest_names_the_key(tmp_path: Path, change: dict[str, object], key: str) -> None:
    root = make_package(tmp_path / "m")
    _edit(root, **change)
    with pytest.raises(ModelError, match=rf"manifest key {key}"):
        load_package(root)


def test_a_manifest_that_is_not_json_is_refused(tmp_path: Path) -> None:
    root = make_package(tmp_path / "m")
    (root / "manifest.json").write_text("{not json")
    with pytest.raises(ModelError, match="cannot read manifest.json"):
        load_package(root)


def test_no_folder_or_no_manifest(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="no such folder"):
        load_package(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="neither manifest.json nor configs/metadata.json"):
        load_package(tmp_path / "empty")


def test_weights_of_another_architecture_fail_at_build(tmp_path: Path) -> None:
    root = make_package(tmp_path / "m")
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["architecture"]["params"]["channels"] = [8, 16]
    (root / "manifest.json").write_text(json.dumps(manifest))
    package = load_package(root)
    with pytest.raises(ModelError, match="cannot load model.pt"):
        package.build("cpu")


def test_unknown_architecture_fails_at_build(tmp_path: Path) -> None:
    root = make_package(tmp_path / "m")
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["architecture"]["name"] = "NoSuchNet"
    (root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelError, match="architecture 'NoSuchNet' not found"):
        load_package(root).build("cpu")


@pytest.mark.parametrize("torchscript", [False, True])
def test_a_monai_bundle_loads(tmp_path: Path, torchscript: bool) -> None:
    package = load_package(make_bundle(tmp_path / "b", torchscript=torchscript))
    manifest = package.manifest
    assert manifest.name == "Tiny-spleen-segmentation"
    assert manifest.input.dims == "3d" and manifest.input.roi_size == [16, 16, 16]
    assert manifest.output.activation == "softmax"
    assert [(label.value, label.name) for label in manifest.output.labels] == [(1, "spleen")]
    net = package.build("cpu")
    assert sum(p.numel() for p in net.parameters()) > 0


def test_a_bundle_without_a_sha256_needs_one_from_the_config(tmp_path: Path) -> None:
    root = make_bundle(tmp_path / "b", with_hash=False)
    with pytest.raises(ModelError, match="no SHA-256 for models/model.pt"):
        load_package(root)
    package = load_package(root, overrides={"sha256": sha256_file(root / "models" / "model.pt")})
    assert package.manifest.weights.file == "models/model.pt"
    with pytest.raises(ModelError, match="wrong or damaged weights"):
        load_package(root, overrides={"sha256": "ab" * 32})


def test_overrides_give_a_bundle_dicom_codes(tmp_path: Path) -> None:
    root = make_bundle(tmp_path / "b")
    label = {"value": 1, "name": "spleen", "type": {"scheme": "SCT", "value": "78961009", "meaning": "Spleen"}}
    package = load_package(root, overrides={"output": {"labels": [label]}})
    assert package.manifest.output.labels[0].type_code().value == "78961009"
    assert TINY_UNET_3D["params"]["out_channels"] == package.manifest.output.channels_needed


def test_the_shipped_model_is_small_and_its_checksum_holds() -> None:
    package = load_package("lung-nodule")
    assert package.root == BUILTIN_MODELS["lung-nodule"]
    assert package.weights_path.stat().st_size < 10 * 1024 * 1024
    assert "NOT FOR DIAGNOSTIC USE" in package.manifest.intended_use
    assert package.manifest.training["command"] == "pacsnode train"


def test_the_file_hash_cache_keeps_the_most_recently_used(tmp_path: Path) -> None:
    from pacsnode.analysis.cnn import package as package_module

    files = []
    for i in range(package_module.HASHES_KEPT + 1):
        path = tmp_path / f"f{i}"
        path.write_bytes(str(i).encode())
        files.append(path)
    for path in files[:-1]:
        assert package_module.sha256_of(path) == sha256_file(path)
    package_module.sha256_of(files[0])  # used again: now the most recent
    package_module.sha256_of(files[-1])  # one more than the cache holds: the least recently used goes
    cached = {key[0] for key in package_module._HASHES}
    assert len(package_module._HASHES) <= package_module.HASHES_KEPT
    assert str(files[0].resolve()) in cached
    assert str(files[1].resolve()) not in cached
