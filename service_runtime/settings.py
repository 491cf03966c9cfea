"""Settings every service shares, read from the environment (pydantic-settings).

Each service's own settings class inherits from :class:`KafkaSettings` and
:class:`HttpServerSettings`, so the same variable means the same thing everywhere.
Unknown variables are ignored by the settings classes (the environment holds plenty that
is not ours), so each service logs the ones that look like its own but are none of its
settings: :func:`unknown_settings`.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping
from typing import Annotated, Any

from pydantic import BeforeValidator, Field
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from shared_schemas.topics import DEFAULT_PARTITIONS


def _split_commas(value: Any) -> Any:
    """``"a, b,,c"`` as ``["a", "b", "c"]``; anything else as it is (a list, say)."""
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


CommaSeparated = Annotated[list[str], NoDecode, BeforeValidator(_split_commas)]
"""A list setting written as ``A,B,C`` in the environment (not as JSON), validated at load."""


class ServiceSettingsBase(BaseSettings):
    """What every settings class shares: read from the environment, names unprefixed,
    unknown variables ignored (see :func:`unknown_settings`), and the logging level."""

    model_config = SettingsConfigDict(env_prefix="", extra="ignore")

    log_level: str = Field("INFO", description="Logging level.")


class KafkaSettings(ServiceSettingsBase):
    """Where Kafka and the schema registry are, and how the topics are laid out."""

    kafka_bootstrap_servers: str = Field(
        "127.0.0.1:9092", description="Kafka bootstrap servers (host:port, comma-separated)."
    )
    schema_registry_url: str | None = Field(
        None,
        description="Schema registry URL. Unset: values use Avro single-object encoding; "
        "set: Confluent wire format with ids from the registry.",
    )
    topic_partitions: int = Field(
        DEFAULT_PARTITIONS, ge=1, description="Partition count of the co-partitioned topics."
    )
    topic_replication_factor: int = Field(1, ge=1, description="Replication factor of new topics.")


class HttpServerSettings(ServiceSettingsBase):
    """How long a server lets a client keep a connection without a complete request.

    uvicorn itself only closes a connection that stays idle after a response; these
    also bound a connection that never sends a request, one that trickles its request
    head, and one that declares a body it never finishes sending.
    """

    http_keep_alive_timeout_seconds: float = Field(
        5.0,
        gt=0,
        description="An open connection with no request in progress is closed after "
        "this long without a byte: before its first request and between requests.",
    )
    http_header_timeout_seconds: float = Field(
        10.0,
        gt=0,
        description="A request head (request line and headers) must be complete within "
        "this long of its first byte, or the connection is closed.",
    )
    http_body_timeout_seconds: float = Field(
        10.0,
        gt=0,
        description="A request body must be complete within this long of the end of its "
        "head, or the connection is closed.",
    )
    http_max_head_bytes: int = Field(
        1_048_576,
        ge=16_384,
        description="A request line and headers larger than this are answered 431 and the "
        "connection closed (room for the longest request target httptools can parse, "
        "65,535 bytes, and generous headers).",
    )


def unknown_settings(
    settings_class: type[ServiceSettingsBase], environ: Mapping[str, str] | None = None
) -> list[str]:
    """Warnings for variables that carry a service's own prefix but name no setting of it.

    The prefixes are those of the service's own fields (``MUTATOR_``, ``CALCULATOR_``,
    ``SERVICE_``, ``CASSANDRA_``): a typo such as ``CALCULATOR_WORKER=4`` would otherwise
    be ignored without a word. Each warning suggests the closest real name.
    """
    environ = os.environ if environ is None else environ
    shared = set(KafkaSettings.model_fields) | set(HttpServerSettings.model_fields)
    own = set(settings_class.model_fields) - shared
    known = {name.upper() for name in settings_class.model_fields}
    prefixes = tuple(sorted({name.split("_", 1)[0].upper() + "_" for name in own}))
    warnings = []
    for variable in sorted(environ):
        name = variable.upper()
        if name.startswith(prefixes) and name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            warnings.append(f"{variable} is not a setting of this service; ignored{hint}")
    return warnings
