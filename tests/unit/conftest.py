"""Unit tests touch no network, no database and start no process: tests/support/isolation.py's guard
is armed while each test here sets up, runs and tears down, and fails the test that tried.
"""

from __future__ import annotations

from collections.abc import Generator

import pytest

from tests.support.isolation import GUARD


def _guarded_phase(whole_stack: bool) -> Generator[None, object, object]:
    GUARD.arm(whole_stack=whole_stack)
    try:
        result = yield
    finally:
        violations = GUARD.disarm()
    if violations:
        pytest.fail(
            "unit tests touch no network, database or process, yet this one:\n  "
            + "\n  ".join(violations)
            + "\nmove it to tests/integration (or tests/acceptance if it runs pacsnode)",
            pytrace=False,
        )
    return result


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Generator[None, object, object]:
    return (yield from _guarded_phase(whole_stack=False))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, object, object]:
    return (yield from _guarded_phase(whole_stack=True))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> Generator[None, object, object]:
    return (yield from _guarded_phase(whole_stack=False))


@pytest.fixture(autouse=True)
def _unit_isolation() -> None:
    """Every unit test runs under the guard (armed by this conftest's ``pytest_runtest_*`` hooks)."""
    assert GUARD.active, "the unit-test isolation guard is not armed"
