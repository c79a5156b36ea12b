"""CT lung analysis, classical (no trained weights): lung volumes, density, LAA-950.

Decode -> HU volume (:mod:`pacsnode.analysis.volume`) -> lung segmentation and
measurements (:mod:`pacsnode.analysis.lung.segmentation`) -> SEG + TID 1500 SR + SC key images
(:mod:`pacsnode.analysis.results.core`).
"""

from __future__ import annotations

import logging
import time
from typing import Annotated

from pydantic import BaseModel, Field

from pacsnode.analysis.errors import InputError
from pacsnode.analysis.pipelines import Pipeline, PipelineInput, PipelineOutput
from pacsnode.storage.model_base import StrictModel

__all__ = ["CtLungPipeline", "CtLungParams"]

logger = logging.getLogger(__name__)


class CtLungParams(StrictModel):
    min_slices: Annotated[int, Field(ge=2)] = 10
    air_threshold_hu: Annotated[int, Field(ge=-1000, le=0)] = -400
    key_slices: Annotated[int, Field(ge=1, le=20)] = 3
    series_number_base: Annotated[int, Field(ge=1, le=99999)] = 9000


class CtLungPipeline(Pipeline):
    """Lung volumes (right, left, total, mL), mean lung density (HU) and LAA-950 (%)."""

    name = "ct-lung"
    version = "1.0.0"
    Params = CtLungParams

    def run(self, inputs: PipelineInput, params: BaseModel) -> PipelineOutput:
        from pacsnode.analysis.lung.anatomy import check_anatomy
        from pacsnode.analysis.lung.segmentation import segment_lungs
        from pacsnode.analysis.lung.writers import write_lung_results
        from pacsnode.analysis.volume import load_series

        assert isinstance(params, CtLungParams)
        if not inputs.series:
            raise InputError("no CT series to analyse")
        # Several matching series (e.g. lung and mediastinal kernels): the one with the most slices.
        series = max(inputs.series, key=lambda s: len(s.paths))
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        volume = load_series(series.paths, min_slices=params.min_slices)
        timings["decode_hu_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        # match.anatomy: skip (AnatomyMismatch) unless the volume shows it; its segmentation is reused.
        lungs = check_anatomy(volume, inputs.anatomy, air_threshold_hu=params.air_threshold_hu)
        result = lungs or segment_lungs(volume, air_threshold_hu=params.air_threshold_hu)
        timings["segment_measure_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        datasets = write_lung_results(
            volume,
            result,
            pipeline_name=self.name,
            pipeline_version=self.version,
            uid_root=inputs.uid_root,
            series_number_base=params.series_number_base,
            key_slices=params.key_slices,
        )
        timings["write_s"] = time.perf_counter() - t0
        summary = {
            "series_instance_uid": series.series_instance_uid,
            "slices": int(volume.hu.shape[0]),
            "right_lung_volume_ml": round(result.right_volume_ml, 1),
            "left_lung_volume_ml": round(result.left_volume_ml, 1),
            "total_lung_volume_ml": round(result.total_volume_ml, 1),
            "mean_lung_density_hu": round(result.mean_density_hu, 1),
            "laa950_percent": round(result.laa950_percent, 2),
            "airways_left_out_ml": round(result.airway_volume_ml, 1),
            "notes": list(result.notes),
            "timings": {k: round(v, 3) for k, v in timings.items()},
        }
        return PipelineOutput(datasets=datasets, summary=summary)
