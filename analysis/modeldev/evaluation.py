"""``pacsnode evaluate``: how well a nodule model does on held-out phantoms, and its false positives on real CT.

On generated studies (seeds the training never used) it reports the Dice of
all nodule voxels, per-nodule sensitivity (a true nodule counts as found when
a finding overlaps it), false positives per study (findings that overlap no
true nodule), and the volume error of found nodules. On the real CT images
of ``pydicom-data`` (no nodules marked, so every finding counts as false) it
reports the findings per image. On real chest CT series with tumour boxes
(``pacsnode evaluate --real DIR``, the layout of :mod:`pacsnode.analysis.modeldev.real`)
it reports per series the findings, the false ones (overlapping no box) and
whether the tumour is found, with its RECIST long axis.

Findings are made as the ``ct-lung-nodule`` pipeline makes them: inside the
lungs' region, through its :class:`~pacsnode.analysis.cnn.findings.LesionFilter`
(``lesions=False``: every component of the map, as before that filter existed).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pacsnode.analysis.cnn.package import ModelPackage

__all__ = [
    "EvaluationReport",
    "RealSeriesScore",
    "StudyScore",
    "evaluate_phantoms",
    "evaluate_real_ct",
    "evaluate_real_series",
    "pydicom_data_ct_files",
]

logger = logging.getLogger(__name__)

#: Seeds of evaluation phantoms start here; ``pacsnode train`` draws its phantom seeds from its own generator.
HELD_OUT_SEED_BASE = 1_000_000


@dataclass(frozen=True, kw_only=True)
class StudyScore:
    seed: int
    true_nodules: int
    found: int
    false_positives: int
    dice: float
    volume_errors_percent: list[float]


@dataclass(frozen=True, kw_only=True)
class RealSeriesScore:
    series: str
    findings: int
    false_findings: int
    tumour_found: bool
    tumour_long_axis_mm: float | None
    tumour_extent_mm: float | None
    tumour_kind: str | None


@dataclass(kw_only=True)
class EvaluationReport:
    model: str
    studies: list[StudyScore] = field(default_factory=list)
    dice: float = 0.0
    sensitivity: float = 0.0
    false_positives_per_study: float = 0.0
    mean_abs_volume_error_percent: float = 0.0
    sensitivity_by_size: dict[str, str] = field(default_factory=dict)
    real_ct_images: int = 0
    real_ct_false_positives: int = 0
    real_ct_files: list[dict[str, Any]] = field(default_factory=list)
    real_series: list[RealSeriesScore] = field(default_factory=list)
    real_false_findings_per_series: float | None = None
    real_tumours_found: str = ""
    lesion_filter: bool = True
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _engine(package: ModelPackage, device: str) -> tuple[Any, Any]:
    from pacsnode.analysis.cnn.engine import EngineOptions, InferenceEngine, warm_model

    options = EngineOptions(device=device)
    warm = warm_model(package, options)
    return InferenceEngine(warm, options), warm


def evaluate_phantoms(
    package: ModelPackage,
    *,
    studies: int = 5,
    seed: int = HELD_OUT_SEED_BASE,
    slices: int = 64,
    size: int = 512,
    device: str = "auto",
    report: EvaluationReport | None = None,
    lesions: bool = True,
) -> EvaluationReport:
    """Score the model on ``studies`` generated chest CTs with known nodules."""
    from pacsnode.analysis.cnn.engine import VolumeInput
    from pacsnode.analysis.modeldev.synthetic import PhantomSpec, make_chest_phantom

    started = time.perf_counter()
    report = report or EvaluationReport(model=f"{package.manifest.name} {package.manifest.version}")
    engine, _ = _engine(package, device)
    rng = np.random.default_rng(seed)
    inter = union = 0
    found_by_size: dict[str, list[int]] = {"<6 mm": [0, 0], "6-10 mm": [0, 0], ">=10 mm": [0, 0]}
    for n in range(studies):
        study_seed = seed + n
        spec = PhantomSpec(
            slices=slices,
            size=size,
            slice_thickness_mm=float(rng.choice([1.0, 1.5, 2.0, 2.5])),
            noise_hu=float(rng.uniform(8.0, 30.0)),
            blur_sigma_mm=float(rng.uniform(0.0, 1.0)),
            vessel_spheres=False,
            nodules=10,
        )
        phantom = make_chest_phantom(spec, seed=study_seed)
        volume = phantom.to_volume()
        prob = engine.predict([VolumeInput(image=volume.hu, spacing=volume.spacing)])[0]
        findings = _findings(prob, volume, package, lesions)
        truth = phantom.nodule_labels if phantom.nodule_labels is not None else np.zeros(volume.hu.shape, np.uint16)
        predicted = np.zeros(truth.shape, dtype=bool)
        for f in findings:
            predicted |= f.mask
        inter += int(np.count_nonzero(predicted & (truth > 0)))
        union += int(np.count_nonzero(predicted)) + int(np.count_nonzero(truth))
        false_positives = sum(1 for f in findings if not (truth[f.mask] > 0).any())
        found = 0
        errors = []
        for nodule in phantom.nodules:
            overlap = [f for f in findings if (truth[f.mask] == nodule.number).any()]
            bucket = "<6 mm" if nodule.diameter_mm < 6 else "6-10 mm" if nodule.diameter_mm < 10 else ">=10 mm"
            found_by_size[bucket][1] += 1
            if overlap:
                found += 1
                found_by_size[bucket][0] += 1
                predicted_ml = sum(f.volume_ml for f in overlap)
                errors.append(100.0 * (predicted_ml - nodule.volume_ml) / nodule.volume_ml)
        study_dice = _dice(predicted, truth > 0)
        report.studies.append(
            StudyScore(
                seed=study_seed,
                true_nodules=len(phantom.nodules),
                found=found,
                false_positives=false_positives,
                dice=round(study_dice, 4),
                volume_errors_percent=[round(e, 1) for e in errors],
            )
        )
        logger.info(
            "phantom %d: %d/%d nodules found, %d false positives, Dice %.3f",
            study_seed,
            found,
            len(phantom.nodules),
            false_positives,
            study_dice,
        )
    true_total = sum(s.true_nodules for s in report.studies)
    found_total = sum(s.found for s in report.studies)
    all_errors = [abs(e) for s in report.studies for e in s.volume_errors_percent]
    report.dice = round(2.0 * inter / union, 4) if union else 1.0
    report.sensitivity = round(found_total / true_total, 4) if true_total else 1.0
    report.false_positives_per_study = round(sum(s.false_positives for s in report.studies) / max(studies, 1), 2)
    report.mean_abs_volume_error_percent = round(float(np.mean(all_errors)), 1) if all_errors else 0.0
    report.sensitivity_by_size = {k: f"{v[0]}/{v[1]}" for k, v in found_by_size.items()}
    report.lesion_filter = lesions
    report.seconds += round(time.perf_counter() - started, 1)
    return report


def _findings(prob: np.ndarray, volume: Any, package: ModelPackage, lesions: bool) -> list[Any]:
    """The findings as the ``ct-lung-nodule`` pipeline makes them (``lesions``), or every component of the map."""
    from pacsnode.analysis.cnn.findings import LesionFilter, findings_from_probabilities
    from pacsnode.analysis.errors import InputError
    from pacsnode.analysis.lung.region import lung_region

    output = package.manifest.output
    if not lesions:
        return findings_from_probabilities(prob, volume, output.labels, output.activation)
    try:
        region = lung_region(volume)
    except InputError:
        region = np.zeros(volume.hu.shape, dtype=bool)
    return findings_from_probabilities(
        prob, volume, output.labels, output.activation, region=region, lesions=LesionFilter()
    )


def evaluate_real_series(
    package: ModelPackage,
    root: Path,
    *,
    device: str = "auto",
    report: EvaluationReport | None = None,
    lesions: bool = True,
) -> EvaluationReport:
    """Run the model on each real CT series folder under ``root``; a finding on no tumour box is false."""
    import json

    from pacsnode.analysis.cnn.engine import VolumeInput
    from pacsnode.analysis.modeldev.real import real_series_dirs
    from pacsnode.analysis.volume import load_series

    started = time.perf_counter()
    report = report or EvaluationReport(model=f"{package.manifest.name} {package.manifest.version}")
    engine, _ = _engine(package, device)
    annotations_file = Path(root) / "annotations.json"
    annotations = json.loads(annotations_file.read_text(encoding="utf-8")) if annotations_file.is_file() else {}
    for folder in real_series_dirs(Path(root)):
        volume = load_series(sorted(folder.glob("*.dcm")))
        boxes = np.zeros(volume.hu.shape, dtype=bool)
        slice_of = {str(ds.SOPInstanceUID): k for k, ds in enumerate(volume.datasets)}
        for box in annotations.get(folder.name, {}).get("tumour_boxes", []):
            k = slice_of.get(str(box["sop_instance_uid"]))
            if k is None:
                continue
            x0, y0, x1, y1 = (int(v) for v in box["bbox_xyxy_px"])
            boxes[k, y0 : y1 + 1, x0 : x1 + 1] = True
        prob = engine.predict([VolumeInput(image=volume.hu, spacing=volume.spacing)])[0]
        findings = _findings(prob, volume, package, lesions)
        on_tumour = [f for f in findings if (f.mask & boxes).any()]
        largest = max(on_tumour, key=lambda f: f.longest_diameter_mm, default=None)
        score = RealSeriesScore(
            series=folder.name,
            findings=len(findings),
            false_findings=len(findings) - len(on_tumour),
            tumour_found=largest is not None,
            tumour_long_axis_mm=round(largest.longest_diameter_mm, 1) if largest else None,
            tumour_extent_mm=round(largest.extent_mm, 1) if largest and largest.extent_mm else None,
            tumour_kind=largest.kind if largest else None,
        )
        report.real_series.append(score)
        logger.info("real series %s: %s", folder.name, score)
    if report.real_series:
        n = len(report.real_series)
        report.real_false_findings_per_series = round(sum(s.false_findings for s in report.real_series) / n, 2)
        report.real_tumours_found = f"{sum(s.tumour_found for s in report.real_series)}/{n}"
    report.seconds += round(time.perf_counter() - started, 1)
    return report


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(np.count_nonzero(a)) + int(np.count_nonzero(b))
    return 2.0 * int(np.count_nonzero(a & b)) / total if total else 1.0


def pydicom_data_ct_files() -> list[Path]:
    """Single-frame CT images of the ``pydicom-data`` package (installed with the test extras); [] without it."""
    try:
        import data_store
    except ImportError:
        return []
    import pydicom

    root = Path(data_store.__file__).parent / "data"
    out = []
    for path in sorted(root.rglob("*.dcm")):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception:  # noqa: BLE001 - not a DICOM file we can read: not a candidate
            continue
        if ds.get("Modality") == "CT" and int(ds.get("NumberOfFrames", 1) or 1) == 1 and "PixelSpacing" in ds:
            out.append(path)
    return out


def evaluate_real_ct(
    package: ModelPackage, files: Sequence[Path], *, device: str = "auto", report: EvaluationReport | None = None
) -> EvaluationReport:
    """Run the model on single real CT images; every finding counts as a false positive."""
    from pacsnode.analysis.cnn.engine import VolumeInput
    from pacsnode.analysis.cnn.findings import findings_from_probabilities
    from pacsnode.analysis.errors import AnalysisError
    from pacsnode.analysis.volume import load_series

    started = time.perf_counter()
    report = report or EvaluationReport(model=f"{package.manifest.name} {package.manifest.version}")
    engine, _ = _engine(package, device)
    for path in files:
        try:
            volume = load_series([path], min_slices=1)
        except AnalysisError as exc:
            report.real_ct_files.append({"file": path.name, "error": str(exc)})
            continue
        prob = engine.predict([VolumeInput(image=volume.hu, spacing=volume.spacing)])[0]
        findings = findings_from_probabilities(
            prob, volume, package.manifest.output.labels, package.manifest.output.activation
        )  # single images: no lung region to speak of, every component counts
        report.real_ct_images += 1
        report.real_ct_false_positives += len(findings)
        report.real_ct_files.append(
            {
                "file": path.name,
                "findings": len(findings),
                "largest_ml": round(max((f.volume_ml for f in findings), default=0.0), 3),
            }
        )
    report.seconds += round(time.perf_counter() - started, 1)
    return report
