"""Analysis pipeline benchmark: a chest CT's last instance received -> its results acknowledged.

Usage (as root; the run moves itself into a private network namespace, so every
server binds loopback only and nothing leaves the machine)::

    .venv/bin/python bench/pipeline.py            # 3 runs of a 300-slice 512x512 CT
    .venv/bin/python bench/pipeline.py --quick    # 1 run of a 120-slice 256x256 CT
    .venv/bin/python -m bench.pipeline --runs 5 --quiet-seconds 2 --scan-interval 0.2

What it does
------------
1. Writes the synthetic chest phantom (:func:`pacsnode.analysis.modeldev.synthetic.write_chest_ct`,
   :data:`~pacsnode.analysis.modeldev.synthetic.BENCHMARK_PHANTOM`: blur
   0.5 mm, 25 vessels and 6 emphysema pockets per lung; slices spaced so the
   stack spans 300 mm) once, timed on its own. Each run gets a copy with fresh
   Study, Series, Frame of Reference and SOP Instance UIDs (a re-labelling,
   also timed on its own), so every run is a new study for the node.
2. Starts DCMTK ``storescp -v`` as the destination DEST, then ``python -m pacsnode.node
   --config FILE serve``: SQLite index in a temporary folder, fsync on, one
   acceptor, ``analysis.workers: 1``, one rule (pipeline ``ct-lung``, modality
   CT, destination DEST), ``--quiet-seconds`` and ``--scan-interval``, export
   ``poll_seconds`` 0.2. The node and storescp run through all the runs; an
   untimed warm-up study (40 slices of 128x128) goes first, so the worker has
   loaded the pipeline as a long-running node would have (``--no-warmup``: the
   first run pays for it).
3. Per run: DCMTK ``storescu`` pushes the study over one association, then the
   bench waits for the job to be done and its 5 exports (SEG, SR, 3 SC) to be
   sent, reading the node's index (SQLite, read-only) every 0.1 s.

What it measures
----------------
Every moment is wall-clock time on this machine; the index's timestamps are
naive UTC with microseconds.

* last received: the largest ``instances.received_at`` of the CT series (set
  when the instance is indexed, just before its C-STORE response);
* quiet end: last received + quiet seconds;
* job created / started / finished: ``jobs.created_at`` (the scheduler queued
  it), ``started_at`` (a worker claimed it), ``finished_at``;
* acknowledged: the newest modification time of the 5 result files storescp
  wrote (storescp writes a file, then sends its C-STORE response).

Figures per run, in seconds:

==========  ================================================================
total       acknowledged - last received - quiet seconds
                = sched + job + export
sched       quiet end -> job started (= scan + claim)
  scan      quiet end -> job created (scheduler pass, every scan interval)
  claim     job created -> started (the worker's job loop polls when idle)
job         started -> finished = decode + segment + write + store + other
  decode    read the slices, HU volume (the job's ``timings.decode_hu_s``)
  segment   segment the lungs and measure (``segment_measure_s``)
  write     build SEG, SR and the 3 SC (``write_s``)
  store     the 5 result objects into the archive (``store_s``)
  other     the rest: series lookup, marking the job done, queueing exports
export      job finished -> acknowledged (exporter poll, association, 5 C-STOREs)
export(db)  job finished -> newest ``exports.sent_at`` (the node marks them sent
            after the association is released)
==========  ================================================================

No other tool here runs this pipeline, so there is no peer: the figures are
absolute, not ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script: bench/pipeline.py
    sys.path.insert(0, str(REPO))

import pydicom  # noqa: E402
import yaml  # noqa: E402
from pydicom.uid import generate_uid  # noqa: E402

from pacsnode.node.testing.netns import (  # noqa: E402
    enter_private_netns,
    require_tool,
    stop_process,
    wait_port,
)

ENV = {**os.environ, "TCP_NODELAY": "1"}
NODE_AET, NODE_PORT = "PACSNODE", 11112
DEST_AET, DEST_PORT = "DEST", 11113
SEG, SR, SC = "1.2.840.10008.5.1.4.1.1.66.4", "1.2.840.10008.5.1.4.1.1.88.34", "1.2.840.10008.5.1.4.1.1.7"
EXPECTED = Counter({"SEG": 1, "SR": 1, "SC": 3})
_CLASS_NAMES = {SEG: "SEG", SR: "SR", SC: "SC"}
_STACK_MM = 300.0  # slice spacing = this / slices
_RUN_TIMEOUT_S = 600.0


# ------------------------------------------------------------------ processes


class Proc:
    """A server we started: its own session, output to a log, stopped by its PID."""

    def __init__(self, name: str, argv: list[str], log: Path, **kwargs: Any) -> None:
        self.name = name
        self.log = log
        with log.open("ab") as out:
            self.proc = subprocess.Popen(
                argv, stdout=out, stderr=subprocess.STDOUT, env=ENV, start_new_session=True, **kwargs
            )

    def wait_listening(self, port: int, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}\n{self.tail()}")
            try:
                wait_port(port, timeout=0.5)
                return
            except TimeoutError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{self.name} is not listening on {port}\n{self.tail()}") from None

    def tail(self, chars: int = 4000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"

    def stop(self, timeout: float = 30) -> None:
        """SIGTERM the process, SIGKILL its session (which we created) after ``timeout``."""
        stop_process(self.proc, timeout, group=True)


def _start_storescp(work: Path) -> tuple[Proc, Path]:
    received = work / "dest"
    received.mkdir()
    proc = Proc(
        "storescp",
        [require_tool("storescp"), "-v", "-aet", DEST_AET, "-od", str(received), "+xa", str(DEST_PORT)],
        work / "storescp.log",
    )
    proc.wait_listening(DEST_PORT)
    return proc, received


def _start_node(work: Path, args: argparse.Namespace) -> tuple[Proc, Path]:
    config = work / "pacsnode.yaml"
    db = work / "index.db"
    config.write_text(
        yaml.safe_dump(
            {
                "node": {
                    "ae_title": NODE_AET,
                    "port": NODE_PORT,
                    "acceptor_processes": 1,
                    "timeouts": {"shutdown_grace": 5},
                },
                "storage": {
                    "root": str(work / "store"),
                    "database_url": f"sqlite:///{db}",
                    "min_free_bytes": 0,
                    "fsync": True,
                },
                "remote_nodes": {"DEST": {"ae_title": DEST_AET, "host": "127.0.0.1", "port": DEST_PORT}},
                "analysis": {
                    "workers": 1,
                    "quiet_seconds": args.quiet_seconds,
                    "scan_interval_seconds": args.scan_interval,
                    "rules": [
                        {"name": "lung", "pipeline": "ct-lung", "match": {"modality": ["CT"]}, "destinations": ["DEST"]}
                    ],
                },
                "export": {"poll_seconds": 0.2},
                "logging": {"level": "INFO"},
            }
        )
    )
    proc = Proc(
        "pacsnode serve",
        [sys.executable, "-m", "pacsnode.node", "--config", str(config), "serve"],
        work / "serve.log",
        cwd=REPO,
    )
    proc.wait_listening(NODE_PORT)
    return proc, db


# ------------------------------------------------------------------ the study


@dataclass(frozen=True)
class Study:
    study_uid: str
    series_uid: str
    paths: list[Path]


def _write_phantom(out: Path, slices: int, size: int) -> tuple[Study, float]:
    from pacsnode.analysis.modeldev.synthetic import BENCHMARK_PHANTOM, write_chest_ct

    spec = replace(BENCHMARK_PHANTOM, slices=slices, size=size, slice_thickness_mm=_STACK_MM / slices)
    truth = write_chest_ct(out, spec, seed=1)
    return Study(truth.study_instance_uid, truth.series_instance_uid, list(truth.paths)), truth.total_volume_ml


def _relabel(source: Study, out: Path) -> Study:
    """A copy of the study with new Study, Series, Frame of Reference and SOP Instance UIDs."""
    out.mkdir(parents=True)
    study_uid, series_uid, frame_uid = generate_uid(), generate_uid(), generate_uid()
    paths = []
    for path in source.paths:
        ds = pydicom.dcmread(path)
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, frame_uid
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        target = out / path.name
        ds.save_as(target)
        paths.append(target)
    return Study(study_uid, series_uid, paths)


def _push(study: Study) -> float:
    start = time.perf_counter()
    result = subprocess.run(
        [
            require_tool("storescu"),
            "-aec",
            NODE_AET,
            "-aet",
            "BENCH",
            "127.0.0.1",
            str(NODE_PORT),
            *map(str, study.paths),
        ],
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        timeout=_RUN_TIMEOUT_S,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"storescu failed: {result.stderr.decode(errors='replace')[-1000:]}")
    return time.perf_counter() - start


# ------------------------------------------------------------------ the index


def _epoch(value: str | None) -> float:
    """A naive-UTC index timestamp as seconds since the epoch."""
    if value is None:
        raise ValueError("timestamp missing")
    return datetime.fromisoformat(value).replace(tzinfo=UTC).timestamp()


class Index:
    """Read-only view of the node's SQLite index."""

    def __init__(self, db: Path) -> None:
        self.conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
        self.conn.row_factory = sqlite3.Row

    def close(self) -> None:
        self.conn.close()

    def jobs(self, series_uid: str) -> list[sqlite3.Row]:
        return self.conn.execute(
            "SELECT * FROM jobs WHERE series_instance_uid = ? ORDER BY id", (series_uid,)
        ).fetchall()

    def exports(self, job_id: int) -> list[sqlite3.Row]:
        return self.conn.execute("SELECT * FROM exports WHERE job_id = ?", (job_id,)).fetchall()

    def received(self, series_uid: str) -> tuple[int, float]:
        """(instances, newest received_at) of a series."""
        row = self.conn.execute(
            "SELECT COUNT(*) AS n, MAX(i.received_at) AS last FROM instances i JOIN series s ON i.series_fk = s.id "
            "WHERE s.series_instance_uid = ?",
            (series_uid,),
        ).fetchone()
        return int(row["n"]), _epoch(row["last"])


def _wait_done(
    index: Index, study: Study, node: Proc, timeout: float = _RUN_TIMEOUT_S
) -> tuple[sqlite3.Row, list[sqlite3.Row]]:
    """Wait for the series' job to be done and its 5 exports sent; return them."""
    deadline = time.monotonic() + timeout
    while True:
        jobs = index.jobs(study.series_uid)
        if jobs:
            job = jobs[-1]
            if job["state"] == "failed":
                raise RuntimeError(f"job {job['id']} failed: {job['last_error']}\n{node.tail()}")
            if job["state"] == "done":
                exports = index.exports(job["id"])
                dead = [e for e in exports if e["state"] == "dead"]
                if dead:
                    raise RuntimeError(f"export dead: {dead[0]['last_error']}\n{node.tail()}")
                if len(exports) >= 5 and all(e["state"] == "done" for e in exports):
                    return job, exports
        if node.proc.poll() is not None:
            raise RuntimeError(f"pacsnode serve exited with {node.proc.returncode}\n{node.tail()}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:.0f} s waiting for the job and its exports\n{node.tail()}")
        time.sleep(0.1)


# ------------------------------------------------------------------ one run


@dataclass
class Run:
    push_s: float
    push_lag_s: float  # storescu exit - last received_at
    total_s: float
    sched_s: float
    scan_s: float
    claim_s: float
    job_s: float
    decode_s: float
    segment_s: float
    write_s: float
    store_s: float
    other_s: float
    export_s: float
    export_db_s: float
    jobs: int
    volume_ml: float


def _results_at(dest: Path, before: set[str], study_uid: str) -> dict[str, float]:
    """Class name -> mtime of the new files storescp wrote for the study (several per class: the newest)."""
    found: Counter[str] = Counter()
    newest: dict[str, float] = {}
    for path in dest.iterdir():
        if path.name in before or not path.is_file():
            continue
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        if str(ds.StudyInstanceUID) != study_uid:
            continue
        name = _CLASS_NAMES.get(str(ds.SOPClassUID), str(ds.SOPClassUID))
        found[name] += 1
        newest[name] = max(newest.get(name, 0.0), path.stat().st_mtime_ns / 1e9)
    if found != EXPECTED:
        raise RuntimeError(f"the destination holds {dict(found)} for the study, expected {dict(EXPECTED)}")
    return newest


def _one_run(study: Study, index: Index, node: Proc, dest: Path, dest_log: Path, quiet_s: float) -> Run:
    before = {p.name for p in dest.iterdir()}
    requests_before = dest_log.read_text(errors="replace").count("Received Store Request")
    push_s = _push(study)
    push_end = time.time()
    job, exports = _wait_done(index, study, node)
    # storescp logs each request, then writes the file, then answers: wait for its 5 files to be complete.
    deadline = time.monotonic() + 60
    while dest_log.read_text(errors="replace").count("Received Store Request") < requests_before + 5:
        if time.monotonic() > deadline:
            raise RuntimeError("storescp did not log 5 store requests")
        time.sleep(0.1)
    acked = max(_results_at(dest, before, study.study_uid).values())

    count, last = index.received(study.series_uid)
    if count != len(study.paths):
        raise RuntimeError(f"the node indexed {count} of {len(study.paths)} instances")
    jobs = index.jobs(study.series_uid)
    result = json.loads(job["result"])
    if result["slices"] != len(study.paths):
        raise RuntimeError(
            f"the job analysed {result['slices']} of {len(study.paths)} slices (the quiet time passed during the push?)"
        )
    timings = result["timings"]
    created, started, finished = _epoch(job["created_at"]), _epoch(job["started_at"]), _epoch(job["finished_at"])
    sent = max(_epoch(e["sent_at"]) for e in exports)
    quiet_end = last + quiet_s
    job_s = finished - started
    steps = (timings["decode_hu_s"], timings["segment_measure_s"], timings["write_s"], timings["store_s"])
    return Run(
        push_s=push_s,
        push_lag_s=push_end - last,
        total_s=acked - quiet_end,
        sched_s=started - quiet_end,
        scan_s=created - quiet_end,
        claim_s=started - created,
        job_s=job_s,
        decode_s=steps[0],
        segment_s=steps[1],
        write_s=steps[2],
        store_s=steps[3],
        other_s=job_s - sum(steps),
        export_s=acked - finished,
        export_db_s=sent - finished,
        jobs=len(jobs),
        volume_ml=float(result["total_lung_volume_ml"]),
    )


def _clear_results(dest: Path, before: set[str]) -> None:
    for path in dest.iterdir():
        if path.name not in before:
            path.unlink()


# ------------------------------------------------------------------ report

_COLUMNS = (
    ("total", "total_s"),
    ("sched", "sched_s"),
    ("scan", "scan_s"),
    ("claim", "claim_s"),
    ("job", "job_s"),
    ("decode", "decode_s"),
    ("segment", "segment_s"),
    ("write", "write_s"),
    ("store", "store_s"),
    ("other", "other_s"),
    ("export", "export_s"),
    ("exp(db)", "export_db_s"),
)


def _print_table(runs: list[Run]) -> None:
    head = f"{'run':>6s} | " + " ".join(f"{name:>7s}" for name, _ in _COLUMNS)
    print(head)
    print("-" * len(head))
    for i, run in enumerate(runs, 1):
        print(f"{i:>6d} | " + " ".join(f"{getattr(run, key):7.2f}" for _, key in _COLUMNS))
    print("-" * len(head))
    print(
        f"{'median':>6s} | "
        + " ".join(f"{statistics.median(getattr(r, key) for r in runs):7.2f}" for _, key in _COLUMNS)
    )


def _print_steps(runs: list[Run], quiet_s: float) -> None:
    med = {key: statistics.median(getattr(r, key) for r in runs) for _, key in _COLUMNS}
    total = med["total_s"]
    rows = [
        ("scheduling delay (quiet end -> job start)", med["sched_s"]),
        ("  scheduler pass (quiet end -> job queued)", med["scan_s"]),
        ("  worker claim (job queued -> job start)", med["claim_s"]),
        ("decode + HU", med["decode_s"]),
        ("segment + measure", med["segment_s"]),
        ("write SEG/SR/SC", med["write_s"]),
        ("store results in the archive", med["store_s"]),
        ("other job work", med["other_s"]),
        ("export (job done -> last result acknowledged)", med["export_s"]),
    ]
    print(f"\nPer-step medians (s; quiet time of {quiet_s:g} s excluded; share of the median total)")
    for name, value in rows:
        share = "" if name.startswith("  ") else f"{100 * value / total:5.1f}%" if total > 0 else ""
        print(f"  {name:54s} {value:7.3f}  {share}")
    print(f"  {'total (last instance received -> all 5 acknowledged)':54s} {total:7.3f}")
    print("  (each line is its own median over the runs, so the lines need not add up to the median total)")


# ------------------------------------------------------------------ main


def _run(args: argparse.Namespace) -> None:
    base = Path(tempfile.mkdtemp(prefix="pacsnode-bench-pipeline-", dir=args.workdir))
    procs: list[Proc] = []
    index: Index | None = None
    try:
        print(
            f"Writing the phantom: {args.slices} slices of {args.size}x{args.size}, "
            f"{_STACK_MM / args.slices:g} mm apart ...",
            flush=True,
        )
        t = time.perf_counter()
        phantom, truth_ml = _write_phantom(base / "phantom", args.slices, args.size)
        write_s = time.perf_counter() - t
        size_mb = sum(p.stat().st_size for p in phantom.paths) / 1e6
        print(
            f"  written in {write_s:.1f} s ({size_mb:.0f} MB; true lung volume {truth_ml:.0f} mL); "
            "not part of the figures",
            flush=True,
        )

        storescp, dest = _start_storescp(base)
        procs.append(storescp)
        node, db = _start_node(base, args)
        procs.append(node)
        index = Index(db)

        if args.warmup:
            from pacsnode.analysis.modeldev.synthetic import PhantomSpec, write_chest_ct

            truth = write_chest_ct(base / "warmup", PhantomSpec(slices=40, size=128, slice_thickness_mm=7.5), seed=2)
            warm = Study(truth.study_instance_uid, truth.series_instance_uid, list(truth.paths))
            print("Warm-up: a 40-slice 128x128 study through the whole path (untimed) ...", flush=True)
            before = {p.name for p in dest.iterdir()}
            _one_run(warm, index, node, dest, storescp.log, args.quiet_seconds)
            _clear_results(dest, before)
            shutil.rmtree(base / "warmup")

        runs: list[Run] = []
        relabel_s: list[float] = []
        for i in range(1, args.runs + 1):
            t = time.perf_counter()
            study = _relabel(phantom, base / f"run-{i}")
            relabel_s.append(time.perf_counter() - t)
            before = {p.name for p in dest.iterdir()}
            run = _one_run(study, index, node, dest, storescp.log, args.quiet_seconds)
            runs.append(run)
            _clear_results(dest, before)
            shutil.rmtree(base / f"run-{i}")
            print(
                f"  run {i}: push {run.push_s:.1f} s ({len(study.paths) / run.push_s:.0f} inst/s), "
                f"then total {run.total_s:.2f} s beyond the quiet time "
                f"(job {run.job_s:.2f} s, lung volume {run.volume_ml:.0f} mL)",
                flush=True,
            )
    finally:
        if index is not None:
            index.close()
        for proc in reversed(procs):
            proc.stop()
        shutil.rmtree(base, ignore_errors=True)

    print(
        f"\nAnalysis pipeline, {args.slices}-slice {args.size}x{args.size} CT ({size_mb:.0f} MB, "
        f"{len(phantom.paths)} files), {len(runs)} run(s), one node throughout"
        f"{', warmed up' if args.warmup else ', cold first run'}"
    )
    print(
        f"quiet_seconds {args.quiet_seconds:g}, scan_interval_seconds {args.scan_interval:g}, "
        "export poll_seconds 0.2, analysis.workers 1, SQLite index, fsync on; destination DCMTK storescp"
    )
    print(
        "Seconds from the last instance received (its received_at in the index) to the last of the 5 results "
        "(SEG, SR, 3 SC) written by storescp, minus the quiet time:"
    )
    _print_table(runs)
    _print_steps(runs, args.quiet_seconds)
    print(
        f"\nNot in the figures: phantom written in {write_s:.1f} s; re-labelled (new UIDs) in "
        f"{statistics.median(relabel_s):.2f} s per run; pushed by storescu in {statistics.median(r.push_s for r in runs):.1f} s "
        f"(median, {len(phantom.paths) / statistics.median(r.push_s for r in runs):.0f} inst/s); "
        f"storescu exited {statistics.median(r.push_lag_s for r in runs):.3f} s after the last received_at."
    )
    extra = [r.jobs for r in runs if r.jobs != 1]
    if extra:
        print(
            f"WARNING: {len(extra)} run(s) queued more than one job for the series (the quiet time ran out "
            "during the push): raise --quiet-seconds"
        )
    print("Absolute figures only: no other tool here runs this pipeline, so there is no peer to compare with.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1 run of a 120-slice 256x256 CT")
    parser.add_argument("--runs", type=int, default=None, help="runs (default 3; --quick 1)")
    parser.add_argument("--slices", type=int, default=None, help="slices (default 300; --quick 120)")
    parser.add_argument("--size", type=int, default=None, help="rows = columns (default 512; --quick 256)")
    parser.add_argument("--quiet-seconds", type=float, default=2.0, help="analysis.quiet_seconds (default 2)")
    parser.add_argument("--scan-interval", type=float, default=0.2, help="analysis.scan_interval_seconds (default 0.2)")
    parser.add_argument(
        "--no-warmup",
        dest="warmup",
        action="store_false",
        help="skip the untimed warm-up study: the first run then includes loading the pipeline",
    )
    parser.add_argument("--workdir", default=None, help="where the phantom, index and store go (default: system temp)")
    args = parser.parse_args()
    args.runs = args.runs or (1 if args.quick else 3)
    args.slices = args.slices or (120 if args.quick else 300)
    args.size = args.size or (256 if args.quick else 512)
    if args.slices < 30 or args.size < 64 or args.runs < 1:
        parser.error("need at least 1 run of 30 slices of 64x64")
    if args.workdir is not None:  # the re-run below starts in REPO: pass the folder absolute
        args.workdir = str(Path(args.workdir).resolve())
        rest, skip = [], False
        for arg in sys.argv[1:]:
            if skip or arg.startswith("--workdir="):
                skip = False
                continue
            if arg == "--workdir":
                skip = True
                continue
            rest.append(arg)
        sys.argv = [sys.argv[0], *rest, f"--workdir={args.workdir}"]
    os.chdir(REPO)  # the private-namespace re-run is `python -m bench.pipeline`
    enter_private_netns("bench.pipeline", ("storescu", "storescp"))
    _run(args)


if __name__ == "__main__":
    main()
