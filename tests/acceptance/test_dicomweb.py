"""``pacsnode serve`` over HTTP with a real DICOMweb client (``dicomweb-client``, from the highdicom authors).

One node per module, its HTTP server on: STOW-RS the Q/R corpus as an uploader, then search,
retrieve, metadata, frames, rendered images and bulk data as a viewer, and C-FIND over DIMSE on
the same node to see that both faces answer from one index. Refusals (401/403) reach the client
as HTTP errors and the node's log.
"""

from __future__ import annotations

import io
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pydicom
import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from dicomweb_client.session_utils import create_session_from_user_pass
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.uid import ExplicitVRLittleEndian, RLELossless

from tests.support.corpus_qr import STUDIES, write_corpus
from tests.support.find import SUCCESS
from tests.support.helpers import wait_for_port
from tests.support.peers import require_private_netns
from tests.support.served import Served
from tests.support.web import PASSWORD, TOKEN, USERS, users_config

pytestmark = pytest.mark.slow


class _Node:
    def __init__(self, served: Served) -> None:
        self.served = served
        self.url = f"http://127.0.0.1:{served.http_port}/dicom-web"

    def client(self, role: str | None) -> DICOMwebClient:
        if role is None:
            return DICOMwebClient(self.url)
        if role == "uploader":
            return DICOMwebClient(self.url, headers={"Authorization": f"Bearer {TOKEN}"})
        return DICOMwebClient(self.url, session=create_session_from_user_pass(USERS[role], PASSWORD))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory, corpus: list[Path]) -> Iterator[_Node]:
    require_private_netns()
    served = Served(tmp_path_factory.mktemp("served"), sections={"http": {"enabled": True, "users": users_config()}})
    # dicomweb-client sends Host without the port: the node is told its own URL.
    served.set_http(public_url=f"http://127.0.0.1:{served.http_port}")
    served.start()
    Served.running.discard(served)  # module-scoped: stopped below, not after each test by the conftest
    try:
        wait_for_port(served.http_port, proc=served.proc)
        running = _Node(served)
        answer = running.client("uploader").store_instances([pydicom.dcmread(p) for p in corpus])
        assert len(answer.ReferencedSOPSequence) == len(corpus)
        assert "FailedSOPSequence" not in answer
        yield running
    finally:
        if served.proc is not None:
            served.stop()


def test_search_levels(node: _Node, corpus: list[Path]) -> None:
    client = node.client("viewer")
    studies = client.search_for_studies()
    assert len(studies) == len(STUDIES)
    first = pydicom.dcmread(corpus[0])
    series = client.search_for_series(first.StudyInstanceUID)
    assert first.SeriesInstanceUID in {s["0020000E"]["Value"][0] for s in series}
    instances = client.search_for_instances(first.StudyInstanceUID, first.SeriesInstanceUID)
    assert first.SOPInstanceUID in {i["00080018"]["Value"][0] for i in instances}
    everything = client.search_for_instances(get_remaining=True, limit=7)  # paged by the client, 7 at a time
    assert len(everything) == len(corpus)
    named = client.search_for_studies(search_filters={"PatientName": "DOE^*"}, fields=["PatientAge"])
    assert named and all(s["00100010"]["Value"][0]["Alphabetic"].lower().startswith("doe^") for s in named)


def test_retrieve_study_same_instances_and_pixels(node: _Node, corpus: list[Path]) -> None:
    client = node.client("viewer")
    first = pydicom.dcmread(corpus[0])
    originals = {
        ds.SOPInstanceUID: ds
        for ds in (pydicom.dcmread(p) for p in corpus)
        if ds.StudyInstanceUID == first.StudyInstanceUID
    }
    retrieved = client.retrieve_study(first.StudyInstanceUID)
    assert {ds.SOPInstanceUID for ds in retrieved} == set(originals)
    for ds in retrieved:
        if "PixelData" in originals[ds.SOPInstanceUID]:
            assert ds.PixelData == originals[ds.SOPInstanceUID].PixelData


def test_metadata_frames_rendered_bulkdata(node: _Node, corpus: list[Path]) -> None:
    client = node.client("viewer")
    ds = pydicom.dcmread(corpus[0])
    uids = (ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
    metadata = client.retrieve_instance_metadata(*uids)
    assert metadata["00080018"]["Value"] == [ds.SOPInstanceUID]
    (frame,) = client.retrieve_instance_frames(*uids, frame_numbers=[1])
    assert frame == ds.PixelData
    bulk_uri = metadata["7FE00010"]["BulkDataURI"]
    (bulk,) = client.retrieve_bulkdata(bulk_uri)
    assert bulk == ds.PixelData
    jpeg = client.retrieve_instance_rendered(*uids, media_types=("image/jpeg",))
    assert Image.open(io.BytesIO(jpeg)).size == (ds.Columns, ds.Rows)


def test_compressed_instance_as_stored_or_decoded(node: _Node) -> None:
    path = get_testdata_file("MR_small_RLE.dcm")
    assert path is not None
    original = pydicom.dcmread(path)
    node.client("uploader").store_instances([original])
    client = node.client("viewer")
    uids = (original.StudyInstanceUID, original.SeriesInstanceUID, original.SOPInstanceUID)
    as_stored = client.retrieve_instance(*uids, media_types=(("application/dicom", "*"),))
    assert as_stored.file_meta.TransferSyntaxUID == RLELossless
    assert as_stored.PixelData == original.PixelData
    decoded = client.retrieve_instance(*uids, media_types=(("application/dicom", ExplicitVRLittleEndian),))
    assert decoded.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert np.array_equal(decoded.pixel_array, original.pixel_array)


def test_dimse_and_dicomweb_see_one_index(node: _Node) -> None:
    from tests.support.find import FindQuery, Peer

    peer = Peer("pacsnode", node.served.port, "PACSNODE")
    query = FindQuery(name="all", model="study", level="STUDY", keys={"StudyInstanceUID": ""}, count=len(STUDIES))
    answer = peer.find(query)
    assert answer.final_status == SUCCESS
    via_web = {s["0020000D"]["Value"][0] for s in node.client("viewer").search_for_studies()}
    via_dimse = {str(ds.StudyInstanceUID) for ds in answer.identifiers}
    assert via_dimse == via_web


def test_refusals(node: _Node, corpus: list[Path]) -> None:
    with pytest.raises(requests.HTTPError) as no_login:
        node.client(None).search_for_studies()
    assert no_login.value.response.status_code == 401
    with pytest.raises(requests.HTTPError) as viewer_store:
        node.client("viewer").store_instances([pydicom.dcmread(corpus[0])])
    assert viewer_store.value.response.status_code == 403
    log = node.served.log.read_text()
    assert "refused with 401" in log and "refused with 403" in log


def test_tls_when_configured(tmp_path: Path) -> None:
    """With http.tls_cert and tls_key the port speaks HTTPS only, and a login is still required."""
    require_private_netns()
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            "-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1",
            "-addext", "subjectAltName=IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    (tmp_path / "node").mkdir()
    served = Served(
        tmp_path / "node",
        sections={"http": {"enabled": True, "users": users_config(), "tls_cert": str(cert), "tls_key": str(key)}},
    )
    served.start()
    try:
        wait_for_port(served.http_port, proc=served.proc)
        url = f"https://127.0.0.1:{served.http_port}/dicom-web/studies"
        with httpx.Client(verify=ssl.create_default_context(cafile=str(cert))) as client:
            assert client.get(url).status_code == 401
            ok = client.get(url, headers={"Authorization": f"Bearer {TOKEN}"})
            assert ok.status_code == 200 and ok.json() == []
        with pytest.raises(httpx.HTTPError):
            httpx.get(url.replace("https://", "http://"), headers={"Authorization": f"Bearer {TOKEN}"})
    finally:
        served.stop()
