"""Lung-pipeline results (SEG, SR, key images) of a small synthetic CT, for the writer and validation tests."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, generate_uid

from pacsnode.analysis.lung.writers import write_lung_results
from pacsnode.analysis.types import LungResult, Volume

PIPELINE_NAME = "lung-threshold"
SLICES, ROWS, COLUMNS = 12, 64, 64
SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
SR_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"
SC_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.7"
UID_PATTERN = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))+$")


def make_ct_headers(
    n: int = SLICES, rows: int = ROWS, columns: int = COLUMNS, *, series_uid: str | None = None
) -> tuple[Dataset, ...]:
    """Headers of an axial CT series (CT Image IOD, no Pixel Data), ascending z."""
    study_uid, frame_uid = generate_uid(), generate_uid()
    series_uid = series_uid or generate_uid()
    headers = []
    for i in range(n):
        ds = Dataset()
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = generate_uid()
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.PatientName = "Lung^Test"
        ds.PatientID = "PID-0001"
        ds.PatientBirthDate = "19600102"
        ds.PatientSex = "F"
        ds.StudyInstanceUID = study_uid
        ds.StudyDate = "20240305"
        ds.StudyTime = "101500"
        ds.ReferringPhysicianName = "Ref^Doctor"
        ds.StudyID = "S1"
        ds.AccessionNumber = "ACC123"
        ds.StudyDescription = "CT CHEST"
        ds.Modality = "CT"
        ds.SeriesInstanceUID = series_uid
        ds.SeriesNumber = 3
        ds.BodyPartExamined = "CHEST"
        ds.PatientPosition = "HFS"
        ds.FrameOfReferenceUID = frame_uid
        ds.PositionReferenceIndicator = ""
        ds.Manufacturer = "Scanner Co"
        ds.InstanceNumber = i + 1
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.AcquisitionNumber = 1
        ds.ContentDate = "20240305"
        ds.ContentTime = "101600"
        ds.PixelSpacing = [0.7, 0.7]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [-22.4, -22.4, -100.0 + 2.5 * i]
        ds.SliceThickness = 2.5
        ds.SliceLocation = -100.0 + 2.5 * i
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = rows
        ds.Columns = columns
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        ds.RescaleIntercept = 0
        ds.RescaleSlope = 1
        ds.RescaleType = "HU"
        ds.KVP = 120
        headers.append(ds)
    return tuple(headers)


def make_volume(n: int = SLICES, rows: int = ROWS, columns: int = COLUMNS, *, series_uid: str | None = None) -> Volume:
    headers = make_ct_headers(n, rows, columns, series_uid=series_uid)
    rng = np.random.default_rng(7)
    hu = rng.integers(-60, 60, size=(n, rows, columns), dtype=np.int16)
    return Volume(
        hu=hu,
        spacing=(2.5, 0.7, 0.7),
        origin=(-22.4, -22.4, -100.0),
        row_direction=(1.0, 0.0, 0.0),
        column_direction=(0.0, 1.0, 0.0),
        datasets=headers,
    )


def make_result(volume: Volume) -> LungResult:
    """Two elliptic blobs (patient's right lung on the image's left) on the middle slices.

    The measurements are made-up numbers: the writers report them, they do not recompute them.
    """
    n, rows, columns = volume.hu.shape
    labels = np.zeros((n, rows, columns), dtype=np.uint8)
    yy, xx = np.mgrid[:rows, :columns]
    for k in range(2, n - 2):
        right = ((yy - rows / 2) / (rows / 4)) ** 2 + ((xx - columns * 0.3) / (columns / 8)) ** 2 <= 1
        left = ((yy - rows / 2) / (rows / 4)) ** 2 + ((xx - columns * 0.7) / (columns / 8)) ** 2 <= 1
        labels[k][right] = 1
        labels[k][left] = 2
    return LungResult(
        labels=labels,
        right_volume_ml=2512.25,
        left_volume_ml=2230.5,
        total_volume_ml=4742.75,
        mean_density_hu=-861.4,
        laa950_percent=12.5,
        right_mean_density_hu=-858.2,
        left_mean_density_hu=-865.0,
        right_laa950_percent=11.75,
        left_laa950_percent=13.375,
    )


def write(volume: Volume, result: LungResult, *, version: str = "1.2.0", **options: Any) -> list[Dataset]:
    return write_lung_results(volume, result, pipeline_name=PIPELINE_NAME, pipeline_version=version, **options)


def save_by_kind(outputs: list[Dataset], folder: Path) -> dict[str, list[Path]]:
    """``outputs`` saved as files in ``folder``, grouped by kind (SEG, SR, SC)."""
    files: dict[str, list[Path]] = {"SEG": [], "SR": [], "SC": []}
    kinds = {SEG_SOP_CLASS: "SEG", SR_SOP_CLASS: "SR", SC_SOP_CLASS: "SC"}
    for i, ds in enumerate(outputs):
        kind = kinds[ds.SOPClassUID]
        path = folder / f"{i:02d}_{kind}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files[kind].append(path)
    return files
