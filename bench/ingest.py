"""Ingest benchmark: pacsnode against DCMTK storescp and Orthanc, same corpus, same run.

Usage (as root; the run moves itself into a private network namespace, so every
server binds loopback only and nothing leaves the machine)::

    .venv/bin/python -m bench.ingest [--count 2000] [--repeat 1] [--warmup 20]

For each corpus (small 64x64 images; 512x512 16-bit CT slices) and each sender
count (1 and 4 parallel DCMTK storescu associations), every receiver starts
fresh, takes --warmup instances of another study (not measured), receives the
corpus and is stopped; every run's store is kept until the bench ends. The receivers: pacsnode with its lean
data path (``node.data_path: lean``, the default), pacsnode with pynetdicom's
(``node.data_path: pynetdicom``), Orthanc and DCMTK storescp. Printed:
instances/s per receiver, each pacsnode's ratio against Orthanc and storescp
(medians over --repeat runs), and the CPU milliseconds each receiver's processes
used per instance (utime + stime from /proc, the figure that scales to bigger
machines). pacsnode runs with fsync on (file, directory, index commit before each
Success); storescp writes files without fsync; Orthanc keeps its default SQLite
index. All run with TCP_NODELAY=1.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from pacsnode.node.testing.corpus import write_series
from pacsnode.node.testing.netns import (
    enter_private_netns,
    require_tool,
    stop_process,
    wait_port,
)

REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "TCP_NODELAY": "1"}


_TICKS = os.sysconf("SC_CLK_TCK")


def _cpu_seconds(pid: int) -> float:
    """CPU time of ``pid`` and its live descendants, plus what its reaped children used."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return 0.0
    # fields[0] is field 3 (state): utime 14, stime 15, cutime 16, cstime 17
    own = sum(int(v) for v in fields[11:15]) / _TICKS
    return own + sum(_cpu_seconds(int(child)) for child in children)


class Receiver:
    name = ""
    aet = ""
    port = 0
    proc: subprocess.Popen[bytes]

    def start(self, work: Path) -> None: ...

    def cpu_seconds(self) -> float:
        return _cpu_seconds(self.proc.pid)

    def stop(self) -> None:
        stop_process(self.proc)


class Pacsnode(Receiver):
    aet, port = "PACSNODE", 11112

    def __init__(self, processes: int, data_path: str) -> None:
        self.processes = processes
        self.data_path = data_path
        self.name = f"pacsnode-{data_path}"

    def start(self, work: Path) -> None:
        config = work / "pacsnode.yaml"
        config.write_text(
            yaml.safe_dump(
                {
                    "node": {"port": self.port, "acceptor_processes": self.processes, "data_path": self.data_path},
                    "storage": {
                        "root": str(work / "store"),
                        "database_url": f"sqlite:///{work / 'index.db'}",
                        "min_free_bytes": 0,
                        "fsync": True,
                    },
                    "logging": {"level": "WARNING"},
                }
            )
        )
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pacsnode.node", "--config", str(config), "serve"], cwd=REPO, env=ENV
        )
        wait_port(self.port)
        deadline = time.monotonic() + 30  # every acceptor process up before the clock starts
        while len(Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()) < self.processes:
            if time.monotonic() > deadline:
                raise RuntimeError("pacsnode's acceptor processes did not start")
            time.sleep(0.05)
        # The node's other processes (the analysis worker imports torch: most of a CPU-second) start
        # after the acceptors: the clock starts once the whole tree is idle, so the CPU per instance
        # is ingest's, not start-up's.
        deadline = time.monotonic() + 60
        used = self.cpu_seconds()
        while time.monotonic() < deadline:
            time.sleep(0.5)
            now = self.cpu_seconds()
            if now - used < 0.02:
                break
            used = now


class Storescp(Receiver):
    name, aet, port = "storescp", "STORESCP", 11113

    def start(self, work: Path) -> None:
        out = work / "storescp"
        out.mkdir()
        self.proc = subprocess.Popen(
            [require_tool("storescp"), "--fork", "-aet", self.aet, "-od", str(out), "+xa", str(self.port)],
            env=ENV,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_port(self.port)


class Orthanc(Receiver):
    name, aet, port = "orthanc", "ORTHANC", 11114

    def start(self, work: Path) -> None:
        cfg = work / "orthanc.json"
        cfg.write_text(
            json.dumps(
                {
                    "Name": "bench",
                    "StorageDirectory": str(work / "orthanc-db"),
                    "IndexDirectory": str(work / "orthanc-db"),
                    "DicomAet": self.aet,
                    "DicomPort": self.port,
                    "HttpPort": 18042,
                    "RemoteAccessAllowed": False,
                    "DicomCheckCalledAet": False,
                    "Plugins": [],
                    "ConcurrentJobs": 2,
                    "DicomAlwaysAllowStore": True,
                    "AuthenticationEnabled": False,
                }
            )
        )
        self.proc = subprocess.Popen(
            ["Orthanc", str(cfg)], env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        wait_port(self.port)


def _push(receiver: Receiver, files: list[Path], senders: int) -> float:
    chunks = [files[i::senders] for i in range(senders)]
    start = time.perf_counter()
    procs = [
        subprocess.Popen(
            [require_tool("storescu"), "-aec", receiver.aet, "127.0.0.1", str(receiver.port), *map(str, chunk)],
            env=ENV,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for chunk in chunks
    ]
    errors = [p.communicate()[1] for p in procs]
    elapsed = time.perf_counter() - start
    for p, err in zip(procs, errors, strict=False):
        if p.returncode != 0:
            raise RuntimeError(f"storescu to {receiver.name} failed: {err.decode()[-500:]}")
    return elapsed


_RECEIVERS = ("pacsnode-lean", "pacsnode-pynetdicom", "orthanc", "storescp")


def _run(args: argparse.Namespace) -> None:
    base = Path(tempfile.mkdtemp(prefix="pacsnode-bench-", dir=args.workdir))
    corpora = {
        "small 64x64": write_series(base / "corpus-small", args.count, rows=64, columns=64),
        "CT 512x512": write_series(base / "corpus-ct", args.count, rows=512, columns=512),
    }
    # Each receiver, once started, first takes a few instances of another study in one association
    # (not measured): the figures are a running receiver's, not its first minute's. pacsnode's first
    # instances after a start cost it about 0.13 s of CPU more than later ones (measured over the first
    # 300 small instances), which in a 300-instance run was a sixth of its CPU.
    warmup = write_series(base / "corpus-warmup", args.warmup, rows=64, columns=64) if args.warmup else []
    receivers = [Pacsnode(args.processes, "lean"), Pacsnode(args.processes, "pynetdicom"), Orthanc(), Storescp()]
    # Every run's store is kept until the end: ext4 without a journal (this machine's root) skips
    # inodes freed in the last minute or more when it creates a file, scanning past each one, so
    # a run that follows the deletion of the previous run's store paid 0.3 ms more per file
    # (measured: creating an empty file took 270 us after a deletion, 7 us without). Where the disk
    # cannot hold them all, each store is deleted after its run instead, and the bench says so.
    runs = 2 * args.repeat * len(receivers)
    need = sum(sum(f.stat().st_size for f in files) for files in corpora.values()) * runs * 1.2
    keep = shutil.disk_usage(base).free > need + (1 << 30)
    if not keep:
        print(
            f"not enough free space to keep every run's store ({need / 2**30:.1f} GiB): each is deleted after its run"
        )
    # (corpus, senders, receiver) -> [(instances/s, CPU ms per instance)]
    results: dict[tuple[str, int, str], list[tuple[float, float]]] = {}
    run = 0
    try:
        for corpus, files in corpora.items():
            for senders in (1, 4):
                for _ in range(args.repeat):
                    for receiver in receivers:
                        run += 1
                        work = base / f"run-{run}-{receiver.name}"
                        work.mkdir()
                        receiver.start(work)
                        try:
                            if warmup:
                                _push(receiver, warmup, 1)
                            cpu_before = receiver.cpu_seconds()
                            elapsed = _push(receiver, files, senders)
                            cpu_ms = (receiver.cpu_seconds() - cpu_before) * 1000 / len(files)
                        finally:
                            receiver.stop()
                        if not keep:
                            shutil.rmtree(work, ignore_errors=True)
                        rate = len(files) / elapsed
                        results.setdefault((corpus, senders, receiver.name), []).append((rate, cpu_ms))
                        print(
                            f"  {corpus:12s} {senders} sender(s) {receiver.name:19s} "
                            f"{rate:7.1f} inst/s {cpu_ms:6.2f} CPU ms/inst",
                            flush=True,
                        )
    finally:
        shutil.rmtree(base, ignore_errors=True)

    print(
        f"\nIngest, {args.count} instances per corpus, median of {args.repeat} run(s), "
        f"pacsnode with {args.processes} acceptor process(es), fsync on; instances/s (CPU ms per instance)"
    )
    head = (
        f"{'corpus':12s} {'senders':>7s} | "
        + " | ".join(f"{name:>19s}" for name in _RECEIVERS)
        + f" | {'lean/orthanc':>12s} {'pynd/orthanc':>12s} {'lean/storescp':>13s}"
    )
    print(head)
    print("-" * len(head))
    for corpus in corpora:
        for senders in (1, 4):
            med = {
                name: (
                    statistics.median(r[0] for r in results[(corpus, senders, name)]),
                    statistics.median(r[1] for r in results[(corpus, senders, name)]),
                )
                for name in _RECEIVERS
            }
            cells = " | ".join(f"{med[n][0]:8.1f} ({med[n][1]:6.2f} ms)" for n in _RECEIVERS)
            lean, pynd = med["pacsnode-lean"][0], med["pacsnode-pynetdicom"][0]
            print(
                f"{corpus:12s} {senders:>7d} | {cells} | {lean / med['orthanc'][0]:11.2f}x "
                f"{pynd / med['orthanc'][0]:11.2f}x {lean / med['storescp'][0]:12.2f}x"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--processes", type=int, default=2, help="pacsnode acceptor processes")
    parser.add_argument(
        "--warmup", type=int, default=20, help="instances of another study each receiver takes before it is measured"
    )
    parser.add_argument("--workdir", default=None, help="where corpora and stores go (default: system temp)")
    args = parser.parse_args()
    enter_private_netns("bench.ingest", ("storescu", "storescp", "Orthanc"))
    _run(args)


if __name__ == "__main__":
    main()
