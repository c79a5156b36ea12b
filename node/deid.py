"""De-identified exports and the re-identification of what comes back.

A remote node with ``deidentify:`` receives every instance through the DICOM PS3.15
Basic Application Level Confidentiality Profile (Table E.1-1, as the `dicom-anonymizer`
library ships it from the standard, release 2026c), applied to the dataset and to every
sequence item in it, private attributes removed, with these choices:

* UIDs (action U, and any other non-registry UID left) are replaced consistently per
  study and destination; the mapping is kept in the index (``deid_studies``,
  ``deid_uids``), so the same study sent again keeps its pseudonymous UIDs;
* PatientID and PatientName become one pseudonym per study and destination;
* Retain Longitudinal Temporal Information with Modified Dates (option
  ``modified_dates``, default on): dates and date-times the profile would remove or
  replace are moved back by one whole number of days per study, so intervals survive;
  otherwise the library's dummy values;
* PatientIdentityRemoved YES, DeidentificationMethod and its code sequence (113100,
  and 113107 with modified dates) say what was done;
* BurnedInAnnotation YES: the instance is not sent (``burned_in: refuse``, default) or
  sent as it is (``send``); an instance without the attribute is counted as unknown in
  the audit event of the export.

An instance sent back (C-STORE) under a pseudonymous Study Instance UID is
re-identified before it is stored: every UID the mapping knows goes back to the
original, the patient and study identity come from the index.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

from pydicom import dcmread
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import UID
from sqlalchemy import Connection

from pacsnode.storage import Archive
from pacsnode.storage import deid as mapping
from pacsnode.storage.db import read_connection
from pacsnode.storage.files import StagedFile
from pacsnode.storage.identity import study_identity
from pacsnode.storage.index import InstanceMeta, read_header
from pacsnode.storage.model_base import StrictModel

__all__ = [
    "DeidentifyProfile",
    "BurnedInAnnotationError",
    "Deidentifier",
    "DeidentifiedFile",
    "Reidentifier",
]

logger = logging.getLogger(__name__)

_BASIC_PROFILE = ("113100", "Basic Application Confidentiality Profile")
_MODIFIED_DATES = ("113107", "Retain Longitudinal Temporal Information Modified Dates Option")


class DeidentifyProfile(StrictModel):
    """``remote_nodes.<name>.deidentify``: what leaves the node for this destination."""

    profile: Literal["basic"] = "basic"
    modified_dates: bool = True
    burned_in: Literal["refuse", "send"] = "refuse"


class BurnedInAnnotationError(ValueError):
    """The instance says it has burned-in annotation; the profile refuses to send it."""


@dataclass(frozen=True, kw_only=True)
class DeidentifiedFile:
    path: Path
    original_study_uid: str
    burned_in_unknown: bool


_Rule = Callable[[Dataset, Any], None]


def _profile_tags() -> dict[Any, _Rule]:
    """Table E.1-1 of PS3.15 as the library ships it: tag -> action."""
    from dicomanonymizer.simpledicomanonymizer import initialize_actions

    return dict(initialize_actions("dicomfields_2026c"))


class Deidentifier:
    """De-identifies files for one destination, recording the pseudonymous identities in the index."""

    def __init__(self, archive: Archive, *, destination: str, profile: DeidentifyProfile) -> None:
        self.archive = archive
        self.destination = destination
        self.profile = profile
        self._base = _profile_tags()

    def deidentify_file(self, source: Path, out: Path) -> DeidentifiedFile:
        """Write ``source`` de-identified to ``out``.

        Raises
        ------
        BurnedInAnnotationError
            The instance has burned-in annotation and the profile refuses it.
        """
        ds = dcmread(source)
        burned_in = str(ds.get("BurnedInAnnotation", "") or "").strip().upper()
        if burned_in == "YES" and self.profile.burned_in == "refuse":
            raise BurnedInAnnotationError("BurnedInAnnotation is YES: not sent to a de-identifying destination")
        original_study = str(ds.StudyInstanceUID)
        study = mapping.study_for(self.archive.engine, self.destination, original_study)
        with self.archive.engine.begin() as conn:
            self._apply(ds, study, conn)
        ds.save_as(out, enforce_file_format=True)
        return DeidentifiedFile(path=out, original_study_uid=original_study, burned_in_unknown=not burned_in)

    def _apply(self, ds: Dataset, study: mapping.PseudonymousStudy, conn: Connection) -> None:
        from dicomanonymizer.simpledicomanonymizer import anonymize_dataset

        def replace_uid(dataset: Dataset, tag: Any) -> None:
            element = dataset.get(tag)
            if element is not None and element.VR == "UI":
                _map_uids(element, lambda uid: mapping.uid_for(conn, study, uid))
            # A sequence (X/Z/U*): its items were walked first, their UIDs replaced there.

        def shift_date(dataset: Dataset, tag: Any) -> None:
            element = dataset.get(tag)
            if element is not None and element.value:
                element.value = _shifted(element, study.day_offset)

        base = self._base  # built once per destination, not once per sequence item
        rules: dict[Any, _Rule] = {}
        for tag, action in base.items():
            if len(tag) != 2:
                continue
            name = getattr(action, "__name__", "")
            if name in ("replace_UID", "delete_or_empty_or_replace_UID"):
                rules[tag] = replace_uid
            elif (
                self.profile.modified_dates
                and tag[0] != 0x0010  # patient dates (birth date) go as the profile says: not retained
                and _dictionary_vr(tag) in ("DA", "DT")
                and name != "keep"
            ):
                rules[tag] = shift_date

        def walk(dataset: Dataset) -> None:
            # The profile's actions apply wherever an attribute occurs: every sequence item first.
            for element in list(dataset):
                if element.VR == "SQ" and element.value:
                    for item in element.value:
                        walk(item)
            anonymize_dataset(
                dataset, extra_anonymization_rules=rules, delete_private_tags=True, base_rules_gen=lambda: dict(base)
            )

        walk(ds)
        # Any UID still original (not a registry UID such as a SOP class): replaced too.
        replaced = set(mapping.original_uids(conn, study))
        for element in _all_elements(ds):
            if element.VR == "UI" and element.value:
                _map_uids(
                    element,
                    lambda uid: uid if uid in replaced or _registered(uid) else mapping.uid_for(conn, study, uid),
                )
        ds.PatientID = study.pseudonym
        ds.PatientName = study.pseudonym
        ds.PatientIdentityRemoved = "YES"
        codes = [_BASIC_PROFILE, *([_MODIFIED_DATES] if self.profile.modified_dates else [])]
        # LO: at most 64 characters; the code sequence names the profile and options in full.
        ds.DeidentificationMethod = "PS3.15 Basic Profile" + (", Modified Dates" if self.profile.modified_dates else "")
        ds.DeidentificationMethodCodeSequence = Sequence([_code(value, meaning) for value, meaning in codes])
        if hasattr(ds, "file_meta"):
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID


class Reidentifier:
    """Maps an instance sent back under a pseudonymous study onto the original study and patient."""

    def __init__(self, archive: Archive, *, destinations: dict[str, str]) -> None:
        self.archive = archive
        self.destinations = destinations  # remote node name -> its AE title

    def reidentify(
        self, staged: StagedFile, meta: InstanceMeta, *, calling_ae_title: str
    ) -> tuple[StagedFile, InstanceMeta] | None:
        """The staged instance re-identified (a new staged file, the old one discarded), or None if not ours.

        Only the destination the study was sent to (its AE title) gets its instances
        re-identified; another peer's instance under the same pseudonymous UID is stored as sent.
        """
        with read_connection(self.archive.engine) as conn:
            study = mapping.find_by_deidentified_study(conn, meta.study_instance_uid)
            if study is None:
                return None
            if self.destinations.get(study.destination) != calling_ae_title.strip():
                logger.warning(
                    "instance %s names the pseudonymous study of destination %s but comes from %r: "
                    "stored as sent, not re-identified",
                    meta.sop_instance_uid,
                    study.destination,
                    calling_ae_title,
                    extra={"action": "reidentify-refused", "destination": study.destination},
                )
                return None
            originals = mapping.original_uids(conn, study)
            identity = study_identity(conn, study.original_study_uid)
        ds = dcmread(staged.path)
        for element in _all_elements(ds):
            if element.VR == "UI" and element.value:
                _map_uids(element, lambda uid: originals.get(uid, uid))
        if identity is not None:
            ds.PatientID = identity.patient_id
            for keyword, value in (
                ("PatientName", identity.patient_name),
                ("PatientBirthDate", identity.patient_birth_date),
                ("PatientSex", identity.patient_sex),
            ):
                if value is not None:
                    setattr(ds, keyword, value)
        for keyword in ("PatientIdentityRemoved", "DeidentificationMethod", "DeidentificationMethodCodeSequence"):
            if keyword in ds:
                delattr(ds, keyword)
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        restaged = self.archive.stage([buffer.getvalue()])
        self.archive.discard(staged)
        try:
            new_meta = read_header(
                restaged.path,
                expected_sop_class_uid=meta.sop_class_uid,
                expected_sop_instance_uid=str(ds.SOPInstanceUID),
                transfer_syntax_uid=meta.transfer_syntax_uid,
            )
        except BaseException:
            self.archive.discard(restaged)
            raise
        logger.info(
            "instance %s re-identified into study %s (sent back by destination %s)",
            new_meta.sop_instance_uid,
            new_meta.study_instance_uid,
            study.destination,
            extra={"action": "reidentified", "destination": study.destination},
        )
        return restaged, new_meta


def _registered(uid: str) -> bool:
    """A UID of the DICOM registry (SOP class, transfer syntax, coding scheme...): not identifying."""
    return UID(uid).name != uid


def _dictionary_vr(tag: Any) -> str:
    try:
        return str(dictionary_VR(tuple(tag)))
    except KeyError:
        return ""


def _shifted(element: DataElement, days: int) -> str:
    text = str(element.value)
    try:
        if element.VR == "DA":
            return (datetime.strptime(text[:8], "%Y%m%d").date() + timedelta(days=days)).strftime("%Y%m%d")
        day = datetime.strptime(text[:8], "%Y%m%d").date() + timedelta(days=days)
        return day.strftime("%Y%m%d") + text[8:]
    except ValueError:  # not a date we can read: nothing of it is kept
        return (date(1, 1, 1)).strftime("%Y%m%d") if element.VR == "DA" else "00010101"


def _map_uids(element: DataElement, replace: Callable[[str], str]) -> None:
    if element.VM > 1:
        element.value = [replace(str(v)) for v in element.value]
    else:
        element.value = replace(str(element.value))


def _all_elements(ds: Dataset) -> list[DataElement]:
    out: list[DataElement] = []

    def collect(dataset: Dataset, _element: DataElement) -> None:
        out.append(_element)

    ds.walk(collect)
    return out


def _code(value: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = "DCM"
    item.CodeMeaning = meaning
    return item
