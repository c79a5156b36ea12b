"""``pacsnode serve`` under hostile or careless peers: it stays up, keeps its slots for real peers, and refuses
what it cannot take whole.

Each test starts the node as a subprocess on a free loopback port, attacks it with raw bytes
(tests/support/pdus.py) from a socket a DICOM library would never drive that way, and checks
both the refusal (an A-ABORT from the service provider, or a closed connection where the
configuration says so) and that real peers -- DCMTK echoscu and storescu, and pynetdicom --
are still served at once. The configuration keys under test:

* ``node.max_associations`` counts established associations only;
* ``node.max_pending_per_host``: connections from one host still negotiating; more are closed at once;
* ``node.timeouts.artim``: from TCP connect to a complete A-ASSOCIATE-RQ, then the connection is closed;
* ``node.max_pdu``: a longer PDU is answered with A-ABORT;
* ``node.max_instance_bytes``: a longer dataset stream is aborted while it arrives, never buffered whole.

Attacks come from other loopback addresses (127.0.0.0/8 all reach a node on 127.0.0.1) where the
per-host cap would otherwise, rightly, refuse the legitimate peers on 127.0.0.1 too.
"""

from __future__ import annotations

import errno
import glob
import hashlib
import itertools
import json
import os
import random
import re
import select
import struct
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from pacsnode.node.testing.corpus import UID_PREFIX, make_dataset, write_series
from tests.support.dimse import encode
from tests.support.pdus import (
    A_ASSOCIATE_RQ,
    CT_IMAGE_STORAGE,
    EXPLICIT_VR_LE,
    IMPLICIT_VR_LE,
    MR_IMAGE_STORAGE,
    P_DATA_TF,
    PROTOCOL_ERROR_REASONS,
    VERIFICATION,
    Outcome,
    RawPeer,
    abort,
    ae_title,
    associate_rq,
    c_echo_rq,
    c_store_rq,
    dimse_statuses,
    item,
    length_fields,
    p_data,
    pdu,
    pdv,
    presentation_context,
    release_rq,
    user_information,
)
from tests.support.peers import require
from tests.support.served import Served

pytestmark = pytest.mark.dcmtk

#: Seconds from connect to a complete A-ASSOCIATE-RQ in the tests that exercise it (node.timeouts.artim).
ARTIM = 2.0
#: Slack on top of ARTIM for a loaded machine to close a connection: a deadline, not a speed requirement.
ARTIM_MARGIN = 8.0
#: How long a refusal (an A-ABORT, a close) may take to arrive before the test says it never came.
REFUSAL_DEADLINE = 10.0
#: How much the node's resident memory may grow while it refuses one oversized PDU or dataset stream:
#: far above what reading a few fragments costs, far below the 1 to 8 MiB sent or the 2 GiB announced.
OVERSIZE_RSS_BOUND = 64 << 20
#: How much the node's resident memory may grow over the whole fuzz run (hundreds of connections,
#: each a thread and a few buffers while it lasts): a leak per connection or a buffer sized by
#: an announced length would exceed it.
FUZZ_RSS_BOUND = 200 << 20
#: The fuzz's random generator seed; a failure message names it, so a run can be repeated exactly.
FUZZ_SEED = 0x5EED_1CE
FUZZ_STREAMS = 600
FUZZ_THREADS = 4
#: How long one fuzz connection waits for the node to close after the peer half-closed.
FUZZ_READ_TIMEOUT = 1.0

SCANNER = "127.0.0.5"  # port scans, probes
FUZZER = "127.0.0.3"
OTHER_HOST = "127.0.0.2"
ENV = {**os.environ, "TCP_NODELAY": "1"}


# -- the node and its legitimate peers ------------------------------------------------------------


def _start(tmp_path: Path, *, json_logs: bool = False, processes: int = 1, **node: Any) -> Served:
    # A short grace: each test ends its own associations, and stopping should not wait on anything else.
    timeouts = {"shutdown_grace": 1, **node.pop("timeouts", {})}
    sections: dict[str, object] = {"logging": {"format": "json" if json_logs else "text"}}
    served = Served(tmp_path, processes=processes, sections=sections, timeouts=timeouts, **node)
    served.start()
    return served


def _tail(served: Served) -> str:
    return f"--- node log (end) ---\n{served.log_tail(3000)}"


def _run(tool: str, *args: str) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run([require(tool), *args], capture_output=True, text=True, timeout=90, env=ENV)
    except subprocess.TimeoutExpired as exc:
        return subprocess.CompletedProcess(exc.cmd, 124, str(exc.stdout or ""), f"timed out after 90 s: {exc}")


def _echoscu(served: Served) -> subprocess.CompletedProcess[str]:
    return _run("echoscu", "-to", "20", "-ta", "20", "-td", "20", "-aec", "PACSNODE", "127.0.0.1", str(served.port))


def _storescu(served: Served, files: list[Path]) -> subprocess.CompletedProcess[str]:
    return _run(
        "storescu",
        *("-to", "20", "-ta", "20", "-td", "20", "-aec", "PACSNODE", "-aet", "LEGIT"),
        *("127.0.0.1", str(served.port)),
        *map(str, files),
    )


def _pynetdicom_echo(port: int, *, source: str | None = None) -> str:
    """A C-ECHO with pynetdicom: '0x0000' on success, else what happened."""
    ae = AE(ae_title="LEGITPY")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 20
    ae.add_requested_context(Verification)
    bind = (source, 0) if source is not None else None
    assoc = ae.associate("127.0.0.1", port, ae_title="PACSNODE", bind_address=bind)
    if assoc.is_rejected:
        return "association rejected"
    if assoc.is_aborted:
        return "association aborted"
    if not assoc.is_established:
        return "no association (connection refused, closed or timed out)"
    try:
        rsp = assoc.send_c_echo()
        return f"0x{int(rsp.Status):04X}" if "Status" in rsp else "no C-ECHO response"
    finally:
        assoc.release()


_files_made = itertools.count()


def _fresh_files(tmp_path: Path, count: int) -> tuple[list[Path], set[str]]:
    """``count`` small CT files with new UIDs, and their SOP Instance UIDs."""
    paths = write_series(tmp_path / f"legit-{next(_files_made)}", count, rows=16, columns=16)
    uids = set()
    for path in paths:
        uids.add(str(dcmread(path, stop_before_pixels=True).SOPInstanceUID))
    return paths, uids


def _assert_serves(served: Served, tmp_path: Path, when: str, *, files: int = 2) -> None:
    """DCMTK echoscu, a pynetdicom C-ECHO and a storescu push of fresh files all succeed; the files are indexed."""
    assert served.proc is not None and served.proc.poll() is None, f"{when}: the node has exited\n{_tail(served)}"
    echo = _echoscu(served)
    assert echo.returncode == 0, f"{when}: echoscu failed ({echo.returncode}): {echo.stderr[-800:]}\n{_tail(served)}"
    status = _pynetdicom_echo(served.port)
    assert status == "0x0000", f"{when}: pynetdicom C-ECHO: {status}\n{_tail(served)}"
    paths, uids = _fresh_files(tmp_path, files)
    push = _storescu(served, paths)
    assert push.returncode == 0, f"{when}: storescu failed ({push.returncode}): {push.stderr[-800:]}\n{_tail(served)}"
    missing = uids - set(served.rows())
    assert not missing, f"{when}: storescu succeeded but {len(missing)} instance(s) are not indexed\n{_tail(served)}"


# -- what the node wrote, and what it holds --------------------------------------------------------


def _log_lines(served: Served, since: int = 0) -> list[str]:
    if not served.log.exists():
        return []
    with served.log.open("rb") as f:
        f.seek(since)
        return f.read().decode("utf-8", "replace").splitlines()


def _log_size(served: Served) -> int:
    return served.log.stat().st_size if served.log.exists() else 0


def _not_json(served: Served) -> list[str]:
    bad = []
    for line in _log_lines(served):
        if not line.strip():
            continue
        try:
            if not isinstance(json.loads(line), dict):
                bad.append(line)
        except ValueError:
            bad.append(line)
    return bad


def _assert_all_json(served: Served, when: str) -> None:
    bad = _not_json(served)
    assert not bad, f"{when}: {len(bad)} line(s) of the node's output are not JSON, e.g.:\n" + "\n".join(
        line[:300] for line in bad[:15]
    )


def _own_lines_since(served: Served, mark: int) -> list[dict[str, Any]]:
    """The JSON log records of pacsnode's own loggers written after byte ``mark`` of the log."""
    out = []
    for line in _log_lines(served, mark):
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and str(record.get("logger", "")).startswith("pacsnode"):
            out.append(record)
    return out


def _wait_own_line(served: Served, mark: int, what: str) -> None:
    served.wait(f"a log line of the node's own about {what}", lambda: _own_lines_since(served, mark), REFUSAL_DEADLINE)


def _tree_pids(pid: int) -> list[int]:
    """``pid`` and all its descendants (from /proc/<pid>/task/*/children)."""
    pids, i = [pid], 0
    while i < len(pids):
        for path in glob.glob(f"/proc/{pids[i]}/task/*/children"):
            try:
                pids.extend(int(p) for p in Path(path).read_text().split())
            except OSError:
                pass
        i += 1
    return pids


def _rss(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _tree_rss(served: Served) -> int:
    """Resident memory of the serve process and every process under it, in bytes."""
    assert served.proc is not None
    return sum(_rss(pid) for pid in _tree_pids(served.proc.pid))


class _PeakRss:
    """Samples the node's resident memory in a background thread; ``peak`` is the highest seen."""

    def __init__(self, served: Served, interval: float = 0.05) -> None:
        self.served = served
        self.interval = interval
        self.baseline = _tree_rss(served)
        self.peak = self.baseline
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="rss-sampler", daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _tree_rss(self.served))
            self._stop.wait(self.interval)

    def __enter__(self) -> _PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self.peak = max(self.peak, _tree_rss(self.served))

    @property
    def growth(self) -> int:
        return self.peak - self.baseline

    def __str__(self) -> str:
        return f"RSS {self.baseline / 2**20:.1f} MiB before, peak {self.peak / 2**20:.1f} MiB"


def _outcomes(peers: list[RawPeer], timeout: float, **kwargs: Any) -> list[Outcome]:
    """Each peer's :meth:`RawPeer.outcome`, all within one shared deadline."""
    deadline = time.monotonic() + timeout
    return [p.outcome(max(0.0, deadline - time.monotonic()), **kwargs) for p in peers]


def _send_quietly(peer: RawPeer, data: bytes) -> str:
    """Send, and say how far it got: the node may close the connection while we are still sending."""
    try:
        peer.send(data)
    except TimeoutError:
        return "send blocked: the node stopped reading"
    except OSError as exc:
        return f"send ended by the node: {exc.strerror or exc}"
    return "sent"


def _small_ct(**fields: str) -> Dataset:
    ds = make_dataset(rows=16, columns=16)
    for keyword, value in fields.items():
        setattr(ds, keyword, value)
    return ds


# -- 1. slots ---------------------------------------------------------------------------------------


PROBES = [
    b"\x01",  # the first byte of an A-ASSOCIATE-RQ
    b"\x01\x00\x00\x00",
    b"GET / HTTP/1.0\r\n\r\n",
    b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03",  # a TLS ClientHello
    b"\x00\x00\x00",
    associate_rq()[:20],
    b"\r\n\r\n",
]


def test_connections_that_never_associate_take_no_association_slot(tmp_path: Path) -> None:
    served = _start(tmp_path, max_associations=2)
    for _ in range(20):  # a port scan: connect, close
        RawPeer(served.port, source=SCANNER).close()
    for i in range(20):  # probes: a few bytes, close
        with RawPeer(served.port, source=SCANNER) as peer:
            _send_quietly(peer, PROBES[i % len(PROBES)])
    # At once, without waiting for the node to notice the closes: the two slots are for established associations.
    ae = AE(ae_title="HOLDER")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 20
    ae.add_requested_context(Verification)
    held = ae.associate("127.0.0.1", served.port, ae_title="PACSNODE")
    try:
        assert held.is_established, (
            f"right after 40 scans and probes, an association was not accepted "
            f"(rejected={held.is_rejected}, aborted={held.is_aborted}); with max_associations=2 the "
            f"connections that never associated must not hold a slot\n{_tail(served)}"
        )
        echo = _echoscu(served)  # the second slot
        assert echo.returncode == 0, (
            f"with one association held, a second (echoscu) failed: {echo.stderr[-600:]}\n{_tail(served)}"
        )
    finally:
        if held.is_established:
            held.release()
    _assert_serves(served, tmp_path, "after the scans and probes")


# -- 2. trickling peers -----------------------------------------------------------------------------


class _Tricklers:
    """``count`` connections, each sending an A-ASSOCIATE-RQ one byte a second, from a loopback address of its own.

    A connection the node closes is replaced by a new one from the same address, so the
    trickling goes on for as long as the test wants. ``lifetimes`` holds, for each connection
    the node ended, the seconds from connect to the end and how it ended.
    """

    def __init__(self, port: int, count: int, interval: float = 1.0) -> None:
        self.port = port
        self.count = count
        self.interval = interval
        self.payload = associate_rq(calling="TRICKLER")
        self.lifetimes: list[tuple[int, float, str]] = []
        self.connections = 0
        self.errors: list[str] = []
        self._open: dict[int, tuple[RawPeer, int]] = {}  # slot -> (peer, bytes sent)
        self._stop = threading.Event()
        self._replace = True
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="tricklers", daemon=True)

    def _source(self, slot: int) -> str:
        return f"127.0.1.{slot + 1}"

    def _connect(self, slot: int) -> None:
        try:
            peer = RawPeer(self.port, source=self._source(slot), timeout=5)
        except OSError as exc:
            self.errors.append(f"connect from {self._source(slot)}: {exc}")
            return
        with self._lock:
            self._open[slot] = (peer, 0)
            self.connections += 1

    def _ended(self, slot: int, how: str) -> None:
        with self._lock:
            peer, _ = self._open.pop(slot)
            self.lifetimes.append((slot, time.monotonic() - peer.connected_at, how))
        peer.close()

    def _run(self) -> None:
        for slot in range(self.count):
            self._connect(slot)
        while True:
            with self._lock:
                if not self._open and not self._replace:
                    return
                current = dict(self._open)
            for slot, (peer, sent) in current.items():  # one more byte each
                if sent >= len(self.payload):
                    continue
                try:
                    peer.sock.send(self.payload[sent : sent + 1])
                    with self._lock:
                        self._open[slot] = (peer, sent + 1)
                except OSError as exc:
                    self._ended(slot, f"send failed: {exc.strerror or exc}")
            tick = time.monotonic() + self.interval
            while (left := tick - time.monotonic()) > 0 and not self._stop.is_set():
                with self._lock:
                    socks = {peer.sock: slot for slot, (peer, _) in self._open.items()}
                if not socks:
                    self._stop.wait(left)  # every connect failed: try again on the next tick
                    break
                readable, _, _ = select.select(list(socks), [], [], left)
                for sock in readable:
                    try:
                        data = sock.recv(65536)
                    except OSError as exc:
                        self._ended(socks[sock], "reset" if exc.errno == errno.ECONNRESET else str(exc))
                        continue
                    if not data:
                        self._ended(socks[sock], "closed")
                    # bytes (an A-ABORT) before the close: the close follows
            if self._replace:
                for slot in range(self.count):
                    if slot not in self._open:
                        self._connect(slot)
            elif self._stop.is_set() and not self._open:
                return

    def start(self) -> None:
        self._thread.start()

    def stop_replacing(self) -> None:
        """No new connections; the open ones keep trickling until the node ends them."""
        self._replace = False

    def still_open(self) -> int:
        with self._lock:
            return len(self._open)

    def close(self) -> None:
        self._replace = False
        self._stop.set()
        self._thread.join(timeout=30)
        with self._lock:
            for peer, _ in self._open.values():
                peer.close()
            self._open.clear()


@pytest.mark.slow
def test_trickling_peers_are_closed_at_artim_and_never_crowd_out_real_ones(tmp_path: Path) -> None:
    served = _start(tmp_path, timeouts={"artim": ARTIM})
    tricklers = _Tricklers(served.port, 16)
    tricklers.start()
    try:
        served.wait("16 trickling connections", lambda: tricklers.connections >= 16, 30)
        _assert_serves(served, tmp_path, "while 16 peers trickle their association requests")
        # every first-generation trickler is closed, and replaced: the node keeps serving the next generation
        served.wait(
            "the node to close a trickling connection and the trickler to connect again",
            lambda: tricklers.connections >= 32,
            ARTIM + ARTIM_MARGIN + 5,
        )
        _assert_serves(served, tmp_path, "while the next 16 trickle")
        tricklers.stop_replacing()
        served.wait(
            f"the node to close every trickling connection (ARTIM {ARTIM} s); still open: {tricklers.still_open()}",
            lambda: tricklers.still_open() == 0,
            ARTIM + ARTIM_MARGIN + 5,
        )
    finally:
        tricklers.close()
    assert not tricklers.errors, f"trickler connects failed: {tricklers.errors[:5]}\n{_tail(served)}"
    late = [(slot, round(t, 1), how) for slot, t, how in tricklers.lifetimes if t > ARTIM + ARTIM_MARGIN]
    assert not late, (
        f"{len(late)} trickling connection(s) lived longer than ARTIM {ARTIM} s + {ARTIM_MARGIN} s "
        f"(slot, seconds, how): {late[:8]}\n{_tail(served)}"
    )
    _assert_serves(served, tmp_path, "after the trickling")


# -- 3. connections still negotiating, per host ------------------------------------------------------


def test_pending_connections_per_host_are_capped_and_other_hosts_still_served(tmp_path: Path) -> None:
    # ARTIM far beyond the test: only the per-host cap can close the extra connections.
    served = _start(tmp_path, json_logs=True, max_pending_per_host=4, timeouts={"artim": 120})
    mark = _log_size(served)
    held = [RawPeer(served.port) for _ in range(4)]
    extra: list[RawPeer] = []
    try:
        for peer in held:
            peer.send(associate_rq()[:10])  # started, never finished
        extra = [RawPeer(served.port) for _ in range(16)]
        outcomes = _outcomes(extra, REFUSAL_DEADLINE, until_closed=True)
        kept = [i + 5 for i, o in enumerate(outcomes) if not o.ended]
        assert not kept, (
            f"with 4 connections from 127.0.0.1 pending and max_pending_per_host=4, connection(s) {kept[:8]} "
            f"(of the 5th..20th) were not closed within {REFUSAL_DEADLINE} s; e.g. {outcomes[kept[0] - 5]}\n{_tail(served)}"
        )
        ended_held = [i + 1 for i, p in enumerate(held) if not p.is_quiet()]
        assert not ended_held, f"the 4 pending connections within the cap were ended: {ended_held}\n{_tail(served)}"
        served.wait(
            "a log line of the node's own for each of the 16 connections closed over the cap",
            lambda: len(_own_lines_since(served, mark)) >= 16,
            REFUSAL_DEADLINE,
        )
        status = _pynetdicom_echo(served.port, source=OTHER_HOST)
        assert status == "0x0000", (
            f"a C-ECHO from {OTHER_HOST} while 127.0.0.1 is at its cap: {status}\n{_tail(served)}"
        )
    finally:
        for peer in held + extra:
            peer.close()
    # Once the held connections are gone, 127.0.0.1 is served again (the node notices the closes).
    served.wait(
        "echoscu from 127.0.0.1 to succeed after the pending ones closed", lambda: _echoscu(served).returncode == 0, 30
    )
    _assert_serves(served, tmp_path, "after the per-host cap")


# -- 4. PDU limits -----------------------------------------------------------------------------------


def test_p_data_announcing_2_gib_is_aborted_and_not_buffered(tmp_path: Path) -> None:
    served = _start(tmp_path, json_logs=True)
    assert _pynetdicom_echo(served.port) == "0x0000", _tail(served)  # warm up before the baseline
    mark = _log_size(served)
    with _PeakRss(served) as rss, RawPeer(served.port, source=SCANNER) as peer:
        peer.associate([(1, VERIFICATION, [IMPLICIT_VR_LE])])
        announced = 2 << 30
        head = struct.pack(">BBI", P_DATA_TF, 0, announced) + struct.pack(">IBB", announced - 4, 1, 0x00)
        sent = _send_quietly(peer, head + bytes(1 << 20))
        outcome = peer.outcome(REFUSAL_DEADLINE)  # the socket stays open: the node must act on the header
        assert outcome.aborted_by_provider, (
            f"a P-DATA-TF announcing 2 GiB (max_pdu {4 << 20}) after a valid association, 1 MiB sent ({sent}), "
            f"then held open: expected an A-ABORT (source 2, reason 6 or 2), got {outcome}\n{_tail(served)}"
        )
    assert rss.growth < OVERSIZE_RSS_BOUND, f"the node's memory grew by {rss.growth >> 20} MiB ({rss})"
    _wait_own_line(served, mark, "the oversized PDU")
    _assert_serves(served, tmp_path, "after the 2 GiB P-DATA-TF")


def test_associate_rq_with_length_ffffffff_is_aborted(tmp_path: Path) -> None:
    served = _start(tmp_path, json_logs=True)
    assert _pynetdicom_echo(served.port) == "0x0000", _tail(served)
    mark = _log_size(served)
    with _PeakRss(served) as rss, RawPeer(served.port, source=SCANNER) as peer:
        rq = associate_rq(length=0xFFFFFFFF)
        sent = _send_quietly(peer, rq + bytes(64 << 10))
        outcome = peer.outcome(REFUSAL_DEADLINE)
        assert outcome.ended, (
            f"an A-ASSOCIATE-RQ announcing 0xFFFFFFFF bytes ({sent}), then held open: expected an A-ABORT "
            f"or a close, got {outcome}\n{_tail(served)}"
        )
        if outcome.abort is not None:
            assert outcome.aborted_by_provider, f"the A-ABORT is not the provider's for a bad PDU: {outcome}"
    assert rss.growth < OVERSIZE_RSS_BOUND, f"the node's memory grew by {rss.growth >> 20} MiB ({rss})"
    _wait_own_line(served, mark, "the oversized A-ASSOCIATE-RQ")
    _assert_serves(served, tmp_path, "after the 0xFFFFFFFF A-ASSOCIATE-RQ")


# -- 5. a dataset stream past max_instance_bytes -------------------------------------------------------


def test_dataset_stream_past_max_instance_bytes_is_aborted_while_it_arrives(tmp_path: Path) -> None:
    limit = 1 << 20
    served = _start(tmp_path, json_logs=True, max_instance_bytes=limit)
    assert _pynetdicom_echo(served.port) == "0x0000", _tail(served)
    big = make_dataset(rows=2048, columns=2048)  # 8 MiB of pixels
    uid = str(big.SOPInstanceUID)
    stream = encode(big)[: 8 << 20]
    mark = _log_size(served)
    sent = [0]
    how_it_ended = ["not started"]
    with _PeakRss(served) as rss, RawPeer(served.port, source=SCANNER) as peer:
        ac = peer.associate([(1, CT_IMAGE_STORAGE, [EXPLICIT_VR_LE])])
        assert 1 in ac.accepted, f"CT Image Storage in explicit VR LE not accepted: {ac}"
        step = ac.fragment_size()
        peer.send(p_data(pdv(1, c_store_rq(1, CT_IMAGE_STORAGE, uid), command=True, last=True)))

        def feed() -> None:
            for offset in range(0, len(stream), step):
                how = _send_quietly(peer, p_data(pdv(1, stream[offset : offset + step], command=False, last=False)))
                if how != "sent":
                    how_it_ended[0] = how
                    return
                sent[0] += min(step, len(stream) - offset)
            how_it_ended[0] = "all 8 MiB sent, the last fragment never marked"

        feeder = threading.Thread(target=feed, name="feeder", daemon=True)
        feeder.start()
        outcome = peer.outcome(REFUSAL_DEADLINE + 10)
        feeder.join(timeout=30)
        assert outcome.aborted_by_provider, (
            f"a C-STORE dataset growing past max_instance_bytes={limit} (never ending): expected an A-ABORT "
            f"(source 2, reason 6 or 2), got {outcome}; the peer sent {sent[0]} byte(s), {how_it_ended[0]}"
            f"\n{_tail(served)}"
        )
    assert rss.growth < OVERSIZE_RSS_BOUND, f"the node's memory grew by {rss.growth >> 20} MiB ({rss})"
    tmp_dir = served.root / "tmp"
    served.wait(
        "the store's tmp/ folder to be empty after the abort",
        lambda: not tmp_dir.exists() or not any(tmp_dir.iterdir()),
        REFUSAL_DEADLINE,
    )
    assert uid not in served.rows(), "the aborted instance has an index row"
    _wait_own_line(served, mark, "the instance over max_instance_bytes")
    _assert_serves(served, tmp_path, "after the oversized instance")


# -- 6. presentation contexts --------------------------------------------------------------------------


def test_a_pdu_trickled_inside_an_association_is_cut_off_at_the_network_timeout(tmp_path: Path) -> None:
    # An established association whose peer sends one byte of a P-DATA every 0.5 s: without a
    # deadline per PDU it would hold its slot for as long as it trickles.
    served = _start(tmp_path, timeouts={"network": 2})
    stream = p_data(pdv(1, c_echo_rq(1), command=True, last=True))
    with RawPeer(served.port) as peer:
        peer.associate([(1, VERIFICATION, [IMPLICIT_VR_LE])])
        started = time.monotonic()
        sent = 0
        while sent < len(stream) and time.monotonic() - started < 10:
            try:
                peer.send(stream[sent : sent + 1])
            except OSError:
                break
            sent += 1
            if not peer.is_quiet():
                break
            time.sleep(0.5)  # the trickle itself, not a wait for the node
        outcome = peer.outcome(REFUSAL_DEADLINE, until_closed=True)
        took = time.monotonic() - started
    assert outcome.ended and sent < len(stream), (
        f"{sent} of {len(stream)} bytes trickled over {took:.1f} s and the association is still open: {outcome}"
    )
    _assert_serves(served, tmp_path, "after the trickled PDU")


def test_p_data_on_a_context_never_accepted_is_aborted(tmp_path: Path) -> None:
    served = _start(tmp_path, json_logs=True)
    mark = _log_size(served)
    with RawPeer(served.port) as peer:
        ac = peer.associate([(1, VERIFICATION, [IMPLICIT_VR_LE])])
        assert 99 not in ac.contexts
        peer.send(p_data(pdv(99, c_echo_rq(1), command=True, last=True)))
        outcome = peer.outcome(REFUSAL_DEADLINE)
    assert outcome.aborted_by_provider, (
        f"a C-ECHO-RQ on presentation context 99, never proposed nor accepted: expected an A-ABORT "
        f"(source 2, reason 6 or 2), got {outcome}\n{_tail(served)}"
    )
    _wait_own_line(served, mark, "the unknown presentation context")
    _assert_serves(served, tmp_path, "after the P-DATA on context 99")


def test_c_store_whose_dataset_arrives_on_another_context_is_aborted(tmp_path: Path) -> None:
    served = _start(tmp_path, json_logs=True)
    ds = _small_ct()
    uid = str(ds.SOPInstanceUID)
    data = encode(ds)
    mark = _log_size(served)
    with RawPeer(served.port) as peer:
        ac = peer.associate([(1, CT_IMAGE_STORAGE, [EXPLICIT_VR_LE]), (3, MR_IMAGE_STORAGE, [EXPLICIT_VR_LE])])
        assert {1, 3} <= set(ac.accepted), f"both storage contexts should be accepted: {ac}"
        half = len(data) // 2
        peer.send(
            p_data(pdv(1, c_store_rq(1, CT_IMAGE_STORAGE, uid), command=True, last=True))
            + p_data(pdv(3, data[:half], command=False, last=False))
            + p_data(pdv(3, data[half:], command=False, last=True))
        )
        outcome = peer.outcome(REFUSAL_DEADLINE)
    assert outcome.aborted_by_provider, (
        f"a C-STORE-RQ on context 1 whose dataset fragments came on context 3: expected an A-ABORT "
        f"(source 2, reason 6 or 2), got {outcome}; statuses answered: {dimse_statuses(outcome.pdus)}"
        f"\n{_tail(served)}"
    )
    assert uid not in served.rows(), "the instance of the mixed-context C-STORE was stored"
    _wait_own_line(served, mark, "the dataset on another context")
    _assert_serves(served, tmp_path, "after the mixed-context C-STORE")


def test_c_store_on_the_verification_context_is_refused_and_not_stored(tmp_path: Path) -> None:
    served = _start(tmp_path, json_logs=True)
    ds = _small_ct()
    uid = str(ds.SOPInstanceUID)
    mark = _log_size(served)
    with RawPeer(served.port) as peer:
        ac = peer.associate([(1, VERIFICATION, [IMPLICIT_VR_LE])])
        assert 1 in ac.accepted, f"Verification not accepted: {ac}"
        peer.send(
            p_data(pdv(1, c_store_rq(1, CT_IMAGE_STORAGE, uid), command=True, last=True))
            + p_data(pdv(1, encode(ds, implicit=True), command=False, last=True))
        )
        outcome = peer.outcome(REFUSAL_DEADLINE)
    statuses = dimse_statuses(outcome.pdus)
    refused = bool(statuses) and all(s != 0 for s in statuses)
    assert outcome.aborted_by_provider or refused, (
        f"a CT C-STORE-RQ on the Verification context: expected an A-ABORT (source 2, reason 6 or 2) or a "
        f"failure status, got {outcome}; statuses answered: {[hex(s) for s in statuses]}\n{_tail(served)}"
    )
    assert uid not in served.rows(), "the CT sent on the Verification context was stored"
    _wait_own_line(served, mark, "the C-STORE on the Verification context")
    _assert_serves(served, tmp_path, "after the C-STORE on the Verification context")


# -- 7. malformed PDUs: the node's own error lines, not tracebacks ---------------------------------------


def _rq_with(items: bytes) -> bytes:
    return associate_rq(items=items)


_APP = item(0x10, b"1.2.840.10008.3.1.1.1")
_PC = presentation_context(1, VERIFICATION, [IMPLICIT_VR_LE])
_UI = user_information()
_GARBAGE = random.Random(7).randbytes(96)

#: name -> (associate first?, bytes to send)
MALFORMED: dict[str, tuple[bool, bytes]] = {
    "rq: presentation context item longer than the PDU": (
        False,
        _rq_with(_APP + item(0x20, _PC[4:], length=0x0400) + _UI),
    ),
    "rq: abstract syntax sub-item longer than its item": (
        False,
        _rq_with(_APP + item(0x20, bytes(4) + item(0x30, VERIFICATION.encode(), length=0xFFF0)) + _UI),
    ),
    "rq: maximum length sub-item of 2 bytes": (
        False,
        _rq_with(_APP + _PC + item(0x50, item(0x51, b"\x40\x00"))),
    ),
    "rq: user information item cut in the middle of a sub-item": (
        False,
        _rq_with(_APP + _PC + item(0x50, item(0x52, b"1.2.3", length=40))),
    ),
    "rq: shorter than its fixed fields": (False, pdu(A_ASSOCIATE_RQ, b"\x00\x01\x00\x00" + ae_title("PACSNODE"))),
    "p-data before any association": (False, p_data(pdv(1, c_echo_rq(1), command=True, last=True))),
    "p-data: garbage command set, last fragment": (True, p_data(pdv(1, _GARBAGE, command=True, last=True))),
    "p-data: pdv item longer than the pdu": (
        True,
        p_data(pdv(1, c_echo_rq(1), command=True, last=True, length=0x10000)),
    ),
    "p-data: pdv item length 0": (True, p_data(pdv(1, b"", command=True, last=True, length=0))),
    "p-data: pdv item length 1": (True, p_data(struct.pack(">IB", 1, 1))),
    "p-data: no pdv at all": (True, p_data()),
    "a second a-associate-rq": (True, associate_rq()),
    "unknown pdu type 0x09": (True, pdu(0x09, b"\x00" * 4)),
    "a-release-rp never asked for": (True, pdu(0x06, b"\x00" * 4)),
}


@pytest.mark.parametrize("name", list(MALFORMED), ids=[re.sub(r"[^a-z0-9]+", "-", n).strip("-") for n in MALFORMED])
def test_malformed_pdu_is_refused_with_the_nodes_own_log_lines(tmp_path: Path, name: str) -> None:
    served = _start(tmp_path, json_logs=True)
    associate_first, data = MALFORMED[name]
    with RawPeer(served.port) as peer:
        if associate_first:
            peer.associate([(1, VERIFICATION, [IMPLICIT_VR_LE])])
        sent = _send_quietly(peer, data)
        outcome = peer.outcome(REFUSAL_DEADLINE)
    assert outcome.ended, f"{name} ({sent}): expected an A-ABORT or a close, got {outcome}\n{_tail(served)}"
    if outcome.abort is not None:
        assert outcome.provider_abort(PROTOCOL_ERROR_REASONS), (
            f"{name}: the A-ABORT is not the provider's for a protocol error: {outcome}"
        )
    _assert_serves(served, tmp_path, f"after {name}", files=1)
    served.stop()  # everything it had to say is written
    _assert_all_json(served, name)


# -- 8. log injection through the network ------------------------------------------------------------------

_FORGED = "1999-12-31 23:59:59,999 CRITICAL [1] pacsnode.forged: FORGED"


def test_control_characters_from_the_network_never_reach_the_log_raw(tmp_path: Path) -> None:
    served = _start(tmp_path)  # text logs: one record per line
    evil_uid = f"1.2.3\n{_FORGED}\x1b[2J\x1b]0;owned\x07"
    attempts: list[tuple[str, bytes]] = [
        ("calling AE title", associate_rq(calling=b"EVIL\n\x1b[31mX\r\x1b")),
        ("called AE title", associate_rq(called=b"\x1b[2J\nFORGED\x1b")),
        ("abstract syntax", associate_rq([(1, evil_uid, [IMPLICIT_VR_LE])])),
        ("transfer syntax", associate_rq([(1, VERIFICATION, [evil_uid])])),
        ("application context", associate_rq(application_context=evil_uid)),
    ]
    outcomes = []
    for what, rq in attempts:
        with RawPeer(served.port) as peer:
            peer.send(rq)
            peer.half_close()
            outcomes.append(f"{what}: {peer.outcome(REFUSAL_DEADLINE, until_closed=True)}")
    with RawPeer(served.port) as peer:  # through the C-STORE command: an SOP Instance UID
        peer.associate([(1, CT_IMAGE_STORAGE, [EXPLICIT_VR_LE])])
        ds = _small_ct()
        peer.send(
            p_data(pdv(1, c_store_rq(1, CT_IMAGE_STORAGE, evil_uid), command=True, last=True))
            + p_data(pdv(1, encode(ds), command=False, last=True))
            + release_rq()
        )
        outcomes.append(f"c-store: {peer.outcome(REFUSAL_DEADLINE, until_closed=True)}")
    _assert_serves(served, tmp_path, "after the injection attempts")
    assert served.proc is not None
    node_pid = served.proc.pid  # one acceptor, in the serve process itself: every record carries this pid
    served.stop()
    raw = served.log.read_bytes()
    assert b"\x1b" not in raw and b"\x07" not in raw, (
        "the node's log holds a raw control character sent by a peer:\n"
        + "\n".join(repr(line) for line in raw.splitlines() if b"\x1b" in line or b"\x07" in line)[:2000]
    )
    lines = raw.decode("utf-8", "replace").splitlines()
    stamp = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ +\[(\d+)\] ")
    forged = [
        line
        for line in lines
        if line.startswith(("1999-12-31", "FORGED"))
        or ((m := stamp.match(line)) is not None and int(m.group(1)) != node_pid)
    ]
    assert not forged, f"a peer forged log lines: {forged[:5]}\n(outcomes: {outcomes})"


# -- 9. fuzz ------------------------------------------------------------------------------------------------


def _fuzz_templates() -> list[bytes]:
    """Valid PDU streams the fuzz mutates: association requests, C-ECHO, C-STORE, release, abort."""
    ds = make_dataset(rows=8, columns=8)  # fixed pixels (seed 0); fixed UIDs below, so streams repeat exactly
    ds.StudyInstanceUID = UID_PREFIX + "77.1"
    ds.SeriesInstanceUID = UID_PREFIX + "77.2"
    ds.SOPInstanceUID = UID_PREFIX + "77.3"
    data = encode(ds)
    half = len(data) // 2
    rq = associate_rq(
        [(1, VERIFICATION, [IMPLICIT_VR_LE]), (3, CT_IMAGE_STORAGE, [EXPLICIT_VR_LE, IMPLICIT_VR_LE])],
        calling="FUZZ",
    )
    echo = p_data(pdv(1, c_echo_rq(1), command=True, last=True))
    store = (
        p_data(pdv(3, c_store_rq(2, CT_IMAGE_STORAGE, str(ds.SOPInstanceUID)), command=True, last=True))
        + p_data(pdv(3, data[:half], command=False, last=False))
        + p_data(pdv(3, data[half:], command=False, last=True))
    )
    # several PDVs in one PDU, and a dataset fragment split over two PDUs
    packed = p_data(
        pdv(3, c_store_rq(3, CT_IMAGE_STORAGE, str(ds.SOPInstanceUID)), command=True, last=True),
        pdv(3, data[:half], command=False, last=False),
    ) + p_data(pdv(3, data[half:], command=False, last=True))
    unnegotiated = p_data(pdv(5, c_echo_rq(4), command=True, last=True))
    command_only = p_data(pdv(3, c_store_rq(5, CT_IMAGE_STORAGE, str(ds.SOPInstanceUID)), command=True, last=True))
    dataset_only = p_data(pdv(3, data, command=False, last=True))
    return [
        rq,
        rq + echo + release_rq(),
        rq + store + release_rq(),
        rq + echo + echo,
        release_rq(),
        abort(),
        echo,
        rq + packed + echo + release_rq(),
        rq + unnegotiated,
        rq + command_only + echo + release_rq(),
        rq + dataset_only + release_rq(),
    ]


_EXTREMES = [0, 1, 2, 3, 4, 5, 6, 0x7F, 0xFF, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF]


def _mutate(rng: random.Random, stream: bytes) -> bytes:
    data = bytearray(stream)
    for _ in range(rng.randint(1, 3)):
        if not data:
            data = bytearray(rng.randbytes(rng.randint(1, 64)))
        op = rng.randrange(8)
        fields = length_fields(bytes(data))
        if op == 0:  # bit flips
            for _ in range(rng.randint(1, 8)):
                data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        elif op == 1:  # truncation
            del data[rng.randrange(len(data)) :]
        elif op == 2 and fields:  # a length field set to an extreme or off by one
            offset, size, _ = rng.choice(fields)
            current = int.from_bytes(data[offset : offset + size], "big")
            value = rng.choice([*_EXTREMES, current + 1, current - 1, rng.getrandbits(size * 8)])
            data[offset : offset + size] = (value % (1 << (size * 8))).to_bytes(size, "big")
        elif op == 3 and fields:  # a PDU or item of another type
            offset, size, kind = rng.choice(fields)
            if kind != "pdv":
                data[offset - 2] = rng.randrange(256)
        elif op == 4:  # a slice repeated (duplicated items, PDUs)
            start = rng.randrange(len(data))
            end = min(len(data), start + rng.randint(1, 256))
            data[end:end] = data[start:end] * rng.randint(1, 4)
        elif op == 5:  # random bytes inserted
            at = rng.randrange(len(data) + 1)
            data[at:at] = rng.randbytes(rng.randint(1, 32))
        elif op == 6:  # a slice removed
            start = rng.randrange(len(data))
            del data[start : start + rng.randint(1, 64)]
        else:  # a whole PDU of random type and length around the stream
            data += pdu(rng.randrange(256), rng.randbytes(rng.randint(0, 64)), length=rng.choice(_EXTREMES))
    return bytes(data)


def _fuzz_streams(seed: int, count: int) -> list[bytes]:
    rng = random.Random(seed)
    templates = _fuzz_templates()
    streams = []
    for _ in range(count):
        if rng.random() < 0.05:
            streams.append(rng.randbytes(rng.randint(1, 512)))
        else:
            streams.append(_mutate(rng, rng.choice(templates)))
    return streams


def _fire(port: int, stream: bytes) -> str:
    """One fuzz connection: send, half-close, read until the node closes (or a short wait ends)."""
    try:
        peer = RawPeer(port, source=FUZZER, timeout=5)
    except OSError as exc:
        return f"connect failed: {exc}"
    with peer:
        _send_quietly(peer, stream)
        peer.half_close()
        return peer.outcome(FUZZ_READ_TIMEOUT, until_closed=True).kind


@pytest.mark.slow
@pytest.mark.parametrize(("data_path", "count"), [("lean", FUZZ_STREAMS), ("pynetdicom", FUZZ_STREAMS // 4)])
def test_fuzzed_pdu_streams_never_take_the_node_down(tmp_path: Path, data_path: str, count: int) -> None:
    """The default (lean) data path gets every stream; pynetdicom's path, behind the same guard, a quarter."""
    served = _start(tmp_path, json_logs=True, processes=2, data_path=data_path)
    assert served.proc is not None
    served.wait("both acceptor processes", lambda: len(_tree_pids(served.proc.pid)) >= 3 if served.proc else False, 30)
    children = set(_tree_pids(served.proc.pid)) - {served.proc.pid}
    assert _pynetdicom_echo(served.port) == "0x0000", _tail(served)
    streams = _fuzz_streams(FUZZ_SEED, count)
    where = f"fuzz seed {FUZZ_SEED:#x}, {count} streams, data path {data_path}"
    kinds: dict[str, int] = {}
    kinds_lock = threading.Lock()
    next_stream = iter(enumerate(streams))
    stream_lock = threading.Lock()
    crashes: list[str] = []

    def fuzz() -> None:
        try:
            while True:
                with stream_lock:
                    got = next(next_stream, None)
                if got is None:
                    return
                kind = _fire(served.port, got[1])
                with kinds_lock:
                    key = kind if not kind.startswith("connect failed") else f"stream {got[0]}: {kind}"
                    kinds[key] = kinds.get(key, 0) + 1
        except Exception as exc:  # a bug in this test, reported as such
            crashes.append(repr(exc))

    echoes: list[str] = []
    done = threading.Event()

    def echo_loop() -> None:
        while not done.is_set():
            echoes.append(_pynetdicom_echo(served.port))
            done.wait(0.5)

    pushes: list[str] = []
    with _PeakRss(served) as rss:
        threads = [threading.Thread(target=fuzz, name=f"fuzz-{i}", daemon=True) for i in range(FUZZ_THREADS)]
        echo_thread = threading.Thread(target=echo_loop, name="legit-echo", daemon=True)
        for thread in (*threads, echo_thread):
            thread.start()
        while any(t.is_alive() for t in threads) or not pushes:
            paths, uids = _fresh_files(tmp_path, 3)
            result = _storescu(served, paths)
            missing = uids - set(served.rows()) if result.returncode == 0 else uids
            pushes.append("ok" if not missing else f"rc {result.returncode}: {result.stderr[-300:]}")
            done.wait(1.0)
        for thread in threads:
            thread.join(timeout=120)
        done.set()
        echo_thread.join(timeout=60)
    summary = f"{where}; outcomes {dict(sorted(kinds.items()))}; {rss}"
    print(summary)  # shown with -s, and under a failure
    assert not crashes, f"the fuzz threads failed: {crashes[:3]}"
    assert served.proc.poll() is None, f"the node exited during the fuzz ({summary})\n{_tail(served)}"
    now = set(_tree_pids(served.proc.pid)) - {served.proc.pid}
    assert children <= now, (
        f"acceptor process(es) {sorted(children - now)} died during the fuzz ({summary})\n{_tail(served)}"
    )
    failed_connects = {k: v for k, v in kinds.items() if k.startswith("stream")}
    assert not failed_connects, (
        f"connections to the node failed during the fuzz: {list(failed_connects)[:5]} ({summary})"
    )
    bad_echoes = [e for e in echoes if e != "0x0000"]
    assert echoes and not bad_echoes, (
        f"{len(bad_echoes)} of {len(echoes)} C-ECHOs during the fuzz failed: {bad_echoes[:5]} ({summary})\n{_tail(served)}"
    )
    bad_pushes = [p for p in pushes if p != "ok"]
    assert not bad_pushes, (
        f"{len(bad_pushes)} of {len(pushes)} storescu pushes failed: {bad_pushes[:3]} ({summary})\n{_tail(served)}"
    )
    assert rss.growth < FUZZ_RSS_BOUND, f"the node's memory grew by {rss.growth >> 20} MiB ({summary})"
    _assert_serves(served, tmp_path, f"after the fuzz ({where})")
    # Nothing partial kept: no file left in tmp/, and every row points at a whole file with its digest.
    leftovers = [p.name for p in (served.root / "tmp").iterdir() if p.is_file()]
    assert not leftovers, f"files left in store/tmp after the fuzz ({where}): {leftovers[:5]}"
    for uid, row in served.rows().items():
        raw = (served.root / row.file_path).read_bytes()
        assert hashlib.sha256(raw).hexdigest() == row.sha256, f"{uid}: the stored file is not the one indexed"
    served.stop()
    _assert_all_json(served, f"after the fuzz ({where})")
