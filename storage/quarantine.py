"""The quarantine: instances received and kept, but not indexed, for the admin to review.

An instance that contradicts the index (its study indexed under another
PatientID, its series under another study) is, under
``storage.patient_mismatch: quarantine``, acknowledged and moved to
``quarantine/`` in the store, with one row here. No Query/Retrieve level
reads this table, so C-FIND, C-MOVE and C-GET never see these instances;
``pacsnode quarantine`` lists them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Row, select

from pacsnode.storage.index import InstanceMeta, Misfiling, inserted_id, utcnow
from pacsnode.storage.models import Quarantined

__all__ = ["QuarantineEntry", "find", "list_entries", "record"]

_quarantine = Quarantined.__table__


@dataclass(frozen=True, kw_only=True)
class QuarantineEntry:
    """One quarantined instance (a row of ``quarantine``)."""

    id: int
    received_at: datetime
    calling_ae_title: str | None
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    reason: str
    file_path: str  # relative to the store root
    file_size: int
    sha256: str

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["received_at"] = self.received_at.isoformat()
        return out


def find(conn: Connection, sop_instance_uid: str, sha256: str) -> Row[Any] | None:
    """The row of this content of this instance, if it is quarantined already."""
    return conn.execute(
        select(_quarantine)
        .where(_quarantine.c.sop_instance_uid == sop_instance_uid, _quarantine.c.sha256 == sha256)
        .order_by(_quarantine.c.id)
    ).first()


def record(
    conn: Connection,
    meta: InstanceMeta,
    *,
    reason: Misfiling,
    file_path: str,
    file_size: int,
    sha256: str,
    calling_ae_title: str | None,
) -> int:
    """Insert the row of a quarantined instance in the caller's transaction; return its id."""
    return inserted_id(
        conn.execute(
            _quarantine.insert().values(
                received_at=utcnow(),
                calling_ae_title=calling_ae_title,
                sop_instance_uid=meta.sop_instance_uid,
                study_instance_uid=meta.study_instance_uid,
                series_instance_uid=meta.series_instance_uid,
                reason=reason.value,
                file_path=file_path,
                file_size=file_size,
                sha256=sha256,
            )
        )
    )


def list_entries(conn: Connection, *, limit: int | None = None) -> list[QuarantineEntry]:
    """The quarantined instances, newest first."""
    query = select(_quarantine).order_by(_quarantine.c.id.desc())
    if limit is not None:
        query = query.limit(limit)
    return [QuarantineEntry(**row._asdict()) for row in conn.execute(query).all()]
