"""The DIMSE side of the audit trail: events built from pynetdicom events, recorded before the answer.

Bound by :class:`pacsnode.node.app.Node`: association accepted / refused (EVT_ESTABLISHED,
EVT_REJECTED), instances stored once per study and association (before the first of
its instances is acknowledged), queries (before the first match is sent), and
retrieves (before the first sub-operation).
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom.events import Event

from pacsnode.node import audit
from pacsnode.storage import Archive
from pacsnode.storage.db import read_connection
from pacsnode.storage.identity import StudyIdentity, studies_of_instances, study_identity
from pacsnode.storage.index import InstanceMeta

__all__ = ["DimseAudit", "WorkerAudit", "study_ref"]


def study_ref(identity: StudyIdentity) -> audit.StudyRef:
    return audit.StudyRef(
        study_instance_uid=identity.study_instance_uid,
        patient_id=identity.patient_id,
        patient_name=identity.patient_name,
        patient_birth_date=identity.patient_birth_date,
        instances=identity.instances,
    )


def _peer(assoc: Any) -> tuple[str, str]:
    """The remote AE of an association (the requestor, or the acceptor when this node requested)."""
    remote = assoc.acceptor if assoc.is_requestor else assoc.requestor
    return str(remote.ae_title).strip(), str(remote.address)


class DimseAudit:
    """Audit events of the association server, written to ``trail``."""

    def __init__(self, trail: audit.AuditTrail, *, archive: Archive, ae_title: str) -> None:
        self.trail = trail
        self.archive = archive
        self.ae_title = ae_title
        self._lock = threading.Lock()
        self._stored: dict[int, set[tuple[str, str | None, str | None, str | None]]] = {}

    @property
    def enabled(self) -> bool:
        return self.trail.enabled

    # -- association events (pynetdicom handlers) ------------------------------------------------
    def on_established(self, event: Event) -> None:
        if not self.enabled or event.assoc.is_requestor:
            return
        calling, host = _peer(event.assoc)
        try:
            self.trail.record(
                audit.association(
                    accepted=True,
                    calling_ae_title=calling,
                    called_ae_title=str(event.assoc.acceptor.ae_title).strip(),
                    host=host,
                )
            )
        except audit.AuditError:  # an association that cannot be audited serves nothing
            event.assoc.abort()

    def on_rejected(self, event: Event) -> None:
        if not self.enabled or event.assoc.is_requestor:
            return
        calling, host = _peer(event.assoc)
        self.trail.record(
            audit.association(
                accepted=False,
                calling_ae_title=calling,
                called_ae_title=str(event.assoc.acceptor.ae_title).strip(),
                host=host,
                reason="A-ASSOCIATE-RJ",
            )
        )

    def on_close(self, event: Event) -> None:
        with self._lock:
            self._stored.pop(id(event.assoc), None)

    # -- services --------------------------------------------------------------------------------
    def instance_stored(self, event: Event, meta: InstanceMeta, *, reidentified: bool = False) -> None:
        """Record the first instance of each study (and patient identity) an association stores."""
        if not self.enabled:
            return
        # Once per study and association, and again for each other patient identity it carries
        # (attribute conflicts: the trail keeps what each instance said).
        key = id(event.assoc)
        seen = (meta.study_instance_uid, meta.patient_id, meta.patient_name, meta.patient_birth_date)
        with self._lock:
            studies = self._stored.setdefault(key, set())
            first = seen not in studies
            studies.add(seen)
        if not first:
            return
        calling, host = _peer(event.assoc)
        try:
            self.trail.record(
                audit.instances_stored(
                    calling_ae_title=calling,
                    host=host,
                    called_ae_title=self.ae_title,
                    study=audit.StudyRef(
                        study_instance_uid=meta.study_instance_uid,
                        patient_id=meta.patient_id or "",
                        patient_name=meta.patient_name,
                        patient_birth_date=meta.patient_birth_date,
                    ),
                    reidentified=reidentified,
                )
            )
        except audit.AuditError:
            with self._lock:
                studies.discard(seen)
            raise

    def query(self, event: Event, *, identifier: Dataset, level: str, rows: list[dict[str, Any]]) -> None:
        """Record a C-FIND before its first match is sent: the keys asked and the studies matched."""
        if not self.enabled:
            return
        calling, host = _peer(event.assoc)
        keys: dict[str, str] = {}
        for element in identifier:
            if element.VR == "SQ" or element.value in (None, "", b""):
                continue
            keys[element.keyword or str(element.tag)] = str(element.value)[:256]
        studies: dict[str, audit.StudyRef] = {}
        for row in rows:
            uid = _text(row.get("StudyInstanceUID"))
            if uid and uid not in studies:
                studies[uid] = audit.StudyRef(study_instance_uid=uid, patient_id=_text(row.get("PatientID")))
        self.trail.record(
            audit.query(
                calling_ae_title=calling,
                host=host,
                called_ae_title=self.ae_title,
                sop_class_uid=str(event.context.abstract_syntax),
                level=level,
                keys=keys,
                matches=len(rows),
                studies=studies.values(),
            )
        )

    def retrieve(
        self,
        event: Event,
        *,
        service: str,
        sop_instance_uids: Iterable[str],
        destination_ae_title: str,
        destination_host: str | None,
    ) -> None:
        """Record a C-MOVE / C-GET before its first sub-operation (Begin Transferring DICOM Instances)."""
        if not self.enabled:
            return
        uids = list(sop_instance_uids)
        with read_connection(self.archive.engine) as conn:
            studies = studies_of_instances(conn, uids)
        calling, host = _peer(event.assoc)
        self.trail.record(
            audit.transfer_begun(
                service=service,
                requestor=audit.Participant(role="requestor", ae_title=calling, host=host, requestor=True),
                source_ae_title=self.ae_title,
                destination=audit.Participant(role="destination", ae_title=destination_ae_title, host=destination_host),
                studies=[study_ref(s) for s in studies],
                instances=len(uids),
            )
        )


def _text(value: Any) -> str | None:
    if value is None:
        return None
    if hasattr(value, "value"):  # a DataElement from the stored header
        value = value.value
    text = str(value)
    return text or None


class WorkerAudit:
    """Audit events of a worker process: analysis jobs and exports."""

    def __init__(self, trail: audit.AuditTrail, *, archive: Archive, ae_title: str) -> None:
        self.trail = trail
        self.archive = archive
        self.ae_title = ae_title

    def job(self, *, job_id: int, pipeline: str, rule: str, study_instance_uid: str, state: str) -> None:
        """An analysis job started or finished on a study (Order Record)."""
        if not self.trail.enabled:
            return
        with read_connection(self.archive.engine) as conn:
            identity = study_identity(conn, study_instance_uid)
        ref = study_ref(identity) if identity else audit.StudyRef(study_instance_uid=study_instance_uid)
        failed = state in ("failed", "retry")
        self.trail.record(
            audit.analysis_job(
                job_id=job_id,
                pipeline=pipeline,
                rule=rule,
                state=state,
                study=ref,
                node_ae_title=self.ae_title,
                outcome=audit.Outcome.SERIOUS_FAILURE if failed else audit.Outcome.SUCCESS,
            )
        )

    def export(
        self,
        *,
        destination: str,
        ae_title: str,
        host: str,
        sop_instance_uids: Iterable[str],
        deidentified: bool = False,
        burned_in_unknown: int = 0,
    ) -> None:
        """Instances about to be sent to a remote node (Begin Transferring DICOM Instances)."""
        if not self.trail.enabled:
            return
        uids = list(sop_instance_uids)
        with read_connection(self.archive.engine) as conn:
            studies = studies_of_instances(conn, uids)
        self.trail.record(
            audit.transfer_begun(
                service="export",
                requestor=audit.Participant(role="requestor", ae_title=self.ae_title, requestor=True),
                source_ae_title=self.ae_title,
                destination=audit.Participant(role="destination", ae_title=ae_title, host=host),
                studies=[study_ref(s) for s in studies],
                instances=len(uids),
                deidentified=deidentified,
                burned_in_unknown=burned_in_unknown,
            )
        )
