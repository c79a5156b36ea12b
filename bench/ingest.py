"""Ingest benchmark: pacsnode against DCMTK storescp and Orthanc, same corpus, same run.

Usage (as root; the run moves itself into a private network namespace, so every
server binds loopback only and nothing leaves the machine)::

    .venv/bin/python -m bench.ingest [--count 2000] [--repeat 1]

For each corpus (small 64x64 images; 512x512 16-bit CT slices) and each sender
count (1 and 4 parallel DCMTK storescu associations), every receiver starts
fresh, receives the corpus and is stopped. Printed: instances/s and MB/s per
receiver, and pacsnode's ratio against each peer (medians over --repeat runs).
pacsnode runs with fsync on; storescp writes files without fsync; Orthanc
keeps its default SQLite index. All run with TCP_NODELAY=1.
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


class Receiver:
    name = ""
    aet = ""
    port = 0

    def start(self, work: Path) -> None: ...

    def stop(self) -> None:
        stop_process(self.proc)


class Pacsnode(Receiver):
    name, aet, port = "pacsnode", "PACSNODE", 11112

    def __init__(self, processes: int) -> None:
        self.processes = processes

    def start(self, work: Path) -> None:
        config = work / "pacsnode.yaml"
        config.write_text(
            yaml.safe_dump(
                {
                    "node": {"port": self.port, "acceptor_processes": self.processes},
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


def _run(args: argparse.Namespace) -> None:
    base = Path(tempfile.mkdtemp(prefix="pacsnode-bench-", dir=args.workdir))
    corpora = {
        "small 64x64": write_series(base / "corpus-small", args.count, rows=64, columns=64),
        "CT 512x512": write_series(base / "corpus-ct", args.count, rows=512, columns=512),
    }
    receivers = [Pacsnode(args.processes), Storescp(), Orthanc()]
    results: dict[tuple[str, int, str], list[tuple[float, float]]] = {}
    try:
        for corpus, files in corpora.items():
            size_mb = sum(f.stat().st_size for f in files) / 1e6
            for senders in (1, 4):
                for _ in range(args.repeat):
                    for receiver in receivers:
                        work = base / f"run-{receiver.name}"
                        shutil.rmtree(work, ignore_errors=True)
                        work.mkdir()
                        receiver.start(work)
                        try:
                            elapsed = _push(receiver, files, senders)
                        finally:
                            receiver.stop()
                        shutil.rmtree(work, ignore_errors=True)
                        results.setdefault((corpus, senders, receiver.name), []).append(
                            (len(files) / elapsed, size_mb / elapsed)
                        )
                        print(
                            f"  {corpus:12s} {senders} sender(s) {receiver.name:9s} "
                            f"{len(files) / elapsed:7.1f} inst/s {size_mb / elapsed:7.1f} MB/s",
                            flush=True,
                        )
    finally:
        shutil.rmtree(base, ignore_errors=True)

    print(
        f"\nIngest, {args.count} instances per corpus, median of {args.repeat} run(s), "
        f"pacsnode with {args.processes} acceptor process(es), fsync on"
    )
    head = f"{'corpus':12s} {'senders':>7s} | {'pacsnode':>16s} | {'storescp':>16s} | {'orthanc':>16s} | {'vs storescp':>11s} {'vs orthanc':>10s}"
    print(head)
    print("-" * len(head))
    for corpus in corpora:
        for senders in (1, 4):
            med = {
                name: (
                    statistics.median(r[0] for r in results[(corpus, senders, name)]),
                    statistics.median(r[1] for r in results[(corpus, senders, name)]),
                )
                for name in ("pacsnode", "storescp", "orthanc")
            }
            cells = " | ".join(f"{med[n][0]:6.1f}/s {med[n][1]:6.1f}MB/s" for n in ("pacsnode", "storescp", "orthanc"))
            print(
                f"{corpus:12s} {senders:>7d} | {cells} | {med['pacsnode'][0] / med['storescp'][0]:10.2f}x "
                f"{med['pacsnode'][0] / med['orthanc'][0]:9.2f}x"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--processes", type=int, default=2, help="pacsnode acceptor processes")
    parser.add_argument("--workdir", default=None, help="where corpora and stores go (default: system temp)")
    args = parser.parse_args()
    enter_private_netns("bench.ingest", ("storescu", "storescp", "Orthanc"))
    _run(args)


if __name__ == "__main__":
    main()
