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
from pynetdicom.presentation import PresentationContext
from pynetdicom.sop_class import (
    _STORAGE_CLASSES,
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)

from pacsnode.storage.query import Model

__all__ = [
    "FIND_MODELS",
    "GET_MODELS",
    "MOVE_MODELS",
    "STORAGE_SOP_CLASSES",
    "TRANSFER_SYNTAXES",
    "qr_contexts",
    "scp_contexts",
]

_UNCOMPRESSED_ORDER = [
    uid.ExplicitVRLittleEndian,
    uid.ImplicitVRLittleEndian,
    uid.DeflatedExplicitVRLittleEndian,
    uid.ExplicitVRBigEndian,
]

TRANSFER_SYNTAXES: list[str] = [
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
