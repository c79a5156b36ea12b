"""The http: section and the stored forms of HTTP secrets (no server, no sockets)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from pacsnode.node.config import Settings
from pacsnode.node.http.passwords import hash_password, hash_token, make_token, verify_password
from pacsnode.node.http.settings import HttpSettings, Role

_FAST = 10  # scrypt N=2^10 for tests; the stored string carries its parameters


def test_password_hash_round_trip_and_salted() -> None:
    first, second = hash_password("s3cret", ln=_FAST), hash_password("s3cret", ln=_FAST)
    assert first != second  # a fresh salt each time
    assert first.startswith(f"$scrypt$ln={_FAST},r=8,p=1$")
    assert verify_password("s3cret", first) and verify_password("s3cret", second)
    assert not verify_password("s3cret ", first)
    assert not verify_password("s3cret", first[:-2] + ("AA" if not first.endswith("AA") else "BB"))
    assert not verify_password("s3cret", "$argon2id$v=19$m=65536,t=3,p=4$abc$def")
    assert not verify_password("s3cret", "not a hash")


def test_default_cost_is_owasp_scrypt() -> None:
    assert hash_password("x").startswith("$scrypt$ln=17,r=8,p=1$")


def test_tokens_random_and_hashed() -> None:
    token = make_token()
    assert len(token) >= 43 and token != make_token()
    assert hash_token(token) == hash_token(token) and hash_token(token).startswith("sha256:")


def test_users_need_a_hashed_secret() -> None:
    with pytest.raises(ValidationError, match="neither a password_hash nor token_hashes"):
        HttpSettings.model_validate({"users": [{"name": "a"}]})
    with pytest.raises(ValidationError, match="hash-password"):
        HttpSettings.model_validate({"users": [{"name": "a", "password_hash": "plain-text-password"}]})
    with pytest.raises(ValidationError, match="make-token"):
        HttpSettings.model_validate({"users": [{"name": "a", "token_hashes": ["abc"]}]})
    with pytest.raises(ValidationError, match="appears twice"):
        token = hash_token(make_token())
        HttpSettings.model_validate({"users": [{"name": "a", "token_hashes": [token]}] * 2})
    ok = HttpSettings.model_validate(
        {"users": [{"name": "a", "role": "uploader", "password_hash": hash_password("p", ln=_FAST)}]}
    )
    assert ok.users[0].role is Role.UPLOADER


def test_tls_cert_and_key_together() -> None:
    with pytest.raises(ValidationError, match="both or neither"):
        HttpSettings.model_validate({"tls_cert": "cert.pem"})
    assert HttpSettings().enabled and HttpSettings().host == "127.0.0.1"


def test_dicomweb_nodes_are_destinations() -> None:
    rule = {"name": "r", "pipeline": "ct-lung", "destinations": ["WEB"]}
    settings = Settings.model_validate(
        {"dicomweb_nodes": {"WEB": {"url": "https://pacs.example.org/dicom-web"}}, "analysis": {"rules": [rule]}}
    )
    assert settings.dicomweb_nodes["WEB"].verify_tls
    with pytest.raises(ValidationError, match="both a remote_nodes and a dicomweb_nodes"):
        Settings.model_validate(
            {
                "dicomweb_nodes": {"WEB": {"url": "http://h/dicom-web"}},
                "remote_nodes": {"WEB": {"ae_title": "W", "host": "h", "port": 104}},
            }
        )


def test_check_config_hides_dicomweb_secrets() -> None:
    from pacsnode.node.config import redacted

    settings = Settings.model_validate(
        {"dicomweb_nodes": {"WEB": {"url": "http://h/dicom-web", "username": "u", "password": "pw", "token": "tk"}}}
    )
    shown = redacted(settings.model_dump(mode="json"))
    node = shown["dicomweb_nodes"]["WEB"]
    assert node["password"] == "***" and node["token"] == "***" and node["username"] == "u"
