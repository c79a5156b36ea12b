"""Query translation without a network: PN folding, identifier checks, and the stored headers
(DICOM JSON) that answer return keys without a column. The schema's migrations are checked in
tests/integration/test_migrations.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage

from pacsnode.storage.index import header_json
from pacsnode.storage.query import (
    IdentifierError,
    Level,
    Model,
    QueryValueError,
    element_from_json,
    parse_find,
    parse_retrieve,
    pn_search_key,
)


@pytest.mark.parametrize(
    ("name", "key"),
    [
        ("Doe^John", "doe^john"),
        ("DOE^JOHN^^^", "doe^john"),
        ("Doe ^ John ", "doe^john"),
        ("Yamada^Tarou=山田^太郎=やまだ^たろう", "yamada^tarou"),
        ("MÜLLER^Jürgen", "müller^jürgen"),
        ("", None),
        ("^^^", None),
    ],
)
def test_pn_search_key(name: str, key: str | None) -> None:
    assert pn_search_key(name) == key


def _identifier(**keys: object) -> Dataset:
    ds = Dataset()
    for keyword, value in keys.items():
        setattr(ds, keyword, value)
    return ds


def test_keys_below_the_level_are_ignored_and_keys_without_a_column_returned() -> None:
    identifier = _identifier(QueryRetrieveLevel="STUDY", StudyInstanceUID="", Modality="CT", InstitutionName="")
    identifier.add_new(0x00091010, "LO", "")  # private: no stored header holds it
    identifier.SOPClassesInStudy = ""  # derived from the instances, not in any header
    parsed = parse_find(identifier, Model.STUDY_ROOT)
    assert parsed.level is Level.STUDY
    assert parsed.return_keys == ("InstitutionName", "StudyInstanceUID")
    assert parsed.conditions == ()
    assert parsed.unsupported == ("SOPClassesInStudy", "(0009,1010)")


def test_a_value_in_a_key_without_a_column_is_returned_but_not_matched() -> None:
    parsed = parse_find(
        _identifier(QueryRetrieveLevel="STUDY", StudyInstanceUID="", PatientAge="045Y", PatientWeight=""),
        Model.STUDY_ROOT,
    )
    assert parsed.return_keys == ("PatientAge", "PatientWeight", "StudyInstanceUID")
    assert parsed.conditions == ()
    assert parsed.unsupported == ("PatientAge",)


def test_a_sequence_key_is_matched_only_when_an_item_holds_a_value() -> None:
    asked = Dataset()
    asked.CodeValue = ""
    universal = _identifier(QueryRetrieveLevel="STUDY", ProcedureCodeSequence=Sequence([asked]))
    assert parse_find(universal, Model.STUDY_ROOT).unsupported == ()
    matching = Dataset()
    matching.CodeValue = "CT-CHEST"
    keyed = _identifier(QueryRetrieveLevel="STUDY", ProcedureCodeSequence=Sequence([matching]))
    parsed = parse_find(keyed, Model.STUDY_ROOT)
    assert parsed.return_keys == ("ProcedureCodeSequence",)
    assert parsed.unsupported == ("ProcedureCodeSequence",)


def test_wildcard_in_unique_key_above_the_level_is_refused() -> None:
    with pytest.raises(IdentifierError, match="StudyInstanceUID"):
        parse_find(_identifier(QueryRetrieveLevel="SERIES", StudyInstanceUID="1.2*"), Model.STUDY_ROOT)


@pytest.mark.parametrize("value", ["2025", "20250101-2025", "-", "2025-01-01"])
def test_malformed_dates_are_refused(value: str) -> None:
    with pytest.raises(QueryValueError):
        parse_find(_identifier(QueryRetrieveLevel="STUDY", StudyDate=value), Model.STUDY_ROOT)


def test_retrieve_needs_the_unique_key_of_its_level() -> None:
    with pytest.raises(IdentifierError, match="SeriesInstanceUID"):
        parse_retrieve(_identifier(QueryRetrieveLevel="SERIES", StudyInstanceUID="1.2.3"), Model.STUDY_ROOT)
    parsed = parse_retrieve(
        _identifier(QueryRetrieveLevel="STUDY", StudyInstanceUID=["1.2.3", "1.2.4"], PatientName="X*"),
        Model.STUDY_ROOT,
    )
    assert [(c.keyword, c.values) for c in parsed.conditions] == [("StudyInstanceUID", ("1.2.3", "1.2.4"))]


# -- stored headers -----------------------------------------------------------------------------


def _header() -> Dataset:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.PatientName = "Yamada^Tarou=山田^太郎=やまだ^たろう"
    ds.PatientAge = "045Y"
    ds.PatientWeight = "80"
    ds.PatientSize = "1.750"
    ds.ImagePositionPatient = ["0", "-12.50", "3e1"]
    ds.InstitutionName = "Universitätsklinik"
    ds.InstanceNumber = "007"
    ds.Rows = 2
    ds.FrameIncrementPointer = 0x00181063  # AT
    code = Dataset()
    code.CodeValue = "CT-CHEST"
    code.CodingSchemeDesignator = "99LOCAL"
    code.CodeMeaning = "CT Thorax"
    code.add_new(0x00091010, "LO", "private in an item")
    ds.ProcedureCodeSequence = Sequence([code])
    ds.add_new(0x00091010, "LO", "private")
    ds.add_new(0x00291010, "OB", b"\x00" * 16)
    ds.RedPaletteColorLookupTableData = b"\x00\x01" * 8  # OW
    ds.ImageComments = "x" * 5000  # larger than the limit
    ds.add_new(0x7FE00010, "OB", b"\x00" * 8)  # PixelData
    return ds


def _round_trip(ds: Dataset) -> dict[str, DataElement | None]:
    stored = json.loads(json.dumps(header_json(ds)))  # as the database gives it back
    return {key: element_from_json(int(key, 16), document) for key, document in stored.items()}


def test_header_json_keeps_what_a_c_find_may_ask_for_and_leaves_out_bulk_data() -> None:
    stored = header_json(_header())
    assert stored["00101010"] == {"vr": "AS", "Value": ["045Y"]}
    assert stored["00100010"]["Value"] == [
        {"Alphabetic": "Yamada^Tarou", "Ideographic": "山田^太郎", "Phonetic": "やまだ^たろう"}
    ]
    assert stored["00101030"] == {"vr": "DS", "Value": ["80"]}  # the text as written, not 80.0
    assert stored["00200013"] == {"vr": "IS", "Value": ["007"]}
    assert stored["00280010"] == {"vr": "US", "Value": [2]}
    item = stored["00081032"]["Value"][0]
    assert set(item) == {"00080100", "00080102", "00080104"}  # no private element in the item either
    left_out = {"00091010", "00291010", "00281201", "00204000", "7FE00010"}
    assert left_out.isdisjoint(stored)


def test_header_json_comes_back_as_the_same_elements() -> None:
    elements = _round_trip(_header())
    assert elements["00101010"] == DataElement(0x00101010, "AS", "045Y")
    assert str(elements["00101030"].value) == "80"  # type: ignore[union-attr]
    assert str(elements["00101020"].value) == "1.750"  # type: ignore[union-attr]
    assert [str(v) for v in elements["00200032"].value] == ["0", "-12.50", "3e1"]  # type: ignore[union-attr]
    assert str(elements["00200013"].value) == "007"  # type: ignore[union-attr]
    assert str(elements["00100010"].value) == "Yamada^Tarou=山田^太郎=やまだ^たろう"  # type: ignore[union-attr]
    assert elements["00080080"].value == "Universitätsklinik"  # type: ignore[union-attr]
    assert elements["00280009"].value == 0x00181063  # type: ignore[union-attr]
    assert elements["00280010"].value == 2  # type: ignore[union-attr]
    (code,) = elements["00081032"].value  # type: ignore[union-attr]
    assert (code.CodeValue, code.CodeMeaning) == ("CT-CHEST", "CT Thorax")


def test_an_empty_or_missing_stored_element() -> None:
    empty = element_from_json(0x00101030, {"vr": "DS"})
    assert empty is not None and empty.VR == "DS" and empty.is_empty
    assert element_from_json(0x00101030, None) is None
    assert element_from_json(0x00101030, "not an element") is None


class _Reached(BaseException):
    """Raised by an item header_json should never have looked at."""


class _Untouchable(Dataset):
    def keys(self):  # type: ignore[no-untyped-def]
        raise _Reached


def _code(value: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = "99PACSNODE"
    item.CodeMeaning = f"Code number {value}"
    return item


def test_a_long_sequence_is_left_out_without_converting_all_of_it() -> None:
    ds = Dataset()
    ds.PatientAge = "045Y"
    items = [_code(str(n)) for n in range(200)]
    items[150] = _Untouchable()  # ~100 characters an item: the 4 KiB limit is passed long before
    ds.ProcedureCodeSequence = Sequence(items)
    stored = header_json(ds)
    assert "00081032" not in stored
    assert stored["00101010"] == {"vr": "AS", "Value": ["045Y"]}


def test_a_sequence_with_a_long_nested_sequence_is_left_out_whole() -> None:
    ds = Dataset()
    outer = Dataset()
    outer.CodeValue = "OUTER"
    outer.ConceptCodeSequence = Sequence([_code(str(n)) for n in range(100)])
    ds.ProcedureCodeSequence = Sequence([outer])
    assert "00081032" not in header_json(ds)  # not kept with its nested sequence cut off


def test_header_json_skips_values_dcmread_deferred(tmp_path: Path) -> None:
    ds = _header()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3.4"
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPInstanceUID = "1.2.3.4"
    path = tmp_path / "header.dcm"
    ds.save_as(path, enforce_file_format=True)
    read = dcmread(path, stop_before_pixels=True, defer_size=4096)
    path.unlink()  # a deferred value would now fail to load: header_json must not try
    stored = header_json(read)
    assert "00204000" not in stored and "00020010" not in stored
    assert stored["00101010"] == {"vr": "AS", "Value": ["045Y"]}
