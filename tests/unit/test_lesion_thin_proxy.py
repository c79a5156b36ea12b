"""The lung nodule pipeline's lesions on thin slices made from the real chest CT: the tumour as a mass, at most 3 false.

A hidden real chest CT may have 1-1.25 mm slices, where the model's own findings are not ruled out by the
slice thickness. No thin real series is shared, so each 5 mm series is resampled along z to 1.25 mm (linear
interpolation of HU, the slice spacing updated): a proxy, not real thin-slice anatomy (the in-plane detail is
still that of 5 mm slices), but one the model has to read as thin slices. Cropped to the tumour's slices and
8 more on each side (about 130 mm of lungs) to keep it short.
Data: TCIA Lung-PET-CT-Dx (Li et al. 2020, https://doi.org/10.7937/TCIA.2020.NNC2-0461, CC BY 4.0),
read where it lies via ``real_chest_ct()``; skipped when absent.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pytest

from tests.support.helpers import REAL_CHEST_CT_SERIES, real_chest_ct

# The target for a real chest CT at default settings: at most 3 false findings per series.
MAX_FALSE_FINDINGS = 3
THIN_MM = 1.25
# 5 mm slices kept on each side of the tumour's boxes.
PAD_SLICES = 8


@dataclass(frozen=True)
class Proxy:
    volume: Any
    boxes: np.ndarray
    prob: np.ndarray
    region: np.ndarray
    airways: np.ndarray | None


def _thin_proxy(name: str) -> Proxy:
    from pacsnode.analysis.cnn.engine import EngineOptions, InferenceEngine, VolumeInput, warm_model
    from pacsnode.analysis.cnn.package import load_package
    from pacsnode.analysis.lung.region import lung_region_and_airways
    from pacsnode.analysis.volume import load_series

    root = real_chest_ct()
    volume = load_series(sorted((root / name).glob("*.dcm")))
    annotations = json.loads((root / "annotations.json").read_text(encoding="utf-8"))[name]
    slice_of = {str(ds.SOPInstanceUID): k for k, ds in enumerate(volume.datasets)}
    boxes = np.zeros(volume.hu.shape, dtype=bool)
    for box in annotations["tumour_boxes"]:
        x0, y0, x1, y1 = (int(v) for v in box["bbox_xyxy_px"])
        boxes[slice_of[str(box["sop_instance_uid"])], y0 : y1 + 1, x0 : x1 + 1] = True
    on = np.flatnonzero(boxes.any(axis=(1, 2)))
    lo, hi = max(int(on[0]) - PAD_SLICES, 0), min(int(on[-1]) + PAD_SLICES + 1, volume.hu.shape[0])
    dz = volume.spacing[0]
    z = np.arange(0.0, (hi - 1 - lo) * dz + 1e-6, THIN_MM) / dz + lo  # positions in 5 mm slice units
    below = np.floor(z).astype(int)
    above = np.minimum(below + 1, hi - 1)
    w = (z - below)[:, None, None]
    hu = (1.0 - w) * volume.hu[below].astype(np.float32) + w * volume.hu[above].astype(np.float32)
    origin = np.asarray(volume.origin) + lo * dz * np.cross(volume.row_direction, volume.column_direction)
    thin = replace(
        volume,
        hu=np.round(hu).astype(np.int16),
        spacing=(THIN_MM, volume.spacing[1], volume.spacing[2]),
        origin=(float(origin[0]), float(origin[1]), float(origin[2])),
        datasets=tuple(volume.datasets[k] for k in np.round(z).astype(int)),  # the nearest slice's header
    )
    package = load_package("lung-nodule")
    options = EngineOptions(device="cpu")
    engine = InferenceEngine(warm_model(package, options), options)
    prob = engine.predict([VolumeInput(image=thin.hu, spacing=thin.spacing)])[0]
    region, airways = lung_region_and_airways(thin)
    return Proxy(volume=thin, boxes=boxes[below] | boxes[above], prob=prob, region=region, airways=airways)


@pytest.fixture(scope="module")
def proxies() -> dict[str, Proxy]:
    return {name: _thin_proxy(name) for name in REAL_CHEST_CT_SERIES}


def _findings(proxy: Proxy, **rules: Any) -> list[Any]:
    from pacsnode.analysis.cnn.findings import findings_from_probabilities
    from pacsnode.analysis.cnn.package import load_package
    from pacsnode.analysis.cnn.pipeline import LungNodulePipeline

    output = load_package("lung-nodule").manifest.output
    lesions = replace(LungNodulePipeline.lesion_filter, **rules)
    return findings_from_probabilities(
        proxy.prob,
        proxy.volume,
        output.labels,
        output.activation,
        region=proxy.region,
        lesions=lesions,
        airways=proxy.airways,
    )


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(REAL_CHEST_CT_SERIES))
def test_thin_slices_give_the_tumour_as_a_mass_with_at_most_3_false_findings(
    proxies: dict[str, Proxy], name: str
) -> None:
    proxy = proxies[name]
    assert proxy.volume.spacing[0] == THIN_MM  # thin: the slice-thickness rule leaves the model's findings in
    findings = _findings(proxy)
    on_tumour = [f for f in findings if (f.mask & proxy.boxes).any()]
    assert "mass" in [f.kind for f in on_tumour], "the tumour is not found as a mass"
    assert sum(1 for f in findings if not (f.mask & proxy.boxes).any()) <= MAX_FALSE_FINDINGS


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(REAL_CHEST_CT_SERIES))
def test_without_the_spot_limit_the_models_findings_on_thin_slices_are_mostly_false(
    proxies: dict[str, Proxy], name: str
) -> None:
    # Why the limit exists: the phantom-trained model marks the real lungs' vessels and walls. Measured on
    # the whole series resampled to 1.25 mm: 72 (B) and 100 or more (L, the cap) false findings without it.
    findings = _findings(proxies[name], max_model_spots=None)
    assert sum(1 for f in findings if not (f.mask & proxies[name].boxes).any()) > MAX_FALSE_FINDINGS
