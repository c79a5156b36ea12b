"""A de-identified export to DCMTK storescp, and a result sent back by storescu re-identified.

The study carries identifying values everywhere a real one does: the patient and study
modules, free text, a private block, nested sequences referencing other instances. After
the export through the Basic Application Level Confidentiality Profile (with modified
dates), no original identifying value is left in the received files, decoded (every
element, sequences included) or as raw bytes; UIDs are consistent within the study and
across two exports. A Secondary Capture built against the de-identified study and sent back
lands in the original study with the original patient and references; the same sent by
another peer is stored as sent.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from pacsnode.node.audit import read_events, trail_path
from pacsnode.node.testing.corpus import UID_PREFIX, make_dataset
from pacsnode.node.worker import Worker
from pacsnode.storage.db import read_connection
from pacsnode.storage.identity import studies_of_instances
from pacsnode.storage.index import find_instance
from pacsnode.storage.queue import ExportQueue
from tests.support.helpers import make_settings, store_datasets
from tests.support.node import RunningNode
from tests.support.peers import StorescpPeer, require

pytestmark = pytest.mark.dcmtk

PATIENT_ID, PATIENT_NAME, BIRTH_DATE = "DEID-ORIG-40417", "Ashcombe^Perpetua^Lavinia", "19520229"
TEXTS = {
    "OtherPatientIDs": "MRN-88120-OTHER",
    "InstitutionName": "Saint Wilhelmina Infirmary",
    "InstitutionAddress": "12 Larkspur Lane, Thornbury",
    "ReferringPhysicianName": "Drumblade^Horatio",
    "OperatorsName": "Fenwick^Odile",
    "StudyDescription": "Chest CT for Ashcombe",
    "SeriesDescription": "Ashcombe lungs",
    "ImageComments": "patient Ashcombe, MRN-88120-OTHER",
    "AccessionNumber": "ACC55721",
    "StudyID": "ST8812",
    "StationName": "CTROOM7",
    "DeviceSerialNumber": "SN-7741203",
}
SECRETS = (
    PATIENT_ID,
    "Ashcombe",
    "Perpetua",
    "Lavinia",
    BIRTH_DATE,
    "20260101",  # every original date of the study
    "20260103",
    "RP-99123",
    "Saint Wilhelmina",
    "Larkspur",
    "Drumblade",
    "Fenwick",
    "MRN-88120",
    "ACC55721",
    "ST8812",
    "CTROOM7",
    "SN-7741203",
)


def _study(folder: Path) -> tuple[list[Path], dict[str, str]]:
    """Two CT instances of one study, identifying values everywhere; returns the files and original UIDs."""
    folder.mkdir()
    study, series, frame = (generate_uid(UID_PREFIX) for _ in range(3))
    sops = [generate_uid(UID_PREFIX) for _ in range(2)]
    paths = []
    for i, sop in enumerate(sops):
        ds = make_dataset(
            rows=8, columns=8, study_uid=study, series_uid=series, patient_id=PATIENT_ID,
            patient_name=PATIENT_NAME, instance_number=i + 1, seed=i,
        )  # fmt: skip
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = sop
        ds.PatientBirthDate = BIRTH_DATE
        ds.FrameOfReferenceUID = frame
        for keyword, value in TEXTS.items():
            setattr(ds, keyword, value)
        ds.SeriesDate = ds.AcquisitionDate = "20260101"
        ds.ContentDate = "20260103"
        private = ds.private_block(0x0029, "ACME IMAGING 1.0", create=True)
        private.add_new(0x10, "LO", PATIENT_NAME)
        private.add_new(0x11, "LO", PATIENT_ID)
        referenced_study = Dataset()
        referenced_study.ReferencedSOPClassUID = "1.2.840.10008.3.1.2.3.1"
        referenced_study.ReferencedSOPInstanceUID = study
        request = Dataset()
        request.RequestedProcedureID = "RP-99123"
        request.AccessionNumber = TEXTS["AccessionNumber"]
        request.ReferencedStudySequence = Sequence([referenced_study])
        ds.RequestAttributesSequence = Sequence([request])
        other = Dataset()
        other.ReferencedSOPClassUID = ds.SOPClassUID
        other.ReferencedSOPInstanceUID = sops[1 - i]
        ds.ReferencedImageSequence = Sequence([other])
        path = folder / f"{i}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths, {"study": study, "series": series, "frame": frame, "sop0": sops[0], "sop1": sops[1]}


def _values(ds: Dataset) -> list[str]:
    """Every value of every element, in sequences and private blocks too, and of the File Meta."""
    out: list[str] = []

    def collect(_dataset: Dataset, element: Any) -> None:
        if element.VR != "SQ":
            out.append(str(element.value))

    ds.walk(collect)
    ds.file_meta.walk(collect)
    return out


def _export(node: RunningNode, uids: list[str]) -> None:
    ExportQueue(node.archive.engine).enqueue(uids, ["AI"], max_attempts=3)
    worker = Worker(node.settings, node.archive)
    assert worker.export_once("test-exporter") == len(uids)


def test_deidentified_export_and_reidentified_result(
    tmp_path: Path, start_node: Callable[..., RunningNode], storescp_factory: Callable[..., StorescpPeer]
) -> None:
    ai = storescp_factory(ae_title="AISERVICE")
    settings = make_settings(
        tmp_path,
        remote_nodes={"AI": {"ae_title": "AISERVICE", "host": "127.0.0.1", "port": ai.port, "deidentify": {}}},
    )
    node = start_node(settings)
    paths, original = _study(tmp_path / "study")
    assert store_datasets(node.port, list(paths)) == [0, 0]
    _export(node, [original["sop0"], original["sop1"]])

    received = [pydicom.dcmread(p) for p in ai.received()]
    assert len(received) == 2
    secrets = (*SECRETS, *original.values())
    for path, ds in zip(ai.received(), received, strict=True):
        values = _values(ds)
        leaked = sorted({s for s in secrets for v in values if s in v or s in v.replace(" ", "^")})
        assert not leaked, f"{path.name}: original values survive: {leaked}"
        raw = path.read_bytes()
        assert not [s for s in secrets if s.encode() in raw], path.name
        assert not any(tag.is_private for tag in ds.keys())
        assert ds.PatientIdentityRemoved == "YES"
        assert [c.CodeValue for c in ds.DeidentificationMethodCodeSequence] == ["113100", "113107"]
        # Modified dates: moved, the interval kept.
        days = (datetime.strptime(ds.ContentDate, "%Y%m%d") - datetime.strptime(ds.StudyDate, "%Y%m%d")).days
        assert days == 2
    # Consistent within the study: one study, series, frame of reference; references follow.
    first, second = sorted(received, key=lambda d: int(d.InstanceNumber))
    assert first.StudyInstanceUID == second.StudyInstanceUID and first.SeriesInstanceUID == second.SeriesInstanceUID
    assert first.FrameOfReferenceUID == second.FrameOfReferenceUID
    assert first.ReferencedImageSequence[0].ReferencedSOPInstanceUID == second.SOPInstanceUID
    assert first.PatientID == second.PatientID != PATIENT_ID

    # Sent again: the same pseudonymous UIDs (the mapping is in the index).
    for p in ai.received():
        p.unlink()
    _export(node, [original["sop0"]])
    (again,) = [pydicom.dcmread(p) for p in ai.received()]
    assert again.SOPInstanceUID == first.SOPInstanceUID and again.StudyInstanceUID == first.StudyInstanceUID

    # The AI service's result: a Secondary Capture in the de-identified study, referencing an image.
    sc = Dataset()
    sc.file_meta = pydicom.dataset.FileMetaDataset()
    sc.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    sc.SOPClassUID = sc.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    sc.SOPInstanceUID = sc.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    for keyword in ("StudyInstanceUID", "PatientID", "PatientName", "StudyDate", "StudyTime", "AccessionNumber"):
        setattr(sc, keyword, first.get(keyword, ""))
    sc.PatientBirthDate = sc.PatientSex = sc.ReferringPhysicianName = sc.StudyID = ""
    sc.SeriesInstanceUID = generate_uid()
    sc.Modality, sc.ConversionType, sc.SeriesNumber, sc.InstanceNumber = "OT", "WSD", 900, 1
    source = Dataset()
    source.ReferencedSOPClassUID = first.SOPClassUID
    source.ReferencedSOPInstanceUID = first.SOPInstanceUID
    sc.SourceImageSequence = Sequence([source])
    sc.SamplesPerPixel, sc.PhotometricInterpretation, sc.Rows, sc.Columns = 1, "MONOCHROME2", 8, 8
    sc.BitsAllocated, sc.BitsStored, sc.HighBit, sc.PixelRepresentation = 8, 8, 7, 0
    sc.PixelData = np.zeros((8, 8), dtype=np.uint8).tobytes()
    result = tmp_path / "result.dcm"
    sc.save_as(result, enforce_file_format=True)
    sent = subprocess.run(
        [require("storescu"), "-aet", "AISERVICE", "-aec", "PACSNODE", "127.0.0.1", str(node.port), str(result)],
        capture_output=True, text=True, timeout=60, check=False, env={"TCP_NODELAY": "1"},
    )  # fmt: skip
    assert sent.returncode == 0, sent.stderr

    with read_connection(node.archive.engine) as conn:
        (where,) = studies_of_instances(conn, [str(sc.SOPInstanceUID)])
        row = find_instance(conn, str(sc.SOPInstanceUID))
    assert where.study_instance_uid == original["study"] and where.patient_id == PATIENT_ID
    assert row is not None
    stored = pydicom.dcmread(node.archive.instance_path(row.file_path))
    assert str(stored.PatientName) == PATIENT_NAME and stored.PatientBirthDate == BIRTH_DATE
    assert stored.StudyInstanceUID == original["study"]
    assert stored.SourceImageSequence[0].ReferencedSOPInstanceUID == original["sop0"]
    assert "PatientIdentityRemoved" not in stored

    # Another peer sending under the pseudonymous study is not re-identified: stored as sent.
    sc.SOPInstanceUID = sc.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    sc.SeriesInstanceUID = generate_uid()  # the first result's series is now in the original study
    sc.save_as(result, enforce_file_format=True)
    sent = subprocess.run(
        [require("storescu"), "-aet", "STRANGER", "-aec", "PACSNODE", "127.0.0.1", str(node.port), str(result)],
        capture_output=True, text=True, timeout=60, check=False, env={"TCP_NODELAY": "1"},
    )  # fmt: skip
    assert sent.returncode == 0, sent.stderr
    with read_connection(node.archive.engine) as conn:
        (elsewhere,) = studies_of_instances(conn, [str(sc.SOPInstanceUID)])
    assert (elsewhere.study_instance_uid, elsewhere.patient_id) == (first.StudyInstanceUID, first.PatientID)

    # The audit trail: the export (de-identified, of the original study) and the re-identified result.
    events = list(read_events(trail_path(settings.audit, settings.storage.root)))
    exports = [e for e in events if e["kind"] == "transfer-begun"]
    assert exports and all(e["detail"]["deidentified"] for e in exports)
    assert exports[0]["studies"][0]["study_instance_uid"] == original["study"]
    assert exports[0]["detail"]["burned_in_unknown"] == 2
    back = [e for e in events if e["kind"] == "instances-stored" and e["detail"].get("reidentified")]
    assert [(s["study_instance_uid"], s["patient_id"]) for e in back for s in e["studies"]] == [
        (original["study"], PATIENT_ID)
    ]
