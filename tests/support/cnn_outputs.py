"""CNN-model results (SEG, per-finding SR, key images, classification SR) on the synthetic chest phantom,
for the writer and validation tests.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from pacsnode.analysis.cnn.writers import (
    ClassScore,
    Finding,
    LabelSpec,
    write_classification_results,
    write_segmentation_results,
)
from pacsnode.analysis.modeldev.synthetic import DicomSpec, PhantomSpec, write_chest_ct
from pacsnode.analysis.types import Volume
from pacsnode.analysis.volume import load_series

SLICES, SIZE = 40, 128
PIPELINE: dict[str, Any] = {"pipeline_name": "nodule-cnn", "pipeline_version": "0.3.1", "model_name": "unet-nodule",
            "model_version": "2024.1"}  # fmt: skip
SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
SR_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"
SC_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.7"
NODULE = LabelSpec(
    value=1, name="nodule", category=codes.SCT.MorphologicallyAbnormalStructure, type=codes.SCT.Nodule,
    color=(255, 0, 0),
)  # fmt: skip
MASS = LabelSpec(
    value=2, name="mass", category=codes.SCT.MorphologicallyAbnormalStructure, type=codes.SCT.Mass,
    color=(0, 128, 255),
)  # fmt: skip
LABELS = (NODULE, MASS)
SCORES = (
    ClassScore(name="nodule", code=codes.SCT.Nodule, probability=0.93, threshold=0.5),
    ClassScore(name="mass", code=codes.SCT.Mass, probability=0.125, threshold=0.5),
)


def sphere_finding(
    volume: Volume, number: int, centre: tuple[int, int, int], radius_mm: float, probability: float, side: Code
) -> Finding:
    """A ball of ``radius_mm`` about voxel ``centre`` (slice, row, column), measured as a model would."""
    dz, dy, dx = volume.spacing
    zz, yy, xx = np.ogrid[: volume.hu.shape[0], : volume.hu.shape[1], : volume.hu.shape[2]]
    mask = ((zz - centre[0]) * dz) ** 2 + ((yy - centre[1]) * dy) ** 2 + ((xx - centre[2]) * dx) ** 2 <= radius_mm**2
    k, i, j = (float(v) for v in np.argwhere(mask).mean(axis=0))
    normal = np.cross(volume.row_direction, volume.column_direction)
    position = (np.asarray(volume.origin) + k * dz * normal + i * dy * np.asarray(volume.column_direction)
                + j * dx * np.asarray(volume.row_direction))  # fmt: skip
    return Finding(
        label=NODULE,
        number=number,
        mask=mask,
        probability=probability,
        volume_ml=float(mask.sum()) * volume.voxel_ml,
        longest_diameter_mm=2 * radius_mm,
        centroid_index=(k, i, j),
        centroid_patient_mm=(float(position[0]), float(position[1]), float(position[2])),
        location=f"{side.meaning.lower()} lung",
        finding_site=codes.SCT.Lung,
        laterality=side,
    )


def write_seg(volume: Volume, findings: Any, **options: Any) -> list[Dataset]:
    return write_segmentation_results(volume, findings, LABELS, **{**PIPELINE, **options})


def write_cls(volume: Volume, scores: Any = SCORES, **options: Any) -> list[Dataset]:
    return write_classification_results(volume, scores, **{**PIPELINE, **options})


def save(outputs: list[Dataset], folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, ds in enumerate(outputs):
        path = folder / f"{i:02d}_{ds.Modality}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def make_volume(folder: Path) -> Volume:
    """The phantom CT the CNN writer tests use, written to ``folder`` and loaded."""
    truth = write_chest_ct(folder, PhantomSpec(slices=SLICES, size=SIZE), dicom=DicomSpec(shuffle_files=False))
    return load_series(truth.paths)


def make_findings(volume: Volume) -> tuple[Finding, ...]:
    """Two nodules: number 1 in the patient's left lung, number 2, the larger, in the right one."""
    # Patient's right lung on the image's left (columns < 64).
    return (
        sphere_finding(volume, 1, (14, 60, 90), 7.0, 0.625, codes.cid244.Left),
        sphere_finding(volume, 2, (22, 62, 38), 12.0, 0.875, codes.cid244.Right),
    )
