"""The HTTP face an admin uses, end to end: DCMTK storescu pushes a chest CT to ``pacsnode serve``, findscu
queries it, the lung pipeline runs and its results cannot be exported (the destination is down), so they
go dead. Then:

- ``/metrics`` shows the counters with the right labels (calling AE titles, statuses, the query level, the
  pipeline and destination), the queue depths and the processes alive; ``/healthz`` answers without a
  login, ``/readyz`` and ``/metrics`` only with one;
- every dashboard page, loaded in a real headless Chromium after logging in through the form, shows what
  the index holds without a console error: the study, its series thumbnails, its job, its key images,
  its SR measurements, its SEG overlay, the dead exports, the node's health;
- with the destination up, a dead export retried from the page (one row, then the rest of the
  destination) reaches the destination, and a job retried from the page runs again;
- a viewer (on a phone-sized window) sees no retry buttons and is refused a retry; a retry without the
  page's CSRF token changes nothing.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import create_engine, text

from pacsnode.analysis.modeldev.synthetic import PhantomSpec, write_chest_ct
from pacsnode.node.http.passwords import hash_password, hash_token, make_token
from tests.support.analysis import jobs_in, storescu
from tests.support.browser import Browser
from tests.support.helpers import wait_for_port
from tests.support.peers import StorescpPeer, require, require_private_netns
from tests.support.served import Served

ADMIN, VIEWER, PASSWORD = "ada", "vic", "correct horse"


def _serve(tmp_path: Path, dest: StorescpPeer, token: str) -> Served:
    password_hash = hash_password(PASSWORD, ln=10)  # cheap to verify: the tests log in many times
    sections: dict[str, Any] = {
        "http": {
            "enabled": True,
            "users": [
                {"name": ADMIN, "role": "admin", "password_hash": password_hash, "token_hashes": [hash_token(token)]},
                {"name": VIEWER, "role": "viewer", "password_hash": password_hash},
            ],
        },
        "remote_nodes": {"DEST": {"ae_title": dest.ae_title, "host": "127.0.0.1", "port": dest.port}},
        "analysis": {
            "workers": 1,
            "quiet_seconds": 1.0,
            "scan_interval_seconds": 0.3,
            "lease_seconds": 10,
            "rules": [{"name": "lung", "pipeline": "ct-lung", "match": {"modality": ["CT"]}, "destinations": ["DEST"]}],
        },
        "storage": {"fsync": False},  # a throwaway store: the pages are under test, not durability
        "export": {"max_attempts": 1, "backoff_seconds": 0.2, "backoff_max_seconds": 1, "poll_seconds": 0.2},
    }
    served = Served(tmp_path, sections=sections)
    served.start()
    wait_for_port(served.http_port, proc=served.proc)
    return served


def _exports(served: Served) -> dict[str, int]:
    engine = create_engine(f"sqlite:///{served.db}")
    try:
        with engine.connect() as conn:
            return {state: n for state, n in conn.execute(text("SELECT state, count(*) FROM exports GROUP BY state"))}
    finally:
        engine.dispose()


def _job(served: Served) -> dict[str, Any]:
    engine = create_engine(f"sqlite:///{served.db}")
    try:
        with engine.connect() as conn:
            row = conn.execute(text("SELECT id, state, attempts, finished_at FROM jobs")).one()
            return dict(row._mapping)
    finally:
        engine.dispose()


def _metrics(base: str, token: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    response = httpx.get(f"{base}/metrics", headers={"Authorization": f"Bearer {token}"}, timeout=30)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def _value(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    key = (name, frozenset(labels.items()))
    assert key in samples, f"{name}{labels} not in /metrics: {sorted(k for k in samples if k[0] == name)}"
    return samples[key]


def _findscu(port: int) -> None:
    result = subprocess.run(
        [require("findscu"), "-S", "-aec", "PACSNODE", "-k", "QueryRetrieveLevel=STUDY", "-k", "PatientID=PHANTOM*",
         "-k", "StudyInstanceUID", "127.0.0.1", str(port)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


def _loaded(browser: Browser, what: str) -> None:
    """The page shows no console error and every image on it loaded."""
    assert browser.errors() == [], (what, browser.errors())
    broken = [src for src, width in browser.images_loaded() if width <= 0]
    assert not broken, (what, broken)


def _login(browser: Browser, base: str, user: str, *, next_path: str = "/") -> None:
    browser.get(f"{base}{next_path}")  # no session yet: the node sends the browser to its login form
    assert "/login" in browser.url, browser.url
    browser.find("input[name=username]").send_keys(user)
    browser.find("input[name=password]").send_keys(PASSWORD)
    browser.click("#login")


@pytest.mark.dcmtk
@pytest.mark.slow
def test_dashboard_and_metrics_show_what_the_node_did(tmp_path: Path) -> None:
    require_private_netns()
    truth = write_chest_ct(tmp_path / "ct", PhantomSpec(slices=41, size=128), seed=11)
    dest = StorescpPeer(tmp_path / "dest", ae_title="DEST")  # its port is known; it starts later
    token = make_token()
    served = _serve(tmp_path, dest, token)
    base = f"http://127.0.0.1:{served.http_port}"

    storescu(served.port, truth.paths)
    _findscu(served.port)
    (job,) = jobs_in(served, {"done", "failed"})
    assert job["state"] == "done", job["last_error"]
    served.wait("5 dead exports", lambda: _exports(served) == {"dead": 5}, 60)

    # -- metrics and health --------------------------------------------------------------------
    assert httpx.get(f"{base}/healthz", timeout=10).status_code == 200
    assert httpx.get(f"{base}/metrics", timeout=10).status_code == 401
    assert httpx.get(f"{base}/readyz", timeout=10).status_code == 401
    ready = httpx.get(f"{base}/readyz", headers={"Authorization": f"Bearer {token}"}, timeout=30)
    assert ready.status_code == 200, ready.text
    checks = ready.json()["checks"]
    assert {name for name, check in checks.items() if check["ok"]} == {
        "database",
        "store",
        "disk",
        "acceptors",
        "workers",
    }

    m = _metrics(base, token)
    stored = _value(m, "pacsnode_instances_received_total", calling_ae="STORESCU", status="0x0000")
    assert stored == len(truth.paths)
    assert _value(m, "pacsnode_received_bytes_total", calling_ae="STORESCU", status="0x0000") > stored * 128 * 128 * 2
    assert _value(m, "pacsnode_associations_total", calling_ae="STORESCU", outcome="released") == 1
    assert _value(m, "pacsnode_associations_total", calling_ae="FINDSCU", outcome="released") == 1
    assert _value(m, "pacsnode_query_duration_seconds_count", service="C-FIND", level="STUDY") == 1
    assert _value(m, "pacsnode_last_association_timestamp_seconds", calling_ae="FINDSCU") > 0
    assert _value(m, "pacsnode_jobs_finished_total", pipeline="ct-lung", outcome="done") == 1
    assert _value(m, "pacsnode_job_duration_seconds_count", pipeline="ct-lung", outcome="done") == 1
    assert _value(m, "pacsnode_exports_finished_total", destination="DEST", outcome="dead") == 5
    assert _value(m, "pacsnode_jobs", state="done") == 1
    assert _value(m, "pacsnode_exports", destination="DEST", state="dead") == 5
    assert _value(m, "pacsnode_studies") == 1
    assert _value(m, "pacsnode_store_free_bytes") > 0
    assert _value(m, "pacsnode_processes_alive", role="worker") == 1
    assert _value(m, "pacsnode_processes_alive", role="acceptor") >= 1
    assert _value(m, "pacsnode_index_up") == 1

    # -- the pages, as an admin sees them -------------------------------------------------------
    with Browser() as browser:
        _login(browser, base, ADMIN)
        assert browser.url.rstrip("/") == base
        _loaded(browser, "studies")
        rows = browser.find_all("#studies tbody tr")
        assert len(rows) == 1 and "Phantom, Chest" in rows[0].text and "1 done" in rows[0].text, rows[0].text
        browser.navigate(lambda: browser.find("input[name=q]").send_keys("no such patient\n"))
        assert "No study matches" in browser.text("main")
        browser.find("input[name=q]").clear()
        browser.navigate(lambda: browser.find("input[name=q]").send_keys("phantom\n"))
        assert len(browser.find_all("#studies tbody tr")) == 1
        browser.screenshot("dashboard-studies.png")
        browser.click("#studies a")

        _loaded(browser, "study")
        assert truth.study_instance_uid in browser.text()
        thumbnails = browser.images_loaded("#series img")
        assert len(thumbnails) == 2, thumbnails  # the CT and the key images; the SEG and SR have none
        job_row = browser.text(f"#job-{job['id']}")
        assert "done" in job_row and "1 / " in job_row, job_row
        assert len(browser.images_loaded("figure.key img")) == 3
        assert len(browser.images_loaded("figure.seg img")) == 1
        measured = {
            (cells[0], cells[1]): float(cells[2])
            for cells in (
                [c.text for c in row.find_elements("css selector", "td")]
                for row in browser.find_all(".measurements tbody tr")
            )
        }
        total = measured[("Both lungs", "Volume")]
        assert abs(total - job["result"]["total_lung_volume_ml"]) < 1.0, (measured, job["result"])
        assert len(browser.find_all(".exports tbody tr")) == 5
        browser.screenshot("dashboard-study.png", max_height=1560)

        browser.get(f"{base}/jobs")
        _loaded(browser, "jobs")
        assert "ct-lung" in browser.text(f"#job-{job['id']}")

        browser.get(f"{base}/health")
        _loaded(browser, "health")
        peers = browser.text("#peers")
        assert "STORESCU" in peers and "FINDSCU" in peers, peers
        assert "1 of 1 worker" in browser.text("#processes")
        assert "above the floor" in browser.text("#disk")
        browser.screenshot("dashboard-health.png")

        browser.get(f"{base}/exports")
        _loaded(browser, "exports")
        dead_rows = browser.find_all("#export-counts tbody tr")
        assert len(dead_rows) == 1 and "DEST" in dead_rows[0].text
        assert len(browser.find_all(".exports tbody tr button")) >= 5
        browser.screenshot("dashboard-exports.png", max_height=1000)

        # -- a retry without the page's token changes nothing; a viewer is refused -------------
        forged = httpx.post(f"{base}/exports/retry-dead", auth=(ADMIN, PASSWORD), data={}, timeout=30)
        assert forged.status_code == 303 and "flash=csrf" in forged.headers["location"]
        viewer = httpx.post(f"{base}/jobs/{job['id']}/retry", auth=(VIEWER, PASSWORD), data={"csrf": "x"}, timeout=30)
        assert viewer.status_code == 403
        assert _exports(served) == {"dead": 5} and _job(served)["state"] == "done"

        # -- dead exports retried from the page once the destination is up ----------------------
        dest.start()
        try:
            browser.navigate(browser.find_all(".exports tbody tr button")[0].click)  # one dead letter
            assert "1 dead export(s) queued again." in browser.text(".flash")
            _loaded(browser, "exports after one retry")
            served.wait("one export sent", lambda: _exports(served).get("done") == 1, 60)
            browser.get(f"{base}/exports")
            browser.click("#export-counts button")  # the rest of the destination
            assert "4 dead export(s) queued again." in browser.text(".flash")
            served.wait("every export sent", lambda: _exports(served) == {"done": 5}, 60)
            served.wait("5 instances at DEST", lambda: len(dest.received()) == 5, 30)
            browser.get(f"{base}/exports")
            _loaded(browser, "exports after the retries")
            assert "No dead export." in browser.text("#no-dead")

            # -- a job retried from its study page runs again ----------------------------------
            before = _job(served)
            browser.get(f"{base}/studies/{truth.study_instance_uid}")
            browser.click(f"#job-{job['id']} button")
            assert f"Job {job['id']} queued again." in browser.text(".flash")
            served.wait(
                "the job done again",
                lambda: (j := _job(served))["state"] == "done" and j["finished_at"] != before["finished_at"],
                120,
            )
        finally:
            dest.stop()
        m = _metrics(base, token)
        assert _value(m, "pacsnode_exports_finished_total", destination="DEST", outcome="sent") >= 5
        assert _value(m, "pacsnode_jobs_finished_total", pipeline="ct-lung", outcome="done") == 2

        # -- a viewer, on a phone: reads everything, retries nothing ----------------------------
        browser.click("header form button")  # log out
        assert "/login" in browser.url
        browser.resize(390, 844)
        _login(browser, base, VIEWER, next_path=f"/studies/{truth.study_instance_uid}")
        _loaded(browser, "study on a phone, as a viewer")
        assert len(browser.images_loaded("figure.key img")) == 3
        assert [b.text for b in browser.find_all("button")] == ["Log out"]
        browser.screenshot("dashboard-phone.png", max_height=1500, scale=1)
    assert served.stop() == 0
