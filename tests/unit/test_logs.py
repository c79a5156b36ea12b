"""Log lines and terminal output: what a peer sends cannot forge lines or drive the terminal."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from pacsnode.node.cli import main
from pacsnode.node.logs import printable, setup_logging


def test_printable_escapes_every_control_character() -> None:
    hostile = "CT1\r\n2026-12-02 INFO forged line\x1b[2J\x07\x9b31m\x00end"
    shown = printable(hostile)
    assert shown == "CT1\\r\\n2026-12-02 INFO forged line\\x1b[2J\\x07\\x9b31m\\x00end"
    assert not any(ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0 for c in shown)
    assert printable("MÜLLER^JÖRG 山田") == "MÜLLER^JÖRG 山田"  # printable text is untouched


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_a_peer_string_cannot_forge_a_log_line(fmt: str, capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging("INFO", fmt)
    logging.getLogger("pacsnode.node.dicom.server").warning(
        "refused calling AE title %s", "EVIL\nWARNING forged\x1b[31m"
    )
    logging.getLogger("pynetdicom.acse").warning("abstract syntax %s", "1.2.3\n1.2.4 forged")
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2
    assert all("\x1b" not in line for line in lines)
    if fmt == "json":
        assert [json.loads(line)["message"].count("\n") for line in lines] == [1, 1]  # escaped by JSON


def test_check_config_does_not_print_the_database_password(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "pacsnode.yaml"
    config.write_text("storage:\n  database_url: postgresql+psycopg://pacs:s3cret-pw@db.example/pacsnode\n")
    assert main(["--config", str(config), "check-config"]) == 0
    out = capsys.readouterr().out
    assert "s3cret-pw" not in out
    assert "postgresql+psycopg://pacs:***@db.example/pacsnode" in out
