"""The dashboard's pure helpers: where a form may send the browser back to, and how index values read."""

from __future__ import annotations

from datetime import datetime, timedelta

import pytest

from pacsnode.node.http import admin, views


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("/studies/1.2.3?x=1", "/studies/1.2.3?x=1"),
        ("/exports", "/exports"),
        ("//evil.example/", "/"),
        ("https://evil.example/", "/"),
        ("/\\evil.example", "/"),
        ("", "/"),
        (None, "/"),
        ("studies", "/"),
    ],
)
def test_a_form_only_sends_the_browser_back_to_this_site(target: str | None, expected: str) -> None:
    assert admin._local(target, "/") == expected


def test_flash_parameters_are_not_kept_in_the_return_address() -> None:
    assert admin._strip_flash("/exports?flash=exports-retried&n=4&state=dead") == "/exports?state=dead"
    assert admin._strip_flash("/jobs?flash=job-retried&n=1") == "/jobs"


def test_index_values_read_like_people_write_them() -> None:
    assert views.person_name("DOE^JOHN^^") == "DOE, JOHN"
    assert views.person_name("PHANTOM^CHEST=ファントム") == "PHANTOM, CHEST"
    assert views.person_name(None) == ""
    assert views.dicom_date("20240131") == "2024-01-31"
    assert views.dicom_date("2024") == "2024"
    now = datetime(2026, 1, 1, 12, 0, 0)
    assert views.age(now - timedelta(seconds=30), now) == "30 s ago"
    assert views.age(now - timedelta(hours=3), now) == "3 h ago"
    assert admin._size(1536) == "1.5 KiB" and admin._size(10) == "10 B"


def test_search_text_is_taken_literally() -> None:
    assert views._like("50%_a\\b") == "%50\\%\\_a\\\\b%"
