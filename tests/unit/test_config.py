from __future__ import annotations

from pathlib import Path

import pytest

from pacsnode.node.config import load
from pacsnode.node.errors import ConfigError
from pacsnode.storage import DuplicatePolicy
from tests.support.helpers import REPO


def test_shipped_default_config_is_valid_and_matches_the_defaults() -> None:
    settings = load(REPO / "config" / "pacsnode.yaml")
    assert settings.node.ae_title == "PACSNODE"
    assert (settings.node.host, settings.node.port) == ("127.0.0.1", 11112)
    # Relative paths in the file resolve against config/, and point at var/ in the repository root.
    assert settings.storage.database_url == f"sqlite:///{REPO / 'var' / 'pacsnode.db'}"
    assert settings.storage.root == REPO / "var" / "store"
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
            "rule 'r' sends results to 'PACS', which is not in remote_nodes or dicomweb_nodes (none defined)",
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


def test_relative_paths_resolve_against_the_files_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    etc = tmp_path / "etc" / "pacsnode"
    etc.mkdir(parents=True)
    config = etc / "pacsnode.yaml"
    config.write_text(
        "storage:\n  root: ../../srv/store\n  database_url: sqlite:///index.db\n"
        "analysis:\n  rules:\n"
        "    - {name: a, pipeline: model, params: {model: lung-nodule}}\n"
    )
    elsewhere = tmp_path / "somewhere" / "else"
    elsewhere.mkdir(parents=True)
    monkeypatch.chdir(elsewhere)
    settings = load(config)
    assert settings.storage.root == tmp_path / "srv" / "store"
    assert settings.storage.database_url == f"sqlite:///{etc / 'index.db'}"
    assert settings.analysis.rules[0].params["model"] == "lung-nodule"  # a built-in name, not a path
    # Absolute paths, other databases and defaults the file does not set are left alone.
    config.write_text("storage:\n  root: /srv/x\n  database_url: postgresql+psycopg://u@h/db\n")
    settings = load(config)
    assert settings.storage.root == Path("/srv/x") and settings.storage.database_url.startswith("postgresql")
    config.write_text("node: {port: 11113}\n")
    assert load(config).storage.root == Path("var/store")


def test_a_model_folder_in_a_rule_resolves_against_the_files_folder(tmp_path: Path) -> None:
    from pacsnode.node.config import _anchor_paths

    data = {"analysis": {"rules": [{"name": "m", "params": {"model": "./models/spleen"}}]}}
    _anchor_paths(data, tmp_path)
    assert data["analysis"]["rules"][0]["params"]["model"] == str(tmp_path / "models" / "spleen")


def test_null_means_any_where_the_comments_say_so(tmp_path: Path) -> None:
    settings = load(
        _write(
            tmp_path,
            "analysis:\n  rules:\n    - name: r\n      pipeline: ct-lung\n"
            "      match: {modality: [CT], body_part: null, sop_class: null, calling_ae: ~}\n",
        )
    )
    match = settings.analysis.rules[0].match
    assert (match.body_part, match.sop_class, match.calling_ae) == ([], [], [])


def test_config_is_accepted_after_the_subcommand(tmp_path: Path) -> None:
    from pacsnode.node.cli import _parser

    config = str(_write(tmp_path, "node: {port: 11113}\n"))
    assert _parser().parse_args(["studies", "--config", config]).config == config
    assert _parser().parse_args(["--config", config, "studies"]).config == config
    assert _parser().parse_args(["studies"]).config is None
