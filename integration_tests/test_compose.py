"""docker-compose.yml and docker-compose-dev.yml, checked without Docker.

No Docker engine runs where the tests run, so this checks what can be checked: both
files parse, every container has a health check and waits for healthy dependencies,
every environment variable a service gets is one its settings class reads, and ports
and URLs agree with the defaults the code and the README use.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic_settings import BaseSettings

from inventory_mutator.settings import MutatorSettings
from sellable_calculator.settings import CalculatorSettings

ROOT = Path(__file__).resolve().parent.parent


def _load(name: str) -> dict[str, Any]:
    return yaml.safe_load((ROOT / name).read_text())


def _resolved_services() -> dict[str, dict[str, Any]]:
    """Services of docker-compose.yml with `extends` from the dev file applied."""
    main, dev = _load("docker-compose.yml"), _load("docker-compose-dev.yml")
    services = {}
    for name, spec in main["services"].items():
        extends = spec.get("extends")
        if extends:
            assert extends["file"] == "docker-compose-dev.yml"
            spec = {
                **dev["services"][extends["service"]],
                **{k: v for k, v in spec.items() if k != "extends"},
            }
        services[name] = spec
    return services


def _settings_class(module: str) -> type[BaseSettings]:
    if module == "sellable_service":
        from sellable_service.settings import ServiceSettings

        return ServiceSettings
    return {"inventory_mutator": MutatorSettings, "sellable_calculator": CalculatorSettings}[module]


def test_both_files_parse_and_the_dev_file_has_only_infrastructure() -> None:
    assert set(_load("docker-compose-dev.yml")["services"]) == {
        "kafka",
        "schema-registry",
        "cassandra",
    }
    assert set(_load("docker-compose.yml")["services"]) == {
        "kafka",
        "schema-registry",
        "cassandra",
        "inventory-mutator",
        "sellable-calculator-0",
        "sellable-calculator-1",
        "sellable-service",
    }


def test_every_service_has_a_health_check_and_waits_for_healthy_dependencies() -> None:
    services = _resolved_services()
    for name, spec in services.items():
        assert spec.get("healthcheck", {}).get("test"), f"{name} has no health check"
        for dependency, condition in (spec.get("depends_on") or {}).items():
            assert dependency in services, f"{name} depends on unknown {dependency}"
            assert condition == {"condition": "service_healthy"}, name


def test_volumes_are_declared() -> None:
    main = _load("docker-compose.yml")
    for name, spec in _resolved_services().items():
        for mount in spec.get("volumes", []):
            volume = mount.split(":", 1)[0]
            assert volume in main["volumes"], f"{name} mounts undeclared volume {volume}"


@pytest.mark.parametrize(
    "name",
    ["inventory-mutator", "sellable-calculator-0", "sellable-calculator-1", "sellable-service"],
)
def test_environment_is_read_by_the_services_settings(name: str) -> None:
    spec = _resolved_services()[name]
    module = spec["command"][-1]
    fields = _settings_class(module).model_fields
    unknown = [key for key in spec["environment"] if key.lower() not in fields]
    assert unknown == [], f"{name} sets variables its settings never read: {unknown}"


def test_ports_and_urls_agree_with_the_defaults() -> None:
    services = _resolved_services()

    def published(name: str) -> int:
        host, container = services[name]["ports"][0].split(":")
        assert host == container
        return int(host)

    assert published("inventory-mutator") == MutatorSettings().mutator_port == 9091
    calculator_default = CalculatorSettings().calculator_port
    for index in (0, 1):
        name = f"sellable-calculator-{index}"
        env = services[name]["environment"]
        port = published(name)
        assert port == calculator_default + index == int(env["CALCULATOR_PORT"])
        assert env["CALCULATOR_ADVERTISED_URL"] == f"http://{name}:{port}"
        assert env["CALCULATOR_INSTANCE_INDEX"] == str(index)
        assert f"localhost:{port}/" in " ".join(services[name]["healthcheck"]["test"])
    assert published("sellable-service") == 9093
    assert published("kafka") == 9092
    assert published("cassandra") == 9042
    for name in ("inventory-mutator", "sellable-calculator-0", "sellable-service"):
        env = services[name]["environment"]
        assert env["KAFKA_BOOTSTRAP_SERVERS"] == "kafka:19092"
        assert env["SCHEMA_REGISTRY_URL"] == "http://schema-registry:8081"
    kafka_env = services["kafka"]["environment"]
    assert "PLAINTEXT://kafka:19092" in kafka_env["KAFKA_ADVERTISED_LISTENERS"]
