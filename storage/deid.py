"""The index side of de-identified exports: pseudonymous studies and replaced UIDs, both ways.

A study exported to a de-identifying destination gets one ``deid_studies`` row per
destination (its pseudonymous Study Instance UID, PatientID and date offset) and one
``deid_uids`` row per UID replaced. The same study sent again gets the same values;
a result sent back under the pseudonymous Study Instance UID is mapped back with
:func:`find_by_deidentified_study` and :func:`original_uids`.
"""

from __future__ import annotations

import dataclasses
import secrets
import uuid
from dataclasses import dataclass

from sqlalchemy import Connection, Engine, select
from sqlalchemy.exc import IntegrityError

from pacsnode.storage.index import inserted_id, utcnow
from pacsnode.storage.models import DeidStudy, DeidUid

__all__ = ["PseudonymousStudy", "study_for", "uid_for", "find_by_deidentified_study", "original_uids", "new_uid"]

_studies = DeidStudy.__table__
_uids = DeidUid.__table__

# Dates move back by a whole number of days in this range: far enough to hide the real
# dates, the same for every instance of the study so intervals stay true.
_MIN_DAYS, _MAX_DAYS = 62, 3650


@dataclass(frozen=True, kw_only=True)
class PseudonymousStudy:
    id: int
    destination: str
    original_study_uid: str
    deidentified_study_uid: str
    pseudonym: str
    day_offset: int


def new_uid() -> str:
    """A fresh UID under 2.25 (PS3.5 B.2: a UUID as one integer), unrelated to the original."""
    return f"2.25.{uuid.uuid4().int}"


def _as_study(row: object) -> PseudonymousStudy:
    data = dict(row._mapping)  # type: ignore[attr-defined]
    data.pop("created_at", None)
    return PseudonymousStudy(**data)


def study_for(engine: Engine, destination: str, original_study_uid: str) -> PseudonymousStudy:
    """The study's pseudonymous identity at ``destination``: the one recorded, else a new one (committed)."""
    for _ in range(3):
        with engine.begin() as conn:
            row = conn.execute(
                select(_studies).where(
                    _studies.c.destination == destination, _studies.c.original_study_uid == original_study_uid
                )
            ).first()
            if row is not None:
                return _as_study(row)
        try:
            with engine.begin() as conn:
                made = PseudonymousStudy(
                    id=0,
                    destination=destination,
                    original_study_uid=original_study_uid,
                    deidentified_study_uid=new_uid(),
                    pseudonym=f"DEID-{secrets.token_hex(6).upper()}",
                    day_offset=-(_MIN_DAYS + secrets.randbelow(_MAX_DAYS - _MIN_DAYS)),
                )
                values = {k: v for k, v in vars(made).items() if k != "id"}
                new_id = inserted_id(conn.execute(_studies.insert().values(**values, created_at=utcnow())))
                return dataclasses.replace(made, id=new_id)
        except IntegrityError:  # another exporter recorded it first: read theirs
            continue
    raise RuntimeError(f"cannot record the pseudonymous study for {original_study_uid}")


def uid_for(conn: Connection, study: PseudonymousStudy, original_uid: str) -> str:
    """The replacement of ``original_uid`` in ``study``: the one recorded, else a new one (in the caller's transaction)."""
    if original_uid == study.original_study_uid:
        return study.deidentified_study_uid
    row = conn.execute(
        select(_uids.c.deidentified_uid).where(_uids.c.deid_study_fk == study.id, _uids.c.original_uid == original_uid)
    ).first()
    if row is not None:
        return str(row.deidentified_uid)
    replacement = new_uid()
    conn.execute(_uids.insert().values(deid_study_fk=study.id, original_uid=original_uid, deidentified_uid=replacement))
    return replacement


def find_by_deidentified_study(conn: Connection, deidentified_study_uid: str) -> PseudonymousStudy | None:
    """The exported study a destination knows as ``deidentified_study_uid``, or ``None``."""
    row = conn.execute(select(_studies).where(_studies.c.deidentified_study_uid == deidentified_study_uid)).first()
    return _as_study(row) if row is not None else None


def original_uids(conn: Connection, study: PseudonymousStudy) -> dict[str, str]:
    """Replacement -> original, for every UID replaced in ``study`` (its Study Instance UID included)."""
    rows = conn.execute(select(_uids.c.deidentified_uid, _uids.c.original_uid).where(_uids.c.deid_study_fk == study.id))
    mapping = {str(r.deidentified_uid): str(r.original_uid) for r in rows}
    mapping[study.deidentified_study_uid] = study.original_study_uid
    return mapping
