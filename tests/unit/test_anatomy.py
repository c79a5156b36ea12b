"""``match.anatomy: chest``: decided on the decoded volume by the lung segmentation, the same for every pipeline.

A volume without lungs (a head or abdomen: soft tissue, no air inside the body)
and a slab holding under 1 L of lung are not chests: the pipeline raises
AnatomyMismatch (a SkipAnalysis, so the worker records the job skipped) before it
writes anything. A chest passes and the ct-lung pipeline reuses the
segmentation. Without ``anatomy`` nothing changes: a series without lungs fails
as before.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from pacsnode.analysis.cnn.pipeline import ModelParams, ModelPipeline
from pacsnode.analysis.errors import AnalysisError, AnatomyMismatch, InputError, SkipAnalysis
from pacsnode.analysis.lung import anatomy as anatomy_module
from pacsnode.analysis.lung.anatomy import CHEST_MIN_LUNG_ML, NO_LUNGS, check_anatomy
from pacsnode.analysis.lung.pipeline import CtLungParams, CtLungPipeline
from pacsnode.analysis.modeldev.synthetic import PhantomSpec, make_chest_phantom, write_chest_ct
from pacsnode.analysis.pipelines import PipelineInput, PipelineOutput, SeriesInput
from pacsnode.analysis.settings import RuleMatch
from pacsnode.analysis.volume import load_series
from tests.support.anatomy import soft_tissue_volume, write_no_lung_ct
from tests.support.helpers import REAL_CHEST_CT_SERIES, real_chest_ct
from tests.support.models import make_package


def _inputs(paths: list[Path], *, anatomy: str | None, job_id: int = 1) -> PipelineInput:
    series = SeriesInput(series_instance_uid="1.2.3.4", modality="CT", series_description="", paths=tuple(paths))
    return PipelineInput(job_id=job_id, study_instance_uid="1.2.3", series=(series,), uid_root="2.25", anatomy=anatomy)


def test_a_volume_without_lungs_is_not_a_chest() -> None:
    with pytest.raises(AnatomyMismatch) as caught:
        check_anatomy(soft_tissue_volume(), "chest")
    assert str(caught.value).startswith(NO_LUNGS)
    # Skipped, not failed: the worker tells it apart from the other analysis errors.
    assert isinstance(caught.value, SkipAnalysis) and isinstance(caught.value, AnalysisError)


def test_less_than_a_litre_of_lung_is_not_a_chest_and_more_is() -> None:
    # A 30 mm slab through the phantom's lungs holds about 0.8 L of lung, a 60 mm slab about 1.5 L.
    thin = make_chest_phantom(PhantomSpec(slices=10, size=96)).to_volume()
    with pytest.raises(AnatomyMismatch, match=f"{NO_LUNGS}.* mL of lung found, less than the 1000 mL"):
        check_anatomy(thin, "chest")
    thicker = make_chest_phantom(PhantomSpec(slices=20, size=96)).to_volume()
    lungs = check_anatomy(thicker, "chest")
    assert lungs is not None and lungs.total_volume_ml > CHEST_MIN_LUNG_ML


def test_no_anatomy_asks_for_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_segmentation(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("segment_lungs must not run when the rule asks for no anatomy")

    monkeypatch.setattr("pacsnode.analysis.lung.segmentation.segment_lungs", no_segmentation)
    assert check_anatomy(soft_tissue_volume(), None) is None
    assert anatomy_module.ANATOMIES == ("chest",)
    with pytest.raises(ValueError, match="unknown anatomy 'head'"):
        check_anatomy(soft_tissue_volume(), "head")


def test_a_rule_accepts_chest_and_refuses_other_anatomies() -> None:
    assert RuleMatch(anatomy="chest").anatomy == "chest"
    assert RuleMatch().anatomy is None
    with pytest.raises(ValueError, match="anatomy"):
        RuleMatch(anatomy="head")  # type: ignore[arg-type]


def test_ct_lung_skips_a_head_when_the_rule_asks_for_a_chest_and_fails_it_otherwise(tmp_path: Path) -> None:
    head = write_no_lung_ct(tmp_path / "head")
    with pytest.raises(AnatomyMismatch, match=NO_LUNGS):
        CtLungPipeline().run(_inputs(head, anatomy="chest"), CtLungParams())
    with pytest.raises(InputError) as caught:  # no anatomy asked for: an input the pipeline cannot analyse
        CtLungPipeline().run(_inputs(head, anatomy=None), CtLungParams())
    assert not isinstance(caught.value, SkipAnalysis)


def test_ct_lung_segments_a_chest_once_when_the_rule_asks_for_a_chest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pacsnode.analysis.lung import segmentation

    truth = write_chest_ct(tmp_path / "chest", PhantomSpec(slices=40, size=64), seed=3)
    calls: list[int] = []
    real = segmentation.segment_lungs

    def counted(*args: object, **kwargs: object) -> object:
        calls.append(1)
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(segmentation, "segment_lungs", counted)
    output = CtLungPipeline().run(_inputs(list(truth.paths), anatomy="chest"), CtLungParams())
    assert len(output.datasets) == 5  # SEG, SR, 3 SC
    assert output.summary["total_lung_volume_ml"] > CHEST_MIN_LUNG_ML
    assert len(calls) == 1


def test_the_model_pipeline_skips_the_job_without_lungs_and_runs_the_others(tmp_path: Path) -> None:
    package = make_package(tmp_path / "seg")
    chest = write_chest_ct(tmp_path / "chest", PhantomSpec(slices=40, size=64), seed=1)
    head = write_no_lung_ct(tmp_path / "head", size=64)
    params = ModelParams.model_validate({"model": str(package), "engine": {"device": "cpu", "precision": "fp32"}})
    outputs = ModelPipeline().run_many(
        [_inputs(list(chest.paths), anatomy="chest", job_id=1), _inputs(head, anatomy="chest", job_id=2)], params
    )
    assert isinstance(outputs[0], PipelineOutput) and outputs[0].datasets
    assert isinstance(outputs[1], AnatomyMismatch) and str(outputs[1]).startswith(NO_LUNGS)


@pytest.mark.parametrize("name", REAL_CHEST_CT_SERIES)
def test_the_real_chest_ct_is_a_chest(name: str) -> None:
    """Both reconstructions of a real chest CT show lungs (empty BodyPartExamined, so the header cannot say).

    Data: TCIA Lung-PET-CT-Dx (Li et al. 2020, https://doi.org/10.7937/TCIA.2020.NNC2-0461, CC BY 4.0).
    """
    volume = load_series(sorted((real_chest_ct() / name).glob("*.dcm")))
    assert not str(volume.datasets[0].get("BodyPartExamined", "")).strip()
    lungs = check_anatomy(volume, "chest")
    assert lungs is not None and lungs.total_volume_ml > 2 * CHEST_MIN_LUNG_ML
