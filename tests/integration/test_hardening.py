"""What a careless admin or a hostile peer finds on disk and on the terminal."""

from __future__ import annotations

import io
import json
import stat
from pathlib import Path

import pytest
import yaml

from pacsnode.node.cli import main
from pacsnode.node.testing.corpus import make_dataset
from pacsnode.storage import Archive, read_header
from pacsnode.storage.db import migrate
from tests.support.helpers import make_settings


def _receive(archive: Archive, **attributes: str) -> None:
    """Store one instance as a received one (staging, header read, index), with ``attributes`` set."""
    ds = make_dataset(rows=8, columns=8)
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    staged = archive.stage([buffer.getvalue()])
    meta = read_header(
        staged.path,
        expected_sop_class_uid=str(ds.SOPClassUID),
        expected_sop_instance_uid=str(ds.SOPInstanceUID),
        transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID),
    )
    archive.add(staged, meta, calling_ae_title="CT1")


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_index_and_store_are_readable_by_their_owner_only(tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "node")
    archive = Archive(settings.storage)
    try:
        migrate(archive.engine)
        _receive(archive)
        db = Path(settings.storage.database_url.removeprefix("sqlite:///"))
        files = [p for p in settings.storage.root.rglob("*") if p.is_file()]
    finally:
        archive.close()
    assert files, "the instance is in the store"
    for path in [db, settings.storage.root, *files]:
        assert _mode(path) & 0o077 == 0, f"{path} is {oct(_mode(path))}"


def test_studies_escapes_terminal_sequences_from_the_index(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    settings = make_settings(tmp_path)
    archive = Archive(settings.storage)
    try:
        migrate(archive.engine)
        _receive(archive, PatientName="EVIL\x1b]0;owned\x07^NAME\x1b[2J", StudyDescription="line\nbreak")
    finally:
        archive.close()
    config = tmp_path / "pacsnode.yaml"
    config.write_text(yaml.safe_dump(json.loads(settings.model_dump_json(exclude={"source"}))))
    assert main(["--config", str(config), "studies"]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x07" not in out
    assert "EVIL\\x1b]0;owned\\x07^NAME\\x1b[2J" in out
    assert len(out.splitlines()) == 3  # header, one study, the count
