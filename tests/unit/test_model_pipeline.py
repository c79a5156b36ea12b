"""The ``model`` pipeline on written CT series: a classification model's results, several jobs in one pass."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest

from pacsnode.analysis.cnn.pipeline import ModelParams, ModelPipeline
from pacsnode.analysis.errors import InputError
from pacsnode.analysis.modeldev.synthetic import PhantomSpec, write_chest_ct
from pacsnode.analysis.pipelines import PipelineInput, PipelineOutput, SeriesInput
from tests.support.models import make_package

CLASSIFIER = {
    "name": "Classifier",
    "params": {"in_shape": [3, 32, 32], "classes": 2, "channels": [4, 8], "strides": [2, 2]},
}
CLASSES = {
    "kind": "classification",
    "activation": "sigmoid",
    "classes": [
        {
            "index": 0,
            "name": "nodule",
            "code": {"scheme": "SCT", "value": "27925004", "meaning": "Nodule"},
            "threshold": 0.5,
        },
        {
            "index": 1,
            "name": "emphysema",
            "code": {"scheme": "SCT", "value": "87433001", "meaning": "Emphysema"},
            "threshold": 0.9,
        },
    ],
}
SR, SC = "1.2.840.10008.5.1.4.1.1.88.34", "1.2.840.10008.5.1.4.1.1.7"


def _inputs(tmp_path: Path, name: str, slices: int = 8, seed: int = 0) -> PipelineInput:
    truth = write_chest_ct(tmp_path / name, PhantomSpec(slices=slices, size=64), seed=seed)
    series = SeriesInput(
        series_instance_uid=truth.series_instance_uid, modality="CT", series_description="", paths=tuple(truth.paths)
    )
    return PipelineInput(job_id=seed, study_instance_uid=truth.study_instance_uid, series=(series,), uid_root="2.25")


def _params(package: Path, **extra: object) -> ModelParams:
    return ModelParams.model_validate(
        {"model": str(package), "engine": {"device": "cpu", "precision": "fp32"}, **extra}
    )


def test_a_classification_model_gives_an_sr_and_a_score_image(tmp_path: Path) -> None:
    steps = [{"kind": "window", "center": -400, "width": 1500}, {"kind": "resize", "size": [32, 32]}]
    package = make_package(tmp_path / "cls", architecture=CLASSIFIER, output=CLASSES, preprocessing=steps)
    output = ModelPipeline().run(_inputs(tmp_path, "ct"), _params(package))
    classes = [str(ds.SOPClassUID) for ds in output.datasets]
    assert classes == [SR, SC]
    scores = output.summary["scores"]
    assert set(scores) == {"nodule", "emphysema"} and all(0.0 <= p <= 1.0 for p in scores.values())
    for ds in output.datasets:
        path = tmp_path / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
        assert pydicom.dcmread(path).StudyInstanceUID == output.datasets[0].StudyInstanceUID


def test_several_jobs_in_one_pass_each_get_their_own_outcome(tmp_path: Path) -> None:
    package = make_package(tmp_path / "seg")
    good_a = _inputs(tmp_path, "a", seed=1)
    good_b = _inputs(tmp_path, "b", seed=2)
    too_short = _inputs(tmp_path, "c", slices=2, seed=3)
    outputs = ModelPipeline().run_many([good_a, too_short, good_b], _params(package, min_slices=4))
    assert isinstance(outputs[1], InputError) and "not enough slices" in str(outputs[1])
    for out, inputs in ((outputs[0], good_a), (outputs[2], good_b)):
        assert isinstance(out, PipelineOutput)
        assert out.summary["series_instance_uid"] == inputs.series[0].series_instance_uid
        assert out.summary["jobs_batched"] == 3  # jobs in the pass, the failed one included
        assert all(ds.StudyInstanceUID == inputs.study_instance_uid for ds in out.datasets)


def test_a_series_of_another_modality_is_refused(tmp_path: Path) -> None:
    package = make_package(tmp_path / "mr-only")
    import json

    manifest = json.loads((package / "manifest.json").read_text())
    manifest["input"]["modality"] = ["MR"]
    (package / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(InputError, match="takes MR images, the series is CT"):
        ModelPipeline().run(_inputs(tmp_path, "ct"), _params(package))
