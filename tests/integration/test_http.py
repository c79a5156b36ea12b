"""The HTTP app in-process (Starlette's test client): access control and DICOMweb against one archive.

Real clients against ``pacsnode serve`` are in tests/acceptance/test_dicomweb.py; these check the
rules one by one: who may do what, what a refusal looks like and that it is logged, and that
QIDO-RS, WADO-RS and STOW-RS answer from the same index and store as DIMSE.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from PIL import Image
from starlette.testclient import TestClient

from pacsnode.node.dicom import status
from pacsnode.node.http.app import build_app
from pacsnode.node.http.auth import SESSION_COOKIE, User
from pacsnode.node.http.context import HttpContext
from pacsnode.node.http.settings import Role
from pacsnode.storage import Archive
from pacsnode.storage.query import Model, parse_find
from tests.support.corpus_qr import STUDIES, study_uid, write_corpus
from tests.support.web import TOKEN, auth, stow_body, web_settings

_ROOT = "/dicom-web"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def web(tmp_path_factory: pytest.TempPathFactory, corpus: list[Path]) -> Iterator[tuple[TestClient, HttpContext]]:
    settings = web_settings(tmp_path_factory.mktemp("node"))
    archive = Archive.open(settings.storage)
    ctx = HttpContext.open(settings, archive=archive)
    with TestClient(build_app(ctx)) as client:
        body, content_type = stow_body(corpus)
        r = client.post(f"{_ROOT}/studies", content=body, headers={"Content-Type": content_type}, auth=auth("uploader"))
        assert r.status_code == 200, r.text
        yield client, ctx
    archive.close()


def _uids(answers: list[dict[str, object]], tag: str) -> set[str]:
    return {a[tag]["Value"][0] for a in answers}  # type: ignore[index]


# -- access ------------------------------------------------------------------------------------


def test_no_credentials_401_with_challenge_and_logged(
    web: tuple[TestClient, HttpContext], caplog: pytest.LogCaptureFixture
) -> None:
    client, _ = web
    with caplog.at_level(logging.WARNING, logger="pacsnode.node.http.auth"):
        r = client.get(f"{_ROOT}/studies")
    assert r.status_code == 401
    assert r.headers["www-authenticate"].startswith("Basic")
    assert any(
        "refused with 401" in rec.getMessage() and "/dicom-web/studies" in rec.getMessage() for rec in caplog.records
    )


@pytest.mark.parametrize(
    "credentials",
    [("vera", "wrong"), ("nobody", "correct horse battery staple")],
    ids=["wrong-password", "unknown-user"],
)
def test_bad_password_401(web: tuple[TestClient, HttpContext], credentials: tuple[str, str]) -> None:
    client, _ = web
    assert client.get(f"{_ROOT}/studies", auth=credentials).status_code == 401


def test_bearer_token(web: tuple[TestClient, HttpContext]) -> None:
    client, _ = web
    ok = client.get(f"{_ROOT}/studies", headers={"Authorization": f"Bearer {TOKEN}"})
    assert ok.status_code == 200 and len(ok.json()) == len(STUDIES)
    bad = client.get(f"{_ROOT}/studies", headers={"Authorization": f"Bearer {TOKEN[:-1]}x"})
    assert bad.status_code == 401


def test_viewer_cannot_store_403_logged(
    web: tuple[TestClient, HttpContext], corpus: list[Path], caplog: pytest.LogCaptureFixture
) -> None:
    client, _ = web
    body, content_type = stow_body(corpus[:1])
    with caplog.at_level(logging.WARNING, logger="pacsnode.node.http.auth"):
        r = client.post(f"{_ROOT}/studies", content=body, headers={"Content-Type": content_type}, auth=auth("viewer"))
    assert r.status_code == 403
    assert any("refused with 403" in rec.getMessage() and "'vera'" in rec.getMessage() for rec in caplog.records)


def test_roles_ordered() -> None:
    assert Role.ADMIN.allows(Role.UPLOADER) and Role.ADMIN.allows(Role.VIEWER) and Role.UPLOADER.allows(Role.VIEWER)
    assert not Role.VIEWER.allows(Role.UPLOADER) and not Role.UPLOADER.allows(Role.ADMIN)


def test_session_cookie_signed_and_checked(web: tuple[TestClient, HttpContext]) -> None:
    client, ctx = web
    cookie = ctx.auth.issue_session(User(name="vera", role=Role.VIEWER))
    assert ctx.auth.session_user(cookie) == User(name="vera", role=Role.VIEWER)
    payload, signature = cookie.split(".")
    forged = payload + "." + ("0" if signature[0] != "0" else "1") + signature[1:]
    assert ctx.auth.session_user(forged) is None
    fresh = TestClient(client.app)
    fresh.cookies.set(SESSION_COOKIE, cookie)
    assert fresh.get(f"{_ROOT}/studies").status_code == 200
    fresh.cookies.set(SESSION_COOKIE, forged)
    assert fresh.get(f"{_ROOT}/studies").status_code == 401


def test_healthz_needs_no_login(web: tuple[TestClient, HttpContext]) -> None:
    client, _ = web
    assert client.get("/healthz").status_code != 401  # 200 with the ops routes, 404 without them
    assert client.get("/metrics").status_code == 401


# -- QIDO-RS -----------------------------------------------------------------------------------


def test_qido_same_matching_as_c_find(web: tuple[TestClient, HttpContext]) -> None:
    """QIDO-RS and C-FIND find the same studies: the same parse_find and SQL underneath."""
    client, ctx = web
    r = client.get(f"{_ROOT}/studies", params={"PatientName": "doe*", "StudyDate": "20240101-"}, auth=auth("viewer"))
    assert r.status_code == 200
    identifier = pydicom.Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.PatientName = "doe*"
    identifier.StudyDate = "20240101-"
    identifier.StudyInstanceUID = ""
    rows = ctx.archive.find(parse_find(identifier, Model.STUDY_ROOT), limit=None)
    assert rows, "the corpus has studies of patients named Doe"
    assert _uids(r.json(), "0020000D") == {row["StudyInstanceUID"] for row in rows}


def test_qido_limit_offset_and_warning(web: tuple[TestClient, HttpContext]) -> None:
    client, _ = web
    every = client.get(f"{_ROOT}/studies", auth=auth("viewer")).json()
    page = client.get(f"{_ROOT}/studies", params={"limit": "3", "offset": "2"}, auth=auth("viewer"))
    assert [a["0020000D"] for a in page.json()] == [a["0020000D"] for a in every[2:5]]
    assert "additional results" in page.headers["warning"]
    last = client.get(f"{_ROOT}/studies", params={"offset": str(len(every) - 1)}, auth=auth("viewer"))
    assert len(last.json()) == 1 and "warning" not in last.headers


def test_qido_includefield_and_uid_list(web: tuple[TestClient, HttpContext]) -> None:
    client, _ = web
    wanted = f"{study_uid(0)},{study_uid(3)}"
    r = client.get(
        f"{_ROOT}/studies",
        params={"StudyInstanceUID": wanted, "includefield": "PatientAge"},
        auth=auth("viewer"),
    )
    answers = r.json()
    assert _uids(answers, "0020000D") == {study_uid(0), study_uid(3)}
    assert all("00101010" in a for a in answers)  # PatientAge, answered from the stored header
    assert all(a["00081190"]["Value"][0].endswith("/dicom-web/studies/" + a["0020000D"]["Value"][0]) for a in answers)


@pytest.mark.parametrize(
    "params",
    [{"StudyDate": "2024-01-01"}, {"NoSuchKeyword": "x"}, {"limit": "-1"}, {"StudyInstanceUID": "1.2.abc"}],
    ids=["bad-date", "unknown-key", "bad-limit", "bad-uid"],
)
def test_qido_bad_request_400(web: tuple[TestClient, HttpContext], params: dict[str, str]) -> None:
    client, _ = web
    assert client.get(f"{_ROOT}/studies", params=params, auth=auth("viewer")).status_code == 400


def test_qido_all_series_and_instances_forms(web: tuple[TestClient, HttpContext], corpus: list[Path]) -> None:
    client, _ = web
    instances = client.get(f"{_ROOT}/instances", params={"limit": "10000"}, auth=auth("viewer")).json()
    assert len(instances) == len(corpus)
    ct_series = client.get(f"{_ROOT}/series", params={"Modality": "CT"}, auth=auth("viewer")).json()
    assert ct_series and all(s["00080060"]["Value"] == ["CT"] for s in ct_series)
    assert all("0020000D" in s for s in ct_series)  # the study's keys come with the all-series form


# -- WADO-RS -----------------------------------------------------------------------------------


def _parts(response_bytes: bytes, content_type: str) -> list[bytes]:
    boundary = content_type.split("boundary=")[1].split(";")[0].strip('"')
    chunks = response_bytes.split(b"--" + boundary.encode())
    return [c.split(b"\r\n\r\n", 1)[1][:-2] for c in chunks[1:-1]]


def test_wado_instance_as_stored_byte_identical(web: tuple[TestClient, HttpContext], corpus: list[Path]) -> None:
    client, ctx = web
    path = corpus[0]
    ds = pydicom.dcmread(path)
    url = f"{_ROOT}/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}"
    r = client.get(url, auth=auth("viewer"), headers={"Accept": 'multipart/related; type="application/dicom"'})
    assert r.status_code == 200
    (part,) = _parts(r.content, r.headers["content-type"])
    stored = pydicom.dcmread(io.BytesIO(part))
    assert stored.SOPInstanceUID == ds.SOPInstanceUID
    assert stored.PixelData == ds.PixelData


def test_wado_406_for_unproducible_syntax(web: tuple[TestClient, HttpContext]) -> None:
    client, _ = web
    accept = 'multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2.4.80'
    r = client.get(f"{_ROOT}/studies/{study_uid(0)}", auth=auth("viewer"), headers={"Accept": accept})
    assert r.status_code == 406


def test_wado_unknown_study_404(web: tuple[TestClient, HttpContext]) -> None:
    client, _ = web
    assert client.get(f"{_ROOT}/studies/1.2.3.4.5", auth=auth("viewer")).status_code == 404


def test_rendered_windowed(web: tuple[TestClient, HttpContext], corpus: list[Path]) -> None:
    client, _ = web
    ds = pydicom.dcmread(corpus[0])
    url = f"{_ROOT}/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}"
    png = client.get(url + "/rendered", auth=auth("viewer"), headers={"Accept": "image/png"})
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    image = Image.open(io.BytesIO(png.content))
    assert image.size == (ds.Columns, ds.Rows)
    narrow = client.get(
        url + "/rendered", params={"window": "0,1"}, auth=auth("viewer"), headers={"Accept": "image/png"}
    )
    assert narrow.status_code == 200 and narrow.content != png.content
    assert client.get(url + "/rendered", params={"window": "x"}, auth=auth("viewer")).status_code == 400


# -- STOW-RS -----------------------------------------------------------------------------------


def test_stow_patient_mismatch_fails_like_c_store(
    web: tuple[TestClient, HttpContext], corpus: list[Path], tmp_path: Path
) -> None:
    """An instance of a stored study under another PatientID: 0xA900 (storage.patient_mismatch: reject)."""
    client, _ = web
    ds = pydicom.dcmread(corpus[0])
    ds.PatientID = "SOMEONE-ELSE"
    ds.SOPInstanceUID = ds.SOPInstanceUID + ".9"
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    path = tmp_path / "mismatch.dcm"
    ds.save_as(path, enforce_file_format=True)
    body, content_type = stow_body([path, corpus[1]])
    r = client.post(f"{_ROOT}/studies", content=body, headers={"Content-Type": content_type}, auth=auth("uploader"))
    assert r.status_code == 202  # some stored (the identical duplicate), some failed
    answer = r.json()
    (failed,) = answer["00081198"]["Value"]
    assert failed["00081155"]["Value"] == [ds.SOPInstanceUID]
    assert failed["00081197"]["Value"] == [status.DATASET_DOES_NOT_MATCH_SOP_CLASS]
    assert len(answer["00081199"]["Value"]) == 1


def test_stow_wrong_target_study_and_garbage(
    web: tuple[TestClient, HttpContext], corpus: list[Path], tmp_path: Path
) -> None:
    client, _ = web
    body, content_type = stow_body([corpus[0]])
    r = client.post(
        f"{_ROOT}/studies/1.2.3.999", content=body, headers={"Content-Type": content_type}, auth=auth("uploader")
    )
    assert r.status_code == 409
    garbage = tmp_path / "garbage.dcm"
    garbage.write_bytes(b"not dicom at all" * 10)
    body, content_type = stow_body([garbage])
    r = client.post(f"{_ROOT}/studies", content=body, headers={"Content-Type": content_type}, auth=auth("uploader"))
    assert r.status_code == 409
    assert r.json()["00081198"]["Value"][0]["00081197"]["Value"] == [status.CANNOT_UNDERSTAND]
    r = client.post(
        f"{_ROOT}/studies", content=b"{}", headers={"Content-Type": "application/json"}, auth=auth("uploader")
    )
    assert r.status_code == 415


def test_stow_instances_trigger_rules_like_pushed_ones(corpus: list[Path], tmp_path: Path) -> None:
    """STOW-RS stores through the C-STORE path, so the scheduler queues the rules' jobs for it,
    with the uploading user as the calling AE a rule can match on."""
    from datetime import timedelta

    from pacsnode.node.scheduler import Scheduler
    from pacsnode.storage.index import utcnow
    from pacsnode.storage.queue import JobQueue

    rule = {
        "name": "from-uploads",
        "pipeline": "ct-lung",
        "match": {"modality": ["CT"], "calling_ae": ["ulla"], "min_instances": 1, "anatomy": None},
    }
    settings = web_settings(tmp_path, analysis={"workers": 0, "quiet_seconds": 5, "rules": [rule]})
    archive = Archive.open(settings.storage)
    try:
        ctx = HttpContext.open(settings, archive=archive)
        ct_files = [p for p in corpus if pydicom.dcmread(p, stop_before_pixels=True).Modality == "CT"][:3]
        series = {str(pydicom.dcmread(p, stop_before_pixels=True).SeriesInstanceUID) for p in ct_files}
        with TestClient(build_app(ctx)) as client:
            body, content_type = stow_body(ct_files)
            r = client.post(
                f"{_ROOT}/studies", content=body, headers={"Content-Type": content_type}, auth=auth("uploader")
            )
            assert r.status_code == 200
        Scheduler(settings, archive).scan_once(utcnow() + timedelta(seconds=3600))
        jobs = JobQueue(archive.engine).list()
        assert {job.series_instance_uid for job in jobs} == series
        assert all(job.rule == "from-uploads" for job in jobs)
    finally:
        archive.close()
