"""DICOM TLS: the listener (TLS only, or a TLS port beside the plain one), client certificates tied to
AE titles, refusals, the connection guard on a TLS port, and TLS for what pacsnode sends.

Real peers: DCMTK echoscu/storescu/findscu/movescu with +tls, storescp +tls as a destination, and
pynetdicom SCUs with Python's ssl. A throwaway CA (and a second, untrusted one) is made per module
with the openssl CLI; no key is ever committed.
"""

from __future__ import annotations

import logging
import socket
import ssl
import struct
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelMove, Verification
from sqlalchemy import select

from pacsnode.node import cli
from pacsnode.node.config import Settings
from pacsnode.node.dicom import status
from pacsnode.node.dicom.export import echo, send_files
from pacsnode.node.dicom.retrieve import find
from pacsnode.node.testing.corpus import make_dataset
from pacsnode.storage.models import Instance
from tests.support import pdus
from tests.support.certs import Authority, Issued, make_authority
from tests.support.helpers import free_port, make_settings, wait_for_port
from tests.support.node import RunningNode
from tests.support.peers import OrthancPeer, StorescpPeer, require, require_private_netns
from tests.support.served import Served


@dataclass
class Pki:
    ca: Authority
    rogue: Authority
    node: Issued
    scanner: Issued
    viewer: Issued
    outsider: Issued  # issued by the rogue CA, same name as the scanner
    storescp: Issued
    orthanc: Issued


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    require("openssl")
    folder = tmp_path_factory.mktemp("pki")
    ca, rogue = make_authority(folder, "hospital"), make_authority(folder, "rogue")
    return Pki(
        ca=ca,
        rogue=rogue,
        node=ca.issue("pacsnode.test", server=True),
        scanner=ca.issue("scanner.test"),
        viewer=ca.issue("viewer.test"),
        outsider=rogue.issue("scanner.test"),
        storescp=ca.issue("storescp.test", server=True),
        orthanc=ca.issue("orthanc.test", server=True),
    )


def _listener(pki: Pki, **more: Any) -> dict[str, Any]:
    return {
        "certificate": str(pki.node.certificate),
        "private_key": str(pki.node.private_key),
        "ca_certificates": str(pki.ca.certificate),
        **more,
    }


PEERS = [
    {"ae_title": "SCANNER", "certificate_subject": "CN=scanner.test, O=Test Hospital"},
    {
        "ae_title": "VIEWER",
        "certificate_subject": "CN=viewer.test",
        "services": ["echo", "find", "move"],
        "move_destinations": ["TLSDEST"],
    },
]


World = tuple[RunningNode, StorescpPeer]


@pytest.fixture(scope="module")
def world(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    """A TLS-only node (client certificates required) and a TLS storescp as its C-MOVE destination."""
    require_private_netns()
    tmp = tmp_path_factory.mktemp("tls")
    tls_options = ["+tls", str(pki.storescp.private_key), str(pki.storescp.certificate), "+cf", str(pki.ca.certificate)]
    with StorescpPeer(tmp / "dest", ae_title="TLSDEST", options=tls_options) as dest:
        settings = make_settings(
            tmp,
            node={"tls": _listener(pki), "max_pending_per_host": 3, "timeouts": {"artim": 2.0, "shutdown_grace": 5}},
            policy={"allowed_peers": PEERS},
            remote_nodes={"dest": _remote("TLSDEST", dest.port, pki)},
        )
        node = RunningNode(settings)
        try:
            yield node, dest
        finally:
            node.stop()


def _remote(ae_title: str, port: int, pki: Pki, *, name: str = "localhost") -> dict[str, Any]:
    return {
        "ae_title": ae_title,
        "host": "127.0.0.1",
        "port": port,
        "tls": {
            "ca_certificates": str(pki.ca.certificate),
            "certificate": str(pki.scanner.certificate),  # the node's client certificate towards the peer
            "private_key": str(pki.scanner.private_key),
            "server_name": name,
        },
    }


def _client_context(pki: Pki, issued: Issued | None, *, trust: Path | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(trust or pki.ca.certificate))
    context.check_hostname = False
    if issued is not None:
        context.load_cert_chain(issued.certificate, issued.private_key)
    return context


def _echo(port: int, calling: str, context: ssl.SSLContext | None) -> int | str:
    ae = AE(ae_title=calling)
    ae.add_requested_context(Verification)
    tls_args = (context, "localhost") if context is not None else None
    assoc = ae.associate("127.0.0.1", port, ae_title="PACSNODE", tls_args=tls_args)
    if assoc.is_rejected:
        return "rejected"
    if not assoc.is_established:
        return "failed"
    try:
        return int(assoc.send_c_echo().Status)
    finally:
        assoc.release()


def _dcmtk(tool: str, issued: Issued, pki: Pki, *args: str) -> subprocess.CompletedProcess[str]:
    command = [
        require(tool),
        "-v",
        "+tls",
        str(issued.private_key),
        str(issued.certificate),
        "+cf",
        str(pki.ca.certificate),
        *args,
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=60)


def _alerts(caplog: pytest.LogCaptureFixture, action: str) -> list[logging.LogRecord]:
    return [
        r
        for r in caplog.records
        if getattr(r, "event", None) == "security-alert" and getattr(r, "action", None) == action
    ]


def test_pynetdicom_stores_over_tls_with_a_client_certificate(world: World, pki: Pki) -> None:
    node, _ = world
    ds = make_dataset(rows=8, columns=8, seed=11)
    ae = AE(ae_title="SCANNER")
    ae.add_requested_context(ds.SOPClassUID, ExplicitVRLittleEndian)
    assoc = ae.associate(
        "127.0.0.1", node.port, ae_title="PACSNODE", tls_args=(_client_context(pki, pki.scanner), "localhost")
    )
    assert assoc.is_established
    try:
        assert int(assoc.send_c_store(ds).Status) == status.SUCCESS
    finally:
        assoc.release()
    node.wait_idle()
    with node.archive.engine.connect() as conn:
        uids = conn.execute(select(Instance.sop_instance_uid)).scalars().all()
    assert ds.SOPInstanceUID in uids


def test_dcmtk_echo_store_find_and_move_over_tls(world: World, pki: Pki, tmp_path: Path) -> None:
    node, dest = world
    port = str(node.port)
    echoed = _dcmtk("echoscu", pki.scanner, pki, "-aet", "SCANNER", "-aec", "PACSNODE", "127.0.0.1", port)
    assert echoed.returncode == 0, echoed.stderr
    ds = make_dataset(rows=8, columns=8, seed=12)
    path = tmp_path / "ct.dcm"
    ds.save_as(path, enforce_file_format=True)
    stored = _dcmtk("storescu", pki.scanner, pki, "-aet", "SCANNER", "-aec", "PACSNODE", "127.0.0.1", port, str(path))
    assert stored.returncode == 0, stored.stderr
    study = ["-S", "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={ds.StudyInstanceUID}"]
    found = _dcmtk("findscu", pki.viewer, pki, "-aet", "VIEWER", "-aec", "PACSNODE", *study, "127.0.0.1", port)
    assert found.returncode == 0 and ds.StudyInstanceUID in found.stdout + found.stderr, found.stderr
    # Debian's movescu has no TLS options: the C-MOVE comes from pynetdicom
    ae = AE(ae_title="VIEWER")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
    assoc = ae.associate(
        "127.0.0.1", node.port, ae_title="PACSNODE", tls_args=(_client_context(pki, pki.viewer), "localhost")
    )
    assert assoc.is_established
    try:
        identifier = Dataset()
        identifier.QueryRetrieveLevel = "STUDY"
        identifier.StudyInstanceUID = ds.StudyInstanceUID
        moved = [
            int(s.Status)
            for s, _ in assoc.send_c_move(identifier, "TLSDEST", StudyRootQueryRetrieveInformationModelMove)
        ]
    finally:
        assoc.release()
    assert moved[-1] == status.SUCCESS, moved
    # the C-MOVE sub-operation went to storescp over TLS (storescp speaks nothing else)
    assert [dcmread(p).SOPInstanceUID for p in dest.received()] == [ds.SOPInstanceUID]


def test_certificate_subject_ties_the_ae_title(world: World, pki: Pki, caplog: pytest.LogCaptureFixture) -> None:
    node, _ = world
    caplog.set_level(logging.WARNING)
    assert _echo(node.port, "SCANNER", _client_context(pki, pki.scanner)) == status.SUCCESS
    # a trusted certificate, but another subject than the one tied to SCANNER
    assert _echo(node.port, "SCANNER", _client_context(pki, pki.viewer)) == "rejected"
    claimed = _dcmtk("echoscu", pki.viewer, pki, "-aet", "SCANNER", "-aec", "PACSNODE", "127.0.0.1", str(node.port))
    assert claimed.returncode != 0
    rejected = _alerts(caplog, "association-rejected")
    assert len(rejected) == 2
    assert all("CN=viewer.test" in r.certificate_subject for r in rejected)  # type: ignore[attr-defined]


def test_plain_untrusted_and_anonymous_clients_are_refused(
    world: World, pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    node, _ = world
    caplog.set_level(logging.WARNING)
    plain = subprocess.run(
        [require("echoscu"), "-aet", "SCANNER", "-aec", "PACSNODE", "127.0.0.1", str(node.port)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert plain.returncode != 0
    assert _answer_over_tls(node.port, _client_context(pki, pki.scanner))[:1] == b"\x02"  # A-ASSOCIATE-AC
    for issued in (pki.outsider, None):  # a certificate from the rogue CA; no certificate
        assert _answer_over_tls(node.port, _client_context(pki, issued)) == b""
    node.wait_idle()
    reasons = [r.reason for r in _alerts(caplog, "tls-refused")]  # type: ignore[attr-defined]
    assert len(reasons) == 3, reasons
    assert any("CERTIFICATE" in reason.upper() for reason in reasons[1:]), reasons


def _answer_over_tls(port: int, context: ssl.SSLContext) -> bytes:
    """The first bytes the node answers an A-ASSOCIATE-RQ with over TLS with ``context`` (b"": closed).

    Under TLS 1.3 the client's handshake ends before the server has checked the client's
    certificate, so the refusal shows on the first read.
    """
    raw = socket.create_connection(("127.0.0.1", port))
    try:
        with context.wrap_socket(raw, server_hostname="localhost") as tls:
            tls.sendall(pdus.associate_rq(calling="SCANNER"))
            tls.settimeout(30)
            return tls.recv(6)
    except (ssl.SSLError, ConnectionResetError):
        return b""
    finally:
        raw.close()


def _wait_closed(sock: socket.socket) -> bytes:
    """Everything the node sends until it closes the connection (the test's own timeout is generous)."""
    sock.settimeout(30)
    received = b""
    try:
        while chunk := sock.recv(4096):
            received += chunk
    except (ConnectionResetError, ssl.SSLError):
        pass
    return received


def test_the_guard_protects_the_tls_port(world: World, pki: Pki, caplog: pytest.LogCaptureFixture) -> None:
    node, _ = world
    caplog.set_level(logging.WARNING)
    # 1. connect and never start the handshake; 2. start it and stall: both closed at ARTIM
    silent = socket.create_connection(("127.0.0.1", node.port))
    stalled = socket.create_connection(("127.0.0.1", node.port))
    stalled.sendall(b"\x16\x03\x01\x02\x00\x01")  # the first bytes of a ClientHello, then nothing
    # 3. the pending cap counts connections still in the handshake: max_pending_per_host is 3
    third = socket.create_connection(("127.0.0.1", node.port))
    fourth = socket.create_connection(("127.0.0.1", node.port))
    assert _wait_closed(fourth) == b""
    for sock in (silent, stalled, third):
        assert _wait_closed(sock) == b""
        sock.close()
    fourth.close()
    messages = [r.getMessage() for r in caplog.records]
    assert sum("no TLS handshake within the ARTIM timeout" in m for m in messages) == 3, messages
    assert any("still negotiating (the limit)" in m for m in messages)
    # 4. after the handshake, the decrypted stream is checked: an oversized PDU gets A-ABORT over TLS
    raw = socket.create_connection(("127.0.0.1", node.port))
    with _client_context(pki, pki.scanner).wrap_socket(raw, server_hostname="localhost") as tls:
        tls.sendall(pdus.pdu(0x04, b"", length=1 << 30))
        answer = _wait_closed(tls)
    assert answer[:1] == b"\x07" and len(answer) == 10, answer  # A-ABORT
    assert struct.unpack(">BBIBBBB", answer)[5] == 2  # source: service provider
    # 5. a port probe (connect, close) is no TLS failure: no alert
    socket.create_connection(("127.0.0.1", node.port)).close()
    node.wait_idle()
    assert not _alerts(caplog, "tls-refused")


def test_a_tls_port_beside_the_plain_one(pki: Pki, tmp_path: Path) -> None:
    require_private_netns()
    settings = make_settings(tmp_path, node={"tls": _listener(pki, port=free_port(), require_client_certificate=False)})
    node = RunningNode(settings)
    try:
        tls_port = node.node.address_tls()[1]
        assert _echo(node.port, "ANY", None) == status.SUCCESS  # plain on node.port
        assert _echo(tls_port, "ANY", _client_context(pki, None)) == status.SUCCESS  # anonymous client: allowed here
        assert _echo(tls_port, "ANY", _client_context(pki, pki.scanner)) == status.SUCCESS
        assert _echo(tls_port, "ANY", None) != status.SUCCESS  # plain to the TLS port
    finally:
        node.stop()


def test_exports_echo_and_find_go_over_tls(world: World, pki: Pki, tmp_path: Path) -> None:
    node, _ = world
    with StorescpPeer(
        tmp_path / "export",
        ae_title="AI",
        options=["+tls", str(pki.storescp.private_key), str(pki.storescp.certificate), "+cf", str(pki.ca.certificate)],
    ) as ai:
        settings = make_settings(
            tmp_path,
            remote_nodes={
                "ai": _remote("AI", ai.port, pki),
                "node": _remote("PACSNODE", node.port, pki),
                "wrong-name": _remote("AI", ai.port, pki, name="elsewhere.test"),
            },
        )
        ok, message = echo(settings, settings.remote_nodes["ai"])
        assert ok, message
        ds = make_dataset(rows=8, columns=8, seed=13)
        path = tmp_path / "result.dcm"
        ds.save_as(path, enforce_file_format=True)
        outcomes = send_files(settings, settings.remote_nodes["ai"], [path])
        assert [o.status for o in outcomes] == [status.SUCCESS]
        assert [dcmread(p).SOPInstanceUID for p in ai.received()] == [ds.SOPInstanceUID]
        # the server's certificate must carry the expected name
        ok, message = echo(settings, settings.remote_nodes["wrong-name"])
        assert not ok
        # C-FIND as an SCU, to the TLS-only node, as SCANNER (its certificate is the one configured)
        result = find(_as_scanner(settings), settings.remote_nodes["node"], "STUDY", {"StudyInstanceUID": ""})
        assert result.status == status.SUCCESS and result.matches


def _as_scanner(settings: Settings) -> Settings:
    return settings.model_copy(update={"node": settings.node.model_copy(update={"ae_title": "SCANNER"})})


def test_orthanc_pushes_queries_and_retrieves_over_tls(pki: Pki, tmp_path: Path) -> None:
    """Orthanc 1.9+ DICOM TLS: it stores into pacsnode, queries it, and receives a C-MOVE from it, all TLS."""
    require_private_netns()
    orthanc_tls = {
        "DicomTlsEnabled": True,
        "DicomTlsCertificate": str(pki.orthanc.certificate),
        "DicomTlsPrivateKey": str(pki.orthanc.private_key),
        "DicomTlsTrustedCertificates": str(pki.ca.certificate),
        "DicomTlsRemoteCertificateRequired": True,
    }
    node_port = free_port()
    node_modality = {"AET": "PACSNODE", "Host": "127.0.0.1", "Port": node_port, "UseDicomTls": True}
    orthanc = OrthancPeer(tmp_path / "orthanc", config={**orthanc_tls, "DicomModalities": {"NODE": node_modality}})
    settings = make_settings(
        tmp_path,
        node={"port": node_port, "tls": _listener(pki)},
        policy={"allowed_peers": [{"ae_title": "ORTHANC", "certificate_subject": "CN=orthanc.test"}]},
        remote_nodes={"orthanc": _remote("ORTHANC", orthanc.dicom_port, pki)},
    )
    node = RunningNode(settings)
    try:
        with orthanc:
            ds = make_dataset(rows=8, columns=8, seed=21)
            path = tmp_path / "ct.dcm"
            ds.save_as(path, enforce_file_format=True)
            (orthanc_id,) = orthanc.upload([path])
            orthanc.rest("POST", "/modalities/NODE/store", {"Resources": [orthanc_id], "Synchronous": True})
            orthanc.rest("DELETE", f"/instances/{orthanc_id}")
            node.wait_idle()
            with node.archive.engine.connect() as conn:
                assert conn.execute(select(Instance.sop_instance_uid)).scalars().all() == [ds.SOPInstanceUID]
            query_id, answers = orthanc.query("NODE", "Study", {"StudyInstanceUID": ""})
            assert [a["StudyInstanceUID"] for a in answers] == [ds.StudyInstanceUID]
            orthanc.retrieve_answers(query_id, "ORTHANC")  # pacsnode's C-MOVE sub-operation to Orthanc, over TLS
            assert orthanc.sop_instance_uids() == {ds.SOPInstanceUID}
    finally:
        node.stop()


def test_serve_opens_the_tls_port_in_every_acceptor_and_warns_when_exposed(
    pki: Pki, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``pacsnode serve`` with two acceptor processes: the plain and the TLS port both answer.

    Also ``check-config``: warnings (exit 0) for a node listening on every interface with an open
    allow list and a plain port (quiet on loopback: tests/unit/test_security_config.py).
    """
    require_private_netns()
    tls_port = free_port()
    listener = _listener(pki, port=tls_port, require_client_certificate=False)
    served = Served(tmp_path, processes=2, sections={"analysis": {"workers": 0, "rules": []}}, tls=listener)
    served.start()
    try:
        wait_for_port(tls_port, proc=served.proc)
        for _ in range(4):  # several associations, so both acceptor processes take some
            assert _echo(served.port, "ANY", None) == status.SUCCESS
            assert _echo(tls_port, "ANY", _client_context(pki, pki.scanner)) == status.SUCCESS
    finally:
        assert served.stop() == 0, served.log_tail()
    exposed = yaml.safe_load(served.config.read_text())
    exposed["node"]["host"] = "0.0.0.0"
    served.config.write_text(yaml.safe_dump(exposed))
    capsys.readouterr()
    assert cli.main(["--config", str(served.config), "check-config"]) == 0  # in-process: no second start-up
    warned = capsys.readouterr().err
    assert "allowed_peers is empty" in warned and "plain port" in warned, warned
