"""STOW-RS client: the export queue's sender for ``dicomweb_nodes`` destinations.

One request per batch: a ``multipart/related; type="application/dicom"`` body streamed from the
stored files (as stored, no re-encoding), then each instance's outcome read from the Store
Instances Response (PS3.18 10.5.3): listed in FailedSOPSequence is failed with its FailureReason,
anything else in a 200/202 answer is stored. A transport error or another HTTP status fails the
whole batch; the export queue retries and dead-letters as for DICOM destinations.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_file_meta_info

from pacsnode.node.dicom.export import ExportOutcome
from pacsnode.node.dicom.status import SUCCESS
from pacsnode.node.http.settings import DicomwebNode

__all__ = ["send_files_stow"]

logger = logging.getLogger(__name__)

_CHUNK = 1 << 20
_FAILED_SOP_SEQUENCE = "00081198"
_REFERENCED_SOP_INSTANCE_UID = "00081155"
_FAILURE_REASON = "00081197"


def _body(files: list[Path], boundary: str) -> Iterator[bytes]:
    for path in files:
        yield f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode("ascii")
        with path.open("rb") as fh:
            while chunk := fh.read(_CHUNK):
                yield chunk
        yield b"\r\n"
    yield f"--{boundary}--\r\n".encode("ascii")


def _failures(document: Any) -> dict[str, int]:
    """SOP Instance UID -> FailureReason from a Store Instances Response in DICOM JSON."""
    failed: dict[str, int] = {}
    if not isinstance(document, dict):
        return failed
    for item in (document.get(_FAILED_SOP_SEQUENCE) or {}).get("Value") or []:
        uid = ((item.get(_REFERENCED_SOP_INSTANCE_UID) or {}).get("Value") or [""])[0]
        reason = ((item.get(_FAILURE_REASON) or {}).get("Value") or [0xC000])[0]
        if uid:
            failed[str(uid)] = int(reason)
    return failed


def send_files_stow(
    node: DicomwebNode, files: list[Path], *, progress: Callable[[ExportOutcome], None] | None = None
) -> list[ExportOutcome]:
    """Send ``files`` to ``node`` in one STOW-RS request; one outcome per file (also given to ``progress``)."""
    import httpx

    outcomes: list[ExportOutcome] = []

    def done(outcome: ExportOutcome) -> None:
        outcomes.append(outcome)
        if progress is not None:
            progress(outcome)

    sendable: list[tuple[Path, str]] = []
    for path in files:
        try:
            uid = str(read_file_meta_info(path).get("MediaStorageSOPInstanceUID", ""))
        except (InvalidDicomError, OSError, ValueError) as exc:
            done(
                ExportOutcome(path=path, sop_instance_uid=None, status=None, error=f"not a readable DICOM file: {exc}")
            )
            continue
        sendable.append((path, uid))
    if not sendable:
        return outcomes
    boundary = "pacsnode-" + secrets.token_hex(16)
    headers = {
        "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
        "Accept": "application/dicom+json",
    }
    if node.token:
        headers["Authorization"] = f"Bearer {node.token}"
    auth = (node.username, node.password or "") if node.username and not node.token else None
    url = node.url.rstrip("/") + "/studies"
    try:
        with httpx.Client(timeout=node.timeout_seconds, verify=node.verify_tls, auth=auth) as client:
            response = client.post(url, content=_body([p for p, _ in sendable], boundary), headers=headers)
    except httpx.HTTPError as exc:
        error = f"STOW-RS to {url} failed: {type(exc).__name__}: {exc}"
        for path, uid in sendable:
            done(ExportOutcome(path=path, sop_instance_uid=uid, status=None, error=error))
        return outcomes
    if response.status_code not in (200, 202, 409):
        error = f"STOW-RS to {url}: HTTP {response.status_code} {response.text[:200].strip()}"
        for path, uid in sendable:
            done(ExportOutcome(path=path, sop_instance_uid=uid, status=None, error=error))
        return outcomes
    try:
        document = response.json() if response.content else {}
    except ValueError:
        document = {}
    failed = _failures(document)
    for path, uid in sendable:
        if uid in failed:
            done(ExportOutcome(path=path, sop_instance_uid=uid, status=failed[uid], error="STOW-RS FailedSOPSequence"))
        elif response.status_code == 409:  # all failed, and the answer did not say which
            done(ExportOutcome(path=path, sop_instance_uid=uid, status=None, error="STOW-RS: HTTP 409"))
        else:
            done(ExportOutcome(path=path, sop_instance_uid=uid, status=SUCCESS))
    return outcomes
