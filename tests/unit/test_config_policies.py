"""Config keys of the store's policies: storage.patient_mismatch and policy.allowed_peers[].overwrite."""

from __future__ import annotations

from pathlib import Path

import pytest

from pacsnode.node.config import PolicySettings, load
from pacsnode.node.errors import ConfigError
from pacsnode.storage import DuplicatePolicy, PatientMismatchPolicy
from tests.support.helpers import REPO


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "pacsnode.yaml"
    path.write_text(text)
    return path


def test_defaults_reject_mismatched_patients_and_trust_no_peer_to_overwrite(tmp_path: Path) -> None:
    settings = load(_write(tmp_path, "policy:\n  allowed_peers:\n    - ae_title: CT1\n"))
    assert settings.storage.patient_mismatch is PatientMismatchPolicy.REJECT
    assert settings.policy.allowed_peers[0].overwrite is False
    shipped = load(REPO / "config" / "pacsnode.yaml")
    assert shipped.storage.patient_mismatch is PatientMismatchPolicy.REJECT


@pytest.mark.parametrize("value", ["reject", "accept", "quarantine"])
def test_patient_mismatch_values(tmp_path: Path, value: str) -> None:
    settings = load(_write(tmp_path, f"storage:\n  patient_mismatch: {value}\n"))
    assert settings.storage.patient_mismatch is PatientMismatchPolicy(value)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("storage:\n  patient_mismatch: warn\n", "storage.patient_mismatch: Input should be 'reject', 'accept' or"),
        (
            "policy:\n  allowed_peers:\n    - {ae_title: PACS, overwrite: sometimes}\n",
            "policy.allowed_peers.0.overwrite: Input should be a valid boolean",
        ),
        ("policy:\n  allowed_peers:\n    - {ae_title: PACS, overwrites: true}\n", "policy.allowed_peers.0.overwrites"),
    ],
)
def test_bad_values_name_the_key(tmp_path: Path, text: str, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        load(_write(tmp_path, text))
    assert expected in str(info.value)


def test_overwrite_without_a_marked_peer_loads(tmp_path: Path) -> None:
    settings = load(_write(tmp_path, "storage:\n  duplicate_policy: overwrite\n"))
    assert settings.storage.duplicate_policy is DuplicatePolicy.OVERWRITE
    assert not any(peer.overwrite for peer in settings.policy.allowed_peers)


def test_trust_to_overwrite_needs_the_mark_the_ae_title_and_the_named_host() -> None:
    policy = PolicySettings.model_validate(
        {
            "allowed_peers": [
                {"ae_title": "PACS", "host": "10.1.2.10", "overwrite": True},
                {"ae_title": "ANYHOST", "overwrite": True},
                {"ae_title": "MODALITY"},
            ]
        }
    )
    assert policy.trusted_to_overwrite("PACS", "10.1.2.10")
    assert policy.trusted_to_overwrite("PACS  ", "10.1.2.10")  # AE titles arrive space-padded
    assert not policy.trusted_to_overwrite("PACS", "10.1.2.11")
    assert policy.trusted_to_overwrite("ANYHOST", "192.0.2.7")
    assert not policy.trusted_to_overwrite("MODALITY", "10.1.2.10")
    assert not policy.trusted_to_overwrite("pacs", "10.1.2.10")
    assert not PolicySettings().trusted_to_overwrite("PACS", "10.1.2.10")


def test_the_hospital_example_trusts_only_its_pacs_to_overwrite() -> None:
    settings = load(REPO / "config" / "examples" / "hospital.yaml")
    assert settings.storage.duplicate_policy is DuplicatePolicy.OVERWRITE
    marked = [(peer.ae_title, peer.host) for peer in settings.policy.allowed_peers if peer.overwrite]
    assert marked == [("PACS", settings.remote_nodes["PACS"].host)]
    assert settings.policy.trusted_to_overwrite("PACS", settings.remote_nodes["PACS"].host)
    assert not settings.policy.trusted_to_overwrite("CT_SCANNER_1", "10.1.2.3")
