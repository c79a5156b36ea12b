"""Pipelines that run a model package: ``model`` (any package or MONAI Bundle) and ``ct-lung-nodule``.

Decode -> volume (:mod:`pacsnode.analysis.volume`) -> engine (:mod:`pacsnode.analysis.cnn.engine`:
preprocessing, batched inference) -> findings -> DICOM results
(:mod:`pacsnode.analysis.cnn.writers`): a segmentation model gives a SEG, a TID 1500
SR with one measurement group per finding (volume, longest diameter,
location, probability) and SC key images with the finding outlined; a
classification model gives an SR with the probability of each class and an
SC with the scores in a banner.

``run_many`` takes several jobs' inputs at once, so their slices share
batches on the device; the next study is decoded while the network runs on
the one before, and each study's results are written while the next runs.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Annotated, Any, TypedDict

import numpy as np
from pydantic import BaseModel, Field, model_validator

from pacsnode.analysis.cnn.findings import LesionFilter, class_scores, findings_from_probabilities, label_spec
from pacsnode.analysis.cnn.package import ModelPackage, load_package
from pacsnode.analysis.cnn.steps import Step
from pacsnode.analysis.errors import InputError, ModelError
from pacsnode.analysis.pipelines import Pipeline, PipelineInput, PipelineOutput
from pacsnode.analysis.settings import EngineOptions
from pacsnode.storage.model_base import StrictModel

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from pacsnode.analysis.cnn.engine import InferenceEngine, VolumeInput
    from pacsnode.analysis.types import LungResult, Volume

__all__ = ["LungNodulePipeline", "ModelParams", "ModelPipeline"]

logger = logging.getLogger(__name__)


class _ResultSeries(TypedDict):
    """The keyword arguments both result writers take: who made the series, and their numbering."""

    pipeline_name: str
    pipeline_version: str
    model_name: str
    model_version: str
    uid_root: str
    series_number_base: int
    window: tuple[float, float]


class ModelParams(StrictModel):
    """Params of the ``model`` pipeline (and ``ct-lung-nodule``, whose model is ``lung-nodule``)."""

    model: Annotated[str, Field(min_length=1)] = "lung-nodule"  # a built-in name or a package/bundle folder
    model_overrides: dict[str, Any] = {}  # manifest fields replacing the package's (bundles: sha256, labels)
    preprocessing: list[Step] | None = None  # replaces the manifest's steps
    engine: EngineOptions = EngineOptions()
    min_slices: Annotated[int, Field(ge=1)] = 1
    series_number_base: Annotated[int, Field(ge=1, le=99999)] = 9100
    max_key_images: Annotated[int, Field(ge=0, le=50)] = 5
    window: tuple[float, float] = (1500.0, -600.0)  # (width, level) of the key images
    # ct-lung-nodule: with more separate spots than this in the lungs, none of the model's findings is reported
    # (masses still are): LesionFilter.max_model_spots; None reports them whatever their number.
    max_model_spots: Annotated[int, Field(ge=0)] | None = LesionFilter.max_model_spots

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
    region: np.ndarray | None = None  # where findings may lie (the lungs' region); None: everywhere
    airways: np.ndarray | None = None  # the traced trachea and main bronchi (the lesion filter's hila)


class ModelPipeline(Pipeline):
    """Runs a model package over the selected series and writes its findings as DICOM results."""

    name = "model"
    version = "1.0.0"
    Params = ModelParams
    batches_jobs = True

    def check(self, params: BaseModel) -> None:
        """Build the network on the CPU and run one small input: wrong weights or outputs fail here."""
        import torch

        from pacsnode.analysis.cnn.engine import (
            InferenceEngine,
            VolumeInput,
            warm_model,
        )

        assert isinstance(params, ModelParams)
        options = params.engine.model_copy(update={"device": "cpu", "precision": "fp32", "batch_size": 1})
        package = params.package()
        engine = InferenceEngine(warm_model(package, options, params.preprocessing), options)
        spec = package.manifest.input
        side = max([32, *(spec.roi_size or [])])
        with torch.inference_mode():
            engine.predict(
                [
                    VolumeInput(
                        image=np.full((3 if spec.dims == "2d" else side, side, side), -500, dtype=np.int16),
                        spacing=(1.0, 1.0, 1.0),
                    )
                ]
            )

    def run(self, inputs: PipelineInput, params: BaseModel) -> PipelineOutput:
        outputs = self.run_many([inputs], params)
        result = outputs[0]
        if isinstance(result, Exception):
            raise result
        return result

    def run_many(self, inputs: Sequence[PipelineInput], params: BaseModel) -> list[PipelineOutput | Exception]:
        """Run several jobs' inputs through one engine call; per job, its output or the error it met."""
        from pacsnode.analysis.cnn.engine import InferenceEngine, warm_model

        assert isinstance(params, ModelParams)
        package = params.package()
        t0 = time.perf_counter()
        warm = warm_model(package, params.engine, params.preprocessing)
        timings = {"model_load_s": time.perf_counter() - t0}
        engine = InferenceEngine(warm, params.engine)
        # Studies are decoded one after the other in a thread; the engine takes each as it is ready, so
        # decoding the next study overlaps the network running on the one before. Each study's findings
        # and DICOM results are built in another thread as soon as its last slice is through.
        with (
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="pacsnode-decode") as decoder,
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="pacsnode-write") as writer,
        ):
            batch = _JobBatch(self, inputs, params, package, engine, decoder=decoder, writer=writer, timings=timings)
            outcomes = batch.run()
        return outcomes

    def _timed_load(
        self, inputs: PipelineInput, params: ModelParams, package: ModelPackage, device: torch.device
    ) -> tuple[_Loaded, float]:
        t0 = time.perf_counter()
        loaded = self._load(inputs, params, package, device)
        return loaded, time.perf_counter() - t0

    def _load(self, inputs: PipelineInput, params: ModelParams, package: ModelPackage, device: torch.device) -> _Loaded:
        """Decode the largest series (into pinned memory when it goes to a GPU: uploaded without a host copy)."""
        from pacsnode.analysis.cnn.feed import host_volume
        from pacsnode.analysis.lung.anatomy import check_anatomy
        from pacsnode.analysis.volume import load_series

        if not inputs.series:
            raise InputError("no series to analyse")
        series = max(inputs.series, key=lambda s: len(s.paths))
        allocate = functools.partial(host_volume, device=device) if device.type == "cuda" else None
        volume = load_series(series.paths, min_slices=params.min_slices, allocate=allocate)
        lungs = check_anatomy(volume, inputs.anatomy)  # match.anatomy: AnatomyMismatch (job skipped) before inference
        modality = str(volume.datasets[0].get("Modality", ""))
        allowed = package.manifest.input.modality
        if allowed and modality not in allowed:
            raise InputError(
                f"model {package.manifest.name} takes {', '.join(allowed)} images, the series is {modality}"
            )
        region, airways = self._region(volume, lungs)
        return _Loaded(
            inputs=inputs, series_uid=series.series_instance_uid, volume=volume, region=region, airways=airways
        )

    lesion_filter: LesionFilter | None = None  # shape tests of the findings (None: every component is one)

    def _region(self, volume: Volume, lungs: LungResult | None) -> tuple[np.ndarray | None, np.ndarray | None]:
        """Where findings may lie (everywhere for a generic model) and the traced airways (none)."""
        return None, None

    def _lesions(self, params: ModelParams) -> LesionFilter | None:
        """The pipeline's lesion filter with the params' limit on the model's spots (None: no filter)."""
        if self.lesion_filter is None:
            return None
        return replace(self.lesion_filter, max_model_spots=params.max_model_spots)

    def _write(
        self,
        item: _Loaded,
        prob: np.ndarray,
        params: ModelParams,
        package: ModelPackage,
        timings: dict[str, float],
        batch_jobs: int,
    ) -> PipelineOutput:
        from pacsnode.analysis.cnn.writers import (
            write_classification_results,
            write_segmentation_results,
        )

        manifest = package.manifest
        timings = dict(timings)
        t0 = time.perf_counter()
        common: _ResultSeries = {
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
            findings = findings_from_probabilities(
                prob,
                item.volume,
                manifest.output.labels,
                manifest.output.activation,
                region=item.region,
                lesions=self._lesions(params),
                airways=item.airways,
            )
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
                    **({"probability": round(f.probability, 3)} if f.probability is not None else {}),
                    **({"source": f.source} if f.source != "model" else {}),
                    "volume_ml": round(f.volume_ml, 3),
                    "longest_diameter_mm": round(f.longest_diameter_mm, 1),
                    **({"extent_mm": round(f.extent_mm, 1)} if f.extent_mm is not None else {}),
                    **({"kind": f.kind} if f.kind else {}),
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
    lesion_filter = LesionFilter()

    def _region(self, volume: Volume, lungs: LungResult | None) -> tuple[np.ndarray | None, np.ndarray | None]:
        """The lungs' region (:func:`~pacsnode.analysis.lung.region.lung_region`) and the airways its
        segmentation traced, the anatomy check's segmentation reused; an empty region (no findings) when the
        images show no lungs."""
        from pacsnode.analysis.lung.region import lung_region_and_airways

        try:
            return lung_region_and_airways(volume, lungs)
        except InputError as exc:
            logger.warning("no lungs found (%s): no nodule findings", exc)
            return np.zeros(volume.hu.shape, dtype=bool), None


class _JobBatch:
    """One ``run_many`` call: its studies through decoding, the engine and the writers, and each job's outcome.

    ``loaded`` lists the studies in the order the engine takes them; ``writes`` (the results being
    written) and ``failed`` (a study's own inference error) are keyed by position in it.
    """

    def __init__(
        self,
        pipeline: ModelPipeline,
        inputs: Sequence[PipelineInput],
        params: ModelParams,
        package: ModelPackage,
        engine: InferenceEngine,
        *,
        decoder: ThreadPoolExecutor,
        writer: ThreadPoolExecutor,
        timings: dict[str, float],
    ) -> None:
        self.pipeline = pipeline
        self.inputs = inputs
        self.params = params
        self.package = package
        self.engine = engine
        self.writer = writer
        self.timings = timings
        deadlines = [item.deadline for item in inputs if item.deadline is not None]
        self.deadline = min(deadlines) if deadlines else None
        self.outcomes: list[PipelineOutput | Exception | None] = [None] * len(inputs)
        self.loaded: list[tuple[int, _Loaded]] = []  # (job index, study)
        self.writes: dict[int, Future[PipelineOutput]] = {}
        self.failed: dict[int, Exception] = {}
        self.decode_s = 0.0
        self.decodes = [
            decoder.submit(pipeline._timed_load, item, params, package, engine.warm.device) for item in inputs
        ]

    def run(self) -> list[PipelineOutput | Exception]:
        """Infer, then gather each job's results or error, with the batch's timings."""
        t0 = time.perf_counter()
        self._infer()
        self.timings["decode_s"] = self.decode_s
        self.timings["inference_s"] = time.perf_counter() - t0
        self.timings.update({f"engine_{k}": float(v) for k, v in self.engine.stats.items()})
        self._collect()
        return [r if r is not None else InputError("no result") for r in self.outcomes]

    def _infer(self) -> None:
        """All studies in one engine call; if it fails, each study on its own (unless past the deadline)."""
        try:
            self.engine.predict(self._decoded(), deadline=self.deadline, on_done=self._write)
        except TimeoutError:
            for future in self.decodes:
                future.cancel()
            raise  # the deadline is the batch's: every job is retried
        except Exception as exc:
            if len(self.inputs) == 1:
                raise
            # One study's failure must not become every study's: the others run one by one.
            logger.warning("batched inference failed (%s); running the studies one by one", exc)
            self._load_the_rest()
            self._infer_one_by_one()

    def _decoded(self) -> Iterator[VolumeInput]:
        """The studies as their decoding finishes; a study that cannot be decoded has that error as its outcome."""
        for i, future in enumerate(self.decodes):
            try:
                item, seconds = future.result()
            except Exception as exc:  # noqa: BLE001 - one bad study must not fail the others
                self.outcomes[i] = exc
                continue
            self.decode_s += seconds
            self.loaded.append((i, item))
            yield _volume_input(item)

    def _write(self, index: int, prob: np.ndarray) -> None:
        """Build the findings and DICOM results of ``loaded[index]`` in the writer thread."""
        _, item = self.loaded[index]
        self.writes[index] = self.writer.submit(
            self.pipeline._write, item, prob, self.params, self.package, dict(self.timings), len(self.inputs)
        )

    def _writer_of(self, index: int) -> Callable[[int, np.ndarray], None]:
        """``on_done`` of an engine call given ``loaded[index]`` alone (the engine calls it volume 0)."""
        return lambda _, prob: self._write(index, prob)

    def _load_the_rest(self) -> None:
        """Wait for the studies the failed engine call had not reached yet."""
        for i, future in enumerate(self.decodes):
            if self.outcomes[i] is None and all(i != j for j, _ in self.loaded):
                try:
                    self.loaded.append((i, future.result()[0]))
                except Exception as one:  # noqa: BLE001
                    self.outcomes[i] = one

    def _infer_one_by_one(self) -> None:
        """Each loaded study not yet written, in an engine call of its own; its error stays its own."""
        for index, (_, item) in enumerate(self.loaded):
            if index in self.writes:
                continue
            try:
                self.engine.predict([_volume_input(item)], deadline=self.deadline, on_done=self._writer_of(index))
            except TimeoutError:
                raise
            except Exception as one:  # noqa: BLE001 - that study's own outcome
                self.failed[index] = one

    def _collect(self) -> None:
        """Each loaded study's outcome: its inference error, its writer's error, or its output with the timings."""
        for index, (i, _) in enumerate(self.loaded):
            if index in self.failed:
                self.outcomes[i] = self.failed[index]
                continue
            try:
                output = self.writes[index].result()
            except Exception as exc:  # noqa: BLE001 - that study's own outcome
                self.outcomes[i] = exc
                continue
            output.summary["timings"].update({k: round(v, 3) for k, v in self.timings.items()})
            self.outcomes[i] = output


def _volume_input(item: _Loaded) -> VolumeInput:
    from pacsnode.analysis.cnn.engine import VolumeInput

    return VolumeInput(image=item.volume.hu, spacing=item.volume.spacing)
