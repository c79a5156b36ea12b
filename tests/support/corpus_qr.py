"""A small, deterministic Query/Retrieve corpus: 6 patients, 10 studies, CT, MR and SR.

Every run writes the same bytes: UIDs come from :data:`pacsnode.node.testing.corpus.UID_PREFIX` with
fixed entropy sources, and the images are 8x8 with seeded pixels. The attributes that
C-FIND matches on vary on purpose: names in mixed case, in UTF-8 (``ISO_IR 192``) and in
Latin-1 (``ISO_IR 100``), study dates over 2024-2026, accession numbers, descriptions,
modalities, series and instance numbers. Some attributes the index has no column for are
there to be returned: IssuerOfPatientID per patient, PatientAge (whole years at the study
date) and PatientWeight per study, ProtocolName per image series (body part and
description), ContentDate and ContentTime per instance (the study's date; the study's hour
and minute with the instance's position as seconds). Empty ones are left out.

The UIDs are functions of the positions, so a query file can name them by placeholder:
``{study:3}`` is :func:`study_uid` ``(3)``, ``{series:3.1}`` is :func:`series_uid` ``(3, 1)``
and ``{instance:3.1.0}`` is :func:`instance_uid` ``(3, 1, 0)`` (see :func:`resolve`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import BasicTextSRStorage, ExplicitVRLittleEndian, generate_uid

from pacsnode.node.testing.corpus import UID_PREFIX, make_dataset

__all__ = [
    "PATIENTS",
    "STUDIES",
    "Patient",
    "Series",
    "Study",
    "instance_uid",
    "resolve",
    "series_uid",
    "study_uid",
    "write_corpus",
]


@dataclass(frozen=True, kw_only=True)
class Patient:
    patient_id: str
    name: str
    charset: str
    birth_date: str
    sex: str
    issuer: str = ""  # IssuerOfPatientID, absent where empty


@dataclass(frozen=True, kw_only=True)
class Series:
    modality: str
    number: int
    description: str
    body_part: str
    instances: int


@dataclass(frozen=True, kw_only=True)
class Study:
    patient: int
    date: str
    time: str
    accession: str
    study_id: str
    description: str
    referring: str
    series: tuple[Series, ...]
    weight: str = ""  # PatientWeight (DS, written as it stands here)


PATIENTS: tuple[Patient, ...] = (
    Patient(
        patient_id="PID001", name="Doe^John", charset="ISO_IR 100", birth_date="19700101", sex="M", issuer="HOSP-A"
    ),
    Patient(
        patient_id="PID002", name="DOE^JANE", charset="ISO_IR 100", birth_date="19851224", sex="F", issuer="HOSP-A"
    ),
    Patient(
        patient_id="PID003", name="Müller^Jürgen", charset="ISO_IR 192", birth_date="19601231", sex="M", issuer="HOSP-A"
    ),
    Patient(
        patient_id="PID004", name="Gómez^Ana", charset="ISO_IR 100", birth_date="19921005", sex="F", issuer="HOSP-B"
    ),
    Patient(
        patient_id="PID005", name="Dodson^Emma", charset="ISO_IR 100", birth_date="20010315", sex="O", issuer="HOSP-B"
    ),
    Patient(patient_id="PID006", name="doe^jonathan", charset="ISO_IR 192", birth_date="19450704", sex="M"),
)

_CT = "CT"
_MR = "MR"
_SR = "SR"

STUDIES: tuple[Study, ...] = (
    Study(
        patient=0,
        date="20240115",
        time="083000",
        accession="ACC1001",
        study_id="1001",
        description="CT CHEST",
        referring="Ref^Alpha",
        weight="80",
        series=(
            Series(modality=_CT, number=1, description="Axial 5mm", body_part="CHEST", instances=2),
            Series(modality=_CT, number=2, description="Axial 1mm", body_part="CHEST", instances=3),
        ),
    ),
    Study(
        patient=0,
        date="20250620",
        time="141500",
        accession="ACC1002",
        study_id="1002",
        description="MR BRAIN",
        referring="Ref^Beta",
        weight="81.5",
        series=(
            Series(modality=_MR, number=1, description="T1 sag", body_part="HEAD", instances=3),
            Series(modality=_SR, number=99, description="Report", body_part="HEAD", instances=2),
        ),
    ),
    Study(
        patient=1,
        date="20240301",
        time="101010",
        accession="ACC2001",
        study_id="2001",
        description="CT ABDOMEN",
        referring="Ref^Alpha",
        weight="62",
        series=(Series(modality=_CT, number=3, description="Portal venous", body_part="ABDOMEN", instances=4),),
    ),
    Study(
        patient=1,
        date="20251111",
        time="070000",
        accession="ACC2002",
        study_id="2002",
        description="MR KNEE",
        referring="Gamma^Ref",
        weight="61.25",
        series=(
            Series(modality=_MR, number=1, description="PD fat sat", body_part="KNEE", instances=2),
            Series(modality=_MR, number=2, description="T2 cor", body_part="KNEE", instances=3),
            Series(modality=_SR, number=3, description="Report", body_part="KNEE", instances=2),
        ),
    ),
    Study(
        patient=2,
        date="20260105",
        time="120000",
        accession="ACC3001",
        study_id="3001",
        description="CT HEAD",
        referring="Ref^Beta",
        series=(
            Series(modality=_CT, number=1, description="Brain window", body_part="HEAD", instances=2),
            Series(modality=_SR, number=2, description="Report", body_part="HEAD", instances=2),
        ),
    ),
    Study(
        patient=2,
        date="20241231",
        time="235959",
        accession="ACC3002",
        study_id="3002",
        description="MR SPINE",
        referring="",
        weight="90.0",
        series=(Series(modality=_MR, number=5, description="T2 sag", body_part="LSPINE", instances=4),),
    ),
    Study(
        patient=3,
        date="20250101",
        time="000000",
        accession="ACC4001",
        study_id="4001",
        description="CT CHEST",
        referring="Ref^Alpha",
        weight="55",
        series=(
            Series(modality=_CT, number=1, description="Lung", body_part="CHEST", instances=3),
            Series(modality=_CT, number=2, description="Mediastinum", body_part="CHEST", instances=2),
        ),
    ),
    Study(
        patient=4,
        date="20260228",
        time="093000",
        accession="ACC5001",
        study_id="5001",
        description="MR BRAIN",
        referring="Delta^Ref",
        weight="48",
        series=(Series(modality=_MR, number=1, description="FLAIR", body_part="HEAD", instances=2),),
    ),
    Study(
        patient=5,
        date="20250315",
        time="160000",
        accession="ACC6001",
        study_id="6001",
        description="CT ABDOMEN",
        referring="Ref^Beta",
        weight="70",
        series=(
            Series(modality=_CT, number=1, description="Arterial", body_part="ABDOMEN", instances=3),
            Series(modality=_MR, number=2, description="Liver T1", body_part="ABDOMEN", instances=2),
        ),
    ),
    Study(
        patient=5,
        date="20261231",
        time="080000",
        accession="ACC6002",
        study_id="6002",
        description="SR ONLY",
        referring="Ref^Alpha",
        series=(Series(modality=_SR, number=1, description="Follow-up note", body_part="ABDOMEN", instances=2),),
    ),
)

_ENTROPY = "pacsnode-tests-corpus-qr"


def study_uid(study: int) -> str:
    """The StudyInstanceUID of ``STUDIES[study]``."""
    return generate_uid(UID_PREFIX, entropy_srcs=[_ENTROPY, "study", str(study)])


def series_uid(study: int, series: int) -> str:
    """The SeriesInstanceUID of ``STUDIES[study].series[series]``."""
    return generate_uid(UID_PREFIX, entropy_srcs=[_ENTROPY, "series", str(study), str(series)])


def instance_uid(study: int, series: int, instance: int) -> str:
    """The SOPInstanceUID of instance ``instance`` (0-based) of that series."""
    return generate_uid(UID_PREFIX, entropy_srcs=[_ENTROPY, "instance", str(study), str(series), str(instance)])


_PLACEHOLDER = re.compile(r"\{(study|series|instance):(\d+(?:\.\d+){0,2})\}")


def resolve(text: str) -> str:
    """Replace ``{study:i}``, ``{series:i.j}`` and ``{instance:i.j.k}`` by their UIDs."""

    def _uid(match: re.Match[str]) -> str:
        kind, where = match.group(1), [int(n) for n in match.group(2).split(".")]
        makers = {"study": (study_uid, 1), "series": (series_uid, 2), "instance": (instance_uid, 3)}
        maker, arity = makers[kind]
        if len(where) != arity:
            raise ValueError(f"{match.group(0)}: {kind} needs {arity} index(es)")
        return str(maker(*where))

    return _PLACEHOLDER.sub(_uid, text)


def _sr_dataset(seed: int) -> Dataset:
    """A minimal Basic Text SR document (no pixel data)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = BasicTextSRStorage
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = BasicTextSRStorage
    ds.ValueType = "CONTAINER"
    concept = Dataset()
    concept.CodeValue = "18748-4"
    concept.CodingSchemeDesignator = "LN"
    concept.CodeMeaning = "Diagnostic imaging report"
    ds.ConceptNameCodeSequence = Sequence([concept])
    ds.ContinuityOfContent = "SEPARATE"
    ds.CompletionFlag = "COMPLETE"
    ds.VerificationFlag = "UNVERIFIED"
    item = Dataset()
    item.RelationshipType = "CONTAINS"
    item.ValueType = "TEXT"
    finding = Dataset()
    finding.CodeValue = "121071"
    finding.CodingSchemeDesignator = "DCM"
    finding.CodeMeaning = "Finding"
    item.ConceptNameCodeSequence = Sequence([finding])
    item.TextValue = f"Synthetic finding {seed}"
    ds.ContentSequence = Sequence([item])
    ds.Manufacturer = ""
    ds.ReferencedPerformedProcedureStepSequence = Sequence()
    ds.PerformedProcedureCodeSequence = Sequence()
    return ds


def _patient_age(patient: Patient, study: Study) -> str:
    """PatientAge (AS) at the study date: whole years, ``nnnY``."""
    born, seen = patient.birth_date, study.date
    years = int(seen[:4]) - int(born[:4]) - (seen[4:] < born[4:])
    return f"{years:03d}Y"


def _dataset(study_index: int, series_index: int, instance_index: int) -> Dataset:
    study = STUDIES[study_index]
    series = study.series[series_index]
    patient = PATIENTS[study.patient]
    seed = study_index * 100 + series_index * 10 + instance_index
    if series.modality == _SR:
        ds = _sr_dataset(seed)
        ds.Modality = _SR
    else:
        ds = make_dataset(rows=8, columns=8, modality=series.modality, seed=seed)
    sop_uid = instance_uid(study_index, series_index, instance_index)
    ds.SOPInstanceUID = sop_uid
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.SpecificCharacterSet = patient.charset
    ds.PatientName = patient.name
    ds.PatientID = patient.patient_id
    ds.PatientBirthDate = patient.birth_date
    ds.PatientSex = patient.sex
    if patient.issuer:
        ds.IssuerOfPatientID = patient.issuer
    ds.PatientAge = _patient_age(patient, study)
    if study.weight:
        ds.PatientWeight = study.weight
    ds.StudyInstanceUID = study_uid(study_index)
    ds.StudyDate = study.date
    ds.StudyTime = study.time
    ds.AccessionNumber = study.accession
    ds.StudyID = study.study_id
    ds.StudyDescription = study.description
    ds.ReferringPhysicianName = study.referring
    ds.SeriesInstanceUID = series_uid(study_index, series_index)
    ds.SeriesNumber = series.number
    ds.SeriesDescription = series.description
    ds.BodyPartExamined = series.body_part
    ds.SeriesDate = study.date
    if series.modality != _SR:
        ds.ProtocolName = f"{series.body_part} {series.description}".upper()
    ds.InstanceNumber = instance_index + 1
    ds.ContentDate = study.date
    ds.ContentTime = f"{study.time[:4]}{instance_index:02d}"
    if series.modality != _SR:
        _complete_image(ds, study_index, series_index, instance_index)
    return ds


def _complete_image(ds: Dataset, study_index: int, series_index: int, instance_index: int) -> None:
    """The Type 1 and 2 attributes of the CT and MR IODs that ``make_dataset`` leaves out."""
    ds.ImagePositionPatient = [0.0, 0.0, float(instance_index)]
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.Manufacturer = "pacsnode tests"
    ds.PatientPosition = "HFS"
    ds.FrameOfReferenceUID = generate_uid(
        UID_PREFIX, entropy_srcs=[_ENTROPY, "for", str(study_index), str(series_index)]
    )
    ds.PositionReferenceIndicator = ""
    ds.AcquisitionNumber = 1
    if ds.Modality == _CT:
        ds.KVP = 120
    else:
        ds.ScanningSequence = "SE"
        ds.SequenceVariant = "NONE"
        ds.ScanOptions = ""
        ds.MRAcquisitionType = "2D"
        ds.RepetitionTime = 500
        ds.EchoTime = 15
        ds.EchoTrainLength = 1


def write_corpus(folder: Path) -> list[Path]:
    """Write every instance of the corpus as a DICOM file into ``folder``; return the paths.

    Files are named ``<study>-<series>-<instance>.dcm`` by position, in corpus order.
    """
    folder.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    for i, study in enumerate(STUDIES):
        for j, series in enumerate(study.series):
            for k in range(series.instances):
                path = folder / f"{i:02d}-{j}-{k}.dcm"
                _dataset(i, j, k).save_as(path, enforce_file_format=True)
                paths.append(path)
    return paths
