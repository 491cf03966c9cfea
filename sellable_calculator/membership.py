"""The calculator group: which partitions this instance owns, decided by Kafka.

Every instance is a member of one consumer group (``CALCULATOR_GROUP_ID``) subscribed
to ``inventory_adjustments``, with the range assignor. The group is used for membership
and assignment only: the member pauses whatever it is assigned and never reads a record
through the group (the dataflow reads both input topics with ``assign``, from the
positions its restored state reflects). Partition p of ``inventory_adjustments`` stands
for partition p of every co-partitioned topic.

The rebalance protocol is eager: every rebalance first revokes everything. The revoke
callback returns only once the dataflow has stopped and the store holds everything it
published, so the next owner of a partition restores from a changelog nobody writes
to any more. (Tansu ran librdkafka's ``cooperative-sticky`` assignor, which would move
fewer partitions, but did not complete its rebalances when measured, so: range.)

Example::

    membership = GroupMembership(settings, assignments, on_failure=stop_instance)
    membership.start()          # a thread: joins, heartbeats, calls back on rebalances
    ...
    membership.stop()           # leaves the group: the others take the partitions at once
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

from sellable_calculator.settings import CalculatorSettings
from service_runtime.retry import Backoff, RetryStopped, retrying
from shared_schemas.topics import INVENTORY_ADJUSTMENTS

log = logging.getLogger(__name__)

MEMBERSHIP_TOPIC = INVENTORY_ADJUSTMENTS.name
"""The topic whose partitions the group assigns (standing for every co-partitioned topic)."""

REJOIN_BACKOFF = Backoff(first=0.5, cap=5.0)
"""Waits before a failed member consumer is replaced by a new one."""


class Assignments:
    """Hands assignments from the membership thread to the dataflow loop, and waits for
    the dataflow to stop when they are revoked. Thread-safe."""

    def __init__(self, revoke_timeout: float = 30.0) -> None:
        self._cond = threading.Condition()
        self._pending: tuple[int, ...] | None = None
        self._generation = 0
        self._running: threading.Event | None = None
        """The stop event of the dataflow running now (None: none runs)."""
        self._closed = False
        self._lost = False
        self._revoke_timeout = revoke_timeout

    def assigned(self, partitions: tuple[int, ...]) -> None:
        """The group assigned ``partitions`` (the whole assignment): run them."""
        with self._cond:
            # A generation is a timestamp: it only has to grow from one assignment to
            # the next across the group, and the rebalances are seconds apart.
            self._generation = max(self._generation + 1, int(time.time() * 1000))
            self._pending = tuple(sorted(partitions))
            self._cond.notify_all()

    def revoked(self, lost: bool = False) -> None:
        """The group takes the assignment back (``lost``: it may have reassigned it
        already): stop the dataflow, and return once it has stopped (or after the revoke
        timeout, logged)."""
        with self._cond:
            self._pending = None
            self._lost = self._lost or lost
            running = self._running
            if running is None:
                return
            running.set()
            if not self._cond.wait_for(lambda: self._running is None, self._revoke_timeout):
                log.error(
                    "the dataflow did not stop within %g s of a revoke; the next owner may "
                    "restore a partition this instance still writes",
                    self._revoke_timeout,
                )

    def close(self) -> None:
        """No more assignments will come: :meth:`next` returns None from now on."""
        with self._cond:
            self._closed = True
            if self._running is not None:
                self._running.set()
            self._cond.notify_all()

    def next(self) -> tuple[tuple[int, ...], int, threading.Event] | None:
        """Wait for an assignment: ``(partitions, generation, stop)``, where ``stop`` is set
        when it is revoked; None once closed. Call :meth:`finished` when its dataflow ends."""
        with self._cond:
            self._cond.wait_for(lambda: self._closed or self._pending is not None)
            if self._closed or self._pending is None:
                return None
            partitions, self._pending = self._pending, None
            self._running = threading.Event()
            return partitions, self._generation, self._running

    def take_lost(self) -> bool:
        """Whether the last assignment was lost rather than revoked (and forget it)."""
        with self._cond:
            lost, self._lost = self._lost, False
            return lost

    def finished(self) -> None:
        """The dataflow of the last assignment has stopped (its sinks flushed)."""
        with self._cond:
            self._running = None
            self._cond.notify_all()


class SessionTimeoutRefused(RuntimeError):
    """The broker's group settings refuse this instance's session timeout."""


_DROPPED = frozenset({KafkaError.UNKNOWN_MEMBER_ID, KafkaError.ILLEGAL_GENERATION})
"""Commit errors that mean the group no longer counts this member."""


def _answer(questions: list[_Question], answer: bool | None) -> None:
    for question in questions:
        question.answer = answer
        question.answered.set()


@dataclass
class _Question:
    """Does the group still count this member? Asked by a sink, answered by the
    membership thread."""

    answered: threading.Event = field(default_factory=threading.Event)
    answer: bool | None = None


class GroupMembership:
    """This instance's membership of the calculator group, on a thread of its own.

    A member consumer that fails (a fatal error) is replaced by a new one, which rejoins,
    with backoff, for as long as it takes (readiness says not ready meanwhile). Anything
    else that breaks the thread calls ``on_failure``: the instance then stops and exits
    non-zero, so that a supervisor restarts it.
    """

    def __init__(
        self,
        settings: CalculatorSettings,
        assignments: Assignments,
        on_failure: Callable[[BaseException], None] = lambda exc: None,
    ) -> None:
        self._settings = settings
        self._assignments = assignments
        self._on_failure = on_failure
        self._stop = threading.Event()
        self._in_group = False
        self._questions: queue.SimpleQueue[_Question] = queue.SimpleQueue()
        self._waiting: list[_Question] = []
        """Questions not sent yet (membership thread only)."""
        self._asked: list[_Question] = []
        """Questions whose commit is on its way (membership thread only)."""
        self._asked_at = 0.0
        self._refused: KafkaError | None = None
        self._assigned: tuple[int, ...] = ()
        self._member_id = ""
        self._thread = threading.Thread(target=self._run, name="group-membership", daemon=True)

    @property
    def in_group(self) -> bool:
        """Whether this instance holds a current assignment (readiness reports it)."""
        return self._in_group and self._thread.is_alive()

    @property
    def member_id(self) -> str:
        """This instance's member id in the group, once it has joined (advertised: the
        standby placement predicts the range assignor from it)."""
        return self._member_id

    def still_member(self, stop: threading.Event, timeout: float = 5.0) -> bool | None:
        """Whether the group coordinator says this instance still holds its assignment:
        True, False, or None when no answer came (a silent broker, a rebalance under way)
        within ``timeout`` or before ``stop`` was set.

        The membership thread asks with an offset commit: it carries the member id and
        the group generation, and the coordinator refuses it from a member it has dropped
        (Kafka's own fencing of a consumer that was silent too long; Tansu answers
        UNKNOWN_MEMBER_ID). The offsets committed are never read: the group is used for
        membership only. Only the membership thread commits, asynchronously, and hears
        the answer in its poll: a synchronous commit has no timeout, and librdkafka
        answers one made on another thread only when this one polls.
        """
        question = _Question()
        self._questions.put(question)
        deadline = time.monotonic() + timeout
        while not question.answered.wait(0.05):
            if stop.is_set() or time.monotonic() > deadline:
                return None
        return question.answer

    def _ask_the_group(self, consumer: Consumer) -> None:
        """Send one commit for every question waiting, unless one is on its way."""
        if self._asked and time.monotonic() - self._asked_at > 10:
            _answer(self._asked, None)  # never wait for ever on an answer that got lost
            self._asked = []
        while True:
            try:
                self._waiting.append(self._questions.get_nowait())
            except queue.Empty:
                break
        if not self._waiting or self._asked:
            return
        questions, self._waiting = self._waiting, []
        if not self._in_group:
            _answer(questions, None)  # between a revoke and the next assignment
            return
        if not self._assigned:
            _answer(questions, True)
            return
        self._asked = questions
        self._asked_at = time.monotonic()
        try:
            consumer.commit(
                offsets=[TopicPartition(MEMBERSHIP_TOPIC, p, 0) for p in self._assigned],
                asynchronous=True,
            )
        except KafkaException as exc:
            self._on_commit(exc.args[0], [])

    def _on_error(self, error: KafkaError) -> None:
        """librdkafka's client-level errors: one of them is a configuration the broker
        refuses for good (Apache Kafka's default group.min.session.timeout.ms is 6 s)."""
        if error.code() == KafkaError.INVALID_SESSION_TIMEOUT:
            self._refused = error

    def _on_commit(self, error: KafkaError | None, _partitions: object) -> None:
        """librdkafka's answer to the commit (in the membership thread's poll)."""
        if error is None:
            answer: bool | None = True
        elif error.code() in _DROPPED:
            log.warning("the group refused this member's commit: %s", error)
            answer = False
        else:
            answer = None  # no verdict (a rebalance under way, a timeout): ask again
        _answer(self._asked, answer)
        self._asked = []

    def start(self) -> None:
        """Join the group."""
        self._thread.start()

    def stop(self, timeout: float = 40.0) -> None:
        """Leave the group (after the revoke stopped the dataflow) and end the thread;
        nothing to do if it never started (the instance failed before joining)."""
        self._stop.set()
        if self._thread.ident is not None:
            self._thread.join(timeout)

    def _consumer(self) -> Consumer:
        session_ms = int(self._settings.calculator_session_timeout_seconds * 1000)
        return Consumer(
            {
                "bootstrap.servers": self._settings.kafka_bootstrap_servers,
                "group.id": self._settings.calculator_group_id,
                "client.id": self._settings.instance_id,
                "partition.assignment.strategy": "range",
                "session.timeout.ms": session_ms,
                "heartbeat.interval.ms": max(100, session_ms // 6),
                # Also the rebalance timeout: how long a rebalance waits for members to
                # rejoin, i.e. for their revoke (dataflow stop) to finish.
                "max.poll.interval.ms": max(6000, 2 * session_ms),
                "enable.auto.commit": False,
                "auto.offset.reset": "latest",
                "on_commit": self._on_commit,
                "error_cb": self._on_error,
            }
        )

    def _run(self) -> None:
        try:
            retrying(
                "membership of the calculator group",
                REJOIN_BACKOFF,
                retry_on=KafkaException,
                stop=self._stop,
                fresh_after=60.0,
                logger=log,
            )(self._member)
        except RetryStopped:
            pass
        except BaseException as exc:  # the instance must not run without a group
            log.error("cannot stay in the calculator group: %s", exc, exc_info=exc)
            self._assignments.close()
            self._on_failure(exc)
        finally:
            self._in_group = False
            self._assignments.close()

    def _member(self) -> None:
        """Be a member until stopped; raises KafkaException on a fatal error."""
        consumer = self._consumer()

        def on_assign(member: Consumer, partitions: list[TopicPartition]) -> None:
            if partitions:
                member.pause(partitions)  # membership only: never read through the group
            owned = tuple(sorted(tp.partition for tp in partitions))
            log.info(
                "the group assigned partitions %s to %s", list(owned), self._settings.instance_id
            )
            self._assigned = owned
            self._member_id = member.memberid() or ""
            self._in_group = True
            self._assignments.assigned(owned)

        def on_revoke(member: Consumer, partitions: list[TopicPartition]) -> None:
            self._in_group = False
            log.info(
                "the group revoked partitions %s: stopping the dataflow",
                sorted(tp.partition for tp in partitions),
            )
            self._assignments.revoked()

        def on_lost(member: Consumer, partitions: list[TopicPartition]) -> None:
            self._in_group = False
            log.warning(
                "lost partitions %s (this instance was silent longer than the session "
                "timeout): stopping the dataflow",
                sorted(tp.partition for tp in partitions),
            )
            self._assignments.revoked(lost=True)

        consumer.subscribe(
            [MEMBERSHIP_TOPIC], on_assign=on_assign, on_revoke=on_revoke, on_lost=on_lost
        )
        try:
            while not self._stop.is_set():
                if self._refused is not None:
                    raise SessionTimeoutRefused(
                        f"the broker refuses CALCULATOR_SESSION_TIMEOUT_SECONDS="
                        f"{self._settings.calculator_session_timeout_seconds:g} "
                        f"({self._refused.str()}): set it within the broker's "
                        "group.min.session.timeout.ms and group.max.session.timeout.ms"
                    )
                message = consumer.poll(0.05)
                self._ask_the_group(consumer)
                error = None if message is None else message.error()
                if error is not None:
                    if error.fatal():
                        raise KafkaException(error)
                    log.warning("calculator group: %s", error)
        finally:
            consumer.close()  # revokes (stopping the dataflow) and leaves the group
            self._in_group = False
