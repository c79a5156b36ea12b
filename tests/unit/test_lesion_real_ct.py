"""The lung nodule model's lesions on a real chest CT: the tumour is found, false findings stay under a measured floor.

Data: TCIA Lung-PET-CT-Dx (Li et al. 2020, https://doi.org/10.7937/TCIA.2020.NNC2-0461, CC BY 4.0),
read where it lies via ``real_chest_ct()``; skipped when absent.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from pacsnode.analysis.cnn.findings import LesionFilter, findings_from_probabilities
from pacsnode.analysis.lung.region import lung_region
from tests.support.helpers import real_chest_ct

# Measured with the shipped phantom-only model: B 100 findings (the cap), 1 on the tumour, 99 false;
# L 100 findings, 5 on the tumour, 95 false (before the lung region and shape tests: 99 and 98).
# A regression guard, not the target of 3.
FLOOR = {"A0001-5mm-B": 99, "A0001-5mm-L": 95}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(FLOOR))
def test_the_tumour_is_found_and_false_findings_stay_under_the_measured_floor(name: str) -> None:
    from pacsnode.analysis.cnn.engine import InferenceEngine, VolumeInput, warm_model
    from pacsnode.analysis.cnn.package import load_package
    from pacsnode.analysis.settings import EngineOptions
    from pacsnode.analysis.volume import load_series

    data = real_chest_ct()
    volume = load_series(sorted((data / name).glob("*.dcm")))
    boxes = np.zeros(volume.hu.shape, dtype=bool)
    slice_of = {str(ds.SOPInstanceUID): k for k, ds in enumerate(volume.datasets)}
    for box in json.loads((data / "annotations.json").read_text())[name]["tumour_boxes"]:
        x0, y0, x1, y1 = box["bbox_xyxy_px"]
        boxes[slice_of[box["sop_instance_uid"]], y0 : y1 + 1, x0 : x1 + 1] = True
    package = load_package("lung-nodule")
    options = EngineOptions(device="cpu")
    engine = InferenceEngine(warm_model(package, options), options)
    (prob,) = engine.predict([VolumeInput(image=volume.hu, spacing=volume.spacing)])
    output = package.manifest.output
    findings = findings_from_probabilities(
        prob, volume, output.labels, output.activation, region=lung_region(volume), lesions=LesionFilter()
    )
    on_tumour = [f for f in findings if (f.mask & boxes).any()]
    assert on_tumour, "the tumour is not among the findings"
    assert max(f.longest_diameter_mm for f in on_tumour) >= 30.0 and "mass" in {f.kind for f in on_tumour}
    assert len(findings) - len(on_tumour) <= FLOOR[name]
