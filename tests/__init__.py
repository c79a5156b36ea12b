"""pacsnode's tests: unit/, integration/, acceptance/, interop/ tiers; shared code in support/."""

import pytest

# Plain ``assert`` in the shared test code explains its failures as it does in test modules.
pytest.register_assert_rewrite("tests.support")
