"""Permissions, certificate subjects, TLS settings and the exposure warnings of check-config (no sockets)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from pacsnode.node.config import PolicySettings, Settings, load
from pacsnode.node.dicom.permissions import AccessPolicy, exposure_warnings
from pacsnode.node.dicom.tls import parse_subject, subject_of
from pacsnode.node.errors import ConfigError

PEERS: list[dict[str, Any]] = [
    {"ae_title": "CT", "host": "10.0.0.1", "services": ["echo", "store"]},
    {"ae_title": "VIEWER", "host": "10.0.0.2", "services": ["find", "move"], "move_destinations": ["VIEWER"]},
    {"ae_title": "VIEWER", "host": "10.0.0.2", "services": ["get"]},
    {"ae_title": "AI", "certificate_subject": "CN=ai.example.org, O=Vendor"},
    {"ae_title": "MUTED", "services": []},
]


def _policy(peers: list[dict[str, Any]] = PEERS) -> AccessPolicy:
    return AccessPolicy(PolicySettings.model_validate({"allowed_peers": peers}))


def test_a_grant_is_the_union_of_the_matching_entries() -> None:
    grant = _policy().grant("VIEWER", "10.0.0.2")
    assert grant is not None
    assert grant.services == {"find", "move", "get"}
    assert grant.allows("move", "VIEWER") and not grant.allows("move", "ELSEWHERE")
    assert not grant.allows("store")


def test_host_and_certificate_subject_must_match() -> None:
    policy = _policy()
    assert policy.grant("CT", "10.0.0.9") is None
    assert policy.grant("AI", "10.0.0.5") is None  # plain connection: no certificate
    assert policy.grant("AI", "10.0.0.5", parse_subject("CN=other.example.org, O=Vendor")) is None
    subject = subject_of({"subject": ((("organizationName", "Vendor"),), (("commonName", "ai.example.org"),))})
    grant = policy.grant("AI", "10.0.0.5", subject)
    assert grant is not None and grant.allows("move", "ANYWHERE")  # every service, any destination by default
    muted = policy.grant("MUTED", "10.0.0.5")
    assert muted is not None and not muted.services  # matched, may do nothing: the association is rejected


def test_an_empty_allow_list_is_open() -> None:
    grant = _policy([]).grant("ANYONE", "192.0.2.1")
    assert grant is not None and grant.services == {"echo", "store", "find", "move", "get"}


@pytest.mark.parametrize(
    ("text", "problem"),
    [("CN", "NAME=value"), ("CN=", "NAME=value"), ("XX=1", "not one of"), ("CN=a,,O=b", "NAME=value")],
)
def test_bad_certificate_subjects_are_refused(text: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        parse_subject(text)


def _settings(**data: Any) -> Settings:
    return Settings.model_validate(data)


def test_tls_settings_are_checked(tmp_path: Path) -> None:
    tls = {"certificate": "node.pem", "private_key": "node.key"}
    with pytest.raises(ValueError, match="ca_certificates"):
        _settings(node={"tls": tls})  # client certificates required by default, so a CA is needed
    with pytest.raises(ValueError, match="tls.port equals node.port"):
        _settings(node={"port": 2762, "tls": {**tls, "ca_certificates": "ca.pem", "port": 2762}})
    with pytest.raises(ValueError, match="go together"):
        _settings(remote_nodes={"x": {"ae_title": "X", "host": "h", "port": 1, "tls": {"certificate": "c.pem"}}})
    with pytest.raises(ValueError, match="certificate_subject"):
        _settings(policy={"allowed_peers": [{"ae_title": "X", "certificate_subject": "name"}]})
    config = tmp_path / "etc" / "pacsnode.yaml"
    config.parent.mkdir()
    config.write_text(
        "node: {tls: {certificate: tls/node.pem, private_key: tls/node.key, ca_certificates: tls/ca.pem}}\n"
        "remote_nodes: {pacs: {ae_title: PACS, host: h, port: 1, tls: {ca_certificates: tls/ca.pem}}}\n"
    )
    settings = load(config)
    assert settings.node.tls is not None and settings.node.tls.certificate == config.parent / "tls" / "node.pem"
    remote_tls = settings.remote_nodes["pacs"].tls
    assert remote_tls is not None and remote_tls.ca_certificates == config.parent / "tls" / "ca.pem"


def test_check_tls_names_the_unreadable_file(tmp_path: Path) -> None:
    from pacsnode.node.dicom.tls import check_tls

    settings = _settings(
        node={
            "tls": {
                "certificate": str(tmp_path / "missing.pem"),
                "private_key": "k",
                "require_client_certificate": False,
            }
        }
    )
    with pytest.raises(ConfigError, match="node.tls"):
        check_tls(settings)


def test_exposure_warnings() -> None:
    assert exposure_warnings(_settings()) == []  # loopback: nothing to say
    open_node = exposure_warnings(_settings(node={"host": "0.0.0.0"}))
    assert any("allowed_peers is empty" in w for w in open_node)
    assert any("without TLS" in w for w in open_node)
    listed = exposure_warnings(
        _settings(
            node={"host": "0.0.0.0"},
            policy={
                "allowed_peers": [
                    {"ae_title": "CT", "services": ["store"]},
                    {"ae_title": "VIEWER", "host": "10.0.0.2", "services": ["move"]},
                ]
            },
        )
    )
    assert any("CT names neither a host nor a certificate_subject" in w for w in listed)
    assert any("VIEWER may C-MOVE to every remote node" in w for w in listed)
    assert not any("allowed_peers is empty" in w for w in listed)
