"""``pacsnode evaluate``: how well a nodule model does on held-out phantoms, and its false positives on real CT.

On generated studies (seeds the training never used) it reports the Dice of
all nodule voxels, per-nodule sensitivity (a true nodule counts as found when
a finding overlaps it), false positives per study (findings that overlap no
true nodule), and the volume error of found nodules. On the real CT images
of ``pydicom-data`` (no nodules marked, so every finding counts as false) it
reports the findings per image.
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

__all__ = ["EvaluationReport", "StudyScore", "evaluate_phantoms", "evaluate_real_ct", "pydicom_data_ct_files"]

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
) -> EvaluationReport:
    """Score the model on ``studies`` generated chest CTs with known nodules."""
    from pacsnode.analysis.cnn.engine import VolumeInput
    from pacsnode.analysis.cnn.findings import findings_from_probabilities
    from pacsnode.analysis.modeldev.synthetic import PhantomSpec, make_chest_phantom

    started = time.perf_counter()
    report = report or EvaluationReport(model=f"{package.manifest.name} {package.manifest.version}")
    engine, _ = _engine(package, device)
    labels = package.manifest.output.labels
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
        findings = findings_from_probabilities(prob, volume, labels, package.manifest.output.activation)
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
        )
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
