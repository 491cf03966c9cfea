"""Fixtures for the mutator's tests."""

from __future__ import annotations

import pytest

from inventory_mutator import producer as producer_module
from inventory_mutator.tests.support import FakeBroker


@pytest.fixture
def broker(monkeypatch: pytest.MonkeyPatch) -> FakeBroker:
    """A fake broker; every librdkafka producer the mutator makes is a fake on it."""
    fake = FakeBroker()
    monkeypatch.setattr(producer_module, "Producer", fake.factory)
    return fake
