from __future__ import annotations

from pathlib import Path

import pytest

from pacsnode.node.config import load
from pacsnode.node.errors import ConfigError
from pacsnode.storage import DuplicatePolicy
from tests.helpers import REPO


def test_shipped_default_config_is_valid_and_matches_the_defaults() -> None:
    settings = load(REPO / "config" / "pacsnode.yaml")
    assert settings.node.ae_title == "PACSNODE"
    assert (settings.node.host, settings.node.port) == ("127.0.0.1", 11112)
    assert settings.storage.database_url.startswith("sqlite:///var/")
    assert settings.storage.duplicate_policy is DuplicatePolicy.KEEP_FIRST
    assert settings.policy.allowed_peers == []


@pytest.mark.parametrize("example", sorted((REPO / "config" / "examples").glob("*.yaml")), ids=lambda p: p.name)
def test_examples_are_valid(example: Path) -> None:
    load(example)


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "pacsnode.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("node:\n  port: 70000\n", "node.port: Input should be less than or equal to 65535"),
        ("node:\n  ae_title: THIS_TITLE_IS_TOO_LONG\n", "node.ae_title"),
        ("node:\n  prot: 104\n", "node.prot: Extra inputs are not permitted"),
        ("storage:\n  duplicate_policy: sometimes\n", "storage.duplicate_policy"),
        ("remote_nodes:\n  PACS:\n    host: x\n    port: 104\n", "remote_nodes.PACS.ae_title: Field required"),
        (
            "analysis:\n  rules:\n    - name: r\n      pipeline: ct-lungs\n",
            "analysis.rules.0: Value error, unknown pipeline 'ct-lungs': built-in pipelines are ct-lung",
        ),
        (
            "analysis:\n  rules:\n    - name: r\n      pipeline: nosuch.module:Thing\n",
            "cannot import module 'nosuch.module'",
        ),
        (
            "analysis:\n  rules:\n    - name: r\n      pipeline: ct-lung\n      params: {min_slice: 3}\n",
            "params of pipeline 'ct-lung'",
        ),
        (
            "analysis:\n  rules:\n    - name: r\n      pipeline: ct-lung\n      match: {series_description: '(lung'}\n",
            "analysis.rules.0.match.series_description: Value error, not a valid regular expression",
        ),
        (
            "analysis:\n  rules:\n    - name: r\n      pipeline: ct-lung\n      match: {sop_class: [CTImage]}\n",
            "unknown SOP class 'CTImage'",
        ),
        (
            "analysis:\n  rules:\n    - name: r\n      pipeline: ct-lung\n      destinations: [PACS]\n",
            "rule 'r' sends results to 'PACS', which is not in remote_nodes (none defined)",
        ),
        (
            "analysis:\n  rules:\n    - {name: r, pipeline: ct-lung}\n    - {name: r, pipeline: ct-lung}\n",
            "rule name 'r' is used more than once",
        ),
        ("analysis:\n  uid_root: 1.2.x\n", "analysis.uid_root"),
        ("policy:\n  allowed_peers:\n    - ae_title: ''\n", "policy.allowed_peers.0.ae_title"),
        ("node: [1, 2\n", "not valid YAML"),
        ("- just\n- a list\n", "expected a mapping"),
    ],
)
def test_broken_config_names_file_key_and_problem(tmp_path: Path, text: str, expected: str) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load(path)
    message = str(info.value)
    assert message.startswith(str(path))
    assert expected in message


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read the config file"):
        load(tmp_path / "nope.yaml")


def test_environment_variable_selects_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _write(tmp_path, "node:\n  ae_title: FROM_ENV\n")
    monkeypatch.setenv("PACSNODE_CONFIG", str(path))
    assert load().node.ae_title == "FROM_ENV"
    assert load(_write(tmp_path, "node:\n  ae_title: EXPLICIT\n")).node.ae_title == "EXPLICIT"


def test_empty_file_gives_defaults(tmp_path: Path) -> None:
    assert load(_write(tmp_path, "")).node.port == 11112
