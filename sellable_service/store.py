"""The Cassandra read model: schema, connection that survives Cassandra being away, queries.

Example::

    store = SellableTable(settings)
    store.start()                      # connects in the background, retrying
    count = await store.sellable_count("STL", "123123")   # None for an unknown key
    result = await store.reservation_result(mutation_id)  # ReservationResult or None

Two tables, each shaped for the queries served:

* ``sellable_inventory``: all skus of a location share a partition
  (``PRIMARY KEY ((location), sku))``), so the single GET and the location listing each
  read one Cassandra partition.
* ``reservation_results``: one row per decided validated reservation, keyed by its
  mutation id (``PRIMARY KEY (mutation_id)``), for ``GET /inventory/reservations/{id}``.

The CQL runs on Cassandra 2.1 (the embedded one) through 5.0: plain types, no JSON
functions, no SASI.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from cassandra import (
    DriverException,
    OperationTimedOut,
    RequestExecutionException,
    Unavailable,
)
from cassandra.cluster import (
    EXEC_PROFILE_DEFAULT,
    Cluster,
    ExecutionProfile,
    NoHostAvailable,
    ResponseFuture,
    Session,
)
from cassandra.policies import ConstantReconnectionPolicy, RoundRobinPolicy
from cassandra.query import PreparedStatement, tuple_factory

from sellable_service.settings import ServiceSettings
from service_runtime.retry import Backoff, RetryStopped, retrying
from shared_schemas.reservations import ReservationResult

log = logging.getLogger(__name__)

TABLE = "sellable_inventory"
RESULTS_TABLE = "reservation_results"
RESULT_COLUMNS = (
    "mutation_id, location, sku, count, status, available, reason, reservation_offset, event_time"
)
"""The columns of a :class:`ReservationResult`, in its field order."""

UNAVAILABLE_ERRORS = (NoHostAvailable, OperationTimedOut, Unavailable, ConnectionError)
"""Driver errors that mean "Cassandra is not there right now" rather than a bug."""

READ_ERRORS = (*UNAVAILABLE_ERRORS, RequestExecutionException)
"""Errors after which a GET answers 503: Cassandra away, and also a coordinator's read
timeout or failure, or an overloaded node (answering again later), never a 500."""

WRITE_RETRY_ERRORS = (*UNAVAILABLE_ERRORS, RequestExecutionException, DriverException)
"""Errors after which the writer retries the same batch (timeouts, overload, no host)."""


CONNECT_BACKOFF = Backoff(first=0.5, cap=5.0)
"""Waits between attempts at the first connection: Cassandra may take a minute to start."""


class CassandraUnavailable(Exception):
    """Cassandra cannot answer now: not connected yet, down, or too slow."""


@dataclass(frozen=True, slots=True)
class SellableRow:
    """One key's row."""

    location: str
    sku: str
    count: int
    on_hand: int
    reserved: int
    updated_at: int


@dataclass(frozen=True, slots=True)
class Page:
    """One page of a location listing; ``next`` is the sku the next page starts after."""

    rows: list[SellableRow]
    next: str | None


def _bridge(response: ResponseFuture) -> asyncio.Future[Any]:
    """Turn the driver's callback future into an asyncio future of its (first page of) rows."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[Any] = loop.create_future()
    handoff = _handoffs.get(loop)
    if handoff is None:
        handoff = _handoffs[loop] = _LoopHandoff(loop)
    put = handoff.put
    response.add_callbacks(lambda rows: put(future, rows, None), lambda exc: put(future, None, exc))
    return future


class _LoopHandoff:
    """Outcomes from the driver's I/O thread, handed to the event loop in batches.

    The driver answers on its own thread, often several responses in one pass over the
    socket; waking the loop once per pass instead of once per response saves a self-pipe
    write and a GIL hand-off for each of the others.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._lock = threading.Lock()
        self._pending: list[tuple[asyncio.Future[Any], Any, BaseException | None]] = []

    def put(self, future: asyncio.Future[Any], result: Any, exc: BaseException | None) -> None:
        with self._lock:
            self._pending.append((future, result, exc))
            first = len(self._pending) == 1
        if first:  # later ones ride along with the drain already scheduled
            self._loop.call_soon_threadsafe(self._drain)

    def _drain(self) -> None:
        with self._lock:
            batch, self._pending = self._pending, []
        for future, result, exc in batch:
            if future.done():
                continue
            if exc is None:
                future.set_result(result)
            else:
                future.set_exception(exc)


_handoffs: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopHandoff] = (
    weakref.WeakKeyDictionary()
)


class SellableTable:
    """The session, the schema and the prepared statements, reconnecting as needed."""

    def __init__(self, settings: ServiceSettings) -> None:
        self.settings = settings
        self._session: Session | None = None
        self._cluster: Cluster | None = None
        self._stop = threading.Event()
        self._connected = threading.Event()
        self._thread = threading.Thread(target=self._connect_loop, name="cassandra-connect")
        self.insert: PreparedStatement | None = None
        self.delete: PreparedStatement | None = None
        self._select_count: PreparedStatement | None = None
        self._select_location: PreparedStatement | None = None
        self.insert_result: PreparedStatement | None = None
        self._select_result: PreparedStatement | None = None

    # --- connection -------------------------------------------------------------------

    def start(self) -> None:
        """Connect in the background; until then every query raises CassandraUnavailable."""
        self._thread.start()

    def wait_connected(self, timeout: float) -> bool:
        """Block until connected (for the writer thread and tests)."""
        return self._connected.wait(timeout)

    @property
    def connected(self) -> bool:
        """Whether a session exists (Cassandra may still be down since)."""
        return self._connected.is_set()

    @property
    def available(self) -> bool:
        """Whether connected and the driver sees at least one Cassandra host up.

        The driver marks a host down as soon as its connections break (a killed node
        closes them) and up again when it reconnects (every second, see the reconnection
        policy): a cheap, current answer for readiness, with no query.
        """
        cluster = self._cluster
        if not self._connected.is_set() or cluster is None:
            return False
        return any(host.is_up for host in cluster.metadata.all_hosts())

    def _connect_loop(self) -> None:
        s = self.settings
        connect = retrying(
            f"connecting to Cassandra at {','.join(s.cassandra_contact_points)}:{s.cassandra_port}",
            CONNECT_BACKOFF,
            stop=self._stop,
            logger=log,
        )
        with contextlib.suppress(RetryStopped):  # closed before Cassandra answered
            connect(self._connect)

    def _connect(self) -> None:
        s = self.settings
        profile = ExecutionProfile(
            load_balancing_policy=RoundRobinPolicy(),
            request_timeout=s.cassandra_request_timeout_seconds,
            # Plain tuples: the default builds a namedtuple class for every result.
            row_factory=tuple_factory,
        )
        extra: dict[str, Any] = {}
        if s.cassandra_protocol_version is not None:
            extra["protocol_version"] = s.cassandra_protocol_version
        cluster = Cluster(
            s.cassandra_contact_points,
            port=s.cassandra_port,
            execution_profiles={EXEC_PROFILE_DEFAULT: profile},
            # Come back quickly after Cassandra restarts: the writer is waiting.
            reconnection_policy=ConstantReconnectionPolicy(1.0, None),
            connect_timeout=5,
            **extra,
        )
        try:
            session = cluster.connect()
            self._create_schema(session)
        except Exception:
            cluster.shutdown()
            raise
        ks = s.cassandra_keyspace
        self.insert = session.prepare(
            f"INSERT INTO {ks}.{TABLE} (location, sku, count, on_hand, reserved, updated_at,"
            " source_partition, source_offset) VALUES (?, ?, ?, ?, ?, ?, ?, ?) USING TIMESTAMP ?"
        )
        self.delete = session.prepare(
            f"DELETE FROM {ks}.{TABLE} USING TIMESTAMP ? WHERE location = ? AND sku = ?"
        )
        self._select_count = session.prepare(
            f"SELECT count FROM {ks}.{TABLE} WHERE location = ? AND sku = ?"
        )
        self._select_location = session.prepare(
            f"SELECT location, sku, count, on_hand, reserved, updated_at FROM {ks}.{TABLE}"
            " WHERE location = ? AND sku > ? LIMIT ?"
        )
        self.insert_result = session.prepare(
            f"INSERT INTO {ks}.{RESULTS_TABLE} ({RESULT_COLUMNS}, source_partition,"
            " source_offset) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) USING TIMESTAMP ?"
        )
        self._select_result = session.prepare(
            f"SELECT {RESULT_COLUMNS} FROM {ks}.{RESULTS_TABLE} WHERE mutation_id = ?"
        )
        self._cluster, self._session = cluster, session
        self._connected.set()
        log.info("connected to Cassandra, keyspace %s ready", ks)

    def _create_schema(self, session: Session) -> None:
        ks = self.settings.cassandra_keyspace
        session.execute(
            f"CREATE KEYSPACE IF NOT EXISTS {ks} WITH replication = "
            f"{self.settings.cassandra_replication}",
            timeout=30,
        )
        session.execute(
            f"""CREATE TABLE IF NOT EXISTS {ks}.{TABLE} (
                location text,
                sku text,
                count bigint,
                on_hand bigint,
                reserved bigint,
                updated_at bigint,
                source_partition int,
                source_offset bigint,
                PRIMARY KEY ((location), sku)
            )""",
            timeout=30,
        )
        session.execute(
            f"""CREATE TABLE IF NOT EXISTS {ks}.{RESULTS_TABLE} (
                mutation_id text,
                location text,
                sku text,
                count bigint,
                status text,
                available bigint,
                reason text,
                reservation_offset bigint,
                event_time bigint,
                source_partition int,
                source_offset bigint,
                PRIMARY KEY (mutation_id)
            )""",
            timeout=30,
        )

    def session(self) -> Session:
        """The live session; raises CassandraUnavailable before the first connection."""
        if self._session is None:
            raise CassandraUnavailable("not connected to Cassandra yet")
        return self._session

    def close(self) -> None:
        """Stop reconnecting and shut the cluster down."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)
        if self._cluster is not None:
            self._cluster.shutdown()

    # --- reads --------------------------------------------------------------------------

    async def sellable_count(self, location: str, sku: str) -> int | None:
        """One key's sellable count, or None; raises CassandraUnavailable.

        Reads only the column the GET answers with: less for Cassandra to send and for
        the driver to decode on the hottest path.
        """
        session = self.session()
        assert self._select_count is not None
        try:
            result = await _bridge(session.execute_async(self._select_count, (location, sku)))
        except READ_ERRORS as exc:
            raise CassandraUnavailable(f"{type(exc).__name__}: {exc}") from exc
        return result[0][0] if result else None

    async def location(self, location: str, limit: int, after: str = "") -> Page:
        """Up to ``limit`` skus of ``location`` after the sku ``after``, in sku order.

        Keyset paging on the clustering column: the cursor is simply the last sku of the
        previous page, so it is stateless, readable, and cannot be forged into anything
        but another starting point.
        """
        session = self.session()
        assert self._select_location is not None
        try:
            result = await _bridge(
                session.execute_async(self._select_location, (location, after, limit + 1))
            )
        except READ_ERRORS as exc:
            raise CassandraUnavailable(f"{type(exc).__name__}: {exc}") from exc
        rows = [_row(r) for r in result]
        more = len(rows) > limit
        rows = rows[:limit]
        return Page(rows, rows[-1].sku if more else None)

    async def reservation_result(self, mutation_id: str) -> ReservationResult | None:
        """The decision stored for ``mutation_id``, or None; raises CassandraUnavailable."""
        session = self.session()
        assert self._select_result is not None
        try:
            result = await _bridge(session.execute_async(self._select_result, (mutation_id,)))
        except READ_ERRORS as exc:
            raise CassandraUnavailable(f"{type(exc).__name__}: {exc}") from exc
        return ReservationResult(*result[0]) if result else None


def _row(raw: Sequence[Any]) -> SellableRow:
    location, sku, count, on_hand, reserved, updated_at = raw
    return SellableRow(location, sku, count, on_hand, reserved, updated_at)
