"""An asyncio front for confluent-kafka's producer: ``await produce(...)`` never blocks the loop,
and a producer that can no longer write is replaced by a fresh one.

Example::

    producer = AsyncProducer({"bootstrap.servers": "127.0.0.1:9092"})
    delivered = await producer.produce("inventory_adjustments", key, value, partition=2,
                                       timeout=5.0)
    print(delivered.partition, delivered.offset)
    status = await producer.readiness(3.0)      # is the producer known to work?
    await producer.aclose(3.0)                  # flush with a deadline, answer the rest

librdkafka delivers acknowledgements through callbacks that run inside ``poll()``. Here
the event loop itself calls ``poll(0)`` (which never waits) every millisecond while
records are in flight, and not at all when none are: the callbacks then resolve their
futures on the loop's own thread. A background polling thread would cost a thread switch
and a fight for the GIL per acknowledgement, which at a few thousand requests a second
was a tenth of the mutator's throughput. The producer is idempotent with ``acks=all``, so
a retry inside librdkafka never writes a record twice.

**Sessions.** An idempotent producer writes under a producer id and epoch that the broker
handed out: one *session*. Some errors end a session for good, and librdkafka then fails
every later record the same way until the process restarts: a fatal error
(``KafkaError.fatal()``, ``_FATAL``; e.g. an unknown producer id after the broker lost its
state), or the broker refusing the session (``PRODUCER_FENCED``, ``OUT_OF_ORDER_SEQUENCE``…:
the embedded broker answers ``PRODUCER_FENCED`` for good once librdkafka has bumped its
epoch because records timed out during a pause). A session can also wedge without any
error: after a broker restart librdkafka retries an unknown producer id under new epochs
for ever, and every record times out. So:

* an error that ends the session replaces the librdkafka producer at once (a new producer
  asks for a new producer id); the old one is purged, so that its queued records are
  answered "not written" and its in-flight ones "may have been written", and destroyed;
* a session whose records time out while the broker answers a metadata request through
  it (the broker check), twice in a row a check interval apart with no acknowledgement in
  between, is replaced the same way: it is wedged, not merely slow;
* a session *works* once a record was acknowledged through it, or the broker check
  passed through it, and nothing above happened since. :meth:`AsyncProducer.readiness`
  says so, and runs the check.

What a failure means for the record (:attr:`ProduceFailed.may_be_written`): a record that
librdkafka never sent (refused locally, purged from its queue, refused for its content)
was not written; any other failure — a timeout, a purge while in flight, a session that
ended after the record may have been sent once — may have been written.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from confluent_kafka import KafkaError, KafkaException, Message, Producer

from service_runtime.kafka import position_of

log = logging.getLogger(__name__)

POLL_INTERVAL_SECONDS = 0.001
"""How often the loop collects acknowledgements while records are in flight. Not less:
uvloop's timers count whole milliseconds, and a shorter delay fires at once, turning the
poll into a busy loop that takes the CPU from the broker on a small machine."""

CHECK_INTERVAL_SECONDS = 1.0
"""How often a session not known to work is checked against the broker again."""

CHECK_TIMEOUT_SECONDS = 2.5
"""Longest wait of the default broker check for the broker's metadata answer."""

RETIRE_GRACE_SECONDS = 1.0
"""How long a replaced session gets to report its purged records before it is destroyed."""

SESSION_ENDING_ERRORS = frozenset(
    {
        KafkaError._FATAL,
        KafkaError._FENCED,
        KafkaError._INCONSISTENT,
        KafkaError._GAPLESS_GUARANTEE,
        KafkaError.PRODUCER_FENCED,
        KafkaError.INVALID_PRODUCER_EPOCH,
        KafkaError.INVALID_PRODUCER_ID_MAPPING,
        KafkaError.OUT_OF_ORDER_SEQUENCE_NUMBER,
        KafkaError.UNKNOWN_PRODUCER_ID,
    }
)
"""Errors after which this producer id/epoch cannot write any more (besides ``fatal()`` ones)."""

NOT_WRITTEN_ERRORS = frozenset(
    {
        KafkaError._PURGE_QUEUE,  # purged before it was ever sent
        KafkaError._UNKNOWN_PARTITION,
        KafkaError._UNKNOWN_TOPIC,
        KafkaError._INVALID_ARG,
        KafkaError.MSG_SIZE_TOO_LARGE,
        KafkaError.RECORD_LIST_TOO_LARGE,
        KafkaError.INVALID_RECORD,
        KafkaError.TOPIC_AUTHORIZATION_FAILED,
    }
)
"""Delivery errors that prove the record is not in the log: never sent, or refused for
what it is (a retry would be refused the same way). Every other failure may have been
written: librdkafka may have sent the record before the failure it reports."""

BrokerCheck = Callable[[Producer], bool]
"""Blocking check, run in a thread, that the broker can take records through this producer.

Raises when it cannot (the message is the reason readiness reports). Returns True when
it had to repair the broker first (recreate lost topics): the broker then lost its
producer ids too, so a session that already wrote is replaced.
"""

T = TypeVar("T")


class ProduceFailed(Exception):
    """The broker did not acknowledge the record: refused, unreachable, too slow, or closing."""

    def __init__(
        self,
        reason: str,
        may_be_written: bool,
        *,
        ends_session: bool = False,
        timed_out: bool = False,
        error: str = "kafka_unavailable",
    ) -> None:
        super().__init__(reason)
        self.may_be_written = may_be_written
        """Whether the record might be (or still land) in the log, or certainly is not."""
        self.ends_session = ends_session
        """The error ended the producer's session (fatal, fenced…): it gets replaced."""
        self.timed_out = timed_out
        """No acknowledgement in time: the session is suspect until one arrives."""
        self.error = error
        """The machine-readable code of the 503: ``kafka_unavailable`` or ``shutting_down``."""


@dataclass(frozen=True, slots=True)
class Delivered:
    """Where an acknowledged record landed."""

    topic: str
    partition: int
    offset: int


@dataclass(frozen=True, slots=True)
class ProducerStatus:
    """What readiness reports about the producer."""

    ready: bool
    session: int
    """Number of the producer session in use: 1 at start, one more per replacement."""
    problem: str | None
    """Why it is not ready (None when ready)."""


def ends_session(error: KafkaError) -> bool:
    """Whether ``error`` means the producer's idempotence session can write no more."""
    return error.fatal() or error.code() in SESSION_ENDING_ERRORS


def _delivery_failure(error: KafkaError) -> ProduceFailed:
    """What a failed delivery report means for the record and for the session."""
    code = error.code()
    return ProduceFailed(
        str(error),
        may_be_written=code not in NOT_WRITTEN_ERRORS,
        ends_session=ends_session(error),
        timed_out=code == KafkaError._MSG_TIMED_OUT,
    )


def _exception_error(exc: KafkaException) -> KafkaError | None:
    error = exc.args[0] if exc.args else None
    return error if isinstance(error, KafkaError) else None


def metadata_round_trip(producer: Producer) -> bool:
    """The default broker check: one metadata request through the producer's own handle."""
    producer.list_topics(timeout=CHECK_TIMEOUT_SECONDS)
    return False


def _in_daemon_thread(
    loop: asyncio.AbstractEventLoop, function: Callable[[], T]
) -> asyncio.Future[T]:
    """Run blocking ``function`` in a daemon thread; its outcome resolves the returned future.

    Not ``asyncio.to_thread``: the default executor's threads are joined at interpreter
    exit, so a check stuck on a frozen broker would hold up the mutator's shutdown.
    """
    future: asyncio.Future[T] = loop.create_future()

    def settle(outcome: tuple[bool, Any]) -> None:
        if not future.done():
            if outcome[0]:
                future.set_result(outcome[1])
            else:
                future.set_exception(outcome[1])

    def run() -> None:
        try:
            outcome: tuple[bool, Any] = (True, function())
        except Exception as exc:
            outcome = (False, exc)
        # RuntimeError: the loop has closed, nobody is waiting any more.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(settle, outcome)

    threading.Thread(target=run, name="kafka-check", daemon=True).start()
    return future


_Outcome = tuple["asyncio.Future[Delivered]", "Delivered | ProduceFailed"]
_Deadline = tuple[float, int, "asyncio.Future[Delivered]", float, "_Session"]


class _Session:
    """One librdkafka producer, i.e. one idempotence session (producer id and epoch)."""

    __slots__ = (
        "broken",
        "check_error",
        "in_flight",
        "number",
        "outcomes",
        "producer",
        "records",
        "retire_at",
        "stalled",
        "stalled_checks",
        "working",
    )

    def __init__(self, number: int, config: dict[str, Any]) -> None:
        self.number = number
        # Outcomes reported by the callbacks during one poll(). They are settled after
        # poll() returns rather than inside the callback, so a callback run by another
        # thread (rd_kafka_destroy) never touches a future from outside its loop.
        self.outcomes: list[_Outcome] = []
        self.in_flight = 0
        """Records handed to librdkafka whose delivery report was not collected yet."""
        self.records = 0
        """Records handed to librdkafka through this session, ever."""
        self.working = False
        """A record was acknowledged, or the broker check passed, through this session."""
        self.stalled = False
        """A record timed out, and none was acknowledged since."""
        self.stalled_checks = 0
        """Broker checks that passed while stalled: the second one replaces the session."""
        self.broken: str | None = None
        """The error that ended this session, if one did."""
        self.check_error: str | None = None
        """Why the last broker check failed (None: it passed, or never ran)."""
        self.retire_at = 0.0
        self.producer: Producer | None = Producer({**config, "error_cb": self._on_error})

    def _on_error(self, error: KafkaError) -> None:
        # Runs inside poll(). Other errors (a broker down, a refused connection) are
        # transient: librdkafka logs and retries them itself.
        if ends_session(error) and self.broken is None:
            self.broken = str(error)

    def stall(self) -> None:
        """A record timed out: suspect until one is acknowledged again."""
        if not self.stalled:
            self.stalled = True
            self.stalled_checks = 0

    def destroy(self) -> None:
        """Destroy the librdkafka handle in a daemon thread, without waiting for it."""
        # The list is the only reference left, so clearing it in the thread runs
        # rd_kafka_destroy there and not on the event loop.
        holder = [self.producer]
        self.producer = None
        threading.Thread(target=holder.clear, name="kafka-producer-destroy", daemon=True).start()


class AsyncProducer:
    """The producer shared by every request of the process, replaced when it breaks.

    Create it, call :meth:`produce`, :meth:`readiness` and :meth:`aclose` from the same
    running event loop.
    """

    def __init__(
        self,
        config: dict[str, Any],
        check: BrokerCheck = metadata_round_trip,
        *,
        on_replaced: Callable[[str], None] | None = None,
    ) -> None:
        self._config: dict[str, Any] = {
            "enable.idempotence": True,
            "acks": "all",
            # Up to 2 ms to gather concurrent requests into one produce request: the
            # broker then answers fewer, larger requests, which lowers the latency of
            # concurrent POSTs as well as raising the rate (README: Performance).
            "linger.ms": 2,
            **config,
        }
        self._check = check
        self._on_replaced = on_replaced
        self._numbers = itertools.count(1)
        self._current = _Session(next(self._numbers), self._config)
        self._retiring: list[_Session] = []
        """Replaced sessions still reporting their purged records."""
        self._polling_loop: asyncio.AbstractEventLoop | None = None
        """The loop whose _poll callback is scheduled, if any."""
        # (deadline, sequence, future, timeout, session): the request-side timeout, checked
        # on each poll; a heap instead of a timer per request, which cost more than the
        # rest of produce().
        self._deadlines: list[_Deadline] = []
        self._sequence = itertools.count()
        self._closing = False
        self._closed = False
        self._close_task: asyncio.Task[int] | None = None
        self._check_task: asyncio.Task[None] | None = None
        self._checked_session: _Session | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._last_replacement: str | None = None

    @property
    def session(self) -> int:
        """Number of the session in use (1 at start, one more per replacement)."""
        return self._current.number

    async def produce(
        self, topic: str, key: bytes, value: bytes, partition: int, timeout: float
    ) -> Delivered:
        """Produce one record and wait (at most ``timeout`` s) for the broker's acknowledgement.

        Raises :class:`ProduceFailed` saying whether the record may have been written.
        """
        if self._closing:
            raise ProduceFailed(
                "the mutator is shutting down", may_be_written=False, error="shutting_down"
            )
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Delivered] = loop.create_future()
        session = self._current
        try:
            self._enqueue(session, future, topic, key, value, partition)
        except BufferError as exc:
            raise ProduceFailed("the producer's local queue is full", False) from exc
        except KafkaException as exc:
            error = _exception_error(exc)
            if error is None or not ends_session(error):
                raise ProduceFailed(str(exc), False) from exc
            # The session had ended before this record was queued, so nothing was sent:
            # the record can go to a fresh session without any risk of a duplicate.
            if session.broken is None:
                session.broken = str(error)
            self._replace(loop)
            session = self._current
            try:
                self._enqueue(session, future, topic, key, value, partition)
            except (BufferError, KafkaException) as again:
                raise ProduceFailed(str(again), False) from again
        heapq.heappush(
            self._deadlines, (loop.time() + timeout, next(self._sequence), future, timeout, session)
        )
        if self._polling_loop is not loop:
            # Not polling yet (or the loop that was has gone, as between test clients).
            self._polling_loop = loop
            loop.call_soon(self._poll, loop)
        return await future

    @staticmethod
    def _enqueue(
        session: _Session,
        future: asyncio.Future[Delivered],
        topic: str,
        key: bytes,
        value: bytes,
        partition: int,
    ) -> None:
        """Hand one record to the session's librdkafka producer."""
        outcomes = session.outcomes

        def on_delivery(error: KafkaError | None, message: Message) -> None:
            if error is None:
                outcomes.append((future, Delivered(*position_of(message))))
            else:
                outcomes.append((future, _delivery_failure(error)))

        assert session.producer is not None  # only the current session takes records
        session.producer.produce(topic, value, key, partition=partition, on_delivery=on_delivery)
        session.in_flight += 1
        session.records += 1

    def _poll(self, loop: asyncio.AbstractEventLoop) -> None:
        """Collect acknowledgements, expire overdue requests, and come back while needed."""
        if self._closed:
            return
        try:
            self._serve(loop)
        except Exception:  # a bug: say so, but keep polling, or every request would hang
            log.exception("serving the Kafka producer failed")
        if self._polling_loop is not loop:
            return  # a newer loop took over polling
        if self._current.in_flight > 0 or self._retiring:
            loop.call_later(POLL_INTERVAL_SECONDS, self._poll, loop)
        else:
            self._polling_loop = None

    def _serve(self, loop: asyncio.AbstractEventLoop) -> None:
        """One poll: settle what was reported or is overdue; replace a session that ended."""
        current = self._current
        self._collect(current, loop)
        if self._retiring:
            self._collect_retiring(loop)
        deadlines, now = self._deadlines, loop.time()
        while deadlines and (deadlines[0][2].done() or deadlines[0][0] <= now):
            _, _, future, timeout, session = heapq.heappop(deadlines)
            if not future.done() and future.get_loop() is loop:
                session.stall()
                future.set_exception(
                    ProduceFailed(
                        f"no acknowledgement from Kafka within {timeout:g} s",
                        may_be_written=True,
                        timed_out=True,
                    )
                )
        if current is self._current and not self._closing:
            if current.broken is not None:
                self._replace(loop)
            elif current.stalled:
                self._supervise(loop)  # check the broker: is it down, or this session wedged?

    def _collect(self, session: _Session, loop: asyncio.AbstractEventLoop) -> None:
        """Serve one session's callbacks and settle the futures they reported on."""
        producer = session.producer
        if producer is None:
            return
        try:
            producer.poll(0)
        except KafkaException as exc:
            # confluent-kafka raises a fatal error from poll() instead of calling error_cb.
            if session.broken is None:
                session.broken = str(exc)
        if not session.outcomes:
            return
        # The same list object stays in place: callbacks of records still in flight hold a
        # reference to it.
        outcomes = session.outcomes.copy()
        session.outcomes.clear()
        session.in_flight -= len(outcomes)
        for future, result in outcomes:
            if isinstance(result, ProduceFailed):
                if result.ends_session:
                    if session.broken is None:
                        session.broken = str(result)
                elif result.timed_out:
                    session.stall()
                if not future.done() and future.get_loop() is loop:
                    future.set_exception(result)
            else:
                session.working = True
                session.stalled = False
                if not future.done() and future.get_loop() is loop:
                    future.set_result(result)

    def _collect_retiring(self, loop: asyncio.AbstractEventLoop) -> None:
        now = loop.time()
        for session in list(self._retiring):
            self._collect(session, loop)
            if session.in_flight <= 0 or now >= session.retire_at:
                self._retiring.remove(session)
                self._destroy(session, loop, "the Kafka producer was replaced before it answered")

    def _replace(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start a new session in place of the current one, and retire the old one."""
        old = self._current
        reason = old.broken or old.check_error or "it stopped working"
        self._current = _Session(next(self._numbers), self._config)
        self._last_replacement = f"session {old.number} ended: {reason}"
        log.warning(
            "Kafka producer session %d can write no more (%s): continuing with a new "
            "producer (session %d)",
            old.number,
            reason,
            self._current.number,
        )
        if self._on_replaced is not None:
            self._on_replaced(reason)
        # Purging reports every record the old session holds at once: the queued ones as
        # _PURGE_QUEUE (never sent: not written), the in-flight ones as _PURGE_INFLIGHT
        # (may have been written), instead of leaving them to time out.
        try:
            assert old.producer is not None
            old.producer.purge(in_queue=True, in_flight=True, blocking=False)
        except Exception as exc:
            log.debug("purging producer session %d failed: %s", old.number, exc)
        old.retire_at = loop.time() + RETIRE_GRACE_SECONDS
        self._retiring.append(old)
        if self._polling_loop is not loop:
            self._polling_loop = loop
            loop.call_soon(self._poll, loop)
        self._supervise(loop)

    def _destroy(self, session: _Session, loop: asyncio.AbstractEventLoop, reason: str) -> None:
        """Answer whoever still waits on ``session``, then destroy its librdkafka handle."""
        waiting = [
            entry[2]
            for entry in self._deadlines
            if entry[4] is session and not entry[2].done() and entry[2].get_loop() is loop
        ]
        for future in waiting:
            future.set_exception(ProduceFailed(reason, may_be_written=True))
        session.in_flight = 0
        if session.producer is not None:
            session.destroy()

    def _supervise(self, loop: asyncio.AbstractEventLoop) -> None:
        """Make sure a task checks the current session until it is known to work."""
        if self._supervisor is None and not self._closing:
            self._supervisor = loop.create_task(self._supervision())

    async def _supervision(self) -> None:
        try:
            while not self._closing:
                session = self._current
                if session.working and not session.stalled and session.check_error is None:
                    return
                try:
                    await self.check()
                except Exception:  # a bug, not the broker: keep supervising all the same
                    log.exception("checking the Kafka producer failed")
                if self._current is session:
                    await asyncio.sleep(CHECK_INTERVAL_SECONDS)
                # else: a new session replaced it; check that one at once.
        finally:
            self._supervisor = None

    async def check(self) -> None:
        """Run the broker check through the current session now (one at a time); never raises.

        Passing makes the session *working*; passing while its records time out, or after
        the broker had to be repaired, replaces it; failing is remembered for readiness.
        """
        session = self._current
        task = self._check_task
        if task is None or task.done() or self._checked_session is not session:
            task = asyncio.get_running_loop().create_task(self._run_check(session))
            self._check_task, self._checked_session = task, session
        await asyncio.shield(task)

    async def _run_check(self, session: _Session) -> None:
        loop = asyncio.get_running_loop()
        producer = session.producer
        if producer is None:
            return
        try:
            repaired = await _in_daemon_thread(loop, lambda: self._check(producer))
        except Exception as exc:
            session.check_error = f"{type(exc).__name__}: {exc}"
            return
        session.check_error = None
        if session is not self._current or self._closing:
            return
        if session.broken is not None:
            self._replace(loop)  # normally done by _poll already; never leave it in place
        elif repaired and session.records:
            session.broken = "the broker had lost its topics, and with them its producer ids"
            self._replace(loop)
        elif session.stalled:
            # Records time out although the broker answers. Twice in a row (a check
            # interval apart, no acknowledgement in between): the session is wedged, e.g.
            # retrying a producer id the broker no longer knows, and not just slow.
            session.stalled_checks += 1
            if session.stalled_checks >= 2:
                session.broken = "its records time out although the broker answers"
                self._replace(loop)
        else:
            session.working = True

    def status(self) -> ProducerStatus:
        """Whether the current session is known to work, from what was seen so far."""
        session = self._current
        problem: str | None = None
        if self._closing:
            problem = "the mutator is shutting down"
        elif session.broken is not None:
            problem = f"the Kafka producer session ended: {session.broken}"
        elif session.check_error is not None:
            problem = f"Kafka check failed: {session.check_error}"
        elif session.stalled:
            problem = "records time out; checking the broker"
        elif not session.working:
            problem = "a new Kafka producer has not been confirmed yet" + (
                f" ({self._last_replacement})" if self._last_replacement else ""
            )
        return ProducerStatus(problem is None, session.number, problem)

    async def readiness(self, timeout: float) -> ProducerStatus:
        """Check the broker through the current session (at most ``timeout`` s), then report."""
        if not self._closing:
            try:
                await asyncio.wait_for(self.check(), timeout)
            except TimeoutError:
                status = self.status()
                return ProducerStatus(
                    False,
                    status.session,
                    status.problem or f"the Kafka check did not finish within {timeout:g} s",
                )
        return self.status()

    def begin_close(self, timeout: float) -> None:
        """Start :meth:`aclose` without waiting for it (from the loop's thread)."""
        if self._close_task is None:
            self._close_task = asyncio.get_running_loop().create_task(self._close(timeout))

    async def aclose(self, timeout: float) -> int:
        """Take no more records, flush for at most ``timeout`` s, answer the rest, destroy.

        Returns how many records were left unacknowledged. Every request still waiting is
        answered: 503 "was not written" for records librdkafka never sent, "may have been
        written" for the others.
        """
        self.begin_close(timeout)
        assert self._close_task is not None
        return await asyncio.shield(self._close_task)

    def _unreported(self) -> int:
        return self._current.in_flight + sum(s.in_flight for s in self._retiring)

    async def _close(self, timeout: float) -> int:
        self._closing = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        if self._unreported() and self._polling_loop is not loop:
            self._polling_loop = loop
            loop.call_soon(self._poll, loop)
        # The loop keeps polling meanwhile, so acknowledgements still answer their requests.
        while self._unreported() and loop.time() < deadline:
            await asyncio.sleep(0.01)
        left = self._unreported()
        if self._supervisor is not None:
            self._supervisor.cancel()
        sessions = [self._current, *self._retiring]
        self._retiring.clear()
        for session in sessions:
            if session.in_flight and session.producer is not None:
                # Reports which records never left the process (_PURGE_QUEUE: not written).
                try:
                    session.producer.purge(in_queue=True, in_flight=True, blocking=True)
                except Exception as exc:
                    log.debug("purging producer session %d failed: %s", session.number, exc)
                self._collect(session, loop)
            self._destroy(
                session,
                loop,
                f"the mutator is shutting down and Kafka did not acknowledge within {timeout:g} s",
            )
        self._closed = True
        if left:
            log.error("%d record(s) not acknowledged at shutdown", left)
        return left
