"""C-FIND benchmark: pacsnode against Orthanc, both filled with the same index, same run.

Usage (as root; the run moves itself into a private network namespace, so every
server binds loopback only and nothing leaves the machine)::

    .venv/bin/python -m bench.query                 # 2,000 patients, 5,000 studies, 100,000 instances
    .venv/bin/python -m bench.query --quick         # 100 / 250 / 5,000: a smoke run of a few minutes
    .venv/bin/python -m bench.query --keep          # leave the filled stores in --workdir

What it does
------------
1. Generates a deterministic hierarchy (``--seed``): patients named
   ``SURNAME^GIVEN``, studies spread over 2015-2025 with unique accession
   numbers, 1-4 series per study (CT, MR, CR, DX, US, PT+CT, MG, NM) and
   instances spread over the series so that their total is ``--instances``.
2. Fills pacsnode: every study but the first ``--real-files`` instances' worth
   goes straight into the index with :func:`pacsnode.storage.index.add_instance` (rows
   whose ``file_path`` is a placeholder: C-FIND never reads files); the rest are
   written as small real files and pushed over DICOM with DCMTK ``storescu``
   to the running node.
3. Fills Orthanc (the Debian package, default SQLite index, default
   ``StorageAccessOnFind``) with the same data: Orthanc has no row import, so
   every instance is written as a small file (same attributes and UIDs, 8x8
   pixels) and pushed with parallel ``storescu`` processes.
4. Times five C-FIND queries (Study Root) on each server:

   ============  =====================================================
   study-name    STUDY level, PatientName ``SURNAME*`` (~20-60 studies)
   study-date    STUDY level, StudyDate range of a few weeks (~40)
   study-acc     STUDY level, one AccessionNumber (1)
   series        SERIES level, every series of one study (2-4)
   image         IMAGE level, every instance of one series (~50)
   ============  =====================================================

   The first run of each query on each server is an untimed warm-up whose
   answers are compared: the UID sets of both servers must be equal and match
   the generator's count, and values that differ on common keys are listed.
   Then each query runs ``--repeat`` times per server, the servers interleaved
   (the order flips every round), in three ways, one table each:

   * pynetdicom requestor, one association kept for every repetition,
     TCP_NODELAY on its socket: what a Python client sees;
   * a bare-socket requestor (hand-built PDUs, responses counted by their
     Status, identifiers not decoded), one association kept: the server's own
     time. pynetdicom costs about 0.3-0.5 ms of client CPU per pending
     response, which roughly doubles a 50-match answer from a fast server;
   * pynetdicom with a fresh association per query (associate, C-FIND,
     release; ``--fresh-repeat`` times), as a one-shot client such as
     ``findscu`` sees it, plus a line for associate + release alone.

Printed: fill times, then per query and table the matches of each server,
median and p90 in milliseconds, the ratio pacsnode/Orthanc (lower is better)
and two verdicts: ``<50ms`` (pacsnode's median below 50 ms, judged for answers
of at most 100 matches) and ``vs Orthanc`` (pacsnode's median no worse than
Orthanc's). The requested return keys are those of a viewer's study list
(with ModalitiesInStudy and the NumberOf...Related... counts); both servers get
the same identifiers. With ``--keep`` the indexes, stores, logs
(``pacsnode.log``, ``orthanc.log``) and files stay in ``--workdir/run-PID``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import date, timedelta
from fnmatch import fnmatchcase
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import yaml
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom import _config as pynetdicom_config
from pynetdicom.association import Association
from pynetdicom.dsutils import encode
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind

from pacsnode.node.dicom.handlers import set_nodelay
from pacsnode.node.testing.corpus import UID_PREFIX, make_dataset
from pacsnode.node.testing.netns import (
    enter_private_netns,
    require_tool,
    stop_process,
    wait_port,
)
from pacsnode.storage.db import make_engine, migrate
from pacsnode.storage.index import InstanceMeta, add_instance

REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "TCP_NODELAY": "1"}
_UID_ROOT = f"{UID_PREFIX}7."
_TARGET_MS = 50.0
_ROWS_PER_TRANSACTION = 5000
_FILES_PER_STORESCU = 1000
_ASSOC_ONLY = "(assoc)"

_SURNAMES = (
    "ADAMS ALLEN BAKER BARNES BELL BENNETT BROOKS BROWN BRYANT BUTLER CAMPBELL CARTER CLARK COLEMAN COLLINS "
    "COOK COOPER COX DAVIS DIAZ EDWARDS EVANS FISHER FLORES FOSTER GARCIA GONZALEZ GRAHAM GRAY GREEN "
    "GRIFFIN HALL HARRIS HAYES HENDERSON HILL HOWARD HUGHES JACKSON JAMES JENKINS JOHNSON JONES KELLY KING "
    "LEE LEWIS LONG LOPEZ MARTIN MARTINEZ MILLER MITCHELL MOORE MORGAN MORRIS MURPHY NELSON NGUYEN OKAFOR "
    "ORTIZ PARKER PATEL PERRY PETERSON PHILLIPS POWELL PRICE RAMIREZ REED REYES RICHARDSON RIVERA ROBERTS "
    "ROBINSON RODRIGUEZ ROGERS ROSS RUSSELL SANCHEZ SANDERS SCOTT SIMMONS SMITH STEWART SULLIVAN TAYLOR "
    "THOMAS THOMPSON TORRES TURNER WALKER WARD WASHINGTON WATSON WHITE WILLIAMS WILSON WOOD WRIGHT YOUNG"
).split()
_GIVEN = (
    "AMELIA ANNA ARTHUR BEN CARLA CHLOE DANIEL DAVID ELENA EMMA ERIC FATIMA GEORGE GRACE HANNAH HUGO IRIS "
    "ISAAC JACK JULIA KAREN KEVIN LAURA LEO LUCY MARIA MARK NINA NOAH OLIVIA OSCAR PAUL PETER RACHEL "
    "RUTH SAM SARA SOFIA THOMAS VICTOR"
).split()

# modality: (SOP Class UID, relative instances per series)
_SERIES_KINDS: dict[str, tuple[str, float]] = {
    "CT": ("1.2.840.10008.5.1.4.1.1.2", 60.0),
    "MR": ("1.2.840.10008.5.1.4.1.1.4", 30.0),
    "CR": ("1.2.840.10008.5.1.4.1.1.1", 1.5),
    "DX": ("1.2.840.10008.5.1.4.1.1.1.1", 1.5),
    "US": ("1.2.840.10008.5.1.4.1.1.6.1", 8.0),
    "PT": ("1.2.840.10008.5.1.4.1.1.128", 60.0),
    "MG": ("1.2.840.10008.5.1.4.1.1.1.2", 1.0),
    "NM": ("1.2.840.10008.5.1.4.1.1.20", 4.0),
}
# study profile: (weight, series modalities cycled over the study's series, descriptions, body parts)
_STUDY_PROFILES: tuple[tuple[float, tuple[str, ...], tuple[str, ...], tuple[str, ...]], ...] = (
    (30, ("CT",), ("CT CHEST", "CT ABDOMEN PELVIS", "CT HEAD"), ("CHEST", "ABDOMEN", "HEAD")),
    (20, ("MR",), ("MR BRAIN", "MR KNEE", "MR SPINE"), ("BRAIN", "KNEE", "LSPINE")),
    (20, ("CR",), ("XR CHEST 2 VIEWS", "XR HAND"), ("CHEST", "HAND")),
    (10, ("DX",), ("XR KNEE", "XR PELVIS"), ("KNEE", "PELVIS")),
    (8, ("US",), ("US ABDOMEN", "US THYROID"), ("ABDOMEN", "NECK")),
    (5, ("PT", "CT"), ("PET CT WHOLE BODY",), ("WHOLEBODY",)),
    (5, ("MG",), ("MAMMO SCREENING",), ("BREAST",)),
    (2, ("NM",), ("NM BONE SCAN",), ("WHOLEBODY",)),
)


@dataclass(frozen=True, kw_only=True)
class PatientRec:
    patient_id: str
    patient_name: str
    birth_date: str
    sex: str


@dataclass(frozen=True, kw_only=True)
class SeriesRec:
    series_instance_uid: str
    modality: str
    sop_class_uid: str
    series_number: int
    series_description: str
    body_part: str
    num_instances: int

    def sop_instance_uid(self, number: int) -> str:
        return f"{self.series_instance_uid}.{number}"


@dataclass(frozen=True, kw_only=True)
class StudyRec:
    patient: PatientRec
    study_instance_uid: str
    study_date: str
    study_time: str
    accession_number: str
    study_id: str
    study_description: str
    referring_physician_name: str
    series: tuple[SeriesRec, ...]

    @property
    def num_instances(self) -> int:
        return sum(s.num_instances for s in self.series)


@dataclass(frozen=True, kw_only=True)
class Query:
    name: str
    level: str
    identifier: Dataset
    answer_key: str  # the unique key of the answers (their set is compared)
    expected: int
    note: str


# --------------------------------------------------------------------------------------------- data


def generate(*, patients: int, studies: int, instances: int, seed: int) -> list[StudyRec]:
    """The whole hierarchy, deterministic for its arguments."""
    if not 0 < patients <= studies:
        raise SystemExit("need 0 < --patients <= --studies")
    rng = random.Random(seed)
    people = []
    for p in range(patients):
        name = f"{rng.choice(_SURNAMES)}^{rng.choice(_GIVEN)}"
        if rng.random() < 0.3:
            name += f"^{chr(65 + rng.randrange(26))}"
        birth = date(1930, 1, 1) + timedelta(days=rng.randrange(90 * 365))
        people.append(
            PatientRec(
                patient_id=f"P{seed:02d}{p + 1:07d}",
                patient_name=name,
                birth_date=birth.strftime("%Y%m%d"),
                sex=rng.choice("MF"),
            )
        )
    owners = list(range(patients)) + [rng.randrange(patients) for _ in range(studies - patients)]
    rng.shuffle(owners)
    first_day, span_days = date(2015, 1, 1), 11 * 365
    weights = [p[0] for p in _STUDY_PROFILES]
    shapes: list[tuple[int, tuple[str, ...], str, str, list[float]]] = []
    for s in range(studies):
        _, modalities, descriptions, parts = rng.choices(_STUDY_PROFILES, weights)[0]
        k = rng.randrange(len(descriptions))
        count = rng.randint(1, 4)
        sizes = [_SERIES_KINDS[modalities[i % len(modalities)]][1] * rng.lognormvariate(0, 0.8) for i in range(count)]
        shapes.append((owners[s], modalities, descriptions[k], parts[min(k, len(parts) - 1)], sizes))
    counts = _apportion([w for shape in shapes for w in shape[4]], instances)

    out: list[StudyRec] = []
    pos = 0
    for s, (owner, modalities, description, part, sizes) in enumerate(shapes):
        study_uid = f"{_UID_ROOT}{seed}.{s + 1}"
        series = []
        for i in range(len(sizes)):
            modality = modalities[i % len(modalities)]
            series.append(
                SeriesRec(
                    series_instance_uid=f"{study_uid}.{i + 1}",
                    modality=modality,
                    sop_class_uid=_SERIES_KINDS[modality][0],
                    series_number=i + 1,
                    series_description=f"{description} {modality} {i + 1}",
                    body_part=part,
                    num_instances=counts[pos + i],
                )
            )
        pos += len(sizes)
        day = first_day + timedelta(days=rng.randrange(span_days))
        out.append(
            StudyRec(
                patient=people[owner],
                study_instance_uid=study_uid,
                study_date=day.strftime("%Y%m%d"),
                study_time=f"{rng.randrange(7, 20):02d}{rng.randrange(60):02d}{rng.randrange(60):02d}",
                accession_number=f"A{seed:02d}{s + 1:08d}",
                study_id=str(s + 1),
                study_description=description,
                referring_physician_name=f"DR^{rng.choice(_SURNAMES)}",
                series=tuple(series),
            )
        )
    return out


def _apportion(weights: Sequence[float], total: int) -> list[int]:
    """Integers >= 1 proportional to ``weights`` that sum to ``total``."""
    n = len(weights)
    if total < n:
        raise SystemExit(f"--instances {total} is fewer than the {n} series generated: raise it")
    scale = (total - n) / sum(weights)
    counts = [1 + int(w * scale) for w in weights]
    rest = total - sum(counts)
    by_fraction = sorted(range(n), key=lambda i: (w := weights[i] * scale) - int(w), reverse=True)
    for i in by_fraction[:rest]:
        counts[i] += 1
    return counts


def _meta(study: StudyRec, series: SeriesRec, number: int) -> InstanceMeta:
    p = study.patient
    return InstanceMeta(
        sop_class_uid=series.sop_class_uid,
        sop_instance_uid=series.sop_instance_uid(number),
        study_instance_uid=study.study_instance_uid,
        series_instance_uid=series.series_instance_uid,
        transfer_syntax_uid=ExplicitVRLittleEndian,
        specific_character_set="ISO_IR 100",
        patient_id=p.patient_id,
        patient_name=p.patient_name,
        patient_birth_date=p.birth_date,
        patient_sex=p.sex,
        study_date=study.study_date,
        study_time=study.study_time,
        accession_number=study.accession_number,
        study_id=study.study_id,
        study_description=study.study_description,
        referring_physician_name=study.referring_physician_name,
        modality=series.modality,
        series_number=series.series_number,
        series_description=series.series_description,
        body_part_examined=series.body_part,
        instance_number=number,
    )


def _iter_meta(studies: Sequence[StudyRec]) -> Iterator[InstanceMeta]:
    for study in studies:
        for series in study.series:
            for number in range(1, series.num_instances + 1):
                yield _meta(study, series, number)


def _write_files(args: tuple[Path, Sequence[StudyRec]]) -> list[Path]:
    """Small files (8x8 pixels) carrying exactly the generated attributes."""
    directory, studies = args
    directory.mkdir(parents=True, exist_ok=True)
    ds = make_dataset(rows=8, columns=8)
    paths = []
    for meta in _iter_meta(studies):
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = meta.sop_class_uid
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = meta.sop_instance_uid
        ds.StudyInstanceUID = meta.study_instance_uid
        ds.SeriesInstanceUID = meta.series_instance_uid
        ds.PatientID = meta.patient_id
        ds.PatientName = meta.patient_name
        ds.PatientBirthDate = meta.patient_birth_date
        ds.PatientSex = meta.patient_sex
        ds.StudyDate = ds.SeriesDate = meta.study_date
        ds.StudyTime = meta.study_time
        ds.AccessionNumber = meta.accession_number
        ds.StudyID = meta.study_id
        ds.StudyDescription = meta.study_description
        ds.ReferringPhysicianName = meta.referring_physician_name
        ds.Modality = meta.modality
        ds.SeriesNumber = meta.series_number
        ds.SeriesDescription = meta.series_description
        ds.BodyPartExamined = meta.body_part_examined
        ds.InstanceNumber = meta.instance_number
        ds.ImagePositionPatient = [0.0, 0.0, float(meta.instance_number or 0)]
        path = directory / f"{meta.sop_instance_uid[len(_UID_ROOT) :]}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def write_files(directory: Path, studies: Sequence[StudyRec], workers: int) -> list[Path]:
    """Write the studies' instances as files, ``workers`` processes in parallel."""
    chunk = max(1, len(studies) // (workers * 8))
    jobs = [(directory / f"{i // chunk:04d}", studies[i : i + chunk]) for i in range(0, len(studies), chunk)]
    with ProcessPoolExecutor(workers, mp_context=get_context("fork")) as pool:
        return [path for paths in pool.map(_write_files, jobs) for path in paths]


# -------------------------------------------------------------------------------------------- queries


def choose_queries(studies: Sequence[StudyRec], seed: int) -> list[Query]:
    """Five queries whose answers have at most 100 matches, with their expected counts."""
    rng = random.Random(seed + 1)

    by_surname: dict[str, int] = {}
    for s in studies:
        surname = s.patient.patient_name.split("^")[0]
        by_surname[surname] = by_surname.get(surname, 0) + 1
    # a surname no other surname starts with, whose study count is nearest 40
    candidates = [n for n in by_surname if not any(o != n and o.startswith(n) for o in by_surname)]
    surname = min(sorted(candidates), key=lambda n: (abs(by_surname[n] - 40), n))
    pattern = f"{surname}*"
    name_hits = sum(fnmatchcase(s.patient.patient_name, pattern) for s in studies)

    dates = sorted(s.study_date for s in studies)
    first, last = date.fromisoformat(dates[0]), date.fromisoformat(dates[-1])
    span = max(1, round(40 * ((last - first).days + 1) / len(studies)))
    start = first + timedelta(days=rng.randrange(max(1, (last - first).days - span)))
    low, high = start.strftime("%Y%m%d"), (start + timedelta(days=span - 1)).strftime("%Y%m%d")
    date_hits = sum(low <= s.study_date <= high for s in studies)

    accession_study = studies[rng.randrange(len(studies))]
    multi = [s for s in studies if len(s.series) >= 3]
    series_study = rng.choice(multi or list(studies))
    every_series = [(st, se) for st in studies for se in st.series if se.num_instances <= 100]
    image_study, image_series = min(
        every_series, key=lambda x: (abs(x[1].num_instances - 50), x[1].series_instance_uid)
    )

    def study_keys(**match: str) -> Dataset:
        ds = _identifier(
            "STUDY",
            [
                "PatientName",
                "PatientID",
                "PatientBirthDate",
                "PatientSex",
                "StudyDate",
                "StudyTime",
                "AccessionNumber",
                "StudyID",
                "StudyDescription",
                "StudyInstanceUID",
                "ModalitiesInStudy",
                "NumberOfStudyRelatedSeries",
                "NumberOfStudyRelatedInstances",
            ],
        )
        for keyword, value in match.items():
            setattr(ds, keyword, value)
        return ds

    series_ds = _identifier(
        "SERIES",
        [
            "StudyInstanceUID",
            "SeriesInstanceUID",
            "Modality",
            "SeriesNumber",
            "SeriesDescription",
            "BodyPartExamined",
            "NumberOfSeriesRelatedInstances",
        ],
    )
    series_ds.StudyInstanceUID = series_study.study_instance_uid
    image_ds = _identifier(
        "IMAGE", ["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID", "InstanceNumber"]
    )
    image_ds.StudyInstanceUID = image_study.study_instance_uid
    image_ds.SeriesInstanceUID = image_series.series_instance_uid
    return [
        Query(
            name="study-name",
            level="STUDY",
            identifier=study_keys(PatientName=pattern),
            answer_key="StudyInstanceUID",
            expected=name_hits,
            note=f"PatientName={pattern}",
        ),
        Query(
            name="study-date",
            level="STUDY",
            identifier=study_keys(StudyDate=f"{low}-{high}"),
            answer_key="StudyInstanceUID",
            expected=date_hits,
            note=f"StudyDate={low}-{high}",
        ),
        Query(
            name="study-acc",
            level="STUDY",
            identifier=study_keys(AccessionNumber=accession_study.accession_number),
            answer_key="StudyInstanceUID",
            expected=1,
            note=f"AccessionNumber={accession_study.accession_number}",
        ),
        Query(
            name="series",
            level="SERIES",
            identifier=series_ds,
            answer_key="SeriesInstanceUID",
            expected=len(series_study.series),
            note="StudyInstanceUID=<one study>",
        ),
        Query(
            name="image",
            level="IMAGE",
            identifier=image_ds,
            answer_key="SOPInstanceUID",
            expected=image_series.num_instances,
            note="StudyInstanceUID+SeriesInstanceUID=<one series>",
        ),
    ]


def _identifier(level: str, keywords: Sequence[str]) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for keyword in keywords:
        setattr(ds, keyword, "")
    return ds


# -------------------------------------------------------------------------------------------- servers


class Server:
    name = ""
    aet = ""
    port = 0
    proc: subprocess.Popen[bytes] | None = None

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)


class Pacsnode(Server):
    name, aet, port = "pacsnode", "PACSNODE", 11112

    def __init__(self, work: Path) -> None:
        self.work = work
        self.database_url = f"sqlite:///{work / 'index.db'}"

    def fill_rows(self, studies: Sequence[StudyRec]) -> int:
        """Index the studies' instances directly, without files; return how many."""
        engine = make_engine(self.database_url)
        migrate(engine)
        n = 0
        metas = _iter_meta(studies)
        try:
            while True:
                with engine.begin() as conn:
                    for meta in metas:
                        add_instance(
                            conn,
                            meta,
                            file_path=f"bench-rows/{meta.sop_instance_uid}.dcm",
                            file_size=0,
                            sha256="0" * 64,
                            calling_ae_title="BENCH",
                        )
                        n += 1
                        if n % _ROWS_PER_TRANSACTION == 0:
                            break
                    else:
                        return n
        finally:
            engine.dispose()

    def start(self) -> None:
        config = self.work / "pacsnode.yaml"
        config.write_text(
            yaml.safe_dump(
                {
                    "node": {"ae_title": self.aet, "port": self.port, "acceptor_processes": 2},
                    "storage": {
                        "root": str(self.work / "store"),
                        "database_url": self.database_url,
                        "min_free_bytes": 0,
                    },
                    "logging": {"level": "WARNING"},
                }
            )
        )
        with open(self.work / "pacsnode.log", "wb") as log:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "pacsnode.node", "--config", str(config), "serve"],
                cwd=REPO,
                env=ENV,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        wait_port(self.port)


class Orthanc(Server):
    name, aet, port = "orthanc", "ORTHANC", 11114

    def __init__(self, work: Path) -> None:
        self.work = work

    def start(self) -> None:
        cfg = self.work / "orthanc.json"
        cfg.write_text(
            json.dumps(
                {
                    "Name": "bench",
                    "StorageDirectory": str(self.work / "db"),
                    "IndexDirectory": str(self.work / "db"),
                    "DicomAet": self.aet,
                    "DicomPort": self.port,
                    "HttpPort": 18042,
                    "RemoteAccessAllowed": False,
                    "DicomCheckCalledAet": False,
                    "Plugins": [],
                    "DicomAlwaysAllowStore": True,
                    "DicomAlwaysAllowFind": True,
                    "DicomScpTimeout": 600,
                    "AuthenticationEnabled": False,
                    "SaveJobs": False,
                }
            )
        )
        with open(self.work / "orthanc.log", "wb") as log:
            self.proc = subprocess.Popen(["Orthanc", str(cfg)], env=ENV, stdout=log, stderr=subprocess.STDOUT)
        wait_port(self.port)


def push(server: Server, files: Sequence[Path], senders: int) -> float:
    """C-STORE the files with ``senders`` storescu processes at a time; return seconds."""
    size = max(1, min(_FILES_PER_STORESCU, -(-len(files) // senders)))
    chunks = [files[i : i + size] for i in range(0, len(files), size)]

    def send(chunk: Sequence[Path]) -> None:
        p = subprocess.run(
            [require_tool("storescu"), "-aec", server.aet, "127.0.0.1", str(server.port), *map(str, chunk)],
            env=ENV,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            check=False,
        )
        if p.returncode != 0:
            raise RuntimeError(f"storescu to {server.name} failed: {p.stderr.decode()[-500:]}")

    start = time.perf_counter()
    with ThreadPoolExecutor(senders) as pool:
        list(pool.map(send, chunks))
    return time.perf_counter() - start


# --------------------------------------------------------------------------------------------- timing


class FindClient:
    """One Study Root C-FIND requestor per server."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.ae = AE(ae_title="BENCHSCU")
        self.ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
        self.ae.acse_timeout = self.ae.dimse_timeout = self.ae.network_timeout = 120
        self.assoc: Association | None = None

    def associate(self) -> Association:
        assoc = self.ae.associate(
            "127.0.0.1", self.server.port, ae_title=self.server.aet, evt_handlers=[(evt.EVT_CONN_OPEN, set_nodelay)]
        )
        if not assoc.is_established:
            raise RuntimeError(f"association with {self.server.name} failed")
        return assoc

    def find(self, query: Query, assoc: Association | None = None) -> tuple[float, list[Dataset]]:
        """Run one query on the kept association (or ``assoc``); return (seconds, answers)."""
        if assoc is None:
            if self.assoc is None or not self.assoc.is_established:
                self.assoc = self.associate()
            assoc = self.assoc
        answers = []
        start = time.perf_counter()
        for status, identifier in assoc.send_c_find(query.identifier, StudyRootQueryRetrieveInformationModelFind):
            code = getattr(status, "Status", None)
            if code in (0xFF00, 0xFF01):
                answers.append(identifier)
            elif code != 0x0000:
                raise RuntimeError(
                    f"{self.server.name}: C-FIND {query.name} ended with status {code if code is None else hex(code)}"
                )
        return time.perf_counter() - start, answers

    def find_fresh(self, query: Query) -> float:
        """Associate, run one query, release; return seconds."""
        start = time.perf_counter()
        assoc = self.associate()
        self.find(query, assoc)
        assoc.release()
        return time.perf_counter() - start

    def close(self) -> None:
        if self.assoc is not None and self.assoc.is_established:
            self.assoc.release()


class RawFindClient:
    """A bare-socket C-FIND requestor: the server's time with almost no client cost.

    pynetdicom spends about 0.3-0.5 ms of Python per pending response on the
    requestor side (PDU decoding, its state machine, dataset decoding), which
    roughly doubles the time of a 50-match answer from a fast server. This
    client sends the A-ASSOCIATE-RQ, the C-FIND-RQ and the A-RELEASE-RQ as
    hand-built PDUs (PS3.8 9.3) and only reads the Status of each response
    command; identifiers are received, counted and not decoded.
    """

    _SOP_CLASS = StudyRootQueryRetrieveInformationModelFind
    _TS = ExplicitVRLittleEndian
    _CONTEXT_ID = 1

    def __init__(self, server: Server) -> None:
        self.server = server
        self.sock: socket.socket | None = None
        self.reader: Any = None
        self.message_id = 0

    @staticmethod
    def _item(kind: int, payload: bytes) -> bytes:
        return struct.pack(">BxH", kind, len(payload)) + payload

    def associate(self) -> None:
        item = self._item
        context = item(
            0x20,
            bytes([self._CONTEXT_ID, 0, 0, 0]) + item(0x30, self._SOP_CLASS.encode()) + item(0x40, self._TS.encode()),
        )
        user = item(0x50, struct.pack(">BxHI", 0x51, 4, 1 << 20) + item(0x52, f"{UID_PREFIX}99".encode()))
        body = (
            struct.pack(">HH", 1, 0)
            + self.server.aet.ljust(16).encode()
            + b"BENCHRAW".ljust(16)
            + bytes(32)
            + item(0x10, b"1.2.840.10008.3.1.1.1")
            + context
            + user
        )
        self.sock = socket.create_connection(("127.0.0.1", self.server.port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.reader = self.sock.makefile("rb")
        self.sock.sendall(struct.pack(">BxI", 0x01, len(body)) + body)
        kind, body = self._read_pdu()
        if kind != 0x02:
            raise RuntimeError(f"{self.server.name}: association refused (PDU type {kind:#x})")
        pos = 68
        while pos < len(body):
            item_type, length = struct.unpack_from(">BxH", body, pos)
            if item_type == 0x21 and body[pos + 4] == self._CONTEXT_ID and body[pos + 6] != 0:
                raise RuntimeError(f"{self.server.name}: C-FIND context rejected (reason {body[pos + 6]})")
            pos += 4 + length

    def _read_pdu(self) -> tuple[int, bytes]:
        header = self.reader.read(6)
        if len(header) < 6:
            raise RuntimeError(f"{self.server.name}: connection closed")
        kind, length = struct.unpack(">BxI", header)
        return kind, self.reader.read(length)

    def _send_pdv(self, control: int, data: bytes) -> None:
        pdv = struct.pack(">IBB", len(data) + 2, self._CONTEXT_ID, control) + data
        assert self.sock is not None
        self.sock.sendall(struct.pack(">BxI", 0x04, len(pdv)) + pdv)

    def _command(self) -> bytes:
        self.message_id = self.message_id % 0xFFFF + 1
        uid = self._SOP_CLASS.encode()
        uid += b"\0" * (len(uid) % 2)
        elements = (
            struct.pack("<HHI", 0, 0x0002, len(uid))
            + uid
            + struct.pack("<HHIH", 0, 0x0100, 2, 0x0020)  # CommandField C-FIND-RQ
            + struct.pack("<HHIH", 0, 0x0110, 2, self.message_id)
            + struct.pack("<HHIH", 0, 0x0700, 2, 0)  # Priority MEDIUM
            + struct.pack("<HHIH", 0, 0x0800, 2, 0x0001)  # a data set follows
        )
        return struct.pack("<HHII", 0, 0, 4, len(elements)) + elements

    @staticmethod
    def _status(command: bytes) -> tuple[int, bool]:
        """(Status, whether a data set follows) of an Implicit VR LE command set."""
        pos, found, has_data = 0, -1, False
        while pos + 8 <= len(command):
            _, element, length = struct.unpack_from("<HHI", command, pos)
            if element == 0x0900:
                found = struct.unpack_from("<H", command, pos + 8)[0]
            elif element == 0x0800:
                has_data = struct.unpack_from("<H", command, pos + 8)[0] != 0x0101
            pos += 8 + length
        return found, has_data

    def find(self, query: Query) -> tuple[float, int]:
        """Run one query; return (seconds, matches)."""
        if self.sock is None:
            self.associate()
        identifier = encode(query.identifier, False, True) or b""
        start = time.perf_counter()
        self._send_pdv(0x03, self._command())
        self._send_pdv(0x02, identifier)
        matches, command = 0, b""
        while True:
            kind, body = self._read_pdu()
            if kind != 0x04:
                raise RuntimeError(f"{self.server.name}: unexpected PDU type {kind:#x} during C-FIND")
            pos = 0
            while pos < len(body):
                length, _, control = struct.unpack_from(">IBB", body, pos)
                if control & 0x01:
                    command += body[pos + 6 : pos + 4 + length]
                    if control & 0x02:
                        code, _ = self._status(command)
                        command = b""
                        if code in (0xFF00, 0xFF01):
                            matches += 1
                        elif code == 0x0000:
                            return time.perf_counter() - start, matches
                        else:
                            raise RuntimeError(f"{self.server.name}: C-FIND {query.name} ended with {code:#06x}")
                pos += 4 + length

    def close(self) -> None:
        if self.sock is None:
            return
        try:
            self.sock.sendall(struct.pack(">BxI", 0x05, 4) + bytes(4))
            while self._read_pdu()[0] not in (0x06, 0x07):
                pass
        except (OSError, RuntimeError):
            pass
        finally:
            self.reader.close()
            self.sock.close()
            self.sock = None


def _p90(values: Sequence[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(0.9 * (len(ordered) - 1)))]


Times = dict[tuple[str, str], list[float]]


@dataclass(frozen=True, kw_only=True)
class Measurements:
    matches: dict[tuple[str, str], int]
    kept: Times  # pynetdicom, one association
    raw: Times  # bare-socket client, one association
    fresh: Times  # pynetdicom, associate + find + release


def _rounds(repeat: int, servers: Sequence[Server]) -> Iterator[Server]:
    """The servers in turn, the order flipped every round."""
    for r in range(repeat):
        yield from (servers if r % 2 == 0 else list(reversed(servers)))


def measure(queries: Sequence[Query], servers: Sequence[Server], *, repeat: int, fresh_repeat: int) -> Measurements:
    """Time every query on every server, interleaved; check that the answers agree."""
    clients = {s.name: FindClient(s) for s in servers}
    matches: dict[tuple[str, str], int] = {}
    kept: Times = {}
    raw: Times = {}
    fresh: Times = {}
    try:
        for q in queries:
            by_server: dict[str, dict[str, Dataset]] = {}
            for s in servers:
                _, answers = clients[s.name].find(q)  # warm-up, and the answers to compare
                by_server[s.name] = {str(a.get(q.answer_key, "")): a for a in answers}
                matches[(q.name, s.name)] = len(answers)
                if len(answers) != q.expected:
                    print(
                        f"  WARNING {q.name}: {s.name} returned {len(answers)} matches, "
                        f"the generator made {q.expected}",
                        flush=True,
                    )
            _compare(q, by_server)
        for q in queries:
            for s in _rounds(repeat, servers):
                kept.setdefault((q.name, s.name), []).append(clients[s.name].find(q)[0] * 1000)
    finally:
        for c in clients.values():
            c.close()

    raw_clients = {s.name: RawFindClient(s) for s in servers}
    try:
        for q in queries:
            for s in servers:
                _, n = raw_clients[s.name].find(q)  # warm-up
                if n != matches[(q.name, s.name)]:
                    print(
                        f"  WARNING {q.name}: {s.name} gave the bare client {n} matches, pynetdicom "
                        f"{matches[(q.name, s.name)]}",
                        flush=True,
                    )
            for s in _rounds(repeat, servers):
                raw.setdefault((q.name, s.name), []).append(raw_clients[s.name].find(q)[0] * 1000)
    finally:
        for rc in raw_clients.values():
            rc.close()

    for s in _rounds(fresh_repeat, servers):
        start = time.perf_counter()
        clients[s.name].associate().release()
        fresh.setdefault((_ASSOC_ONLY, s.name), []).append((time.perf_counter() - start) * 1000)
    for q in queries:
        for s in _rounds(fresh_repeat, servers):
            fresh.setdefault((q.name, s.name), []).append(clients[s.name].find_fresh(q) * 1000)
    return Measurements(matches=matches, kept=kept, raw=raw, fresh=fresh)


def _compare(query: Query, by_server: dict[str, dict[str, Dataset]]) -> None:
    """Warn when the servers' answer sets differ; list the values that differ on common keys."""
    (a_name, a), (b_name, b) = list(by_server.items())[:2]
    if set(a) != set(b):
        print(
            f"  WARNING {query.name}: answers differ: {len(set(a) - set(b))} only from {a_name}, "
            f"{len(set(b) - set(a))} only from {b_name}",
            flush=True,
        )
    requested = {e.keyword for e in query.identifier if e.keyword != "QueryRetrieveLevel"}
    missing = {
        name: sorted(requested - {e.keyword for d in answers.values() for e in d})
        for name, answers in by_server.items()
    }
    for name, keys in missing.items():
        if keys and any(by_server[name].values()):
            print(f"  note {query.name}: {name} does not return {', '.join(keys)}", flush=True)
    shown = 0
    for uid in sorted(set(a) & set(b)):
        for keyword in sorted(requested):
            va, vb = a[uid].get(keyword), b[uid].get(keyword)
            if va is None or vb is None:
                continue
            sa, sb = str(va).strip(), str(vb).strip()
            if sa != sb and shown < 5:
                print(f"  note {query.name}: {keyword} of {uid[-12:]}: {a_name} {sa!r}, {b_name} {sb!r}", flush=True)
                shown += 1


def print_table(
    title: str, queries: Sequence[Query], times: dict[tuple[str, str], list[float]], matches: dict[tuple[str, str], int]
) -> None:
    print(f"\n{title}")
    head = (
        f"{'query':10s} {'level':6s} {'matches p/o':>11s} | {'pacsnode med':>12s} {'p90':>7s} | "
        f"{'orthanc med':>11s} {'p90':>7s} | {'p/o':>5s} | {'<50ms':5s} {'vs Orthanc':10s}"
    )
    print(head)
    print("-" * len(head))
    for q in queries:
        if (q.name, "pacsnode") not in times:
            continue
        p, o = times[(q.name, "pacsnode")], times[(q.name, "orthanc")]
        pm, om = statistics.median(p), statistics.median(o)
        small = max(matches[(q.name, "pacsnode")], matches[(q.name, "orthanc")]) <= 100
        target = ("OK" if pm < _TARGET_MS else "MISS") if small else "n/a"
        print(
            f"{q.name:10s} {q.level:6s} {matches[(q.name, 'pacsnode')]:>5d}/{matches[(q.name, 'orthanc')]:<5d} | "
            f"{pm:9.2f} ms {_p90(p):7.2f} | {om:8.2f} ms {_p90(o):7.2f} | {pm / om:5.2f} | "
            f"{target:5s} {'OK' if pm <= om else 'MISS':10s}"
        )
    if (_ASSOC_ONLY, "pacsnode") in times:
        p, o = times[(_ASSOC_ONLY, "pacsnode")], times[(_ASSOC_ONLY, "orthanc")]
        pm, om = statistics.median(p), statistics.median(o)
        print(
            f"{'(associate + release only)':29s} | {pm:9.2f} ms {_p90(p):7.2f} | {om:8.2f} ms {_p90(o):7.2f} | "
            f"{pm / om:5.2f} |"
        )


# ---------------------------------------------------------------------------------------------- main


def _run(args: argparse.Namespace) -> None:
    pynetdicom_config.LOG_HANDLER_LEVEL = "none"
    workdir = Path(args.workdir).resolve()
    base = workdir / f"run-{os.getpid()}"
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True)
    workers = args.writers or max(1, os.cpu_count() or 1)
    pacsnode, orthanc = Pacsnode(base / "pacsnode"), Orthanc(base / "orthanc")
    for server in (pacsnode, orthanc):
        server.work.mkdir()
    try:
        t = time.perf_counter()
        studies = generate(patients=args.patients, studies=args.studies, instances=args.instances, seed=args.seed)
        queries = choose_queries(studies, args.seed)
        cut, pushed = 0, 0
        while cut < len(studies) and pushed < args.real_files:  # whole studies, from the first
            pushed += studies[cut].num_instances
            cut += 1
        real, rows = studies[:cut], studies[cut:]
        n_series = sum(len(s.series) for s in studies)
        print(
            f"generated {args.patients} patients, {len(studies)} studies, {n_series} series, "
            f"{args.instances} instances in {time.perf_counter() - t:.1f} s",
            flush=True,
        )
        for q in queries:
            print(f"  {q.name:10s} {q.level:6s} {q.note}: {q.expected} expected matches")

        t = time.perf_counter()
        real_files = write_files(base / "files" / "real", real, workers)
        row_files = write_files(base / "files" / "rows", rows, workers)
        print(
            f"wrote {len(real_files) + len(row_files)} small files in {time.perf_counter() - t:.1f} s "
            f"({workers} processes)",
            flush=True,
        )

        t = time.perf_counter()
        n_rows = pacsnode.fill_rows(rows)
        rows_s = time.perf_counter() - t
        print(f"pacsnode: {n_rows} instances indexed as rows in {rows_s:.1f} s ({n_rows / rows_s:.0f}/s)", flush=True)
        pacsnode.start()
        real_s = push(pacsnode, real_files, args.senders)
        print(
            f"pacsnode: {len(real_files)} real files pushed in {real_s:.1f} s "
            f"({len(real_files) / real_s:.0f}/s, {args.senders} storescu)",
            flush=True,
        )

        orthanc.start()
        orthanc_s = push(orthanc, real_files + row_files, args.senders)
        total = len(real_files) + len(row_files)
        print(
            f"orthanc: {total} files pushed in {orthanc_s:.1f} s ({total / orthanc_s:.0f}/s, {args.senders} storescu)",
            flush=True,
        )
        if not args.keep:
            shutil.rmtree(base / "files", ignore_errors=True)

        result = measure(queries, [pacsnode, orthanc], repeat=args.repeat, fresh_repeat=args.fresh_repeat)
    finally:
        for server in (pacsnode, orthanc):
            server.stop()
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
        else:
            print(f"\nkept {base}")

    print(
        f"\nFill: pacsnode {n_rows} rows {rows_s:.1f} s + {len(real_files)} files over DICOM {real_s:.1f} s "
        f"= {rows_s + real_s:.1f} s; Orthanc {total} files over DICOM {orthanc_s:.1f} s"
    )
    size = f"{args.instances} instances / {len(studies)} studies / {args.patients} patients"
    print_table(
        f"C-FIND, {size}, pynetdicom requestor, one association kept, {args.repeat} repetitions "
        f"(ms; p/o = pacsnode/Orthanc, lower is better)",
        queries,
        result.kept,
        result.matches,
    )
    print_table(
        f"C-FIND, {size}, bare-socket requestor (no client decoding), one association kept, "
        f"{args.repeat} repetitions (ms)",
        queries,
        result.raw,
        result.matches,
    )
    if args.fresh_repeat:
        print_table(
            f"C-FIND with a fresh pynetdicom association each time (associate + find + release), "
            f"{args.fresh_repeat} repetitions (ms)",
            queries,
            result.fresh,
            result.matches,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--patients", type=int, default=2000)
    parser.add_argument("--studies", type=int, default=5000)
    parser.add_argument("--instances", type=int, default=100_000)
    parser.add_argument(
        "--real-files",
        type=int,
        default=2000,
        help="instances pushed to pacsnode as files over DICOM (whole studies); the rest are rows",
    )
    parser.add_argument("--repeat", type=int, default=20, help="timed runs of each query on each server")
    parser.add_argument(
        "--fresh-repeat", type=int, default=5, help="timed runs with a fresh association each (0: skip that table)"
    )
    parser.add_argument("--senders", type=int, default=4, help="parallel storescu processes for the fills")
    parser.add_argument("--writers", type=int, default=0, help="processes writing the files (default: CPUs)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--workdir", default=str(REPO / "bench" / "out" / "query"))
    parser.add_argument("--keep", action="store_true", help="keep the stores, indexes and files")
    parser.add_argument("--quick", action="store_true", help="smoke run: 100 patients, 250 studies, 5,000 instances")
    args = parser.parse_args()
    if args.quick:
        args.patients, args.studies, args.instances, args.real_files = 100, 250, 5000, 500
        args.repeat = min(args.repeat, 10)
    enter_private_netns("bench.query", ("storescu", "Orthanc"))
    _run(args)


if __name__ == "__main__":
    main()
