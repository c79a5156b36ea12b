"""What pacsnode writes passes validators written outside the project: dciodvfy and ``dsrdump -Ee``.

The synthetic phantom's CT files, the lung pipeline's SEG, SR and key images, and the CNN writers'
SEG, per-finding SR, key images and classification SR, each run through the shared
``validate_dicom.sh``. These tests start processes, hence tests/integration; the unit tests of the
writers (tests/unit/test_writers.py, tests/unit/test_model_writers.py) check the content.
Without dciodvfy/dsrdump they are skipped with the reason (the lung results' test fails), and all
fail under ``CI=true``.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from pydicom.pixels import get_encoder
from pydicom.uid import RLELossless

from pacsnode.analysis.modeldev.synthetic import DicomSpec, PhantomSpec, write_chest_ct
from pacsnode.analysis.types import Volume
from tests.support import cnn_outputs, lung_outputs
from tests.support.validate import validate_dicom


def test_phantom_ct_files_pass_dciodvfy(tmp_path: Path) -> None:
    encoder = get_encoder(RLELossless)
    if not encoder.is_available:
        pytest.skip(f"no encoder for {encoder.UID.name}: {encoder.missing_dependencies}")
    small = PhantomSpec(slices=12, size=48)
    plain = write_chest_ct(tmp_path / "plain", small, seed=5)
    rle = write_chest_ct(tmp_path / "rle", small, seed=5, dicom=DicomSpec(transfer_syntax_uid=RLELossless))
    report = validate_dicom([plain.paths[0], rle.paths[0]], sr=False)
    assert "0 errors, 0 warnings" in report, report


def test_lung_results_pass_the_validator(tmp_path: Path) -> None:
    volume = lung_outputs.make_volume()
    outputs = lung_outputs.write(volume, lung_outputs.make_result(volume))
    written = lung_outputs.save_by_kind(outputs, tmp_path)
    assert [len(written[kind]) for kind in ("SEG", "SR")] == [1, 1] and written["SC"], written
    validate_dicom([path for paths in written.values() for path in paths], quiet=False, required=True)


@pytest.fixture(scope="module")
def cnn_volume(tmp_path_factory: pytest.TempPathFactory) -> Volume:
    return cnn_outputs.make_volume(tmp_path_factory.mktemp("ct"))


@pytest.mark.parametrize("scenario", ["segmentation", "image-rule mass", "no findings", "classification"])
def test_cnn_results_pass_the_validator(scenario: str, cnn_volume: Volume, tmp_path: Path) -> None:
    if scenario == "segmentation":
        outputs = cnn_outputs.write_seg(cnn_volume, cnn_outputs.make_findings(cnn_volume))
    elif scenario == "image-rule mass":  # no probability, its source and kind as text in the SR
        first = cnn_outputs.make_findings(cnn_volume)[0]
        outputs = cnn_outputs.write_seg(
            cnn_volume, [replace(first, probability=None, source="image rule", kind="mass")]
        )
    elif scenario == "no findings":
        outputs = cnn_outputs.write_seg(cnn_volume, [])
    else:
        outputs = cnn_outputs.write_cls(cnn_volume)
    paths = cnn_outputs.save(outputs, tmp_path)
    report = validate_dicom(paths, quiet=False)
    assert f"TOTAL: {len(paths)} files, 0 failed" in report, report
