"""Routing that works on real archives: descriptions and protocol from the index, ``anatomy: chest`` in the worker.

Series are stored as received (the C-STORE staging, header read and index
write) in a real SQLite index; the scheduler queues with the rules, a worker
runs the jobs. A CT without lungs queued by ``anatomy: chest`` rules ends
``skipped`` with the reason for both the ct-lung and the ct-lung-nodule
pipelines: no result object, no export, not failed. The real chest CT, whose
BodyPartExamined is empty, is analysed by the default config's chest rule.
"""

from __future__ import annotations

import io
import json
from datetime import timedelta
from pathlib import Path
from typing import Any

import pydicom
import pytest
from sqlalchemy import func, select, update

from pacsnode.analysis.lung.anatomy import CHEST_MIN_LUNG_ML, NO_LUNGS
from pacsnode.analysis.modeldev.synthetic import DicomSpec, PhantomSpec, write_chest_ct
from pacsnode.analysis.routing import select_series
from pacsnode.node.cli import main
from pacsnode.node.config import Settings, load
from pacsnode.node.scheduler import ImageSizes, Scheduler
from pacsnode.node.worker import Worker
from pacsnode.storage import Archive, read_header
from pacsnode.storage.activity import series_of_study
from pacsnode.storage.db import migrate, read_connection
from pacsnode.storage.models import Instance, Series
from pacsnode.storage.queue import ExportQueue, JobQueue, JobState, utcnow
from tests.support.anatomy import write_no_lung_ct
from tests.support.helpers import REAL_CHEST_CT_SERIES, REPO, free_port, make_settings, real_chest_ct

DEFAULT_CONFIG = REPO / "config" / "pacsnode.yaml"


def _store(archive: Archive, paths: list[Path]) -> None:
    """Store files as the C-STORE handler does: the bytes staged, the header read back, the index written."""
    for path in paths:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        buffer = io.BytesIO()
        pydicom.dcmread(path).save_as(buffer, enforce_file_format=True)
        staged = archive.stage([buffer.getvalue()])
        meta = read_header(
            staged.path,
            expected_sop_class_uid=str(ds.SOPClassUID),
            expected_sop_instance_uid=str(ds.SOPInstanceUID),
            transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID),
        )
        archive.add(staged, meta, calling_ae_title="CT1")


def _chest_rule(name: str, pipeline: str, **params: Any) -> dict[str, Any]:
    return {
        "name": name,
        "pipeline": pipeline,
        "match": {"modality": ["CT"], "body_part": None, "anatomy": "chest", "min_instances": 20},
        "params": params,
        "destinations": ["PACS"],
    }


def _settings(tmp_path: Path, rules: list[dict[str, Any]]) -> Settings:
    return make_settings(
        tmp_path,
        analysis={"quiet_seconds": 5, "workers": 0, "rules": rules},
        remote_nodes={"PACS": {"ae_title": "PACS", "host": "127.0.0.1", "port": free_port()}},
    )


def _run_jobs(settings: Settings, archive: Archive) -> None:
    """Queue what the rules match (as if the quiet time had passed) and run every job to its outcome."""
    Scheduler(settings, archive).scan_once(utcnow() + timedelta(seconds=3600))
    queue = JobQueue(archive.engine)
    worker = Worker(settings, archive)
    while (job := queue.claim("w", lease_s=60)) is not None:
        worker.run_job(job, "w")


def _result_instances(archive: Archive, study_uid: str) -> int:
    from pacsnode.storage.models import Study

    with read_connection(archive.engine) as conn:
        return int(
            conn.execute(
                select(func.count())
                .select_from(Instance)
                .join(Series, Instance.series_fk == Series.id)
                .join(Study, Series.study_fk == Study.id)
                .where(Series.is_result.is_(True), Study.study_instance_uid == study_uid)
            ).scalar_one()
        )


def test_a_ct_without_lungs_is_skipped_by_both_chest_pipelines_and_a_chest_is_analysed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    head = write_no_lung_ct(
        tmp_path / "head", slices=30, size=64, dicom=DicomSpec(study_instance_uid="1.2.826.0.1.77.1")
    )
    chest = write_chest_ct(
        tmp_path / "chest",
        PhantomSpec(slices=40, size=64),
        seed=2,
        dicom=DicomSpec(study_instance_uid="1.2.826.0.1.77.2"),
    )
    rules = [
        _chest_rule("chest-lung", "ct-lung"),
        _chest_rule("chest-nodules", "ct-lung-nodule", engine={"device": "cpu", "precision": "fp32"}),
    ]
    settings = _settings(tmp_path, rules)
    archive = Archive(settings.storage)
    migrate(archive.engine)
    try:
        _store(archive, head)
        _store(archive, list(chest.paths))
        _run_jobs(settings, archive)
        jobs = JobQueue(archive.engine).list()
        exports = ExportQueue(archive.engine).list()
        head_results = _result_instances(archive, "1.2.826.0.1.77.1")
        chest_results = _result_instances(archive, "1.2.826.0.1.77.2")
    finally:
        archive.close()

    by_study = {(j.study_instance_uid, j.rule): j for j in jobs}
    assert len(jobs) == 4, [(j.rule, j.study_instance_uid, j.state) for j in jobs]
    for rule in ("chest-lung", "chest-nodules"):
        skipped = by_study[("1.2.826.0.1.77.1", rule)]
        assert skipped.state is JobState.SKIPPED, (rule, skipped.state, skipped.last_error)
        assert (skipped.last_error or "").startswith(NO_LUNGS), skipped.last_error
        assert skipped.result == {"skipped": skipped.last_error}
        assert skipped.attempts == 1 and skipped.finished_at is not None
        done = by_study[("1.2.826.0.1.77.2", rule)]
        assert done.state is JobState.DONE, (rule, done.state, done.last_error)
        assert done.result is not None and done.result["results"]
    assert head_results == 0  # nothing written for the head
    assert chest_results == sum(
        len(by_study[("1.2.826.0.1.77.2", r)].result["results"]) for r in ("chest-lung", "chest-nodules")
    )  # type: ignore[index]
    # Exports only of the chest's results: nothing is sent for a skipped job.
    done_jobs = {by_study[("1.2.826.0.1.77.2", r)].id for r in ("chest-lung", "chest-nodules")}
    assert exports and {e.job_id for e in exports} == done_jobs

    # `pacsnode jobs` shows the state and the reason; skipped is a state of its own, not a failure.
    config = tmp_path / "pacsnode.yaml"
    config.write_text(json.dumps(json.loads(settings.model_dump_json(exclude={"source"}))))
    assert main(["jobs", "--config", str(config)]) == 0
    table = capsys.readouterr().out
    head_lines = [line for line in table.splitlines() if "1.2.826.0.1.77.1" in line]
    assert len(head_lines) == 2 and all(" skipped " in line and NO_LUNGS in line for line in head_lines), table
    assert main(["jobs", "--config", str(config), "--state", "failed", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == []
    assert main(["jobs", "--config", str(config), "--state", "skipped", "--json"]) == 0
    assert {j["rule"] for j in json.loads(capsys.readouterr().out)} == {"chest-lung", "chest-nodules"}


def test_a_skipped_series_is_not_analysed_again_when_the_rule_says_reanalyze_false(tmp_path: Path) -> None:
    head = write_no_lung_ct(tmp_path / "head", slices=24, size=48)
    rule = {**_chest_rule("chest-lung", "ct-lung"), "reanalyze": False}
    settings = _settings(tmp_path, [rule])
    archive = Archive(settings.storage)
    migrate(archive.engine)
    try:
        _store(archive, head[:-1])
        _run_jobs(settings, archive)
        _store(archive, head[-1:])  # a late instance moves the series' clock
        _run_jobs(settings, archive)
        jobs = JobQueue(archive.engine).list()
    finally:
        archive.close()
    assert [j.state for j in jobs] == [JobState.SKIPPED]


def test_study_description_and_protocol_name_come_from_the_index(tmp_path: Path) -> None:
    truth = write_chest_ct(tmp_path / "ct", PhantomSpec(slices=4, size=16), seed=1)
    for path in truth.paths:
        ds = pydicom.dcmread(path)
        ds.StudyDescription = "CT Thorax"
        ds.ProtocolName = "Lung Screening LD"
        ds.save_as(path, enforce_file_format=True)

    def rule(**match: Any) -> Any:
        settings = _settings(tmp_path, [{"name": "r", "pipeline": "ct-lung", "match": match}])
        return settings.analysis.rules[0]

    settings = _settings(tmp_path, [])
    archive = Archive(settings.storage)
    migrate(archive.engine)
    try:
        _store(archive, list(truth.paths))
        sizes = ImageSizes(archive)
        with read_connection(archive.engine) as conn:
            [facts] = series_of_study(conn, truth.study_instance_uid)
        assert (facts.study_description, facts.protocol_name) == ("CT Thorax", "Lung Screening LD")
        assert select_series(rule(study_description="thorax", protocol_name="lung"), [facts], sizes) == [facts]
        assert select_series(rule(protocol_name="^lung screening"), [facts], sizes) == [facts]
        assert select_series(rule(protocol_name="abdomen"), [facts], sizes) == []
        assert select_series(rule(study_description="^thorax"), [facts], sizes) == []

        # A series indexed before the index kept headers has no protocol name: a protocol rule skips it.
        with archive.engine.begin() as conn:
            conn.execute(update(Series).values(dicom_json=None))
        with read_connection(archive.engine) as conn:
            [old] = series_of_study(conn, truth.study_instance_uid)
        assert old.protocol_name is None and old.study_description == "CT Thorax"
        assert select_series(rule(protocol_name="lung"), [old], sizes) == []
        assert select_series(rule(study_description="thorax"), [old], sizes) == [old]
    finally:
        archive.close()


def test_the_default_config_analyses_both_real_series(tmp_path: Path) -> None:
    """The real chest CT (empty BodyPartExamined, SeriesDescription "5mm") is matched and analysed as a chest.

    Data: TCIA Lung-PET-CT-Dx (Li et al. 2020, https://doi.org/10.7937/TCIA.2020.NNC2-0461, CC BY 4.0).
    """
    data = real_chest_ct()
    default = load(DEFAULT_CONFIG)
    base = make_settings(tmp_path)
    settings = default.model_copy(update={"node": base.node, "storage": base.storage})
    rules = {rule.name: rule for rule in settings.analysis.rules}
    assert rules["chest-ct-lung"].match.anatomy == "chest" and rules["chest-ct-nodules"].match.anatomy == "chest"
    archive = Archive(settings.storage)
    migrate(archive.engine)
    try:
        for name in REAL_CHEST_CT_SERIES:
            _store(archive, sorted((data / name).glob("*.dcm")))
        study = pydicom.dcmread(next((data / REAL_CHEST_CT_SERIES[0]).glob("*.dcm")), stop_before_pixels=True)
        with read_connection(archive.engine) as conn:
            facts = series_of_study(conn, str(study.StudyInstanceUID))
        assert len(facts) == 2 and all(not f.body_part_examined for f in facts)
        assert {(f.study_description, f.series_description, f.protocol_name) for f in facts} == {
            ("Chest", "5mm", "2 Chest C-/Thorax")
        }
        # Both chest rules are enabled and select both series. Only ct-lung's jobs run here: the
        # nodule rule's run through `serve` is tests/acceptance/test_real_chest_ct.py's.
        sizes = ImageSizes(archive)
        for rule in rules.values():
            assert rule.enabled and select_series(rule, facts, sizes) == facts, rule.name
        lung_only = settings.analysis.model_copy(update={"rules": [rules["chest-ct-lung"]]})
        _run_jobs(settings.model_copy(update={"analysis": lung_only}), archive)
        jobs = JobQueue(archive.engine).list()
    finally:
        archive.close()
    assert sorted(j.rule for j in jobs) == ["chest-ct-lung", "chest-ct-lung"]
    assert {j.series_instance_uid for j in jobs} == {f.series_instance_uid for f in facts}
    for job in jobs:
        assert job.state is JobState.DONE, job.last_error
        assert job.result is not None
        # An adult's lungs: litres, both sides (the worker's anatomy check passed on the decoded volume).
        assert job.result["total_lung_volume_ml"] > 2 * CHEST_MIN_LUNG_ML
        assert job.result["right_lung_volume_ml"] > 1000 and job.result["left_lung_volume_ml"] > 1000
        assert len(job.result["results"]) == 5  # SEG, SR and 3 SC
