"""Query translation without a network: PN folding, identifier checks, and the schema's migrations."""

from __future__ import annotations

from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from pydicom.dataset import Dataset

from pacsnode.storage.db import make_engine, migrate
from pacsnode.storage.models import Base
from pacsnode.storage.query import (
    IdentifierError,
    Level,
    Model,
    QueryValueError,
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


def test_keys_below_the_level_are_ignored_and_unknown_keys_reported() -> None:
    parsed = parse_find(
        _identifier(QueryRetrieveLevel="STUDY", StudyInstanceUID="", Modality="CT", InstitutionName=""),
        Model.STUDY_ROOT,
    )
    assert parsed.level is Level.STUDY
    assert parsed.return_keys == ("StudyInstanceUID",)
    assert parsed.conditions == ()
    assert parsed.unsupported == ("InstitutionName",)


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


def test_migrations_build_exactly_the_models(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'index.db'}")
    migrate(engine)
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    engine.dispose()
    assert diff == []
