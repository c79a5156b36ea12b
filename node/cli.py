"""The ``pacsnode`` command."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable
from dataclasses import asdict, replace
from datetime import UTC, datetime, timedelta
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from pacsnode.node.config import Settings, load, redacted
from pacsnode.node.errors import ConfigError, UnknownNodeError
from pacsnode.node.logs import printable, setup_logging
from pacsnode.storage.models import ExportState, JobState

__all__ = ["main"]

logger = logging.getLogger("pacsnode")

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_CONFIG = 2


def _version() -> str:
    try:
        return version("pacsnode")
    except PackageNotFoundError:  # pragma: no cover - running from a bare checkout
        return "unknown"


Command = Callable[[Any, argparse.Namespace], int]


def _command(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], name: str, func: Command, *, help: str
) -> argparse.ArgumentParser:
    """A subcommand that runs ``func``; it takes ``--config`` after its name as well."""
    p = sub.add_parser(name, help=help)
    p.add_argument("--config", metavar="FILE", default=argparse.SUPPRESS, help=_CONFIG_HELP)
    p.set_defaults(func=func)
    return p


_CONFIG_HELP = "config file (default: $PACSNODE_CONFIG, else config/pacsnode.yaml)"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pacsnode",
        description="DICOM node: receives, stores and indexes studies.",
    )
    parser.add_argument("--version", action="version", version=f"pacsnode {_version()}")
    parser.add_argument("--config", metavar="FILE", help=_CONFIG_HELP)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _command(sub, "serve", _cmd_serve, help="run the node until SIGTERM/SIGINT")
    _command(sub, "check-config", _cmd_check_config, help="validate the config file and print the effective settings")
    p = _command(sub, "echo", _cmd_echo, help="C-ECHO a remote node")
    p.add_argument("node", help="a name from remote_nodes, or AET@HOST:PORT")
    p = _command(sub, "send", _cmd_send, help="C-STORE files and folders to a remote node")
    p.add_argument("node", help="a name from remote_nodes, or AET@HOST:PORT")
    p.add_argument("paths", nargs="+", type=Path, metavar="PATH")
    p = _command(sub, "find", _cmd_find, help="C-FIND a remote node")
    p.add_argument("node", help="a name from remote_nodes, or AET@HOST:PORT")
    p.add_argument("--level", default="STUDY", type=str.upper, choices=["PATIENT", "STUDY", "SERIES", "IMAGE"])
    p.add_argument("--patient-root", action="store_true", help="use the Patient Root model (default: Study Root)")
    p.add_argument(
        "-k",
        "--key",
        action="append",
        default=[],
        metavar="KEYWORD[=VALUE]",
        help="a matching key (KEYWORD=VALUE) or return key (KEYWORD); repeatable",
    )
    p.add_argument("--json", action="store_true", help="one JSON array of answers")
    p = _command(sub, "retrieve", _cmd_retrieve, help="pull a study (or series) from a remote node into this node")
    p.add_argument("node", help="a name from remote_nodes, or AET@HOST:PORT")
    p.add_argument("--study", required=True, metavar="UID", help="StudyInstanceUID")
    p.add_argument("--series", metavar="UID", help="only this SeriesInstanceUID")
    p.add_argument(
        "--method",
        choices=["get", "move"],
        default="get",
        help="get: C-GET, stored here directly (default); move: C-MOVE to --destination",
    )
    p.add_argument(
        "--destination", metavar="AET", help="C-MOVE destination AE title (default: this node's, which must be serving)"
    )
    p = _command(sub, "studies", _cmd_studies, help="list the studies in the index")
    p.add_argument("--json", action="store_true", help="one JSON array instead of a table")
    p = _command(
        sub, "quarantine", _cmd_quarantine, help="list instances kept apart, not indexed (storage.patient_mismatch)"
    )
    p.add_argument("--limit", type=int, default=100)
    p.add_argument("--json", action="store_true", help="one JSON array instead of a table")
    p = _command(sub, "audit", _cmd_audit, help="who touched a study: the audit trail, filtered")
    p.add_argument("--patient", metavar="ID", help="events naming this PatientID")
    p.add_argument("--study", metavar="UID", help="events naming this Study Instance UID")
    p.add_argument("--peer", metavar="AE", help="events with this AE title as a participant")
    p.add_argument(
        "--since", metavar="WHEN", help="ISO date or date-time (UTC unless it says), or an age: 30m, 12h, 7d"
    )
    p.add_argument("--kind", action="append", default=[], help="only this event kind (repeatable)")
    p.add_argument("--json", action="store_true", help="JSON lines, as recorded")
    p = _command(
        sub, "worker", _cmd_worker, help="run analysis worker processes (jobs, exports, scheduling) until SIGTERM"
    )
    p.add_argument("--count", type=int, metavar="N", help="worker processes (default: analysis.workers, at least 1)")
    p = _command(sub, "jobs", _cmd_jobs, help="list analysis jobs")
    p.add_argument("--state", type=JobState, choices=list(JobState))
    p.add_argument("--study", metavar="UID", help="only jobs of this StudyInstanceUID")
    p.add_argument("--limit", type=int, default=100)
    p.add_argument("--json", action="store_true", help="one JSON array instead of a table")
    p = _command(sub, "analyze", _cmd_analyze, help="queue analysis of a stored study now (no quiet time)")
    p.add_argument("study", metavar="STUDY_UID")
    p.add_argument(
        "--pipeline",
        metavar="NAME",
        help="a rule name or pipeline name (default: every enabled rule that matches the study)",
    )
    p.add_argument("--series", metavar="UID", help="only this SeriesInstanceUID")
    p = _command(sub, "retry", _cmd_retry, help="queue a failed job again")
    p.add_argument("job_id", type=int, metavar="JOB_ID")
    p = _command(sub, "exports", _cmd_exports, help="list result exports; re-queue dead ones")
    p.add_argument("--failed", action="store_true", help="only dead exports and those waiting after a failure")
    p.add_argument("--state", type=ExportState, choices=list(ExportState))
    p.add_argument("--retry", type=int, metavar="EXPORT_ID", help="queue this dead export again")
    p.add_argument("--retry-dead", action="store_true", help="queue every dead export again")
    p.add_argument("--limit", type=int, default=100)
    p.add_argument("--json", action="store_true", help="one JSON array instead of a table")
    p = _command(sub, "train", _cmd_train, help="train the lung-nodule demonstration model on generated chest CT")
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="folder for manifest.json and model.pt")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument(
        "--real",
        type=Path,
        metavar="DIR",
        help="folder of real CT series folders (tumour boxes in DIR/annotations.json): real lungs with inserted "
        "nodules, the tumour and hard negatives in each batch",
    )
    p.add_argument(
        "--init",
        metavar="NAME|DIR",
        help="start from this model package's weights (a fine-tuning) instead of random ones",
    )
    p.add_argument(
        "--learning-rate", type=float, default=None, metavar="LR", help="Adam's initial rate (default 0.003)"
    )
    p = _command(
        sub, "evaluate", _cmd_evaluate, help="score a nodule model on held-out generated studies and real CT images"
    )
    p.add_argument("--model", default="lung-nodule", metavar="NAME|DIR", help="built-in model name or package folder")
    p.add_argument("--studies", type=int, default=5, help="generated studies (default 5)")
    p.add_argument(
        "--seed", type=int, default=None, help="first seed of the generated studies (default: held-out range)"
    )
    p.add_argument("--slices", type=int, default=64)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--no-real", action="store_true", help="skip the real CT images of pydicom-data")
    p.add_argument(
        "--real",
        type=Path,
        metavar="DIR",
        help="folder of real chest CT series folders with tumour boxes in DIR/annotations.json: false findings "
        "per series, tumour found",
    )
    p.add_argument(
        "--inserted",
        type=int,
        default=12,
        metavar="N",
        help="with --real: nodules inserted into each series' lungs, sensitivity by size (default 12; 0: none)",
    )
    p.add_argument(
        "--pleural",
        type=int,
        default=12,
        metavar="N",
        help="with --real: solid masses inserted at each series' pleura, sensitivity by long axis (default 12; 0: none)",
    )
    p.add_argument(
        "--no-lesion-filter",
        action="store_true",
        help="score every component of the model's map (no lung region, no lesion filter)",
    )
    p.add_argument("--json", action="store_true", help="one JSON object instead of a table")
    p = _command(
        sub, "hash-password", _cmd_hash_password, help="print the http.users password_hash of a password (asked for)"
    )
    p.add_argument("--stdin", action="store_true", help="read the password from standard input (one line)")
    _command(sub, "make-token", _cmd_make_token, help="make a bearer token: print it and its http.users token hash")
    return parser


_NO_CONFIG = {"train", "evaluate", "hash-password", "make-token"}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command in _NO_CONFIG:  # model tools: they must run while the config names a model not yet made
        setup_logging("INFO", "text")
        return int(args.func(None, args))
    try:
        settings = load(args.config)
    except ConfigError as exc:
        print(f"pacsnode: config error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    setup_logging(settings.logging.level, settings.logging.format)
    try:
        return int(args.func(settings, args))
    except UnknownNodeError as exc:
        print(f"pacsnode: {exc}", file=sys.stderr)
        return EXIT_CONFIG


def _cmd_hash_password(settings: Settings | None, args: argparse.Namespace) -> int:
    import getpass

    from pacsnode.node.http.passwords import hash_password

    if args.stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = getpass.getpass("password: ")
        if getpass.getpass("again: ") != password:
            print("pacsnode: the passwords differ", file=sys.stderr)
            return EXIT_FAILED
    if not password:
        print("pacsnode: empty password", file=sys.stderr)
        return EXIT_FAILED
    print(hash_password(password))
    return 0


def _cmd_make_token(settings: Settings | None, args: argparse.Namespace) -> int:
    from pacsnode.node.http.passwords import hash_token, make_token

    token = make_token()
    print(f"token:       {token}")
    print(f"token_hashes: [{hash_token(token)}]   # for http.users; the token itself is shown only now")
    return 0


def _cmd_serve(settings: Settings, args: argparse.Namespace) -> int:
    from pacsnode.node.app import serve
    from pacsnode.node.dicom.permissions import exposure_warnings
    from pacsnode.node.dicom.tls import check_tls
    from pacsnode.storage import StorageError

    try:
        check_tls(settings)
    except ConfigError as exc:
        print(f"pacsnode: config error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    for warning in exposure_warnings(settings):
        logger.warning("security: %s", warning, extra={"event": "security-warning"})
    try:
        return serve(settings)
    except StorageError as exc:
        logger.error("cannot open the archive: %s", exc)
        return EXIT_FAILED
    except OSError as exc:
        logger.error("cannot listen on %s:%d: %s", settings.node.host, settings.node.port, exc)
        return EXIT_FAILED


def _cmd_check_config(settings: Settings, args: argparse.Namespace) -> int:
    from pacsnode.analysis import AnalysisError
    from pacsnode.analysis.pipelines import resolve_pipeline
    from pacsnode.node.dicom.permissions import exposure_warnings
    from pacsnode.node.dicom.tls import check_tls

    for rule in settings.analysis.rules:  # deeper checks a pipeline offers: e.g. build its model once
        pipeline = resolve_pipeline(rule.pipeline)
        try:
            pipeline().check(pipeline.Params.model_validate(rule.params))
        except AnalysisError as exc:
            print(f"pacsnode: config error: {settings.source}: analysis.rules[{rule.name}]: {exc}", file=sys.stderr)
            return EXIT_CONFIG
    try:
        check_tls(settings)
    except ConfigError as exc:
        print(f"pacsnode: config error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    for warning in exposure_warnings(settings):
        print(f"pacsnode: warning: {warning}", file=sys.stderr)
    print(f"{settings.source}: OK")
    print(json.dumps(redacted(settings.model_dump(mode="json")), indent=2))
    return EXIT_OK


def _cmd_echo(settings: Settings, args: argparse.Namespace) -> int:
    from pacsnode.node.app import configure_pynetdicom
    from pacsnode.node.dicom.export import echo, resolve_node

    configure_pynetdicom()
    ok, message = echo(settings, resolve_node(settings, args.node))
    print(printable(message))
    return EXIT_OK if ok else EXIT_FAILED


def _cmd_send(settings: Settings, args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from pacsnode.node.app import configure_pynetdicom
    from pacsnode.node.dicom.export import collect_files, resolve_node, send_files

    configure_pynetdicom()
    remote = resolve_node(settings, args.node)
    missing = [p for p in args.paths if not p.exists()]
    if missing:
        print(f"pacsnode: no such file or folder: {', '.join(map(str, missing))}", file=sys.stderr)
        return EXIT_FAILED
    files = collect_files(args.paths)
    bar = tqdm(total=len(files), unit="file", disable=not sys.stderr.isatty(), file=sys.stderr)
    try:
        outcomes = send_files(settings, remote, files, progress=lambda _o: bar.update(1))
    finally:
        bar.close()
    failed = [o for o in outcomes if not o.ok]
    print(
        f"sent {len(outcomes) - len(failed)} of {len(outcomes)} file(s) to {remote.ae_title}@{remote.host}:{remote.port}"
    )
    for o in failed:
        code = f"0x{o.status:04X}" if o.status is not None else "not sent"
        print(f"  FAILED {o.path}: {code}" + (f": {printable(o.error)}" if o.error else ""))
    return EXIT_OK if not failed else EXIT_FAILED


def _parse_keys(items: list[str]) -> dict[str, str]:
    from pydicom.datadict import dictionary_VR, tag_for_keyword

    keys: dict[str, str] = {}
    for item in items:
        keyword, _, value = item.partition("=")
        keyword = keyword.strip()
        tag = tag_for_keyword(keyword)
        if tag is None:
            raise ValueError(f"unknown DICOM keyword {keyword!r} in -k {item!r}")
        keys[keyword] = value if dictionary_VR(tag) != "SQ" else ""
    return keys


def _cmd_find(settings: Settings, args: argparse.Namespace) -> int:
    from pacsnode.node.app import configure_pynetdicom
    from pacsnode.node.dicom.export import resolve_node
    from pacsnode.node.dicom.retrieve import DEFAULT_RETURN_KEYS, find

    configure_pynetdicom()
    remote = resolve_node(settings, args.node)
    try:
        keys = _parse_keys(args.key)
    except ValueError as exc:
        print(f"pacsnode: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    keys = {**{k: "" for k in DEFAULT_RETURN_KEYS[args.level]}, **keys}
    try:
        result = find(settings, remote, args.level, keys, patient_root=args.patient_root)
    except ConnectionError as exc:
        print(f"pacsnode: {exc}", file=sys.stderr)
        return EXIT_FAILED
    rows = [{k: _text(answer.get(k)) for k in keys} for answer in result.matches]
    if args.json:
        print(json.dumps(rows, indent=2, ensure_ascii=False))
    else:
        _print_table(list(keys), [[row[k] for k in keys] for row in rows])
    if result.status != 0:
        status = "no final status" if result.status is None else f"0x{result.status:04X}"
        print(
            f"pacsnode: C-FIND ended with {status}"
            + (f": {printable(result.error_comment)}" if result.error_comment else ""),
            file=sys.stderr,
        )
        return EXIT_FAILED
    print(f"{len(rows)} match(es)", file=sys.stderr)
    return EXIT_OK


def _text(value: object) -> str:
    from pydicom.multival import MultiValue

    if value is None:
        return ""
    if isinstance(value, list | tuple | MultiValue):
        return "\\".join(str(v) for v in value)
    return str(value)


def _print_table(header: list[str], rows: list[list[str]]) -> None:
    """Aligned columns; control characters from the index or a peer are escaped, never sent to the terminal."""
    rows = [[printable(cell) for cell in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    for line in (header, *rows):
        print("  ".join(col.ljust(w) for col, w in zip(line, widths, strict=False)).rstrip())


def _cmd_retrieve(settings: Settings, args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from pacsnode.node.app import configure_pynetdicom
    from pacsnode.node.dicom.export import resolve_node
    from pacsnode.node.dicom.retrieve import retrieve
    from pacsnode.storage import Archive, StorageError

    configure_pynetdicom()
    remote = resolve_node(settings, args.node)
    archive = None
    if args.method == "get":
        try:
            archive = Archive.open(settings.storage)
        except StorageError as exc:
            print(f"pacsnode: {exc}", file=sys.stderr)
            return EXIT_FAILED
    bar = tqdm(unit="instance", disable=not sys.stderr.isatty(), file=sys.stderr)

    def _progress(done: int, total: int) -> None:
        bar.total = total
        bar.n = done
        bar.refresh()

    try:
        result = retrieve(
            settings,
            remote,
            args.study,
            series_uid=args.series,
            method=args.method,
            destination=args.destination,
            archive=archive,
            progress=_progress,
        )
    except ConnectionError as exc:
        print(f"pacsnode: {exc}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        bar.close()
        if archive is not None:
            archive.close()
    status = "no final status" if result.status is None else f"0x{result.status:04X}"
    where = "stored here" if args.method == "get" else f"moved to {args.destination or settings.node.ae_title}"
    print(
        f"retrieve from {remote.ae_title}: {status}; {result.completed} completed, {result.failed} failed, "
        f"{result.warning} warning ({where}{': ' + str(result.stored_here) if args.method == 'get' else ''})"
    )
    if result.error_comment:
        print(f"  {printable(result.error_comment)}")
    for uid in result.failed_uids:
        print(f"  FAILED {printable(uid)}")
    return EXIT_OK if result.ok else EXIT_FAILED


def _parse_since(text: str) -> datetime:
    """``--since``: an ISO date or date-time (UTC unless it names an offset), or an age such as 7d, 12h, 30m."""
    units = {"m": 60, "h": 3600, "d": 86400}
    if text[-1:] in units and text[:-1].isdigit():
        return datetime.now(UTC) - timedelta(seconds=int(text[:-1]) * units[text[-1]])
    when = datetime.fromisoformat(text)
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


def _cmd_audit(settings: Settings, args: argparse.Namespace) -> int:
    from pacsnode.node.audit import read_events, trail_path

    try:
        since = _parse_since(args.since) if args.since else None
    except ValueError:
        print(f"pacsnode: --since {args.since!r}: not an ISO date, date-time or age (7d, 12h, 30m)", file=sys.stderr)
        return EXIT_FAILED
    events = read_events(
        trail_path(settings.audit, settings.storage.root),
        patient_id=args.patient,
        study_uid=args.study,
        peer=args.peer,
        since=since,
        kinds=args.kind,
    )
    for doc in events:
        if args.json:
            print(json.dumps(doc, ensure_ascii=False))
            continue
        who = ", ".join(
            f"{p.get('role')}={p.get('ae_title', '')}" + (f"@{p['host']}" if p.get("host") else "")
            for p in doc.get("participants") or []
        )
        studies = ", ".join(
            f"{s.get('study_instance_uid')} (patient {s.get('patient_id', '?')})" for s in doc.get("studies") or []
        )
        outcome = "" if doc.get("outcome") == 0 else f" outcome={doc.get('outcome')}"
        print(
            printable(
                f"{doc.get('time')} {doc.get('kind')}{outcome} {who}" + (f" studies: {studies}" if studies else "")
            )
        )
    return EXIT_OK


def _cmd_studies(settings: Settings, args: argparse.Namespace) -> int:
    from pacsnode.storage import Archive, StorageError
    from pacsnode.storage.db import migrate

    archive = Archive(settings.storage)
    try:
        migrate(archive.engine)
        studies = archive.studies()
    except StorageError as exc:
        print(f"pacsnode: {exc}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        archive.close()
    if args.json:
        print(json.dumps([asdict(s) for s in studies], indent=2))
        return EXIT_OK
    header = ("PATIENT", "NAME", "DATE", "DESCRIPTION", "MODALITIES", "SERIES", "INSTANCES", "STUDY UID")
    rows = [
        (
            s.patient_id,
            s.patient_name or "",
            s.study_date or "",
            s.study_description or "",
            (s.modalities_in_study or "").replace("\\", ","),
            str(s.num_series),
            str(s.num_instances),
            s.study_instance_uid,
        )
        for s in studies
    ]
    _print_table(list(header), [list(row) for row in rows])
    print(f"{len(studies)} stud{'y' if len(studies) == 1 else 'ies'}")
    return EXIT_OK


def _cmd_quarantine(settings: Settings, args: argparse.Namespace) -> int:
    from pacsnode.storage import StorageError

    try:
        archive = _open_archive(settings)
    except StorageError as exc:
        print(f"pacsnode: {exc}", file=sys.stderr)
        return EXIT_FAILED
    try:
        entries = archive.quarantined(limit=args.limit)
    except StorageError as exc:
        print(f"pacsnode: {exc}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        archive.close()
    if args.json:
        print(json.dumps([e.as_dict() for e in entries], indent=2))
        return EXIT_OK
    rows = [
        [
            str(e.id),
            e.received_at.strftime("%Y-%m-%d %H:%M:%S"),
            e.calling_ae_title or "",
            e.reason,
            e.study_instance_uid,
            e.sop_instance_uid,
            e.file_path,
        ]
        for e in entries
    ]
    _print_table(["ID", "RECEIVED (UTC)", "CALLING AE", "REASON", "STUDY UID", "SOP INSTANCE UID", "FILE"], rows)
    print(f"{len(entries)} quarantined instance(s); files are relative to {settings.storage.root}")
    return EXIT_OK


def _open_archive(settings: Settings):  # type: ignore[no-untyped-def]
    from pacsnode.storage import Archive
    from pacsnode.storage.db import migrate

    archive = Archive(settings.storage)
    migrate(archive.engine)
    return archive


def _cmd_worker(settings: Settings, args: argparse.Namespace) -> int:
    from pacsnode.node.app import configure_pynetdicom, run_workers
    from pacsnode.storage import StorageError

    count = args.count if args.count is not None else max(1, settings.analysis.workers)
    if count < 1:
        print("pacsnode: --count must be at least 1", file=sys.stderr)
        return EXIT_CONFIG
    configure_pynetdicom()
    try:
        return run_workers(settings, count)
    except StorageError as exc:
        logger.error("cannot open the archive: %s", exc)
        return EXIT_FAILED


def _cmd_jobs(settings: Settings, args: argparse.Namespace) -> int:
    from pacsnode.storage.queue import JobQueue

    archive = _open_archive(settings)
    try:
        jobs = JobQueue(archive.engine).list(state=args.state, study_instance_uid=args.study, limit=args.limit)
    finally:
        archive.close()
    if args.json:
        print(json.dumps([j.as_dict() for j in jobs], indent=2))
        return EXIT_OK
    rows = []
    for j in jobs:
        took = ""
        if j.started_at and j.finished_at:
            took = f"{(j.finished_at - j.started_at).total_seconds():.1f}s"
        rows.append(
            [
                str(j.id),
                j.state,
                j.pipeline,
                j.rule,
                f"{j.attempts}/{j.max_attempts}",
                j.created_at.strftime("%Y-%m-%d %H:%M:%S"),
                took,
                j.study_instance_uid,
                (j.last_error or "")[:80],
            ]
        )
    headers = ["ID", "STATE", "PIPELINE", "RULE", "TRIES", "QUEUED (UTC)", "TOOK", "STUDY", "LAST ERROR / REASON"]
    _print_table(headers, rows)
    print(f"{len(jobs)} job(s)")
    return EXIT_OK


def _cmd_analyze(settings: Settings, args: argparse.Namespace) -> int:
    from pacsnode.analysis.errors import PipelineError
    from pacsnode.analysis.pipelines import resolve_pipeline
    from pacsnode.analysis.routing import select_series
    from pacsnode.node.scheduler import ImageSizes, enqueue_rule_jobs
    from pacsnode.storage.activity import series_of_study
    from pacsnode.storage.db import read_connection
    from pacsnode.storage.queue import JobQueue

    archive = _open_archive(settings)
    try:
        with read_connection(archive.engine) as conn:
            series = series_of_study(conn, args.study, args.series or "")
        if not series:
            print(
                f"pacsnode: no received series for study {args.study}"
                + (f" series {args.series}" if args.series else ""),
                file=sys.stderr,
            )
            return EXIT_FAILED
        analysis = settings.analysis
        rules = [r for r in analysis.rules if r.enabled]
        if args.pipeline:
            rules = [r for r in analysis.rules if args.pipeline in (r.name, r.pipeline)]
        queue = JobQueue(archive.engine)
        queued: list[tuple[int, bool, str]] = []
        skipped: list[str] = []
        if args.pipeline and not rules:
            try:
                resolve_pipeline(args.pipeline)
            except PipelineError as exc:
                print(f"pacsnode: {exc}", file=sys.stderr)
                return EXIT_CONFIG
            job_id, created = queue.enqueue(
                rule="cli",
                pipeline=args.pipeline,
                study_instance_uid=args.study,
                series_instance_uid=args.series or "",
                max_attempts=analysis.max_attempts,
                timeout_s=analysis.job_timeout_seconds,
            )
            queued.append((job_id, created, f"pipeline {args.pipeline} (no rule: results are not exported)"))
        sizes = ImageSizes(archive)
        for rule in rules:
            chosen = select_series(rule, series, sizes)
            if not chosen:
                skipped.append(rule.name)
                continue
            for job_id, created in enqueue_rule_jobs(
                queue, rule, analysis, study_instance_uid=args.study, chosen=chosen
            ):
                queued.append((job_id, created, f"rule {rule.name} ({rule.pipeline})"))
    finally:
        archive.close()
    if not queued:
        if skipped:
            print(
                f"pacsnode: no series of study {args.study} matches rule(s) {', '.join(skipped)}",
                file=sys.stderr,
            )
        else:
            print(f"pacsnode: no enabled rule matches study {args.study}; name one with --pipeline", file=sys.stderr)
        return EXIT_FAILED
    for job_id, created, what in queued:
        print(f"job {job_id}: {what}" + ("" if created else " (already pending)"))
    return EXIT_OK


def _cmd_retry(settings: Settings, args: argparse.Namespace) -> int:
    from pacsnode.storage.queue import JobQueue

    archive = _open_archive(settings)
    try:
        job = JobQueue(archive.engine).retry(args.job_id)
    except LookupError as exc:
        print(f"pacsnode: {exc.args[0]}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        archive.close()
    print(f"job {job.id} queued again ({job.pipeline}, study {job.study_instance_uid})")
    return EXIT_OK


def _cmd_exports(settings: Settings, args: argparse.Namespace) -> int:
    from pacsnode.storage.queue import ExportQueue

    archive = _open_archive(settings)
    try:
        queue = ExportQueue(archive.engine)
        if args.retry is not None or args.retry_dead:
            count = queue.retry(export_id=args.retry)
            if args.retry is not None and count == 0:
                print(f"pacsnode: export {args.retry} is not dead (or does not exist)", file=sys.stderr)
                return EXIT_FAILED
            print(f"{count} export(s) queued again")
            return EXIT_OK
        exports = queue.list(state=args.state, limit=args.limit)
        if args.failed:
            exports = [
                e for e in exports if e.state is ExportState.DEAD or (e.state is ExportState.PENDING and e.last_error)
            ]
    finally:
        archive.close()
    if args.json:
        print(json.dumps([e.as_dict() for e in exports], indent=2))
        return EXIT_OK
    rows = [
        [
            str(e.id),
            e.state,
            e.destination,
            f"{e.attempts}/{e.max_attempts}",
            e.not_before.strftime("%H:%M:%S") if e.state is ExportState.PENDING else "",
            e.sop_instance_uid,
            str(e.job_id or ""),
            (e.last_error or "")[:80],
        ]
        for e in exports
    ]
    _print_table(["ID", "STATE", "DESTINATION", "TRIES", "NEXT (UTC)", "SOP INSTANCE", "JOB", "LAST ERROR"], rows)
    print(f"{len(exports)} export(s)")
    return EXIT_OK


def _cmd_train(settings: Settings | None, args: argparse.Namespace) -> int:
    from pacsnode.analysis.modeldev.training import TrainConfig, train

    def progress(step: int, loss: float) -> None:
        print(f"step {step}/{args.steps}: loss {loss:.4f}", flush=True)

    config = TrainConfig(seed=args.seed, steps=args.steps)
    if args.learning_rate is not None:
        config = replace(config, learning_rate=args.learning_rate)
    manifest = train(args.out, config, progress=progress, real=args.real, init=args.init)
    size = (args.out / manifest["weights"]["file"]).stat().st_size
    print(
        f"wrote {args.out}/manifest.json and {manifest['weights']['file']} ({size / 1e6:.2f} MB), "
        f"sha256 {manifest['weights']['sha256']}"
    )
    return EXIT_OK


def _cmd_evaluate(settings: Settings | None, args: argparse.Namespace) -> int:
    from pacsnode.analysis.cnn.package import load_package
    from pacsnode.analysis.errors import ModelError
    from pacsnode.analysis.modeldev.evaluation import (
        HELD_OUT_SEED_BASE,
        evaluate_phantoms,
        evaluate_real_ct,
        evaluate_real_series,
        pydicom_data_ct_files,
    )

    try:
        package = load_package(args.model)
    except ModelError as exc:
        print(f"pacsnode: {exc}", file=sys.stderr)
        return EXIT_FAILED
    seed = HELD_OUT_SEED_BASE if args.seed is None else args.seed
    lesions = not args.no_lesion_filter
    report = evaluate_phantoms(
        package, studies=args.studies, seed=seed, slices=args.slices, device=args.device, lesions=lesions
    )
    if args.real is not None:
        report = evaluate_real_series(
            package,
            args.real,
            device=args.device,
            report=report,
            lesions=lesions,
            inserted=args.inserted,
            pleural=args.pleural,
            seed=seed,
        )
    if not args.no_real:
        files = pydicom_data_ct_files()
        if not files:
            print("pydicom-data is not installed: no real CT images to run on", file=sys.stderr)
        report = evaluate_real_ct(package, files, device=args.device, report=report)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
        return EXIT_OK
    print(f"model {report.model}: {len(report.studies)} generated studies (seeds {seed}..{seed + args.studies - 1})")
    _print_table(
        ["seed", "nodules", "found", "false pos.", "Dice", "volume error %"],
        [
            [
                str(s.seed),
                str(s.true_nodules),
                str(s.found),
                str(s.false_positives),
                f"{s.dice:.3f}",
                " ".join(f"{e:+.0f}" for e in s.volume_errors_percent),
            ]
            for s in report.studies
        ],
    )
    print(
        f"Dice {report.dice:.3f}  sensitivity {report.sensitivity:.1%} "
        f"({', '.join(f'{k}: {v}' for k, v in report.sensitivity_by_size.items())})  "
        f"false positives/study {report.false_positives_per_study:.2f}  "
        f"mean |volume error| {report.mean_abs_volume_error_percent:.1f}%"
    )
    if not args.no_real:
        print(
            f"real CT (pydicom-data, no nodules marked): {report.real_ct_false_positives} findings "
            f"on {report.real_ct_images} images"
        )
    for s in report.real_series:
        tumour = (
            f"tumour found ({s.tumour_kind}, long axis {s.tumour_long_axis_mm} mm, 3D extent "
            f"{s.tumour_extent_mm} mm, on {s.tumour_slices_mm} mm of slices)"
            if s.tumour_found
            else "tumour NOT found"
        )
        print(f"real series {s.series}: {s.findings} findings, {s.false_findings} false; {tumour}")
        if s.inserted_nodules:
            print(
                f"  with {s.inserted_nodules} inserted nodules: {s.inserted_found} found "
                f"({', '.join(f'{k}: {v}' for k, v in s.inserted_by_size.items())}), "
                f"{s.inserted_false_findings} false findings"
            )
        if s.pleural_masses:
            print(
                f"  with {s.pleural_masses} solid masses at the pleura: {s.pleural_found} found "
                f"({', '.join(f'{k}: {v}' for k, v in s.pleural_by_size.items())}), "
                f"{s.pleural_false_findings} false findings"
            )
    return EXIT_OK
