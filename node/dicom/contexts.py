"""Presentation contexts pacsnode accepts: every storage SOP class pynetdicom knows,
in every transfer syntax pydicom knows, Verification, and Query/Retrieve.

Instances are stored as received, never decoded, so any transfer syntax can be
accepted. pynetdicom picks the first of *our* syntaxes that the requestor
proposes, so compressed syntaxes come first: a sender that offers its original
JPEG and a fallback gets to send the original bytes.
"""

from __future__ import annotations

from pydicom import uid
from pynetdicom import build_context
from pynetdicom import sop_class as pynetdicom_sop_classes
from pynetdicom.presentation import PresentationContext
from pynetdicom.sop_class import _STORAGE_CLASSES, SOPClass

from pacsnode.storage.query import Model

__all__ = [
    "FIND_MODELS",
    "GET_MODELS",
    "MOVE_MODELS",
    "STORAGE_SOP_CLASSES",
    "TRANSFER_SYNTAXES",
    "PatientRootQueryRetrieveInformationModelFind",
    "PatientRootQueryRetrieveInformationModelGet",
    "PatientRootQueryRetrieveInformationModelMove",
    "StudyRootQueryRetrieveInformationModelFind",
    "StudyRootQueryRetrieveInformationModelGet",
    "StudyRootQueryRetrieveInformationModelMove",
    "Verification",
    "qr_contexts",
    "scp_contexts",
]


def _sop_class(keyword: str) -> SOPClass:
    """pynetdicom's SOP class `keyword` (such as ``Verification``), with its type.

    pynetdicom makes these constants at import time (``globals()[keyword] = ...``),
    so a type checker cannot see them when imported by name.
    """
    value = getattr(pynetdicom_sop_classes, keyword)
    if not isinstance(value, SOPClass):
        raise TypeError(f"pynetdicom.sop_class.{keyword} is not a SOP class")
    return value


Verification = _sop_class("Verification")
PatientRootQueryRetrieveInformationModelFind = _sop_class("PatientRootQueryRetrieveInformationModelFind")
PatientRootQueryRetrieveInformationModelGet = _sop_class("PatientRootQueryRetrieveInformationModelGet")
PatientRootQueryRetrieveInformationModelMove = _sop_class("PatientRootQueryRetrieveInformationModelMove")
StudyRootQueryRetrieveInformationModelFind = _sop_class("StudyRootQueryRetrieveInformationModelFind")
StudyRootQueryRetrieveInformationModelGet = _sop_class("StudyRootQueryRetrieveInformationModelGet")
StudyRootQueryRetrieveInformationModelMove = _sop_class("StudyRootQueryRetrieveInformationModelMove")

# build_context takes a list[str | UID] (invariant), hence the element type.
_UNCOMPRESSED_ORDER: list[str | uid.UID] = [
    uid.ExplicitVRLittleEndian,
    uid.ImplicitVRLittleEndian,
    uid.DeflatedExplicitVRLittleEndian,
    uid.ExplicitVRBigEndian,
]

TRANSFER_SYNTAXES: list[str | uid.UID] = [
    ts for ts in uid.AllTransferSyntaxes if ts not in _UNCOMPRESSED_ORDER
] + _UNCOMPRESSED_ORDER

STORAGE_SOP_CLASSES: dict[str, str] = {name: str(value) for name, value in _STORAGE_CLASSES.items()}


def scp_contexts() -> list[PresentationContext]:
    """The supported contexts of the SCP: storage classes and Verification."""
    contexts = [build_context(sop_class, TRANSFER_SYNTAXES) for sop_class in STORAGE_SOP_CLASSES.values()]
    contexts.append(build_context(Verification, _UNCOMPRESSED_ORDER))
    return contexts


# Query/Retrieve SOP classes by service, with the information model each one queries.
FIND_MODELS: dict[str, Model] = {
    PatientRootQueryRetrieveInformationModelFind: Model.PATIENT_ROOT,
    StudyRootQueryRetrieveInformationModelFind: Model.STUDY_ROOT,
}
MOVE_MODELS: dict[str, Model] = {
    PatientRootQueryRetrieveInformationModelMove: Model.PATIENT_ROOT,
    StudyRootQueryRetrieveInformationModelMove: Model.STUDY_ROOT,
}
GET_MODELS: dict[str, Model] = {
    PatientRootQueryRetrieveInformationModelGet: Model.PATIENT_ROOT,
    StudyRootQueryRetrieveInformationModelGet: Model.STUDY_ROOT,
}


def qr_contexts() -> list[PresentationContext]:
    """Query/Retrieve (Patient Root and Study Root: FIND, MOVE, GET); identifiers are small, so uncompressed."""
    return [build_context(sop_class, _UNCOMPRESSED_ORDER) for sop_class in (*FIND_MODELS, *MOVE_MODELS, *GET_MODELS)]
