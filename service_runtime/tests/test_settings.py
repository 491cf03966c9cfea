"""Settings read from the environment: mistyped variables are reported, not silently dropped."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from inventory_mutator.settings import MutatorSettings
from sellable_calculator.settings import CalculatorSettings
from sellable_service.settings import ServiceSettings
from service_runtime.settings import unknown_settings


def test_a_mistyped_variable_of_the_service_is_reported_with_the_closest_name() -> None:
    environ = {
        "CALCULATOR_WORKER": "4",  # the typo
        "CALCULATOR_WORKERS": "2",
        "CALCULATOR_PORT": "9094",
        "KAFKA_HOME": "/opt/kafka",  # shared prefixes belong to other tools too
        "SERVICE_PORT": "9093",  # another service's variable
        "HOME": "/root",
    }
    assert unknown_settings(CalculatorSettings, environ) == [
        "CALCULATOR_WORKER is not a setting of this service; ignored "
        "(did you mean CALCULATOR_WORKERS?)"
    ]


def test_every_documented_variable_is_known() -> None:
    for settings_class in (MutatorSettings, CalculatorSettings, ServiceSettings):
        environ = {name.upper(): "x" for name in settings_class.model_fields}
        assert unknown_settings(settings_class, environ) == []


def test_the_service_checks_both_of_its_prefixes() -> None:
    warnings = unknown_settings(ServiceSettings, {"CASSANDRA_KEYSPCE": "k", "SERVICE_PROT": "1"})
    assert [w.split()[0] for w in warnings] == ["CASSANDRA_KEYSPCE", "SERVICE_PROT"]
    assert "CASSANDRA_KEYSPACE" in warnings[0] and "SERVICE_PORT" in warnings[1]


def test_list_settings_are_comma_separated_lists_validated_at_load(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CASSANDRA_CONTACT_POINTS", " cass-1, cass-2,, ")
    assert ServiceSettings().cassandra_contact_points == ["cass-1", "cass-2"]
    monkeypatch.setenv("CASSANDRA_CONTACT_POINTS", " , ")
    with pytest.raises(ValidationError, match="cassandra_contact_points"):
        ServiceSettings()


def test_the_calculator_state_dir_defaults_to_the_working_directory(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("CALCULATOR_STATE_DIR", raising=False)
    assert CalculatorSettings().calculator_state_dir == Path(".local/calculator")
