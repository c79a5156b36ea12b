"""DICOMweb benchmark: pacsnode's QIDO-RS and WADO-RS against Orthanc's DICOMweb plugin, same data, same run.

Usage (as root; the run moves itself into a private network namespace)::

    .venv/bin/python -m bench.dicomweb                # 12 studies x 2 series x 40 images of 256x256 (~100 MB)
    .venv/bin/python -m bench.dicomweb --quick        # 4 x 2 x 10: a smoke run

What it does
------------
1. Writes a deterministic corpus (``pacsnode.node.testing.corpus.make_dataset``: 16-bit CT/MR images,
   uncompressed) and stores it in ``pacsnode serve`` (C-STORE over one association) and in Orthanc
   1.10 with libOrthancDicomWeb (REST upload), both on loopback in this namespace.
2. QIDO-RS: each search runs once untimed on both (the answers must name the same UIDs), then
   ``--repeat`` times per server, the servers interleaved. One keep-alive HTTP connection per
   server (httpx); pacsnode is asked with a bearer token (its cheapest login check), Orthanc without
   authentication (its default for loopback).
3. WADO-RS: each of ``--retrieve-studies`` studies is retrieved whole
   (``multipart/related; type="application/dicom"; transfer-syntax=*``: as stored, no transcoding)
   ``--retrieve-repeat`` times per server, the body read to the end; MB/s = bytes / wall time.

Printed: per search the median and p90 latency in ms of each server and the ratio pacsnode/Orthanc
(lower is better), then per study retrieve the median MB/s of each and the ratio pacsnode/Orthanc
(higher is better). ``--json FILE`` writes the same figures.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from pacsnode.node.testing.corpus import make_dataset
from pacsnode.node.testing.netns import enter_private_netns

_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
_ACCEPT_AS_STORED = 'multipart/related; type="application/dicom"; transfer-syntax=*'


def _write_corpus(folder: Path, studies: int, series: int, images: int, size: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    for s in range(studies):
        study_uid = f"1.2.826.0.1.3680043.10.1432.77.{s + 1}"
        for r in range(series):
            series_uid = f"{study_uid}.{r + 1}"
            for i in range(images):
                ds = make_dataset(
                    rows=size,
                    columns=size,
                    modality="CT" if r % 2 == 0 else "MR",
                    patient_id=f"BENCH{s % 5:03d}",
                    patient_name=f"BENCH^PATIENT{s % 5}",
                    study_uid=study_uid,
                    series_uid=series_uid,
                    instance_number=i + 1,
                    seed=s * 1000 + r * 100 + i,
                )
                ds.StudyDate = f"2024{(s % 12) + 1:02d}15"
                ds.AccessionNumber = f"ACC{s:05d}"
                path = folder / f"{s:03d}-{r}-{i:03d}.dcm"
                ds.save_as(path, enforce_file_format=True)
                paths.append(path)
    return paths


def _timed(call: Callable[[], int]) -> tuple[float, int]:
    started = time.perf_counter()
    size = call()
    return time.perf_counter() - started, size


def _p90(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(0.9 * (len(ordered) - 1))))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--studies", type=int, default=12)
    parser.add_argument("--series", type=int, default=2)
    parser.add_argument("--images", type=int, default=40)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=30)
    parser.add_argument("--retrieve-studies", type=int, default=3)
    parser.add_argument("--retrieve-repeat", type=int, default=5)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--keep", action="store_true", help="keep the corpus, stores and logs")
    args = parser.parse_args()
    if args.quick:
        args.studies, args.images, args.repeat, args.retrieve_repeat = 4, 10, 10, 3
    enter_private_netns("bench.dicomweb", ("Orthanc",))
    if not _PLUGIN.is_file():
        print("bench.dicomweb: Orthanc's DICOMweb plugin is not installed (Debian orthanc-dicomweb)", file=sys.stderr)
        return 2
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.support.helpers import store_datasets, wait_for_port
    from tests.support.peers import OrthancPeer
    from tests.support.served import Served
    from tests.support.web import TOKEN, users_config

    work = Path(tempfile.mkdtemp(prefix="bench-dicomweb-"))
    files = _write_corpus(work / "corpus", args.studies, args.series, args.images, args.size)
    total_bytes = sum(p.stat().st_size for p in files)
    print(f"corpus: {len(files)} instances, {total_bytes / 1e6:.1f} MB in {work}")

    (work / "pacsnode").mkdir()
    served = Served(work / "pacsnode", sections={"http": {"enabled": True, "users": users_config()}})
    served.start()
    orthanc = OrthancPeer(work / "orthanc", config={"Plugins": [str(_PLUGIN)], "DicomWeb": {"Enable": True}})
    try:
        wait_for_port(served.http_port, proc=served.proc)
        started = time.perf_counter()
        statuses = [s for i in range(0, len(files), 100) for s in store_datasets(served.port, files[i : i + 100])]
        assert all(s == 0 for s in statuses), "pacsnode refused instances"
        print(f"pacsnode filled (C-STORE) in {time.perf_counter() - started:.1f} s")
        orthanc.start()
        started = time.perf_counter()
        orthanc.upload(files)
        print(f"Orthanc filled (REST) in {time.perf_counter() - started:.1f} s")
        results = _run(
            args,
            pacsnode=(f"http://127.0.0.1:{served.http_port}/dicom-web", {"Authorization": f"Bearer {TOKEN}"}),
            orthanc=(f"http://127.0.0.1:{orthanc.http_port}/dicom-web", {}),
        )
    finally:
        orthanc.stop()
        served.stop()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


def _run(args: argparse.Namespace, **servers: tuple[str, dict[str, str]]) -> dict[str, Any]:
    clients = {
        name: httpx.Client(base_url=url, headers=headers, timeout=120) for name, (url, headers) in servers.items()
    }
    study = "1.2.826.0.1.3680043.10.1432.77.1"
    searches: list[tuple[str, str, dict[str, str]]] = [
        ("studies-all", "/studies", {}),
        ("studies-name", "/studies", {"PatientName": "BENCH^PATIENT1*"}),
        ("studies-date", "/studies", {"StudyDate": "20240301-20240630"}),
        ("studies-accession", "/studies", {"AccessionNumber": "ACC00003"}),
        ("series-of-study", f"/studies/{study}/series", {}),
        ("instances-of-series", f"/studies/{study}/series/{study}.1/instances", {}),
        ("instances-ct", "/instances", {"Modality": "CT", "limit": "100"}),
    ]
    out: dict[str, Any] = {"qido": {}, "wado": {}}
    print(f"\nQIDO-RS, {args.repeat} runs each (ms)")
    print(
        f"{'search':22s} {'matches':>9s} | {'pacsnode med':>12s} {'p90':>7s} | {'orthanc med':>11s} {'p90':>7s} | p/o"
    )
    for name, path, query in searches:
        # Orthanc 1.10's plugin does not decode %2A or %5E: wildcards and carets go as they are, to both.
        params = urllib.parse.urlencode(query, safe="*?^,-", quote_via=urllib.parse.quote)
        found = {}
        for server, client in clients.items():
            r = client.get(f"{path}?{params}")
            r.raise_for_status()
            tag = {"studies": "0020000D", "series": "0020000E"}.get(path.rsplit("/", 1)[-1], "00080018")
            found[server] = {a[tag]["Value"][0] for a in r.json()}
        if found["pacsnode"] != found["orthanc"]:
            print(f"  {name}: answers differ: pacsnode {len(found['pacsnode'])}, Orthanc {len(found['orthanc'])}")
        times: dict[str, list[float]] = {server: [] for server in clients}
        for round_ in range(args.repeat):
            order = list(clients) if round_ % 2 == 0 else list(reversed(clients))
            for server in order:
                client = clients[server]
                elapsed, _ = _timed(lambda c=client, u=f"{path}?{params}": len(c.get(u).content))
                times[server].append(elapsed * 1000)
        p, o = statistics.median(times["pacsnode"]), statistics.median(times["orthanc"])
        out["qido"][name] = {"pacsnode_ms": p, "orthanc_ms": o, "ratio": p / o, "matches": len(found["pacsnode"])}
        print(
            f"{name:22s} {len(found['pacsnode']):>4d}/{len(found['orthanc']):<4d} | {p:12.1f} {_p90(times['pacsnode']):7.1f} | "
            f"{o:11.1f} {_p90(times['orthanc']):7.1f} | {p / o:.2f}"
        )
    print(f"\nWADO-RS study retrieve (as stored), {args.retrieve_repeat} runs each (MB/s)")
    print(f"{'study':10s} {'MB':>7s} | {'pacsnode':>9s} | {'orthanc':>9s} | p/o")
    for s in range(min(args.retrieve_studies, args.studies)):
        uid = f"1.2.826.0.1.3680043.10.1432.77.{s + 1}"
        rates: dict[str, list[float]] = {server: [] for server in clients}
        size = 0
        for round_ in range(args.retrieve_repeat):
            order = list(clients) if round_ % 2 == 0 else list(reversed(clients))
            for server in order:
                client = clients[server]

                def fetch(c: httpx.Client = client, study_uid: str = uid) -> int:
                    n = 0
                    with c.stream("GET", f"/studies/{study_uid}", headers={"Accept": _ACCEPT_AS_STORED}) as r:
                        r.raise_for_status()
                        for chunk in r.iter_bytes(1 << 20):
                            n += len(chunk)
                    return n

                elapsed, size = _timed(fetch)
                rates[server].append(size / elapsed / 1e6)
        p, o = statistics.median(rates["pacsnode"]), statistics.median(rates["orthanc"])
        out["wado"][f"study-{s + 1}"] = {"pacsnode_mb_s": p, "orthanc_mb_s": o, "ratio": p / o, "bytes": size}
        print(f"study-{s + 1:<4d} {size / 1e6:7.1f} | {p:9.1f} | {o:9.1f} | {p / o:.2f}")
    for client in clients.values():
        client.close()
    return out


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
