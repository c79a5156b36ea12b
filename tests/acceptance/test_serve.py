"""``pacsnode serve`` as a subprocess, driven by DCMTK and by the pacsnode CLI."""

from __future__ import annotations

import json
import os
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage

from pacsnode.node.testing.corpus import UID_PREFIX, make_dataset, write_series
from tests.support.helpers import (
    PYDICOM_FILES,
    REPO,
    pacsnode_cmd,
    pydicom_data_files,
    sha256_file,
)
from tests.support.peers import require
from tests.support.served import Served


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    s = Served(tmp_path)
    s.start()
    yield s
    if s.proc is not None:
        s.stop()


def _dcmtk(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        list(args), capture_output=True, text=True, timeout=300, env={**os.environ, "TCP_NODELAY": "1"}
    )


# (storescu option proposing the file's transfer syntax, files)
DCMTK_PUSHES = [
    ("-xe", [PYDICOM_FILES / "CT_small.dcm", pydicom_data_files() / "MR-SIEMENS-DICOM-WithOverlays.dcm"]),
    ("-xy", [PYDICOM_FILES / "SC_rgb_jpeg_dcmtk.dcm"]),
    ("-xs", [pydicom_data_files() / "JPEG-LL.dcm"]),
    ("-xv", [pydicom_data_files() / "RG3_J2KR.dcm", pydicom_data_files() / "US1_J2KR.dcm"]),
    ("-xw", [pydicom_data_files() / "MR2_J2KI.dcm"]),
    ("-xt", [PYDICOM_FILES / "MR_small_jpeg_ls_lossless.dcm"]),
    ("-xr", [pydicom_data_files() / "OBXXXX1A_rle_2frame.dcm", pydicom_data_files() / "emri_small_RLE.dcm"]),
    ("-xd", [PYDICOM_FILES / "image_dfl.dcm"]),
]


@pytest.mark.dcmtk
def test_dcmtk_echo_and_push_of_every_encoding(served: Served) -> None:
    echoscu = require("echoscu")
    storescu = require("storescu")
    result = _dcmtk(echoscu, "-aec", "PACSNODE", "127.0.0.1", str(served.port))
    assert result.returncode == 0, result.stderr
    expected: dict[str, Path] = {}
    for option, files in DCMTK_PUSHES:
        result = _dcmtk(
            storescu, option, "-aec", "PACSNODE", "-aet", "DCMTK", "127.0.0.1", str(served.port), *map(str, files)
        )
        assert result.returncode == 0, f"{option}: {result.stderr}"
        for f in files:
            expected[str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID)] = f
    rows = served.rows()
    assert set(rows) == set(expected)
    for uid, original in expected.items():
        row = rows[uid]
        stored = served.root / row.file_path
        ds_in = pydicom.dcmread(original, stop_before_pixels=True)
        assert row.transfer_syntax_uid == ds_in.file_meta.TransferSyntaxUID, original.name
        assert sha256_file(stored) == row.sha256
        assert row.calling_ae_title == "DCMTK"
        if ds_in.file_meta.TransferSyntaxUID.is_compressed:
            # compressed pixel data must arrive byte-identical
            assert pydicom.dcmread(stored).PixelData == pydicom.dcmread(original).PixelData, original.name

    listing = json.loads(served.cli("studies", "--json").stdout)
    assert sum(s["num_instances"] for s in listing) == len(expected)
    assert {s["study_instance_uid"] for s in listing} == {
        str(pydicom.dcmread(f, stop_before_pixels=True).StudyInstanceUID) for f in expected.values()
    }
    table = served.cli("studies").stdout
    assert "STUDY UID" in table and f"{len(listing)} stud" in table


@pytest.mark.dcmtk
def test_dcmtk_unknown_sop_class_and_wrong_called_ae(served: Served) -> None:
    echoscu = require("echoscu")
    result = _dcmtk(echoscu, "-aec", "NOT_US", "127.0.0.1", str(served.port))
    assert result.returncode != 0
    assert "Called AE Title Not Recognized" in result.stdout + result.stderr
    # the node keeps serving
    assert _dcmtk(echoscu, "-aec", "PACSNODE", "127.0.0.1", str(served.port)).returncode == 0
    assert "association rejected" in served.log.read_text()


def test_cli_send_echo_and_check_config(served: Served, tmp_path: Path) -> None:
    files = write_series(tmp_path / "series", 12, rows=32, columns=32, per_series=6)
    (tmp_path / "series" / "notes.txt").write_text("not DICOM")
    assert "status 0x0000" in served.cli("echo", "SELF").stdout
    result = served.cli("send", "SELF", str(tmp_path / "series"), check=False)
    assert result.returncode == 1  # the text file failed, and is reported
    assert "sent 12 of 13 file(s)" in result.stdout
    assert "FAILED" in result.stdout and "notes.txt" in result.stdout
    assert set(served.rows()) == {str(pydicom.dcmread(f).SOPInstanceUID) for f in files}
    ok = served.cli("send", "SELF", str(files[0]))
    assert "sent 1 of 1" in ok.stdout
    unknown = served.cli("echo", "NOBODY", check=False)
    assert unknown.returncode == 2 and "unknown node" in unknown.stderr
    assert served.cli("check-config").stdout.startswith(f"{served.config}: OK")


def test_broken_config_exits_2_with_one_message(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("node:\n  port: not-a-port\n")
    for command in ("serve", "check-config", "studies"):
        result = subprocess.run(
            pacsnode_cmd("--config", str(bad), command), cwd=REPO, capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 2
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1
        assert str(bad) in lines[0] and "node.port" in lines[0]
    env = {**os.environ, "PACSNODE_CONFIG": str(bad)}
    result = subprocess.run(pacsnode_cmd("check-config"), cwd=REPO, capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 2


def test_version() -> None:
    result = subprocess.run(pacsnode_cmd("--version"), capture_output=True, text=True, timeout=60)
    assert result.stdout.startswith("pacsnode ")


def test_sigterm_lets_the_inflight_association_finish(tmp_path: Path) -> None:
    served = Served(tmp_path, processes=2)
    served.start()
    datasets = [make_dataset(rows=256, columns=256) for _ in range(40)]
    statuses: list[int] = []
    shutting_down = threading.Event()

    def push() -> None:
        ae = AE(ae_title="SLOW")
        ae.add_requested_context(CTImageStorage, "1.2.840.10008.1.2.1")
        assoc = ae.associate("127.0.0.1", served.port, ae_title="PACSNODE")
        try:
            for ds in datasets:
                statuses.append(int(assoc.send_c_store(ds).Status))
                shutting_down.wait(120)  # after the first store, the rest goes to an acceptor that is stopping
        finally:
            if assoc.is_established:
                assoc.release()

    t = threading.Thread(target=push)
    t.start()
    try:
        served.wait("the first C-STORE to be acknowledged", lambda: statuses, timeout=60)
        served.terminate()  # SIGTERM while the association is open, 39 stores still to come
        served.wait(
            "both acceptors to begin shutting down",
            lambda: served.log.read_text().count("shutting down acceptor") >= 2,
            timeout=60,
        )
    finally:
        shutting_down.set()
    assert served.stop() == 0
    t.join(timeout=30)
    assert statuses == [0] * len(datasets)
    assert len(served.rows()) == len(datasets)
    log = served.log.read_text()
    assert "shutting down" in log and "pacsnode stopped" in log


@pytest.mark.slow
def test_kill_9_during_a_500_instance_push_loses_nothing_acknowledged(tmp_path: Path) -> None:
    served = Served(tmp_path, processes=1)
    served.start()
    study = generate_uid(UID_PREFIX)
    acknowledged: list[str] = []
    sent = threading.Event()

    def push() -> None:
        ae = AE(ae_title="PUSHER")
        ae.add_requested_context(CTImageStorage, "1.2.840.10008.1.2.1")
        assoc = ae.associate("127.0.0.1", served.port, ae_title="PACSNODE")
        template = make_dataset(rows=128, columns=128, study_uid=study)
        for i in range(500):
            template.SOPInstanceUID = generate_uid(UID_PREFIX)
            template.InstanceNumber = i
            rsp = assoc.send_c_store(template)
            if not assoc.is_established or "Status" not in rsp:
                break
            if rsp.Status == 0:
                acknowledged.append(str(template.SOPInstanceUID))
            if len(acknowledged) == 200:
                sent.set()
        sent.set()
        if assoc.is_established:
            assoc.abort()

    t = threading.Thread(target=push)
    t.start()
    assert sent.wait(60)
    served.kill()  # SIGKILL mid-stream
    t.join(timeout=60)
    assert 200 <= len(acknowledged) < 500

    served.start()  # restart: migrations and the tmp/ sweep run
    served.stop()
    rows = served.rows()
    missing = [uid for uid in acknowledged if uid not in rows]
    assert missing == []
    for uid in acknowledged:
        stored = served.root / rows[uid].file_path
        assert sha256_file(stored) == rows[uid].sha256
        assert str(pydicom.dcmread(stored).SOPInstanceUID) == uid
    assert list((served.root / "tmp").iterdir()) == []
    # every row points at a complete file; nothing was indexed that is not on disk
    for row in rows.values():
        assert (served.root / row.file_path).is_file()
