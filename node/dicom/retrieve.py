"""Query/Retrieve SCU for admins: ``pacsnode find`` and ``pacsnode retrieve``.

``find`` sends one C-FIND and collects the answers. ``retrieve`` pulls a study
(or series) from a remote node, either with C-GET over one association, the
instances landing through the same C-STORE handler as pushed ones, or with
C-MOVE to a destination (by default this node, which must be serving and known
to the remote under its AE title).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom import AE, build_role, evt

from pacsnode.node.config import RemoteNode, Settings
from pacsnode.node.dicom.contexts import (
    STORAGE_SOP_CLASSES,
    TRANSFER_SYNTAXES,
    PatientRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)
from pacsnode.node.dicom.export import make_ae, why_not_established
from pacsnode.node.dicom.handlers import AssociationLog, StoreService, set_nodelay
from pacsnode.node.dicom.tls import client_args
from pacsnode.storage import Archive

__all__ = ["DEFAULT_RETURN_KEYS", "FindResult", "RetrieveResult", "find", "retrieve"]

logger = logging.getLogger(__name__)

DEFAULT_RETURN_KEYS: dict[str, tuple[str, ...]] = {
    "PATIENT": ("PatientID", "PatientName", "PatientBirthDate", "NumberOfPatientRelatedStudies"),
    "STUDY": (
        "PatientID",
        "PatientName",
        "StudyDate",
        "AccessionNumber",
        "StudyDescription",
        "ModalitiesInStudy",
        "NumberOfStudyRelatedSeries",
        "NumberOfStudyRelatedInstances",
        "StudyInstanceUID",
    ),
    "SERIES": (
        "StudyInstanceUID",
        "SeriesNumber",
        "Modality",
        "SeriesDescription",
        "NumberOfSeriesRelatedInstances",
        "SeriesInstanceUID",
    ),
    "IMAGE": ("StudyInstanceUID", "SeriesInstanceUID", "InstanceNumber", "SOPClassUID", "SOPInstanceUID"),
}

# C-GET can request at most 128 contexts: the Get model plus the storage classes met in practice.
_GET_STORAGE_CLASSES = (
    "CTImageStorage",
    "EnhancedCTImageStorage",
    "MRImageStorage",
    "EnhancedMRImageStorage",
    "ComputedRadiographyImageStorage",
    "DigitalXRayImageStorageForPresentation",
    "DigitalXRayImageStorageForProcessing",
    "DigitalMammographyXRayImageStorageForPresentation",
    "DigitalMammographyXRayImageStorageForProcessing",
    "UltrasoundImageStorage",
    "UltrasoundMultiFrameImageStorage",
    "XRayAngiographicImageStorage",
    "XRayRadiofluoroscopicImageStorage",
    "NuclearMedicineImageStorage",
    "PositronEmissionTomographyImageStorage",
    "EnhancedPETImageStorage",
    "SecondaryCaptureImageStorage",
    "MultiFrameGrayscaleByteSecondaryCaptureImageStorage",
    "MultiFrameGrayscaleWordSecondaryCaptureImageStorage",
    "MultiFrameTrueColorSecondaryCaptureImageStorage",
    "BasicTextSRStorage",
    "EnhancedSRStorage",
    "ComprehensiveSRStorage",
    "Comprehensive3DSRStorage",
    "KeyObjectSelectionDocumentStorage",
    "SegmentationStorage",
    "GrayscaleSoftcopyPresentationStateStorage",
    "EncapsulatedPDFStorage",
    "RTImageStorage",
    "RTDoseStorage",
    "RTStructureSetStorage",
    "RTPlanStorage",
    "VLPhotographicImageStorage",
    "VLWholeSlideMicroscopyImageStorage",
    "BreastTomosynthesisImageStorage",
    "XRay3DAngiographicImageStorage",
    "TwelveLeadECGWaveformStorage",
    "RawDataStorage",
)


@dataclass
class FindResult:
    status: int | None
    matches: list[Dataset] = field(default_factory=list)
    error_comment: str = ""


@dataclass
class RetrieveResult:
    status: int | None
    completed: int = 0
    failed: int = 0
    warning: int = 0
    failed_uids: list[str] = field(default_factory=list)
    stored_here: int = 0
    error_comment: str = ""

    @property
    def ok(self) -> bool:
        return self.status == 0x0000 and self.failed == 0


def _associate(remote: RemoteNode, ae: AE, **kwargs: Any) -> Any:
    handlers = [(evt.EVT_CONN_OPEN, set_nodelay), *kwargs.pop("evt_handlers", [])]
    kwargs.update(client_args(remote))
    assoc = ae.associate(remote.host, remote.port, ae_title=remote.ae_title, evt_handlers=handlers, **kwargs)
    if not assoc.is_established:
        raise ConnectionError(why_not_established(assoc, remote))
    return assoc


def _final(result: FindResult | RetrieveResult, rsp: Dataset) -> None:
    result.status = int(rsp.Status)
    result.error_comment = str(rsp.get("ErrorComment", "") or "")


def find(
    settings: Settings, remote: RemoteNode, level: str, keys: dict[str, str], *, patient_root: bool = False
) -> FindResult:
    """One C-FIND at ``level``; ``keys`` maps keywords to match values ('' = return key)."""
    model = PatientRootQueryRetrieveInformationModelFind if patient_root else StudyRootQueryRetrieveInformationModelFind
    identifier = Dataset()
    identifier.QueryRetrieveLevel = level
    for keyword, value in keys.items():
        setattr(identifier, keyword, value)
    if any(not str(v).isascii() for v in keys.values()):
        identifier.SpecificCharacterSet = "ISO_IR 192"
    ae = make_ae(settings)
    ae.add_requested_context(model)
    assoc = _associate(remote, ae)
    result = FindResult(status=None)
    try:
        for rsp, answer in assoc.send_c_find(identifier, model):
            if "Status" not in rsp:
                break
            if int(rsp.Status) in (0xFF00, 0xFF01) and answer is not None:
                result.matches.append(answer)
            else:
                _final(result, rsp)
    finally:
        assoc.release()
    return result


def _identifier(study_uid: str, series_uid: str | None) -> Dataset:
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "SERIES" if series_uid else "STUDY"
    identifier.StudyInstanceUID = study_uid
    if series_uid:
        identifier.SeriesInstanceUID = series_uid
    return identifier


def _collect(result: RetrieveResult, rsp: Dataset, identifier: Dataset | None) -> None:
    result.completed = int(rsp.get("NumberOfCompletedSuboperations", result.completed) or 0)
    result.failed = int(rsp.get("NumberOfFailedSuboperations", result.failed) or 0)
    result.warning = int(rsp.get("NumberOfWarningSuboperations", result.warning) or 0)
    if identifier is not None and "FailedSOPInstanceUIDList" in identifier:
        value = identifier.FailedSOPInstanceUIDList
        result.failed_uids = [str(value)] if isinstance(value, str) else [str(v) for v in value]


def retrieve(
    settings: Settings,
    remote: RemoteNode,
    study_uid: str,
    *,
    series_uid: str | None = None,
    method: str = "get",
    destination: str | None = None,
    archive: Archive | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> RetrieveResult:
    """Pull a study or series from ``remote``; C-GET stores into ``archive``.

    ``progress(done, total)`` is called on each pending response.
    """
    identifier = _identifier(study_uid, series_uid)
    ae = make_ae(settings)
    result = RetrieveResult(status=None)
    if method == "move":
        model = StudyRootQueryRetrieveInformationModelMove
        ae.add_requested_context(model)
        assoc = _associate(remote, ae)
        responses = assoc.send_c_move(identifier, destination or settings.node.ae_title, model)
    else:
        if archive is None:
            raise ValueError("C-GET needs the archive to store into")
        model = StudyRootQueryRetrieveInformationModelGet
        ae.add_requested_context(model)
        roles = []
        for name in _GET_STORAGE_CLASSES:
            sop_class = STORAGE_SOP_CLASSES[name]
            ae.add_requested_context(sop_class, TRANSFER_SYNTAXES)
            roles.append(build_role(sop_class, scp_role=True))
        store = StoreService(
            archive=archive, settings=settings.node, assoc_log=AssociationLog(), policy=settings.policy
        )

        def _on_store(event: Any) -> Any:
            code = store.handle_store(event)
            if code == 0:
                result.stored_here += 1
            return code

        assoc = _associate(remote, ae, ext_neg=roles, evt_handlers=[(evt.EVT_C_STORE, _on_store)])
        responses = assoc.send_c_get(identifier, model)
    try:
        for rsp, answer in responses:
            if "Status" not in rsp:
                break
            _collect(result, rsp, answer)
            if int(rsp.Status) in (0xFF00, 0xFF01):
                remaining = int(rsp.get("NumberOfRemainingSuboperations", 0) or 0)
                done = result.completed + result.failed + result.warning
                if progress is not None:
                    progress(done, done + remaining)
            else:
                _final(result, rsp)
    finally:
        assoc.release()
    return result
