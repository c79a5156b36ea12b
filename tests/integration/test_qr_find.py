"""C-FIND SCP over a real association: matching, return keys, statuses, cancel.

Return keys the index has no column for come from the ``dicom_json`` that each level keeps of
its first instance (an instance: its own header); the instances of :data:`CORPUS` carry such
headers (:func:`_header`), the bulk studies none (rows as indexed before revision 0004).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, build_context, evt
from pynetdicom.pdu_primitives import SOPClassExtendedNegotiation
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelFind,
)

from pacsnode.node.dicom.handlers import set_nodelay
from pacsnode.node.testing.corpus import make_dataset
from pacsnode.storage.index import InstanceMeta, add_instance, header_json
from tests.support.helpers import hold_reactor, make_settings, store_datasets
from tests.support.node import RunningNode

STUDY_ROOT = StudyRootQueryRetrieveInformationModelFind
PATIENT_ROOT = PatientRootQueryRetrieveInformationModelFind

# (patient id, name, birth date, study uid, date, time, accession, description, [(series uid, modality, number, n)])
CORPUS: list[tuple[str, str, str, str, str, str, str, str, list[tuple[str, str, int, int]]]] = [
    (
        "P1",
        "Doe^John",
        "19600101",
        "1.2.3.1",
        "20240105",
        "081500",
        "ACC1",
        "CT chest",
        [("1.2.3.1.1", "CT", 1, 3), ("1.2.3.1.2", "SR", 2, 1)],
    ),
    ("P1", "Doe^John", "19600101", "1.2.3.2", "20250310", "140000", "ACC2", "CT abdomen", [("1.2.3.2.1", "CT", 1, 2)]),
    (
        "P2",
        "DOE^JANE",
        "19700202",
        "1.2.3.3",
        "20250311",
        "093000",
        "ACC3",
        "MR brain",
        [("1.2.3.3.1", "MR", 1, 2), ("1.2.3.3.2", "MR", 2, 2)],
    ),
    (
        "P3",
        "Müller^Jürgen",
        "19800303",
        "1.2.3.4",
        "20260101",
        "000001",
        "ACC4",
        "Röntgen Thorax",
        [("1.2.3.4.1", "CR", 1, 1)],
    ),
    ("P4", "Gómez^Ana", "19900404", "1.2.3.5", "20261231", "235959", "ACC5", "CT head", [("1.2.3.5.1", "CT", 3, 1)]),
]


# Header attributes without an index column, per study: PatientAge, PatientWeight (DS text as
# written), InstitutionName.
STUDY_HEADERS = {
    "1.2.3.1": ("064Y", "72.50", "Klinik Nord"),
    "1.2.3.2": ("065Y", "71", "Klinik Nord"),
    "1.2.3.3": ("055Y", "", "Klinik Süd"),
    "1.2.3.4": ("045Y", "90.0", "Universitätsklinik Köln"),
    "1.2.3.5": ("035Y", "55", "Klinik Süd"),
}


def _header(study: str, series: str, modality: str, i: int) -> dict[str, object]:
    """The stored header of instance ``i`` of a series: what read_header keeps of a received file."""
    age, weight, institution = STUDY_HEADERS[study]
    ds = Dataset()
    ds.PatientAge = age
    if weight:
        ds.PatientWeight = weight
    ds.InstitutionName = institution
    ds.ProtocolName = f"{modality} protocol {series}"
    ds.ContentDate = f"202601{i:02d}"  # differs per instance: each level keeps its first
    code = Dataset()
    code.CodeValue = f"P-{study}"
    code.CodingSchemeDesignator = "99PACSNODE"
    code.CodeMeaning = f"Procedure of {study}"
    ds.ProcedureCodeSequence = Sequence([code])
    return header_json(ds)


def _fill(node: RunningNode, extra_studies: int = 0) -> None:
    rows: list[InstanceMeta] = []
    for pid, name, birth, study, date, time, acc, desc, series_list in CORPUS:
        charset = "ISO_IR 192" if not name.isascii() else None
        for series, modality, number, count in series_list:
            for i in range(1, count + 1):
                rows.append(
                    InstanceMeta(
                        sop_class_uid="1.2.840.10008.5.1.4.1.1.2"
                        if modality != "SR"
                        else "1.2.840.10008.5.1.4.1.1.88.11",
                        sop_instance_uid=f"{series}.{i}",
                        study_instance_uid=study,
                        series_instance_uid=series,
                        transfer_syntax_uid="1.2.840.10008.1.2.1",
                        specific_character_set=charset,
                        patient_id=pid,
                        patient_name=name,
                        patient_birth_date=birth,
                        patient_sex="O",
                        study_date=date,
                        study_time=time,
                        accession_number=acc,
                        study_id="1",
                        study_description=desc,
                        referring_physician_name="Ref^Doc",
                        modality=modality,
                        series_number=number,
                        series_description=f"{modality} series",
                        body_part_examined="CHEST",
                        instance_number=i,
                        dicom_json=_header(study, series, modality, i),
                    )
                )
    for n in range(extra_studies):
        rows.append(
            InstanceMeta(
                sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                sop_instance_uid=f"9.9.{n}.1.1",
                study_instance_uid=f"9.9.{n}",
                series_instance_uid=f"9.9.{n}.1",
                transfer_syntax_uid="1.2.840.10008.1.2.1",
                patient_id="BULK",
                patient_name="Bulk^Patient",
                modality="OT",
                accession_number=f"B{n}",
            )
        )
    with node.archive.engine.begin() as conn:
        for meta in rows:
            add_instance(
                conn,
                meta,
                file_path=f"none/{meta.sop_instance_uid}",
                file_size=0,
                sha256="0" * 64,
                calling_ae_title="TEST",
            )


@pytest.fixture(scope="module")
def qr_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningNode]:
    node = RunningNode(make_settings(tmp_path_factory.mktemp("qr"), query={"max_matches": 40}))
    try:
        _fill(node, extra_studies=40)
        yield node
    finally:
        node.stop()


class FindClient:
    def __init__(self, port: int, *, ext: dict[str, bytes] | None = None, transfer_syntax: str | None = None) -> None:
        ae = AE(ae_title="FINDSCU")
        ae.requested_contexts = [
            build_context(STUDY_ROOT, transfer_syntax),
            build_context(PATIENT_ROOT, transfer_syntax),
        ]
        ext_neg = []
        for uid, info in (ext or {}).items():
            item = SOPClassExtendedNegotiation()
            item.sop_class_uid = uid
            item.service_class_application_information = info
            ext_neg.append(item)
        self.assoc = ae.associate(
            "127.0.0.1",
            port,
            ae_title="PACSNODE",
            ext_neg=ext_neg or None,
            evt_handlers=[(evt.EVT_CONN_OPEN, set_nodelay)],
        )
        assert self.assoc.is_established

    def find(
        self, keys: dict[str, Any] | Dataset, model: str = STUDY_ROOT
    ) -> tuple[int, list[Dataset], Dataset | None]:
        if isinstance(keys, Dataset):
            ds = keys
        else:
            ds = Dataset()
            for keyword, value in keys.items():
                setattr(ds, keyword, value)
        matches: list[Dataset] = []
        self.pending_codes: list[int] = []
        final_status, final = -1, None
        hold_reactor(self.assoc)
        for rsp, identifier in self.assoc.send_c_find(ds, model):
            code = int(rsp.Status)
            if code in (0xFF00, 0xFF01):
                assert identifier is not None
                matches.append(identifier)
                self.pending_codes.append(code)
            else:
                final_status, final = code, rsp
        return final_status, matches, final

    def close(self) -> None:
        self.assoc.release()


@pytest.fixture
def client(qr_node: RunningNode) -> Iterator[FindClient]:
    c = FindClient(qr_node.port)
    yield c
    c.close()


def _uids(matches: list[Dataset], keyword: str = "StudyInstanceUID") -> set[str]:
    return {str(m.get(keyword)) for m in matches}


STUDY = {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": ""}


@pytest.mark.parametrize(
    ("keys", "expected"),
    [
        ({"PatientName": "DOE*"}, {"1.2.3.1", "1.2.3.2", "1.2.3.3"}),
        ({"PatientName": "doe^john"}, {"1.2.3.1", "1.2.3.2"}),
        ({"PatientName": "*jane"}, {"1.2.3.3"}),
        ({"PatientName": "d?e^j*"}, {"1.2.3.1", "1.2.3.2", "1.2.3.3"}),
        ({"PatientName": "Doe^John^^^"}, {"1.2.3.1", "1.2.3.2"}),
        ({"PatientName": "müller*"}, {"1.2.3.4"}),
        ({"StudyDate": "20250310"}, {"1.2.3.2"}),
        ({"StudyDate": "20250101-20251231"}, {"1.2.3.2", "1.2.3.3"}),
        ({"StudyDate": "-20240105"}, {"1.2.3.1"}),
        ({"StudyDate": "20260101-"}, {"1.2.3.4", "1.2.3.5"}),
        ({"StudyDate": "20250311", "StudyTime": "0900-1000"}, {"1.2.3.3"}),
        ({"StudyTime": "-0815"}, {"1.2.3.1", "1.2.3.4"}),
        ({"AccessionNumber": "ACC3"}, {"1.2.3.3"}),
        ({"AccessionNumber": "acc3"}, set()),
        ({"StudyInstanceUID": ["1.2.3.1", "1.2.3.5"]}, {"1.2.3.1", "1.2.3.5"}),
        ({"ModalitiesInStudy": "SR"}, {"1.2.3.1"}),
        ({"ModalitiesInStudy": ["MR", "CR"]}, {"1.2.3.3", "1.2.3.4"}),
        ({"PatientID": "P1", "StudyDescription": "CT*"}, {"1.2.3.1", "1.2.3.2"}),
        ({"StudyDescription": "R*ntgen*"}, {"1.2.3.4"}),
    ],
)
def test_study_level_matching(client: FindClient, keys: dict[str, Any], expected: set[str]) -> None:
    code, matches, _ = client.find({**STUDY, "PatientID": "", **keys})
    assert code in (0x0000,) or (not expected)
    assert _uids(matches) == expected


def test_returns_exactly_the_requested_keys_with_derived_values(client: FindClient) -> None:
    code, matches, _ = client.find(
        {
            **STUDY,
            "StudyInstanceUID": "1.2.3.1",
            "PatientName": "",
            "StudyDate": "",
            "ModalitiesInStudy": "",
            "NumberOfStudyRelatedSeries": "",
            "NumberOfStudyRelatedInstances": "",
        }
    )
    assert code == 0
    (match,) = matches
    assert {e.keyword for e in match} == {
        "QueryRetrieveLevel",
        "StudyInstanceUID",
        "PatientName",
        "StudyDate",
        "ModalitiesInStudy",
        "NumberOfStudyRelatedSeries",
        "NumberOfStudyRelatedInstances",
    }
    assert str(match.PatientName) == "Doe^John"
    assert match.StudyDate == "20240105"
    assert list(match.ModalitiesInStudy) == ["CT", "SR"]
    assert int(match.NumberOfStudyRelatedSeries) == 2
    assert int(match.NumberOfStudyRelatedInstances) == 4


def test_supported_keys_give_plain_pending(client: FindClient) -> None:
    assert client.find({**STUDY, "AccessionNumber": "ACC1"})[0] == 0
    assert client.pending_codes == [0xFF00]


def test_series_and_image_levels(client: FindClient) -> None:
    code, series, _ = client.find(
        {
            "QueryRetrieveLevel": "SERIES",
            "StudyInstanceUID": "1.2.3.3",
            "SeriesInstanceUID": "",
            "Modality": "",
            "SeriesNumber": "",
            "NumberOfSeriesRelatedInstances": "",
        }
    )
    assert code == 0
    assert [
        (s.SeriesInstanceUID, s.Modality, int(s.SeriesNumber), int(s.NumberOfSeriesRelatedInstances)) for s in series
    ] == [("1.2.3.3.1", "MR", 1, 2), ("1.2.3.3.2", "MR", 2, 2)]
    code, images, _ = client.find(
        {
            "QueryRetrieveLevel": "IMAGE",
            "StudyInstanceUID": "1.2.3.1",
            "SeriesInstanceUID": "1.2.3.1.1",
            "SOPInstanceUID": "",
            "InstanceNumber": "2",
            "SOPClassUID": "",
        }
    )
    assert code == 0
    assert [(i.SOPInstanceUID, int(i.InstanceNumber)) for i in images] == [("1.2.3.1.1.2", 2)]


def test_patient_root_patient_level_with_counts(client: FindClient) -> None:
    code, patients, _ = client.find(
        {
            "QueryRetrieveLevel": "PATIENT",
            "PatientID": "P1",
            "PatientName": "",
            "NumberOfPatientRelatedStudies": "",
            "NumberOfPatientRelatedSeries": "",
            "NumberOfPatientRelatedInstances": "",
        },
        PATIENT_ROOT,
    )
    assert code == 0
    (patient,) = patients
    assert int(patient.NumberOfPatientRelatedStudies) == 2
    assert int(patient.NumberOfPatientRelatedSeries) == 3
    assert int(patient.NumberOfPatientRelatedInstances) == 6


def test_non_ascii_names_round_trip(client: FindClient) -> None:
    for uid, name in (("1.2.3.4", "Müller^Jürgen"), ("1.2.3.5", "Gómez^Ana")):
        code, matches, _ = client.find({**STUDY, "StudyInstanceUID": uid, "PatientName": "", "StudyDescription": ""})
        assert code == 0
        (match,) = matches
        assert str(match.PatientName) == name
        assert match.SpecificCharacterSet == "ISO_IR 192"
    ds_latin = {**STUDY, "SpecificCharacterSet": "ISO_IR 100", "StudyInstanceUID": "1.2.3.5", "PatientName": ""}
    code, matches, _ = client.find(ds_latin)
    assert code == 0
    assert matches[0].SpecificCharacterSet == "ISO_IR 100"
    assert str(matches[0].PatientName) == "Gómez^Ana"


def test_unsupported_optional_key_gives_pending_warning(client: FindClient) -> None:
    code, matches, _ = client.find({**STUDY, "StudyInstanceUID": "1.2.3.1", "SOPClassesInStudy": ""})
    assert code == 0
    assert client.pending_codes == [0xFF01]
    assert len(matches) == 1
    assert "SOPClassesInStudy" in matches[0] and matches[0].SOPClassesInStudy in ("", None)


# -- return keys without an index column: from the stored headers ------------------------------


def test_study_level_keys_without_a_column_come_from_the_first_header(client: FindClient) -> None:
    code, matches, _ = client.find(
        {
            **STUDY,
            "StudyInstanceUID": ["1.2.3.1", "1.2.3.3"],
            "PatientAge": "",
            "PatientWeight": "",
            "ContentDate": "",
            "StudyDescription": "",
        }
    )
    assert code == 0
    assert client.pending_codes == [0xFF00, 0xFF00]  # returning them is supported
    answers = {m.StudyInstanceUID: m for m in matches}
    first = answers["1.2.3.1"]
    assert (first.PatientAge, str(first.PatientWeight), first.StudyDescription) == ("064Y", "72.50", "CT chest")
    assert first.ContentDate == "20260101"  # the study's first instance, not a later one
    second = answers["1.2.3.3"]
    assert second.PatientAge == "055Y"
    assert "PatientWeight" in second and second.PatientWeight in ("", None)  # not in its header: empty


def test_keys_from_headers_keep_their_stored_vr(qr_node: RunningNode) -> None:
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.StudyInstanceUID = "1.2.3.2"
    identifier.add_new(0x00101010, "LO", "")  # PatientAge asked for with a VR that is not its own
    identifier.PatientWeight = ""
    c = FindClient(qr_node.port, transfer_syntax=ExplicitVRLittleEndian)
    try:
        code, matches, _ = c.find(identifier)
    finally:
        c.close()
    assert code == 0
    (match,) = matches
    assert (match["PatientAge"].VR, match.PatientAge) == ("AS", "065Y")
    assert (match["PatientWeight"].VR, str(match.PatientWeight)) == ("DS", "71")


def test_series_and_image_levels_answer_from_their_own_headers(client: FindClient) -> None:
    code, series, _ = client.find(
        {
            "QueryRetrieveLevel": "SERIES",
            "StudyInstanceUID": "1.2.3.3",
            "SeriesInstanceUID": "",
            "ProtocolName": "",
            "ContentDate": "",
        }
    )
    assert code == 0
    assert [(s.SeriesInstanceUID, s.ProtocolName, s.ContentDate) for s in series] == [
        ("1.2.3.3.1", "MR protocol 1.2.3.3.1", "20260101"),
        ("1.2.3.3.2", "MR protocol 1.2.3.3.2", "20260101"),
    ]
    code, images, _ = client.find(
        {
            "QueryRetrieveLevel": "IMAGE",
            "StudyInstanceUID": "1.2.3.1",
            "SeriesInstanceUID": "1.2.3.1.1",
            "SOPInstanceUID": "",
            "ContentDate": "",
            "PatientAge": "",
        }
    )
    assert code == 0
    assert [(i.SOPInstanceUID, i.ContentDate, i.PatientAge) for i in images] == [
        ("1.2.3.1.1.1", "20260101", "064Y"),
        ("1.2.3.1.1.2", "20260102", "064Y"),
        ("1.2.3.1.1.3", "20260103", "064Y"),
    ]


def test_patient_level_answers_from_the_patients_first_header(client: FindClient) -> None:
    code, patients, _ = client.find(
        {"QueryRetrieveLevel": "PATIENT", "PatientID": "P1", "PatientAge": "", "InstitutionName": ""}, PATIENT_ROOT
    )
    assert code == 0
    (patient,) = patients
    assert (patient.PatientAge, patient.InstitutionName) == ("064Y", "Klinik Nord")  # from study 1.2.3.1


def test_a_sequence_comes_back_whole_or_with_the_item_keys_asked_for(client: FindClient) -> None:
    code, matches, _ = client.find({**STUDY, "StudyInstanceUID": "1.2.3.2", "ProcedureCodeSequence": []})
    assert code == 0
    (item,) = matches[0].ProcedureCodeSequence
    assert (item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning) == (
        "P-1.2.3.2",
        "99PACSNODE",
        "Procedure of 1.2.3.2",
    )
    asked = Dataset()
    asked.CodeValue = ""
    asked.CodeMeaning = ""
    code, matches, _ = client.find({**STUDY, "StudyInstanceUID": "1.2.3.2", "ProcedureCodeSequence": [asked]})
    assert code == 0
    (item,) = matches[0].ProcedureCodeSequence
    assert {e.keyword for e in item} == {"CodeValue", "CodeMeaning"}
    assert (item.CodeValue, item.CodeMeaning) == ("P-1.2.3.2", "Procedure of 1.2.3.2")


def test_non_ascii_values_from_headers_set_the_character_set(client: FindClient) -> None:
    code, matches, _ = client.find({**STUDY, "StudyInstanceUID": "1.2.3.4", "InstitutionName": ""})
    assert code == 0
    assert (matches[0].SpecificCharacterSet, matches[0].InstitutionName) == ("ISO_IR 192", "Universitätsklinik Köln")
    latin = {**STUDY, "SpecificCharacterSet": "ISO_IR 100", "StudyInstanceUID": "1.2.3.5", "InstitutionName": ""}
    code, matches, _ = client.find(latin)
    assert code == 0
    assert (matches[0].SpecificCharacterSet, matches[0].InstitutionName) == ("ISO_IR 100", "Klinik Süd")
    code, matches, _ = client.find(
        {**STUDY, "StudyInstanceUID": "1.2.3.4", "ProcedureCodeSequence": [], "PatientAge": ""}
    )
    assert code == 0 and "SpecificCharacterSet" not in matches[0]  # nothing outside ASCII


def test_a_value_in_a_key_without_a_column_is_returned_not_matched(client: FindClient) -> None:
    code, matches, _ = client.find({**STUDY, "PatientID": "P1", "PatientAge": "099Y"})
    assert code == 0
    assert client.pending_codes == [0xFF01, 0xFF01]  # PatientAge was not used for matching
    assert {(m.StudyInstanceUID, m.PatientAge) for m in matches} == {("1.2.3.1", "064Y"), ("1.2.3.2", "065Y")}


def test_entities_indexed_without_a_header_answer_empty(client: FindClient) -> None:
    code, matches, _ = client.find({**STUDY, "AccessionNumber": "B1", "PatientAge": "", "ProcedureCodeSequence": []})
    assert code == 0
    assert client.pending_codes == [0xFF00]
    (match,) = matches
    assert match.PatientAge in ("", None)
    assert len(match.ProcedureCodeSequence) == 0


def test_a_stored_file_answers_from_its_header(start_node, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Over C-STORE: read_header keeps the header that C-FIND then answers from (no second read)."""
    node = start_node(make_settings(tmp_path))
    ds = make_dataset(rows=4, columns=4, modality="MR", seed=3)
    ds.PatientAge = "042Y"
    ds.PatientWeight = "68.0"
    ds.ProtocolName = "BRAIN T2"
    ds.ContentDate = "20260315"
    assert store_datasets(node.port, [ds]) == [0]
    c = FindClient(node.port)
    try:
        code, matches, _ = c.find(
            {
                "QueryRetrieveLevel": "IMAGE",
                "StudyInstanceUID": ds.StudyInstanceUID,
                "SeriesInstanceUID": ds.SeriesInstanceUID,
                "SOPInstanceUID": "",
                "PatientAge": "",
                "PatientWeight": "",
                "ProtocolName": "",
                "ContentDate": "",
                "PixelSpacing": "",
            }
        )
    finally:
        c.close()
    assert code == 0
    (match,) = matches
    assert (match.PatientAge, str(match.PatientWeight), match.ProtocolName, match.ContentDate) == (
        "042Y",
        "68.0",
        "BRAIN T2",
        "20260315",
    )
    assert [str(v) for v in match.PixelSpacing] == [str(v) for v in ds.PixelSpacing]


@pytest.mark.parametrize(
    ("keys", "model", "status", "comment"),
    [
        ({"StudyInstanceUID": ""}, STUDY_ROOT, 0xA900, "Query/Retrieve Level"),
        ({"QueryRetrieveLevel": "FRAME", "StudyInstanceUID": ""}, STUDY_ROOT, 0xA900, "unknown"),
        ({"QueryRetrieveLevel": "PATIENT", "PatientID": ""}, STUDY_ROOT, 0xA900, "not in the study root"),
        ({"QueryRetrieveLevel": "SERIES", "SeriesInstanceUID": ""}, STUDY_ROOT, 0xA900, "StudyInstanceUID"),
        ({"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": ""}, PATIENT_ROOT, 0xA900, "PatientID"),
        ({"QueryRetrieveLevel": "STUDY", "StudyDate": "2025"}, STUDY_ROOT, 0xC000, "StudyDate"),
        ({"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": "1.2.*"}, STUDY_ROOT, 0xC000, "not a UID"),
        ({"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": ""}, STUDY_ROOT, 0xA700, "more than 40"),
    ],
)
def test_bad_identifiers_get_failure_status(
    qr_node: RunningNode, keys: dict[str, Any], model: str, status: int, comment: str
) -> None:
    c = FindClient(qr_node.port)
    try:
        code, matches, final = c.find(keys, model)
    finally:
        c.close()
    assert code == status
    assert matches == []
    assert final is not None and comment in str(final.ErrorComment)
    # and the node keeps serving
    c = FindClient(qr_node.port)
    try:
        assert _uids(c.find({**STUDY, "AccessionNumber": "ACC1"})[1]) == {"1.2.3.1"}
    finally:
        c.close()


def test_relational_query_needs_no_unique_keys_above(qr_node: RunningNode) -> None:
    c = FindClient(qr_node.port, ext={STUDY_ROOT: b"\x01"})
    try:
        code, series, _ = c.find({"QueryRetrieveLevel": "SERIES", "SeriesInstanceUID": "", "Modality": "MR"})
    finally:
        c.close()
    assert code == 0
    assert _uids(series, "SeriesInstanceUID") == {"1.2.3.3.1", "1.2.3.3.2"}


def test_combined_date_time_range_when_negotiated(qr_node: RunningNode) -> None:
    keys = {**STUDY, "StudyDate": "20250310-20250311", "StudyTime": "1200-1000"}
    plain = FindClient(qr_node.port)
    combined = FindClient(qr_node.port, ext={STUDY_ROOT: b"\x00\x01"})
    try:
        # independent ranges: no time is both >= 12:00 and <= 10:00
        assert plain.find(keys)[1] == []
        # one date-time range: 2025-03-10 12:00 .. 2025-03-11 10:00
        assert _uids(combined.find(keys)[1]) == {"1.2.3.2", "1.2.3.3"}
    finally:
        plain.close()
        combined.close()


@pytest.mark.dcmtk
def test_cancel_stops_the_responses(start_node, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """DCMTK findscu sends C-CANCEL after the first answer: pacsnode stops and answers 0xFE00.

    (A pynetdicom requestor cannot test this: its reactor reads every queued
    answer before it sends anything, so its C-CANCEL arrives after the last one.)
    """
    import subprocess

    from tests.support.peers import require

    node = start_node(make_settings(tmp_path, query={"max_matches": 5000}))
    _fill(node, extra_studies=2000)
    out = tmp_path / "answers"
    out.mkdir()
    result = subprocess.run(
        [
            require("findscu"),
            "-v",
            "-S",
            "-aec",
            "PACSNODE",
            "--cancel",
            "1",
            "-X",
            "-od",
            str(out),
            "-k",
            "QueryRetrieveLevel=STUDY",
            "-k",
            "StudyInstanceUID",
            "-k",
            "PatientID=BULK",
            "127.0.0.1",
            str(node.port),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={"TCP_NODELAY": "1"},
        check=False,
    )
    log = result.stdout + result.stderr
    assert "Received Final Find Response (Cancel" in log, log[-2000:]
    assert 1 <= len(list(out.glob("rsp*.dcm"))) < 2000
