"""An index error names the statement, never its values: they carry patient names, IDs and birth dates."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError

from pacsnode.storage.db import make_engine


def test_a_failed_statement_does_not_quote_its_parameters(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'index.db'}")
    try:
        with pytest.raises(IntegrityError) as caught:
            with engine.begin() as conn:
                conn.execute(text("CREATE TABLE people (name TEXT UNIQUE)"))
                for _ in range(2):
                    conn.execute(text("INSERT INTO people VALUES (:name)"), {"name": "Winterbottom^Clarabel"})
    finally:
        engine.dispose()
    assert "UNIQUE constraint failed" in str(caught.value)
    assert "Winterbottom" not in str(caught.value)
