"""Synthetic DICOM corpora for benchmarks and tests: real files, made here.

Each corpus is one template dataset written once per instance with fresh UIDs,
so thousands of files take seconds. Pixel data is deterministic per seed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    MRImageStorage,
    generate_uid,
)

__all__ = ["make_dataset", "write_series", "UID_PREFIX"]

UID_PREFIX = "1.2.826.0.1.3680043.10.1432."  # pacsnode test data


def make_dataset(
    *,
    rows: int,
    columns: int,
    modality: str = "CT",
    patient_id: str = "PN0001",
    patient_name: str = "Test^Patient",
    study_uid: str | None = None,
    series_uid: str | None = None,
    instance_number: int = 1,
    seed: int = 0,
) -> Dataset:
    """A valid single-frame CT or MR image with 16-bit signed pixels."""
    sop_class = CTImageStorage if modality == "CT" else MRImageStorage
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid(UID_PREFIX)
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID = study_uid or generate_uid(UID_PREFIX)
    ds.SeriesInstanceUID = series_uid or generate_uid(UID_PREFIX)
    ds.PatientID = patient_id
    ds.PatientName = patient_name
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.StudyDate = "20260101"
    ds.StudyTime = "120000"
    ds.AccessionNumber = "ACC0001"
    ds.StudyID = "1"
    ds.StudyDescription = "Synthetic study"
    ds.ReferringPhysicianName = ""
    ds.Modality = modality
    ds.SeriesNumber = 1
    ds.SeriesDescription = f"Synthetic {modality}"
    ds.BodyPartExamined = "CHEST"
    ds.InstanceNumber = instance_number
    ds.ImagePositionPatient = [0.0, 0.0, float(instance_number)]
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.PixelSpacing = [0.7, 0.7]
    ds.SliceThickness = 1.0
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = columns
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    if modality == "CT":
        ds.RescaleIntercept = 0
        ds.RescaleSlope = 1
        ds.RescaleType = "HU"
    rng = np.random.default_rng(seed)
    ds.PixelData = rng.integers(-1000, 1500, size=(rows, columns), dtype=np.int16).tobytes()
    return ds


def write_series(
    directory: Path,
    count: int,
    *,
    rows: int,
    columns: int,
    per_series: int = 100,
    modality: str = "CT",
    seed: int = 0,
) -> list[Path]:
    """Write ``count`` instances, ``per_series`` per series and one study per 5 series."""
    directory.mkdir(parents=True, exist_ok=True)
    template = make_dataset(rows=rows, columns=columns, modality=modality, seed=seed)
    paths: list[Path] = []
    study_uid = series_uid = ""
    for i in range(count):
        if i % (per_series * 5) == 0:
            study_uid = generate_uid(UID_PREFIX)
            template.PatientID = f"PN{seed:02d}{i // (per_series * 5):05d}"
        if i % per_series == 0:
            series_uid = generate_uid(UID_PREFIX)
        template.StudyInstanceUID = study_uid
        template.SeriesInstanceUID = series_uid
        template.SOPInstanceUID = generate_uid(UID_PREFIX)
        template.file_meta.MediaStorageSOPInstanceUID = template.SOPInstanceUID
        template.InstanceNumber = i % per_series + 1
        path = directory / f"{i:06d}.dcm"
        template.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
