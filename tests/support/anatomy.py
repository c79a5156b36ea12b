"""CT series that are not chests, for rules with ``match.anatomy: chest``: a head or abdomen without lungs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom

from pacsnode.analysis.modeldev.synthetic import RESCALE_INTERCEPT, DicomSpec, PhantomSpec, write_chest_ct
from pacsnode.analysis.types import Volume

#: Soft tissue (brain, liver, muscle): about 40 HU.
SOFT_TISSUE_HU = 40
AIR_HU = -1000


def soft_tissue_slices(slices: int, size: int, *, seed: int = 0) -> np.ndarray:
    """HU (slices, size, size): a soft-tissue ellipse with noise, air around it and none inside it."""
    rows, columns = np.mgrid[0:size, 0:size]
    centre = (size - 1) / 2
    inside = ((rows - centre) / (0.35 * size)) ** 2 + ((columns - centre) / (0.42 * size)) ** 2 <= 1.0
    noise = np.random.default_rng(seed).normal(0.0, 10.0, (slices, size, size))
    hu = np.where(inside[None], SOFT_TISSUE_HU + noise, AIR_HU)
    return np.clip(np.rint(hu), -1024, 3071).astype(np.int16)


def soft_tissue_volume(slices: int = 30, size: int = 96, *, spacing_mm: float = 4.0, seed: int = 0) -> Volume:
    """A volume of :func:`soft_tissue_slices` (a head or abdomen, no lungs), axial, 5 mm slices."""
    return Volume(
        hu=soft_tissue_slices(slices, size, seed=seed),
        spacing=(5.0, spacing_mm, spacing_mm),
        origin=(-spacing_mm * size / 2, -spacing_mm * size / 2, 0.0),
        row_direction=(1.0, 0.0, 0.0),
        column_direction=(0.0, 1.0, 0.0),
        datasets=(),
    )


def write_no_lung_ct(
    folder: Path,
    *,
    slices: int = 30,
    size: int = 96,
    seed: int = 0,
    dicom: DicomSpec | None = None,
    body_part: str = "HEAD",
    description: str = "Head",
) -> list[Path]:
    """Write a CT series with no lungs: the synthetic phantom's headers, the pixels of :func:`soft_tissue_slices`.

    The files are as valid as the phantom's (every Type 1 and 2 attribute of the CT Image IOD);
    BodyPartExamined, SeriesDescription and StudyDescription say ``body_part`` and ``description``.
    """
    truth = write_chest_ct(folder, PhantomSpec(slices=slices, size=size), seed=seed, dicom=dicom or DicomSpec())
    hu = soft_tissue_slices(slices, size, seed=seed)
    for path in truth.paths:
        ds = pydicom.dcmread(path)
        k = int(ds.InstanceNumber) - 1
        ds.PixelData = (hu[k].astype(np.int32) - RESCALE_INTERCEPT).astype(np.uint16).tobytes()
        ds.BodyPartExamined = body_part
        ds.SeriesDescription = description
        ds.StudyDescription = description
        ds.save_as(path, enforce_file_format=True)
    return list(truth.paths)
