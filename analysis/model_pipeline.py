"""Pipelines that run a model package: ``model`` (any package or MONAI Bundle) and ``ct-lung-nodule``.

Decode -> volume (:mod:`analysis.volume`) -> engine (:mod:`analysis.engine`:
preprocessing, batched inference) -> findings -> DICOM results
(:mod:`analysis.model_writers`): a segmentation model gives a SEG, a TID 1500
SR with one measurement group per finding (volume, longest diameter,
location, probability) and SC key images with the finding outlined; a
classification model gives an SR with the probability of each class and an
SC with the scores in a banner.

``run_many`` takes several jobs' inputs at once, so their slices share
batches on the device; the next study is decoded while the network runs on
the one before, and each study's results are written while the next runs.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from analysis.model_package import LabelOutput, ModelError, ModelPackage, load_package
from analysis.pipelines import Pipeline, PipelineInput, PipelineOutput
from analysis.preprocess_steps import Step
from analysis.settings import EngineOptions
from analysis.types import InputError

if TYPE_CHECKING:  # pragma: no cover
    from analysis.model_writers import ClassScore, Finding
    from analysis.types import Volume

__all__ = ["LungNodulePipeline", "ModelParams", "ModelPipeline", "find_components"]

logger = logging.getLogger(__name__)


class ModelParams(BaseModel):
    """Params of the ``model`` pipeline (and ``ct-lung-nodule``, whose model is ``lung-nodule``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: Annotated[str, Field(min_length=1)] = "lung-nodule"  # a built-in name or a package/bundle folder
    model_overrides: dict[str, Any] = {}  # manifest fields replacing the package's (bundles: sha256, labels)
    preprocessing: list[Step] | None = None  # replaces the manifest's steps
    engine: EngineOptions = EngineOptions()
    min_slices: Annotated[int, Field(ge=1)] = 1
    series_number_base: Annotated[int, Field(ge=1, le=99999)] = 9100
    max_key_images: Annotated[int, Field(ge=0, le=50)] = 5
    window: tuple[float, float] = (1500.0, -600.0)  # (width, level) of the key images

    @model_validator(mode="after")
    def _package(self) -> ModelParams:
        try:
            package = load_package(self.model, overrides=self.model_overrides)
        except ModelError as exc:
            raise ValueError(str(exc)) from exc
        _check_spec(package)
        return self

    def package(self) -> ModelPackage:
        return load_package(self.model, overrides=self.model_overrides)


def _check_spec(package: ModelPackage) -> None:
    spec = package.manifest
    if spec.input.dims == "3d" and spec.output.kind == "classification":
        raise ValueError(f"model {spec.name}: 3d classification models are not supported yet (2d ones are)")


@dataclass(frozen=True, kw_only=True)
class _Loaded:
    inputs: PipelineInput
    series_uid: str
    volume: Volume


class ModelPipeline(Pipeline):
    """Runs a model package over the selected series and writes its findings as DICOM results."""

    name = "model"
    version = "1.0.0"
    Params = ModelParams
    batches_jobs = True

    def check(self, params: BaseModel) -> None:
        """Build the network on the CPU and run one small input: wrong weights or outputs fail here."""
        import torch

        from analysis.engine import InferenceEngine, VolumeInput, warm_model

        assert isinstance(params, ModelParams)
        options = params.engine.model_copy(update={"device": "cpu", "precision": "fp32", "batch_size": 1})
        package = params.package()
        engine = InferenceEngine(warm_model(package, options, params.preprocessing), options)
        spec = package.manifest.input
        side = max([32, *(spec.roi_size or [])])
        with torch.inference_mode():
            engine.predict([VolumeInput(image=np.full((3 if spec.dims == "2d" else side, side, side), -500,
                                                      dtype=np.int16), spacing=(1.0, 1.0, 1.0))])

    def run(self, inputs: PipelineInput, params: BaseModel) -> PipelineOutput:
        outputs = self.run_many([inputs], params)
        result = outputs[0]
        if isinstance(result, Exception):
            raise result
        return result

    def run_many(self, inputs: Sequence[PipelineInput], params: BaseModel) -> list[PipelineOutput | Exception]:
        """Run several jobs' inputs through one engine call; per job, its output or the error it met."""
        from analysis.engine import InferenceEngine, VolumeInput, warm_model

        assert isinstance(params, ModelParams)
        timings: dict[str, float] = {}
        package = params.package()
        options = params.engine
        t0 = time.perf_counter()
        warm = warm_model(package, options, params.preprocessing)
        timings["model_load_s"] = time.perf_counter() - t0

        results: list[PipelineOutput | Exception | None] = [None] * len(inputs)
        loaded: list[tuple[int, _Loaded]] = []  # (job index, study) in the order the engine sees them
        deadlines = [item.deadline for item in inputs if item.deadline is not None]
        deadline = min(deadlines) if deadlines else None
        engine = InferenceEngine(warm, options)
        decode_s = 0.0

        # Studies are decoded one after the other in a thread; the engine takes each as it is ready, so
        # decoding the next study overlaps the network running on the one before. Each study's findings
        # and DICOM results are built in another thread as soon as its last slice is through.
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="pacsnode-decode") as decoder, \
                ThreadPoolExecutor(max_workers=1, thread_name_prefix="pacsnode-write") as writer:
            futures = [decoder.submit(self._timed_load, item, params, package) for item in inputs]
            writes: dict[int, Future[PipelineOutput]] = {}

            def decoded() -> Iterator[VolumeInput]:
                nonlocal decode_s
                for i, future in enumerate(futures):
                    try:
                        item, seconds = future.result()
                    except Exception as exc:  # noqa: BLE001 - one bad study must not fail the others
                        results[i] = exc
                        continue
                    decode_s += seconds
                    loaded.append((i, item))
                    yield VolumeInput(image=item.volume.hu, spacing=item.volume.spacing)

            def write(index: int, prob: np.ndarray) -> None:
                _, item = loaded[index]
                writes[index] = writer.submit(self._write, item, prob, params, package, dict(timings), len(inputs))

            t0 = time.perf_counter()
            failed: dict[int, Exception] = {}
            try:
                engine.predict(decoded(), deadline=deadline, on_done=write)
            except TimeoutError:
                for future in futures:
                    future.cancel()
                raise  # the deadline is the batch's: every job is retried
            except Exception as exc:
                if len(inputs) == 1:
                    raise
                # One study's failure must not become every study's: the others run one by one.
                logger.warning("batched inference failed (%s); running the studies one by one", exc)
                for i, future in enumerate(futures):  # the studies the stream had not reached yet
                    if results[i] is None and all(i != j for j, _ in loaded):
                        try:
                            loaded.append((i, future.result()[0]))
                        except Exception as one:  # noqa: BLE001
                            results[i] = one
                for index, (_, item) in enumerate(loaded):
                    if index in writes:
                        continue
                    volume = VolumeInput(image=item.volume.hu, spacing=item.volume.spacing)
                    try:
                        engine.predict([volume], deadline=deadline, on_done=lambda _, p, k=index: write(k, p))
                    except TimeoutError:
                        raise
                    except Exception as one:  # noqa: BLE001 - that study's own outcome
                        failed[index] = one
            timings["decode_s"] = decode_s
            timings["inference_s"] = time.perf_counter() - t0
            timings.update({f"engine_{k}": float(v) for k, v in engine.stats.items()})
            for index, (i, _) in enumerate(loaded):
                if index in failed:
                    results[i] = failed[index]
                    continue
                try:
                    output = writes[index].result()
                except Exception as exc:  # noqa: BLE001 - that study's own outcome
                    results[i] = exc
                    continue
                output.summary["timings"].update({k: round(v, 3) for k, v in timings.items()})
                results[i] = output
        return [r if r is not None else InputError("no result") for r in results]

    def _timed_load(self, inputs: PipelineInput, params: ModelParams, package: ModelPackage) -> tuple[_Loaded, float]:
        t0 = time.perf_counter()
        loaded = self._load(inputs, params, package)
        return loaded, time.perf_counter() - t0

    def _load(self, inputs: PipelineInput, params: ModelParams, package: ModelPackage) -> _Loaded:
        from analysis.volume import load_series

        if not inputs.series:
            raise InputError("no series to analyse")
        series = max(inputs.series, key=lambda s: len(s.paths))
        volume = load_series(series.paths, min_slices=params.min_slices)
        modality = str(volume.datasets[0].get("Modality", ""))
        allowed = package.manifest.input.modality
        if allowed and modality not in allowed:
            raise InputError(f"model {package.manifest.name} takes {', '.join(allowed)} images, the series is {modality}")
        return _Loaded(inputs=inputs, series_uid=series.series_instance_uid, volume=volume)

    def _write(
        self,
        item: _Loaded,
        prob: np.ndarray,
        params: ModelParams,
        package: ModelPackage,
        timings: dict[str, float],
        batch_jobs: int,
    ) -> PipelineOutput:
        from analysis.model_writers import write_classification_results, write_segmentation_results

        manifest = package.manifest
        timings = dict(timings)
        t0 = time.perf_counter()
        common = {
            "pipeline_name": self.name,
            "pipeline_version": self.version,
            "model_name": manifest.name,
            "model_version": manifest.version,
            "uid_root": item.inputs.uid_root,
            "series_number_base": params.series_number_base,
            "window": params.window,
        }
        summary: dict[str, Any] = {
            "series_instance_uid": item.series_uid,
            "slices": int(item.volume.hu.shape[0]),
            "model": f"{manifest.name} {manifest.version}",
            "jobs_batched": batch_jobs,
        }
        if manifest.output.kind == "segmentation":
            findings = findings_from_probabilities(prob, item.volume, manifest.output.labels, manifest.output.activation)
            datasets = write_segmentation_results(
                item.volume,
                findings,
                [label_spec(label) for label in manifest.output.labels],
                max_key_images=params.max_key_images,
                **common,
            )
            summary["findings"] = [
                {
                    "label": f.label.name,
                    "number": f.number,
                    "probability": round(f.probability, 3),
                    "volume_ml": round(f.volume_ml, 3),
                    "longest_diameter_mm": round(f.longest_diameter_mm, 1),
                    "location": f.location,
                }
                for f in findings
            ]
        else:
            scores, key_slice = class_scores(prob, manifest)
            datasets = write_classification_results(item.volume, scores, key_slice=key_slice, **common)
            summary["scores"] = {s.name: round(s.probability, 4) for s in scores}
        timings["write_s"] = time.perf_counter() - t0
        summary["timings"] = {k: round(v, 3) for k, v in timings.items()}
        return PipelineOutput(datasets=datasets, summary=summary)


class LungNodulePipeline(ModelPipeline):
    """Lung nodules on CT with pacsnode's shipped demonstration model (``lung-nodule``)."""

    name = "ct-lung-nodule"
    version = "1.0.0"


# --- outputs -> findings -----------------------------------------------------------------------


def label_spec(label: LabelOutput) -> Any:
    """The writer's LabelSpec of a manifest label."""
    from analysis.model_writers import LabelSpec

    return LabelSpec(
        value=label.value,
        name=label.name,
        category=label.category.to_code(),
        type=label.type_code().to_code(),
        modifier=label.modifier.to_code() if label.modifier else None,
        color=label.color,
    )


def _channel(label: LabelOutput, activation: str) -> int:
    return label.value if activation == "softmax" else label.value - 1


def find_components(mask: np.ndarray, spacing: tuple[float, float, float], min_volume_mm3: float) -> tuple[np.ndarray, int]:
    """3D connected components (26-connected) of ``mask`` of at least ``min_volume_mm3``; (labels, count)."""
    labels, count, _ = _components(mask, spacing, min_volume_mm3)
    return labels, count


def _components(
    mask: np.ndarray, spacing: tuple[float, float, float], min_volume_mm3: float
) -> tuple[np.ndarray, int, np.ndarray]:
    """As :func:`find_components`, plus the voxel count of each kept component (index = label).

    Labelled inside the bounding box of the mask only (findings are sparse), then placed in a full array.
    """
    from scipy import ndimage

    labels = np.zeros(mask.shape, dtype=np.int32)
    box = _bounding_box(mask)
    if box is None:
        return labels, 0, np.zeros(1, dtype=np.int64)
    inner, count = ndimage.label(mask[box], structure=np.ones((3, 3, 3), dtype=bool))
    voxel_mm3 = float(np.prod(spacing))
    sizes = np.bincount(inner.ravel())
    keep = sizes * voxel_mm3 >= min_volume_mm3
    keep[0] = False
    remap = np.zeros(count + 1, dtype=np.int32)
    remap[keep] = np.arange(1, int(keep.sum()) + 1)
    labels[box] = remap[inner]
    return labels, int(keep.sum()), np.concatenate([[0], sizes[keep]])


def _above(channel: np.ndarray, threshold: float) -> np.ndarray:
    """``channel >= threshold`` for probabilities; float16 maps compare as integers (same order for x >= 0)."""
    if channel.dtype == np.float16 and threshold >= 0:
        bits = channel.view(np.uint16)
        if int(bits.max(initial=0)) < 0x7C00:  # no sign bit, no inf or NaN: bit order = value order
            return bits >= np.float16(threshold).view(np.uint16)
    return channel >= threshold


def _bounding_box(mask: np.ndarray) -> tuple[slice, ...] | None:
    box = []
    for axis in range(mask.ndim):
        others = tuple(a for a in range(mask.ndim) if a != axis)
        hits = np.flatnonzero(mask.any(axis=others))
        if hits.size == 0:
            return None
        box.append(slice(int(hits[0]), int(hits[-1]) + 1))
    return tuple(box)


def findings_from_probabilities(
    prob: np.ndarray, volume: Volume, labels: Sequence[LabelOutput], activation: str, *, max_findings: int = 100
) -> list[Finding]:
    """Threshold each label's map, split it into connected findings, measure each; largest first.

    At most ``max_findings`` per label (the largest), so a noisy map cannot exhaust memory.
    """
    from dataclasses import replace

    from scipy import ndimage

    from analysis.model_writers import Finding

    findings: list[tuple[float, Finding]] = []
    normal = np.cross(volume.row_direction, volume.column_direction)
    for label in labels:
        channel = prob[_channel(label, activation)]
        components, count, sizes = _components(_above(channel, label.threshold), volume.spacing, label.min_volume_mm3)
        if count == 0:
            continue
        spec = label_spec(label)
        kept = set((np.argsort(-sizes[1:], kind="stable")[:max_findings] + 1).tolist())
        if count > max_findings:
            logger.warning("%d %s findings; keeping the %d largest", count, label.name, max_findings)
        for k, box in enumerate(ndimage.find_objects(components), start=1):
            if box is None or k not in kept:
                continue
            mask_box = components[box] == k
            idx = np.argwhere(mask_box) + np.array([s.start for s in box])
            centroid = idx.mean(axis=0)
            patient = _patient(volume, normal, centroid)
            mask = np.zeros(components.shape, dtype=bool)
            mask[box] = mask_box
            slice_index = int(round(centroid[0]))
            # The patient's right is -x (LPS), measured from the body's midline on that slice, not x = 0.
            side = "right" if patient[0] < _midline_x(volume, normal, slice_index) else "left"
            finding_site = label.finding_site.to_code() if label.finding_site else None
            laterality = None
            if label.lateralize:
                from pydicom.sr.codedict import codes

                laterality = codes.cid244.Right if side == "right" else codes.cid244.Left
            site = label.finding_site.meaning.lower() if label.finding_site else "body"
            instance = volume.datasets[slice_index].get("InstanceNumber") if volume.datasets else None
            location = (
                f"{side} {site}, image {instance if instance is not None else slice_index + 1}, "
                f"patient x {patient[0]:.0f} y {patient[1]:.0f} z {patient[2]:.0f} mm"
            )
            volume_ml = float(idx.shape[0] * volume.voxel_ml)
            findings.append(
                (
                    volume_ml,
                    Finding(
                        label=spec,
                        number=len(findings) + 1,
                        mask=mask,
                        probability=float(np.clip(channel[box][mask_box].astype(np.float32).max(), 0.0, 1.0)),
                        volume_ml=volume_ml,
                        longest_diameter_mm=longest_diameter_mm(idx, volume.spacing),
                        centroid_index=(float(centroid[0]), float(centroid[1]), float(centroid[2])),
                        centroid_patient_mm=(float(patient[0]), float(patient[1]), float(patient[2])),
                        location=location,
                        finding_site=finding_site,
                        laterality=laterality,
                    ),
                )
            )
    findings.sort(key=lambda pair: -pair[0])  # numbered largest first
    return [replace(f, number=n) for n, (_, f) in enumerate(findings, start=1)]


def _patient(volume: Volume, normal: np.ndarray, index: np.ndarray) -> np.ndarray:
    """Patient coordinates (mm) of a (slice, row, column) index: rows run along the column direction."""
    return (
        np.asarray(volume.origin)
        + index[0] * volume.spacing[0] * normal
        + index[1] * volume.spacing[1] * np.asarray(volume.column_direction)
        + index[2] * volume.spacing[2] * np.asarray(volume.row_direction)
    )


def _midline_x(volume: Volume, normal: np.ndarray, slice_index: int, body_hu: float = -500.0) -> float:
    """Patient x of the centre of the body (voxels above ``body_hu``) on one slice; 0 when there is none."""
    rows, cols = np.nonzero(volume.hu[slice_index] > body_hu)
    if rows.size == 0:
        return 0.0
    centre = np.array([slice_index, float(rows.mean()), float(cols.mean())])
    return float(_patient(volume, normal, centre)[0])


def longest_diameter_mm(index: np.ndarray, spacing: tuple[float, float, float]) -> float:
    """The longest distance between two voxel corners of a finding (its 3D extent), mm.

    ``index`` is (n, 3) voxel indexes (slice, row, column). The candidates are
    the corners of the voxels, reduced to their convex hull before the
    pairwise distances.
    """
    corners = np.array([[a, b, c] for a in (-0.5, 0.5) for b in (-0.5, 0.5) for c in (-0.5, 0.5)])
    points = ((index[:, None, :] + corners[None]) * np.asarray(spacing)).reshape(-1, 3)
    points = np.unique(points, axis=0)
    if points.shape[0] > 64:
        from scipy.spatial import ConvexHull, QhullError

        try:
            points = points[ConvexHull(points).vertices]
        except QhullError:
            pass
    diff = points[:, None, :] - points[None, :, :]
    return float(np.sqrt((diff**2).sum(axis=-1)).max())


def class_scores(prob: np.ndarray, manifest: Any) -> tuple[list[ClassScore], int | None]:
    """Per class, the probability (the largest over slices for a 2D model) and the slice that gave it."""
    from analysis.model_writers import ClassScore

    scores = []
    key_slice = None
    best = -1.0
    for spec in manifest.output.classes:
        values = np.asarray(prob[spec.index], dtype=np.float32).reshape(-1)
        where = int(values.argmax())
        p = float(np.clip(values[where], 0.0, 1.0))
        if values.size > 1 and p > best:
            best, key_slice = p, where
        scores.append(ClassScore(name=spec.name, code=spec.code.to_code(), probability=p, threshold=spec.threshold))
    return scores, key_slice
