"""The dashboard and ops routes in-process (Starlette's test client) over an archive holding a small
corpus, without ``serve``: the login form, what each page shows, refusals, and the ops endpoints when
the node's multi-process metrics are not installed. The browser and ``serve`` are in
tests/acceptance/test_dashboard.py.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest
from starlette.testclient import TestClient

from pacsnode.node.http.app import build_app
from pacsnode.node.http.context import HttpContext
from pacsnode.storage import Archive
from tests.support.corpus_qr import write_corpus
from tests.support.web import PASSWORD, USERS, auth, stow_body, web_settings


@pytest.fixture(scope="module")
def web(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TestClient, HttpContext]]:
    corpus = write_corpus(tmp_path_factory.mktemp("corpus"))
    settings = web_settings(tmp_path_factory.mktemp("node"))
    archive = Archive.open(settings.storage)
    ctx = HttpContext.open(settings, archive=archive)
    with TestClient(build_app(ctx)) as client:
        body, content_type = stow_body(corpus)
        r = client.post(
            "/dicom-web/studies", content=body, headers={"Content-Type": content_type}, auth=auth("uploader")
        )
        assert r.status_code == 200, r.text
        yield client, ctx
    archive.close()


def _csrf(html: str) -> str:
    found = re.search(r'name="csrf" value="([0-9a-f]+)"', html)
    assert found, "no CSRF token on the page"
    return found.group(1)


def test_login_form_sets_a_session_and_a_wrong_password_does_not(web: tuple[TestClient, HttpContext]) -> None:
    client, _ctx = web
    with TestClient(client.app) as browser:
        first = browser.get("/jobs", headers={"Accept": "text/html"}, follow_redirects=False)
        assert first.status_code == 303 and first.headers["location"] == "/login?next=/jobs"
        wrong = browser.post("/login", data={"username": USERS["admin"], "password": "nope", "next": "/jobs"})
        assert wrong.status_code == 401 and "Wrong user name or password." in wrong.text
        assert "pacsnode_session" not in browser.cookies
        ok = browser.post(
            "/login",
            data={"username": USERS["admin"], "password": PASSWORD, "next": "https://evil.example/"},
            follow_redirects=False,
        )
        assert ok.status_code == 303 and ok.headers["location"] == "/"  # never sent to another site
        cookie = ok.headers["set-cookie"].lower()
        assert "httponly" in cookie and "samesite=strict" in cookie
        assert browser.get("/jobs").status_code == 200


def test_pages_show_the_index(web: tuple[TestClient, HttpContext]) -> None:
    client, _ctx = web
    studies = client.get("/", auth=auth("viewer"))
    assert studies.status_code == 200
    uids = re.findall(r'href="/studies/([0-9.]+)"', studies.text)
    assert len(uids) >= 2
    page = client.get(f"/studies/{uids[0]}", auth=auth("viewer"))
    assert page.status_code == 200 and uids[0] in page.text
    for thumbnail in re.findall(r'src="(/dicom-web/[^"]+/thumbnail[^"]*)"', page.text):
        assert client.get(thumbnail.replace("&amp;", "&"), auth=auth("viewer")).status_code == 200
    assert client.get("/studies/1.2.3.4.5.6", auth=auth("viewer")).status_code == 404
    for path in ("/jobs", "/jobs?state=failed", "/exports", "/health"):
        assert client.get(path, auth=auth("viewer")).status_code == 200, path
    assert "Nothing was ever queued for export." in client.get("/exports", auth=auth("viewer")).text
    assert client.get("/ui/segmentations/1.2.3/overlay.png", auth=auth("viewer")).status_code == 404


def test_retries_need_an_admin_and_the_pages_token(web: tuple[TestClient, HttpContext]) -> None:
    client, ctx = web
    job_id, _ = ctx.jobs.enqueue(rule="r", pipeline="ct-lung", study_instance_uid="1.2.3", max_attempts=1, timeout_s=5)
    assert client.post(f"/jobs/{job_id}/retry", auth=auth("viewer"), data={}).status_code == 403
    forged = client.post(f"/jobs/{job_id}/retry", auth=auth("admin"), data={"csrf": "0" * 40}, follow_redirects=False)
    assert forged.status_code == 303 and "flash=csrf" in forged.headers["location"]
    token = _csrf(client.get("/jobs", auth=auth("admin")).text)
    foreign = client.post(
        f"/jobs/{job_id}/retry",
        auth=auth("admin"),
        data={"csrf": token},
        headers={"Origin": "https://evil.example"},
        follow_redirects=False,
    )
    assert "flash=csrf" in foreign.headers["location"]
    done = client.post(f"/jobs/{job_id}/retry", auth=auth("admin"), data={"csrf": token, "next": "/jobs"})
    assert done.status_code == 200 and f"Job {job_id} queued again." in done.text


def test_ops_without_serve(web: tuple[TestClient, HttpContext]) -> None:
    client, _ctx = web
    assert client.get("/healthz").text == "ok\n"
    assert client.get("/metrics").status_code == 401
    text = client.get("/metrics", auth=auth("viewer")).text
    assert re.search(r"^pacsnode_studies [1-9]", text, re.M), text
    assert "pacsnode_index_up 1.0" in text
    ready = client.get("/readyz", auth=auth("viewer"))
    assert ready.status_code == 200
    assert ready.json()["checks"]["acceptors"]["detail"] == "not monitored (metrics not installed)"
