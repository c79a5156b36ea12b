"""Query/Retrieve against real peers: DCMTK findscu, getscu, movescu -> storescp, and Orthanc.

The tests that start a listening peer (storescp, Orthanc) need the private
network namespace that ``bash .ci/test`` provides.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelMove

from pacsnode.node.dicom.handlers import set_nodelay
from tests.support.helpers import (
    PYDICOM_FILES,
    make_settings,
    pydicom_data_files,
    store_datasets,
)
from tests.support.node import RunningNode
from tests.support.peers import OrthancPeer, StorescpPeer, require

pytestmark = pytest.mark.dcmtk

ENV = {"TCP_NODELAY": "1", "PATH": "/usr/bin:/bin:/usr/local/bin"}


def _files() -> dict[str, Path]:
    return {
        "explicit": PYDICOM_FILES / "CT_small.dcm",
        "jpeg_lossless": pydicom_data_files() / "JPEG-LL.dcm",
        "j2k_lossless": pydicom_data_files() / "RG3_J2KR.dcm",
    }


def _study(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID)


def _filled(node: RunningNode) -> dict[str, Path]:
    files = _files()
    assert store_datasets(node.port, list(files.values())) == [0, 0, 0]
    return files


def _dcmtk(tool: str, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [require(tool), *args], capture_output=True, text=True, timeout=120, env=ENV, cwd=cwd, check=False
    )


def test_findscu_study_query(node: RunningNode, tmp_path: Path) -> None:
    files = _filled(node)
    out = tmp_path / "find"
    out.mkdir()
    result = _dcmtk(
        "findscu",
        "-S",
        "-aec",
        "PACSNODE",
        "-X",
        "-od",
        str(out),
        "-k",
        "QueryRetrieveLevel=STUDY",
        "-k",
        "StudyInstanceUID",
        "-k",
        "PatientName",
        "-k",
        "NumberOfStudyRelatedInstances",
        "-k",
        f"StudyDate=-{'20991231'}",
        "127.0.0.1",
        str(node.port),
    )
    assert result.returncode == 0, result.stderr
    answers = [pydicom.dcmread(p) for p in sorted(out.glob("rsp*.dcm"))]
    by_uid = {a.StudyInstanceUID: a for a in answers}
    expected = {
        _study(p): pydicom.dcmread(p, stop_before_pixels=True)
        for p in files.values()
        if pydicom.dcmread(p, stop_before_pixels=True).get("StudyDate")
    }
    assert set(by_uid) == set(expected)
    for uid, ds in expected.items():
        assert str(by_uid[uid].PatientName) == str(ds.PatientName)
        assert int(by_uid[uid].NumberOfStudyRelatedInstances) == 1


def test_getscu_receives_decompressed_when_it_proposes_only_uncompressed(node: RunningNode, tmp_path: Path) -> None:
    files = _filled(node)
    source = pydicom.dcmread(files["jpeg_lossless"])
    out = tmp_path / "get"
    out.mkdir()
    result = _dcmtk(
        "getscu",
        "-S",
        "-aec",
        "PACSNODE",
        "-od",
        str(out),
        "-k",
        "QueryRetrieveLevel=STUDY",
        "-k",
        f"StudyInstanceUID={source.StudyInstanceUID}",
        "127.0.0.1",
        str(node.port),
    )
    assert result.returncode == 0, result.stderr
    (received,) = [pydicom.dcmread(p) for p in out.iterdir() if p.is_file()]
    assert received.SOPInstanceUID == source.SOPInstanceUID
    assert not received.file_meta.TransferSyntaxUID.is_compressed
    assert np.array_equal(received.pixel_array, source.pixel_array)


def test_getscu_receives_stored_bytes_when_it_accepts_the_stored_syntax(node: RunningNode, tmp_path: Path) -> None:
    files = _filled(node)
    source = pydicom.dcmread(files["jpeg_lossless"])
    out = tmp_path / "get"
    out.mkdir()
    result = _dcmtk(
        "getscu",
        "-S",
        "-aec",
        "PACSNODE",
        "-od",
        str(out),
        "+xs",
        "-k",
        "QueryRetrieveLevel=SERIES",
        "-k",
        f"StudyInstanceUID={source.StudyInstanceUID}",
        "-k",
        f"SeriesInstanceUID={source.SeriesInstanceUID}",
        "127.0.0.1",
        str(node.port),
    )
    assert result.returncode == 0, result.stderr
    (received,) = [pydicom.dcmread(p) for p in out.iterdir() if p.is_file()]
    assert received.file_meta.TransferSyntaxUID == source.file_meta.TransferSyntaxUID
    assert received.PixelData == source.PixelData


def test_getscu_for_nothing_stored_is_success(node: RunningNode, tmp_path: Path) -> None:
    out = tmp_path / "get"
    out.mkdir()
    result = _dcmtk(
        "getscu",
        "-S",
        "-aec",
        "PACSNODE",
        "-od",
        str(out),
        "-v",
        "-k",
        "QueryRetrieveLevel=STUDY",
        "-k",
        "StudyInstanceUID=1.2.3.4.5.6.7",
        "127.0.0.1",
        str(node.port),
    )
    assert result.returncode == 0, result.stderr
    assert list(out.iterdir()) == []


def _node_with_destination(start_node: Any, tmp_path: Path, name: str, ae_title: str, port: int) -> RunningNode:
    settings = make_settings(tmp_path, remote_nodes={name: {"ae_title": ae_title, "host": "127.0.0.1", "port": port}})
    return start_node(settings)


def test_movescu_to_storescp(start_node: Any, storescp_factory: Callable[..., StorescpPeer], tmp_path: Path) -> None:
    storescp = storescp_factory(ae_title="STORESCP")
    node = _node_with_destination(start_node, tmp_path, "archive", "STORESCP", storescp.port)
    files = _filled(node)
    for key in ("explicit", "j2k_lossless"):
        result = _dcmtk(
            "movescu",
            "-S",
            "-aec",
            "PACSNODE",
            "-aem",
            "STORESCP",
            "-k",
            "QueryRetrieveLevel=STUDY",
            "-k",
            f"StudyInstanceUID={_study(files[key])}",
            "127.0.0.1",
            str(node.port),
        )
        assert result.returncode == 0, result.stderr
    received = {pydicom.dcmread(p).SOPInstanceUID: pydicom.dcmread(p) for p in storescp.received()}
    for key in ("explicit", "j2k_lossless"):
        source = pydicom.dcmread(files[key])
        got = received[source.SOPInstanceUID]
        assert got.file_meta.TransferSyntaxUID == source.file_meta.TransferSyntaxUID
        assert got.PixelData == source.PixelData
    assert len(received) == 2


def test_movescu_unknown_destination_is_refused(node: RunningNode) -> None:
    _filled(node)
    result = _dcmtk(
        "movescu",
        "-v",
        "-S",
        "-aec",
        "PACSNODE",
        "-aem",
        "NOWHERE",
        "-k",
        "QueryRetrieveLevel=STUDY",
        "-k",
        f"StudyInstanceUID={_study(_files()['explicit'])}",
        "127.0.0.1",
        str(node.port),
    )
    assert "Refused: MoveDestinationUnknown" in result.stdout + result.stderr
    assert store_datasets(node.port, [_files()["explicit"]]) == [0]  # still serving


def test_move_reports_failed_instances(
    start_node: Any, storescp_factory: Callable[..., StorescpPeer], tmp_path: Path
) -> None:
    storescp = storescp_factory(ae_title="STORESCP")
    node = _node_with_destination(start_node, tmp_path, "archive", "STORESCP", storescp.port)
    files = _filled(node)
    # a second instance in the CT study, then its file disappears from the store
    lost = pydicom.dcmread(files["explicit"])
    lost.SOPInstanceUID = lost.SOPInstanceUID + ".9"
    lost.file_meta.MediaStorageSOPInstanceUID = lost.SOPInstanceUID
    assert store_datasets(node.port, [lost]) == [0]
    for path in node.archive.store.objects_dir.rglob("*.dcm"):
        if pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID == lost.SOPInstanceUID:
            path.unlink()

    ae = AE(ae_title="MOVESCU")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="PACSNODE", evt_handlers=[(evt.EVT_CONN_OPEN, set_nodelay)])
    assert assoc.is_established
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.StudyInstanceUID = lost.StudyInstanceUID
    try:
        responses = list(assoc.send_c_move(identifier, "STORESCP", StudyRootQueryRetrieveInformationModelMove))
    finally:
        assoc.release()
    final, final_identifier = responses[-1]
    assert int(final.Status) == 0xB000
    assert int(final.NumberOfCompletedSuboperations) == 1
    assert int(final.NumberOfFailedSuboperations) == 1
    assert final_identifier is not None
    failed = final_identifier.FailedSOPInstanceUIDList
    assert (failed if isinstance(failed, str) else list(failed)) in (lost.SOPInstanceUID, [lost.SOPInstanceUID])
    assert [pydicom.dcmread(p).SOPInstanceUID for p in storescp.received()] == [
        pydicom.dcmread(files["explicit"]).SOPInstanceUID
    ]


def test_orthanc_queries_and_retrieves_from_pacsnode(
    start_node: Any, orthanc_factory: Callable[..., OrthancPeer], tmp_path: Path
) -> None:
    settings = make_settings(tmp_path)
    port = settings.node.port
    orthanc = orthanc_factory(ae_title="ORTHANC", modalities={"pacsnode": ("PACSNODE", "127.0.0.1", port)})
    node = start_node(
        make_settings(
            tmp_path,
            node={"port": port},
            remote_nodes={"orthanc": {"ae_title": "ORTHANC", "host": "127.0.0.1", "port": orthanc.dicom_port}},
        )
    )
    files = _filled(node)
    query_id, answers = orthanc.query("pacsnode", "Study", {"PatientName": "*", "StudyInstanceUID": ""})
    assert {a["StudyInstanceUID"] for a in answers} == {_study(p) for p in files.values()}
    orthanc.retrieve_answers(query_id, "ORTHANC")
    expected = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in files.values()}
    assert orthanc.sop_instance_uids() == expected


def _write_config(tmp_path: Path, settings: Any) -> Path:
    import yaml

    path = tmp_path / "pacsnode.yaml"
    path.write_text(yaml.safe_dump(settings.model_dump(mode="json")))
    return path


def _cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    from tests.support.helpers import pacsnode_cmd

    return subprocess.run(
        pacsnode_cmd("--config", str(config), *args), capture_output=True, text=True, timeout=120, check=False
    )


def test_cli_find_and_retrieve_from_orthanc(
    start_node: Any, orthanc_factory: Callable[..., OrthancPeer], tmp_path: Path
) -> None:
    import json

    port = make_settings(tmp_path).node.port
    orthanc = orthanc_factory(ae_title="ORTHANC", modalities={"pacsnode": ("PACSNODE", "127.0.0.1", port)})
    files = _files()
    orthanc.upload(files.values())
    settings = make_settings(
        tmp_path,
        node={"port": port},
        remote_nodes={"orthanc": {"ae_title": "ORTHANC", "host": "127.0.0.1", "port": orthanc.dicom_port}},
    )
    config = _write_config(tmp_path, settings)

    found = _cli(config, "find", "orthanc", "--json", "-k", "PatientName=*", "-k", "StudyInstanceUID")
    assert found.returncode == 0, found.stderr
    answers = json.loads(found.stdout)
    assert {a["StudyInstanceUID"] for a in answers} == {_study(p) for p in files.values()}

    bad = _cli(config, "find", "orthanc", "-k", "NoSuchKeyword=1")
    assert bad.returncode == 2 and "NoSuchKeyword" in bad.stderr

    # C-GET: lands in the archive without a serving node
    jpeg = _study(files["jpeg_lossless"])
    got = _cli(config, "retrieve", "orthanc", "--study", jpeg)
    assert got.returncode == 0, got.stdout + got.stderr
    assert "1 completed, 0 failed" in got.stdout
    listed = json.loads(_cli(config, "studies", "--json").stdout)
    assert [s["study_instance_uid"] for s in listed] == [jpeg]

    # C-MOVE to this node while it serves
    node = start_node(settings)
    ct = _study(files["explicit"])
    moved = _cli(config, "retrieve", "orthanc", "--study", ct, "--method", "move")
    assert moved.returncode == 0, moved.stdout + moved.stderr
    assert {s.study_instance_uid for s in node.archive.studies()} == {jpeg, ct}
    stored = pydicom.dcmread(files["jpeg_lossless"])
    with node.archive.engine.connect() as conn:
        from pacsnode.storage.index import find_instance

        row = find_instance(conn, str(stored.SOPInstanceUID))
    assert row is not None
    # The C-GET SCP picks the transfer syntax of each sub-operation (Orthanc sends this one
    # uncompressed); what arrived is stored as it arrived, with the same pixels.
    arrived = pydicom.dcmread(node.archive.instance_path(row.file_path))
    assert arrived.file_meta.TransferSyntaxUID == row.transfer_syntax_uid
    assert np.array_equal(arrived.pixel_array, stored.pixel_array)
