"""The CNN path end to end on the CPU: DCMTK storescu pushes a chest CT with nodules to ``pacsnode serve``;
the shipped lung-nodule model runs in a worker; its SEG, per-nodule SR and SC key images arrive at a DCMTK
storescp, valid per dciodvfy, and the nodules it reports are where the phantom put them. Also: a model package
whose weights do not match its manifest is refused by ``check-config`` with the reason.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
import yaml

from pacsnode.analysis.modeldev.synthetic import PhantomSpec, write_chest_ct
from tests.support.analysis import SC, SEG, SR, by_class, jobs_in, storescu, validate_results
from tests.support.helpers import REPO, pacsnode_cmd, sha256_file
from tests.support.models import make_package
from tests.support.peers import StorescpPeer
from tests.support.served import Served


def _node(tmp_path: Path, dest: StorescpPeer, *, name: str, pipeline: str, params: dict[str, Any]) -> Served:
    """A served node with one CT rule (``pipeline`` with ``params``) exporting to ``dest``."""
    rule = {
        "name": name,
        "pipeline": pipeline,
        "match": {"modality": ["CT"]},
        "params": params,
        "destinations": ["DEST"],
    }
    served = Served(
        tmp_path,
        sections={
            "analysis": {
                "workers": 1,
                "quiet_seconds": 1.5,
                "scan_interval_seconds": 0.3,
                "lease_seconds": 10,
                "rules": [rule],
            },
            "export": {"backoff_seconds": 0.5, "poll_seconds": 0.2},
            "remote_nodes": {"DEST": {"ae_title": dest.ae_title, "host": "127.0.0.1", "port": dest.port}},
        },
    )
    served.start()
    return served


def _long_axis_and_volume(sr: pydicom.Dataset) -> list[tuple[float, float]]:
    """(volume mL, long axis mm) of every measurement group of a TID 1500 SR."""
    out = []

    def numbers(items: Any) -> dict[str, float]:
        found: dict[str, float] = {}
        for item in items:
            if item.get("ValueType") == "NUM" and "MeasuredValueSequence" in item:
                found[item.ConceptNameCodeSequence[0].CodeValue] = float(item.MeasuredValueSequence[0].NumericValue)
            if "ContentSequence" in item:
                for key, value in numbers(item.ContentSequence).items():
                    found.setdefault(key, value)
        return found

    for item in sr.ContentSequence:
        if item.ConceptNameCodeSequence[0].CodeMeaning == "Imaging Measurements":
            for group in item.ContentSequence:
                values = numbers(group.get("ContentSequence", []))
                if "118565006" in values:  # SCT Volume, SCT Long axis
                    out.append((values["118565006"], values.get("103339001", 0.0)))
    return out


@pytest.mark.dcmtk
def test_pushed_ct_with_nodules_comes_back_with_each_nodule_measured(
    tmp_path: Path, storescp_factory: Callable[..., StorescpPeer]
) -> None:
    spec = PhantomSpec(
        slices=28,
        size=512,
        slice_thickness_mm=2.0,
        nodules=3,
        nodule_diameter_mm=(12.0, 20.0),
        nodule_kinds=("solid",),
        vessel_spheres=False,
    )
    truth = write_chest_ct(tmp_path / "ct", spec, seed=11)
    assert len(truth.nodules) == 3
    dest = storescp_factory(ae_title="DEST")
    served = _node(
        tmp_path,
        dest,
        name="nodules",
        pipeline="ct-lung-nodule",
        params={"engine": {"device": "cpu"}, "max_key_images": 5},
    )

    storescu(served.port, truth.paths)
    (job,) = jobs_in(served, {"done", "failed"})
    assert job["state"] == "done", job["last_error"]
    findings = job["result"]["findings"]
    assert findings, job["result"]
    expected = 2 + min(len(findings), 5)  # SEG, SR and one key image per finding
    received = served.wait(
        f"{expected} results at the destination", lambda: len(dest.received()) >= expected and dest.received(), 60
    )
    classes = by_class(received)
    assert classes == Counter({SEG: 1, SR: 1, SC: expected - 2}), classes
    validate_results(received)

    # Every phantom nodule is reported near its true centre, with about its true size.
    centres = []
    for f in findings:
        xyz = f["location"].split("patient x ")[1].split(" mm")[0].replace("y ", "").replace("z ", "").split()
        centres.append(np.array([float(v) for v in xyz]))
    for nodule in truth.nodules:
        distance = min(float(np.linalg.norm(c - np.array(nodule.centre_mm))) for c in centres)
        assert distance < nodule.diameter_mm / 2, (nodule, findings)
    sr = next(pydicom.dcmread(f) for f in received if str(pydicom.dcmread(f).SOPClassUID) == SR)
    measured = _long_axis_and_volume(sr)
    # The SR states what the job found, finding by finding (largest first).
    assert [round(v, 3) for v, _ in measured] == [f["volume_ml"] for f in findings]
    assert [round(d, 1) for _, d in measured] == [f["longest_diameter_mm"] for f in findings]
    # Sizes: the finding nearest each nodule has about its volume. The demonstration model under-segments
    # some nodules against the pleura (see `pacsnode evaluate`), so two of the three must agree.
    agree = 0
    for nodule in truth.nodules:
        nearest = min(
            range(len(findings)), key=lambda i: float(np.linalg.norm(centres[i] - np.array(nodule.centre_mm)))
        )
        volume_ml, long_axis = measured[nearest]
        agree += 0.5 * nodule.volume_ml < volume_ml < 2.0 * nodule.volume_ml and long_axis > 0.7 * nodule.diameter_mm
    assert agree >= 2, (truth.nodules, findings)
    for ds in (pydicom.dcmread(f, stop_before_pixels=True) for f in received):
        assert ds.StudyInstanceUID == truth.study_instance_uid
    assert served.stop() == 0


def test_check_config_refuses_a_model_whose_weights_do_not_match(tmp_path: Path) -> None:
    import subprocess

    package = make_package(tmp_path / "model")
    config = tmp_path / "pacsnode.yaml"
    rule = {"name": "cnn", "pipeline": "model", "params": {"model": str(package)}}
    config.write_text(
        yaml.safe_dump(
            {
                "storage": {"root": str(tmp_path / "s"), "database_url": f"sqlite:///{tmp_path / 'i.db'}"},
                "analysis": {"rules": [rule]},
            }
        )
    )
    ok = subprocess.run(
        pacsnode_cmd("--config", str(config), "check-config"),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout.split("\n", 1)[1])["analysis"]["rules"][0]["pipeline"] == "model"

    manifest = json.loads((package / "manifest.json").read_text())
    manifest["weights"]["sha256"] = "1" * 64
    (package / "manifest.json").write_text(json.dumps(manifest))
    bad = subprocess.run(
        pacsnode_cmd("--config", str(config), "check-config"),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert bad.returncode == 2
    assert "analysis.rules.0" in bad.stderr and "wrong or damaged weights" in bad.stderr, bad.stderr

    # Right checksum, wrong architecture: the manifest validates, the deeper check builds the network and fails.
    manifest["weights"]["sha256"] = sha256_file(package / "model.pt")
    manifest["architecture"]["params"]["channels"] = [8, 16]
    (package / "manifest.json").write_text(json.dumps(manifest))
    deep = subprocess.run(
        pacsnode_cmd("--config", str(config), "check-config"),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert deep.returncode == 2
    assert "analysis.rules[cnn]" in deep.stderr and "cannot load model.pt" in deep.stderr, deep.stderr


@pytest.mark.dcmtk
def test_a_torchscript_monai_bundle_in_a_rule_at_default_settings_analyses_a_pushed_ct(
    tmp_path: Path, storescp_factory: Callable[..., StorescpPeer]
) -> None:
    """A MONAI Bundle as the Model Zoo ships it (``models/model.ts``, a traced 2D network with batch norm),
    named in a rule with no engine settings: the worker runs it on a pushed CT and its results arrive."""
    from tests.support.models import make_bundle

    bundle = make_bundle(tmp_path / "bundle", torchscript=True, dims="2d")
    truth = write_chest_ct(tmp_path / "ct", PhantomSpec(slices=10, size=32), seed=3)
    dest = storescp_factory(ae_title="DEST")
    served = _node(tmp_path, dest, name="bundle", pipeline="model", params={"model": str(bundle)})
    storescu(served.port, truth.paths)
    (job,) = jobs_in(served, {"done", "failed"})
    assert job["state"] == "done", job["last_error"]
    received = served.wait("the bundle's results at the destination", lambda: dest.received(), 60)
    assert set(by_class(received)) <= {SEG, SR, SC}, by_class(received)
    validate_results(received)
    for ds in (pydicom.dcmread(f, stop_before_pixels=True) for f in received):
        assert ds.StudyInstanceUID == truth.study_instance_uid
    assert served.stop() == 0
