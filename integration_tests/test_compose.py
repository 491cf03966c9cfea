"""docker-compose.yml and docker-compose-dev.yml, checked without Docker.

No Docker engine runs where the tests run, so this checks what can be checked: both
files parse, every container has a health check and waits for healthy dependencies,
every environment variable a service gets is one its settings class reads, ports and
URLs agree with the defaults the code and the README use, and the calculators are one
service that scales: replicas that differ only in their container, each with state of
its own, in a group the broker accepts.
"""

from __future__ import annotations

import os
import socket
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
        "sellable-calculator",
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
    ["inventory-mutator", "sellable-calculator", "sellable-service"],
)
def test_environment_is_read_by_the_services_settings(name: str) -> None:
    spec = _resolved_services()[name]
    module = spec["command"][-1]
    fields = _settings_class(module).model_fields
    unknown = [key for key in spec["environment"] if key.lower() not in fields]
    assert unknown == [], f"{name} sets variables its settings never read: {unknown}"


def _published(spec: dict[str, Any]) -> tuple[range, int]:
    """The host ports (a range, or one port) and the container port of ``spec``'s first
    published port."""
    host, container = spec["ports"][0].split(":")
    first, _, last = host.partition("-")
    return range(int(first), int(last or first) + 1), int(container)


def test_ports_and_urls_agree_with_the_defaults() -> None:
    services = _resolved_services()

    def published(name: str) -> int:
        hosts, container = _published(services[name])
        assert list(hosts) == [container]
        return container

    assert published("inventory-mutator") == MutatorSettings().mutator_port == 9091
    assert published("sellable-service") == 9093
    assert published("kafka") == 9092
    assert published("cassandra") == 9042
    for name in ("inventory-mutator", "sellable-calculator", "sellable-service"):
        env = services[name]["environment"]
        assert env["KAFKA_BOOTSTRAP_SERVERS"] == "kafka:19092"
        assert env["SCHEMA_REGISTRY_URL"] == "http://schema-registry:8081"
    kafka_env = services["kafka"]["environment"]
    assert "PLAINTEXT://kafka:19092" in kafka_env["KAFKA_ADVERTISED_LISTENERS"]


def test_calculator_replicas_publish_the_default_port_and_a_host_port_each() -> None:
    calculator = _resolved_services()["sellable-calculator"]
    env = calculator["environment"]
    hosts, container = _published(calculator)
    default = CalculatorSettings().calculator_port
    assert container == int(env["CALCULATOR_PORT"]) == default == 9094
    # The tour's ports (9094, 9095) are in the range, with room for more replicas.
    assert hosts.start == default and len(hosts) > calculator["deploy"]["replicas"] >= 2
    assert f"localhost:{container}/health/ready" in " ".join(calculator["healthcheck"]["test"])


def test_calculator_replicas_differ_only_in_their_container(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Nothing in the service names one replica: the instance id, the advertised URL and
    the state directory all come from the container's host name, which other containers
    on the compose network resolve."""
    calculator = _resolved_services()["sellable-calculator"]
    env = calculator["environment"]
    assert "container_name" not in calculator and "hostname" not in calculator
    assert "CALCULATOR_INSTANCE_ID" not in env and "CALCULATOR_ADVERTISED_URL" not in env
    assert env["CALCULATOR_HOST"] == "0.0.0.0"
    for key in list(os.environ):
        if key.startswith(("CALCULATOR_", "KAFKA_", "SCHEMA_", "TOPIC_")):
            monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, str(value))
    monkeypatch.setattr(socket, "gethostname", lambda: "3f2a9c1b7d4e")
    settings = CalculatorSettings()
    assert settings.advertised_url == "http://3f2a9c1b7d4e:9094"
    assert settings.instance_id == "calculator-3f2a9c1b7d4e-9094"
    assert settings.instance_dir == Path(env["CALCULATOR_STATE_DIR"]) / settings.instance_id


def test_calculator_replicas_keep_state_in_their_own_container_and_restart() -> None:
    """No volume: one shared by the replicas would share state directories, and a replica
    on an empty disk restores from the changelog topic anyway."""
    calculator = _resolved_services()["sellable-calculator"]
    assert not calculator.get("volumes"), "calculator replicas must not share a volume"
    assert Path(calculator["environment"]["CALCULATOR_STATE_DIR"]).is_absolute()
    assert calculator["restart"] in ("always", "unless-stopped", "on-failure")


def test_nothing_refers_to_a_calculator_by_instance() -> None:
    """The per-instance services (sellable-calculator-0, -1) are gone: no URL, dependency
    or variable may name one, nor any variable the calculators no longer read."""
    for name in ("docker-compose.yml", "docker-compose-dev.yml"):
        text = (ROOT / name).read_text()
        for gone in (
            "sellable-calculator-",
            "CALCULATOR_INSTANCE_INDEX",
            "CALCULATOR_INSTANCE_COUNT",
            "CALCULATOR_PARTITIONS",
            "CALCULATOR_EPOCH_SECONDS",
        ):
            assert gone not in text, f"{name} still mentions {gone}"


def test_the_broker_accepts_the_calculators_session_timeout() -> None:
    """Kafka refuses a group member whose session timeout is below
    group.min.session.timeout.ms (6 s unless set): the calculators' would never join."""
    services = _resolved_services()
    broker_minimum_ms = int(
        services["kafka"]["environment"].get("KAFKA_GROUP_MIN_SESSION_TIMEOUT_MS", 6000)
    )
    env = services["sellable-calculator"]["environment"]
    session = float(
        env.get(
            "CALCULATOR_SESSION_TIMEOUT_SECONDS",
            CalculatorSettings.model_fields["calculator_session_timeout_seconds"].default,
        )
    )
    assert broker_minimum_ms <= session * 1000
