"""``pacsnode evaluate``: how well a nodule model does on held-out phantoms, and its false positives on real CT.

On generated studies (seeds the training never used) it reports the Dice of
all nodule voxels, per-nodule sensitivity (a true nodule counts as found when
a finding overlaps it), false positives per study (findings that overlap no
true nodule), and the volume error of found nodules. On the real CT images
of ``pydicom-data`` (no nodules marked, so every finding counts as false) it
reports the findings per image. On real chest CT series with tumour boxes
(``pacsnode evaluate --real DIR``, the layout of :mod:`pacsnode.analysis.modeldev.real`)
it reports per series the findings, the false ones (overlapping no box) and
whether the tumour is found, with its RECIST long axis; with ``inserted`` nodules per series, the
same series again with phantom nodules painted into its aerated lung
(:func:`pacsnode.analysis.modeldev.real.insert_nodules`, seeded), scored per nodule by size
(:data:`REAL_SIZE_BUCKETS`, the nodule's volume-equivalent diameter). Those findings are made in
the lungs' region of the series without the nodules (its filled outline holds them), so the series
is segmented once. On slices thicker than the lesion filter's ``max_nodule_slice_mm`` only masses
are reported, so nodules below the mass size are not found there: that is the filter's choice, and
the figures show it. With ``pleural`` masses per series, the same again with solid phantom nodules of
20-50 mm centred on the pleura (the part outside the lung left out: a tumour against the chest wall or
the mediastinum), scored by the RECIST long axis of what was painted (:data:`PLEURAL_SIZE_BUCKETS`):
whether a tumour like the real one but smaller is found.

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
    "REAL_SIZE_BUCKETS",
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


#: Size classes (mm, volume-equivalent diameter) of the nodules inserted into real lungs: [low, high).
REAL_SIZE_BUCKETS: tuple[tuple[str, float, float], ...] = (
    ("<6 mm", 0.0, 6.0),
    ("6-10 mm", 6.0, 10.0),
    ("10-20 mm", 10.0, 20.0),
    ("20-30 mm", 20.0, 30.0),
    (">=30 mm", 30.0, float("inf")),
)

#: Diameters (mm) of the inserted nodules, drawn log-uniformly: every class above gets some.
INSERTED_DIAMETER_MM = (4.0, 45.0)

#: Size classes (mm, RECIST long axis of what was painted) of the solid masses inserted at the pleura: [low, high).
PLEURAL_SIZE_BUCKETS: tuple[tuple[str, float, float], ...] = (
    ("<30 mm", 0.0, 30.0),
    ("30-40 mm", 30.0, 40.0),
    (">=40 mm", 40.0, float("inf")),
)

#: Diameters (mm) of the solid masses inserted at the pleura, before the part outside the lung is left out.
PLEURAL_DIAMETER_MM = (20.0, 50.0)


@dataclass(frozen=True, kw_only=True)
class RealSeriesScore:
    series: str
    findings: int
    false_findings: int
    tumour_found: bool
    tumour_long_axis_mm: float | None
    tumour_extent_mm: float | None
    tumour_kind: str | None
    tumour_slices_mm: float | None = None  # craniocaudal span of the tumour's finding
    inserted_nodules: int = 0
    inserted_found: int = 0
    inserted_by_size: dict[str, str] = field(default_factory=dict)
    inserted_false_findings: int = 0  # on the series with nodules: findings on neither a nodule nor the tumour
    pleural_masses: int = 0
    pleural_found: int = 0
    pleural_by_size: dict[str, str] = field(default_factory=dict)
    pleural_false_findings: int = 0


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
    real_inserted_sensitivity: float | None = None
    real_inserted_by_size: dict[str, str] = field(default_factory=dict)
    real_pleural_by_size: dict[str, str] = field(default_factory=dict)
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


def _findings(
    prob: np.ndarray,
    volume: Any,
    package: ModelPackage,
    lesions: bool,
    region: np.ndarray | None = None,
    airways: np.ndarray | None = None,
) -> list[Any]:
    """The findings as the ``ct-lung-nodule`` pipeline makes them (``lesions``; in ``region`` with the traced
    ``airways``, by default the volume's lungs' region and airways), or every component of the map."""
    from pacsnode.analysis.cnn.findings import LesionFilter, findings_from_probabilities
    from pacsnode.analysis.errors import InputError
    from pacsnode.analysis.lung.region import lung_region_and_airways

    output = package.manifest.output
    if not lesions:
        return findings_from_probabilities(prob, volume, output.labels, output.activation)
    if region is None:
        try:
            region, airways = lung_region_and_airways(volume)
        except InputError:
            region = np.zeros(volume.hu.shape, dtype=bool)
    return findings_from_probabilities(
        prob, volume, output.labels, output.activation, region=region, lesions=LesionFilter(), airways=airways
    )


def evaluate_real_series(
    package: ModelPackage,
    root: Path,
    *,
    device: str = "auto",
    report: EvaluationReport | None = None,
    lesions: bool = True,
    inserted: int = 0,
    pleural: int = 0,
    seed: int = HELD_OUT_SEED_BASE,
) -> EvaluationReport:
    """Run the model on each real CT series folder under ``root``; a finding on no tumour box is false.

    With ``inserted`` > 0, each series is run again with that many nodules inserted into its lungs
    (series ``n`` from seed ``seed + n``), with ``pleural`` > 0 again with that many solid masses
    inserted at its pleura (seed ``seed + 1000 + n``); see the module's description."""
    import json

    from pacsnode.analysis.cnn.engine import VolumeInput
    from pacsnode.analysis.lung.region import lung_region_and_airways
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
        lungs = None
        if inserted > 0 or pleural > 0:  # segmented once: the lungs' region of the findings and where the nodules go
            from pacsnode.analysis.lung.segmentation import segment_lungs

            lungs = segment_lungs(volume)
        prob = engine.predict([VolumeInput(image=volume.hu, spacing=volume.spacing)])[0]
        region, airways = lung_region_and_airways(volume, lungs) if lungs else (None, None)
        findings = _findings(prob, volume, package, lesions, region=region, airways=airways)
        on_tumour = [f for f in findings if (f.mask & boxes).any()]
        largest = max(on_tumour, key=lambda f: f.longest_diameter_mm, default=None)
        span = None
        if largest is not None:
            slices = np.flatnonzero(largest.mask.any(axis=(1, 2)))
            span = round(float(slices[-1] - slices[0] + 1) * volume.spacing[0], 1)
        nodules: dict[str, Any] = {}
        n = len(report.real_series)
        if lungs is not None and inserted > 0:
            count, found, by_size, false = _score_inserted(
                engine, package, volume, lungs, boxes, lesions, inserted, seed + n, folder.name
            )
            nodules |= {
                "inserted_nodules": count,
                "inserted_found": found,
                "inserted_by_size": by_size,
                "inserted_false_findings": false,
            }
        if lungs is not None and pleural > 0:
            count, found, by_size, false = _score_inserted(
                engine, package, volume, lungs, boxes, lesions, pleural, seed + 1000 + n, folder.name, at_pleura=True
            )
            nodules |= {
                "pleural_masses": count,
                "pleural_found": found,
                "pleural_by_size": by_size,
                "pleural_false_findings": false,
            }
        score = RealSeriesScore(
            series=folder.name,
            findings=len(findings),
            false_findings=len(findings) - len(on_tumour),
            tumour_found=largest is not None,
            tumour_long_axis_mm=round(largest.longest_diameter_mm, 1) if largest else None,
            tumour_extent_mm=round(largest.extent_mm, 1) if largest and largest.extent_mm else None,
            tumour_kind=largest.kind if largest else None,
            tumour_slices_mm=span,
            **nodules,
        )
        report.real_series.append(score)
        logger.info("real series %s: %s", folder.name, score)
    if report.real_series:
        n = len(report.real_series)
        report.real_false_findings_per_series = round(sum(s.false_findings for s in report.real_series) / n, 2)
        report.real_tumours_found = f"{sum(s.tumour_found for s in report.real_series)}/{n}"
        total = sum(s.inserted_nodules for s in report.real_series)
        if total:
            report.real_inserted_sensitivity = round(sum(s.inserted_found for s in report.real_series) / total, 4)
            report.real_inserted_by_size = _sum_fractions([s.inserted_by_size for s in report.real_series])
        if any(s.pleural_masses for s in report.real_series):
            report.real_pleural_by_size = _sum_fractions([s.pleural_by_size for s in report.real_series])
    report.seconds += round(time.perf_counter() - started, 1)
    return report


def _score_inserted(
    engine: Any,
    package: ModelPackage,
    volume: Any,
    lungs: Any,
    boxes: np.ndarray,
    lesions: bool,
    count: int,
    seed: int,
    name: str,
    *,
    at_pleura: bool = False,
) -> tuple[int, int, dict[str, str], int]:
    """(inserted, found, found by size, false findings) of ``count`` nodules inserted into ``volume``'s lungs
    (seeded); with ``at_pleura``, solid masses at the pleura, scored by their RECIST long axis
    (:data:`PLEURAL_SIZE_BUCKETS`)."""
    from dataclasses import replace

    from pacsnode.analysis.cnn.engine import VolumeInput
    from pacsnode.analysis.cnn.findings import axial_diameter_mm
    from pacsnode.analysis.lung.region import lung_region
    from pacsnode.analysis.modeldev.real import TUMOUR_MIN_HU, RealSeries, insert_nodules

    region = lung_region(volume, lungs)
    series = RealSeries(
        name=name,
        hu=volume.hu.astype(np.float32),
        pixel_mm=float(volume.spacing[1]),
        slice_mm=float(volume.spacing[0]),
        region=region,
        lung=lungs.labels > 0,
        tumour=boxes & (volume.hu > TUMOUR_MIN_HU) & region,
        tumour_slices=frozenset(np.flatnonzero(boxes.any(axis=(1, 2))).tolist()),
    )
    image, labels, truths = insert_nodules(
        series,
        np.random.default_rng(seed),
        count,
        diameter_mm=PLEURAL_DIAMETER_MM if at_pleura else INSERTED_DIAMETER_MM,
        kinds=("solid",) if at_pleura else None,
        at_pleura=at_pleura,
    )
    if at_pleura:  # what the lung holds of a mass at the pleura, by RECIST
        buckets = PLEURAL_SIZE_BUCKETS
        sizes = [axial_diameter_mm(np.argwhere(labels == k), volume.spacing) for k in range(1, len(truths) + 1)]
    else:
        buckets = REAL_SIZE_BUCKETS
        sizes = [diameter for diameter, _ in truths]
    info = np.iinfo(volume.hu.dtype) if np.issubdtype(volume.hu.dtype, np.integer) else None
    hu = np.round(image) if info is None else np.clip(np.round(image), info.min, info.max)
    with_nodules = replace(volume, hu=hu.astype(volume.hu.dtype))
    prob = engine.predict([VolumeInput(image=with_nodules.hu, spacing=with_nodules.spacing)])[0]
    findings = _findings(prob, with_nodules, package, lesions, region=region, airways=lungs.airways)
    by_size = {bucket: [0, 0] for bucket, _, _ in buckets}
    found = 0
    for number, size in enumerate(sizes, start=1):
        bucket = next(b for b, low, high in buckets if low <= size < high)
        by_size[bucket][1] += 1
        if any((labels[f.mask] == number).any() for f in findings):
            by_size[bucket][0] += 1
            found += 1
    false = sum(1 for f in findings if not ((labels[f.mask] > 0).any() or (f.mask & boxes).any()))
    what = "solid masses at the pleura" if at_pleura else "nodules"
    logger.info(
        "real series %s with %d inserted %s: %d found, %d false findings", name, len(truths), what, found, false
    )
    return len(truths), found, {k: f"{v[0]}/{v[1]}" for k, v in by_size.items()}, false


def _sum_fractions(parts: Sequence[dict[str, str]]) -> dict[str, str]:
    """``{"a": "1/2"}`` + ``{"a": "0/3"}`` -> ``{"a": "1/5"}``."""
    total: dict[str, list[int]] = {}
    for part in parts:
        for key, value in part.items():
            found, count = (int(v) for v in value.split("/"))
            pair = total.setdefault(key, [0, 0])
            pair[0] += found
            pair[1] += count
    return {k: f"{v[0]}/{v[1]}" for k, v in total.items()}


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
