"""Standby replicas: partitions this instance does not own, kept warm from their changelog.

As in Kafka Streams, each partition is also followed by ``CALCULATOR_STANDBY_REPLICAS``
other instances (default 1; none while an instance is alone). A standby applies the
partition's changelog records (:mod:`sellable_calculator.changelog`) to its local store,
continuously, so that:

* when the owner dies and the group gives the partition to the standby, its restore
  reads only the tail of the changelog the standby had not applied yet;
* while the owner is unavailable, a GET for one of its keys is answered from the
  standby, marked as such (``X-Replica: standby``, how far behind it is): a value
  that was true a moment ago, honestly labelled, instead of a 503.

Where a standby goes: the group hands partitions out with the range assignor, which
sorts the members by member id and gives each a contiguous range. Every instance
advertises its member id (:class:`~sellable_calculator.routing.InstanceInfo`), so every
instance can compute where a partition goes if its owner dies: the range assignment of
the members without the owner. That instance is the partition's standby
(:func:`standby_partitions`); with two replicas, the second is where it would go if the
first died too, and so on. If the prediction is wrong (two instances die at once, a
member id not advertised yet), the new owner restores more: slower, never wrong.

Example::

    standby = StandbyReplicas(settings, store, routing, advertiser, metrics)
    standby.start()                    # a thread: follows what the routing table implies
    standby.exclude(assigned)          # before restoring an assignment: hands them over
    view = standby.view(3)             # StandbyView(lag=2) while partition 3 is warm
    standby.stop()
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, replace

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition

from sellable_calculator.changelog import (
    INPUT_TOPICS,
    ChangelogError,
    ChangelogReader,
    PartitionState,
)
from sellable_calculator.metrics import CalculatorMetrics
from sellable_calculator.routing import InstanceInfo, RoutingTable
from sellable_calculator.settings import CalculatorSettings
from sellable_calculator.store import SellableStore
from service_runtime.retry import Backoff, RetryStopped, retrying

log = logging.getLogger(__name__)

RECONNECT_BACKOFF = Backoff(first=0.5, cap=5.0)
"""Waits before a failed changelog consumer is replaced by a new one."""

LAG_ADVERTISE_SECONDS = 5.0
"""How often changed lags are advertised at most (the set of warm partitions is
advertised as soon as it changes)."""


def range_owner(partition: int, members: int, partitions: int) -> int:
    """The index (in member-id order) of the member the range assignor gives
    ``partition`` when ``members`` members share ``partitions`` partitions: each member
    gets a contiguous range, the first ``partitions % members`` one partition more."""
    per, extra = divmod(partitions, members)
    boundary = extra * (per + 1)
    if partition < boundary:
        return partition // (per + 1)
    return extra + (partition - boundary) // per


def _member_order(info: InstanceInfo) -> str:
    # librdkafka's range assignor sorts members by member id; one not advertised yet is
    # placed by its instance id (member ids start with the client id, the instance id).
    return info.member_id or info.instance_id


def standby_partitions(
    owners: Mapping[int, InstanceInfo],
    me: InstanceInfo,
    replicas: int,
    partitions: int,
) -> frozenset[int]:
    """The partitions ``me`` keeps as a standby, given each partition's owner.

    The members are the owners and ``me``. Partition p's first standby is the member the
    range assignor would give p if its owner left; its second, the one it would get if
    that one left too; up to ``replicas`` (fewer when there are fewer other members). An
    instance is never the standby of a partition it owns.
    """
    members = {info.instance_id: info for info in owners.values()}
    members[me.instance_id] = me
    ordered = sorted(members.values(), key=_member_order)
    result: set[int] = set()
    for partition, owner in owners.items():
        gone = {owner.instance_id}
        for _ in range(replicas):
            remaining = [m for m in ordered if m.instance_id not in gone]
            if not remaining:
                break
            target = remaining[range_owner(partition, len(remaining), partitions)]
            if target.instance_id == me.instance_id:
                result.add(partition)
                break
            gone.add(target.instance_id)
    return frozenset(result)


@dataclass(frozen=True, slots=True)
class StandbyView:
    """What a standby can say about a partition it answers for."""

    lag: int
    """Changelog records of the partition not applied here, as of the last end offset
    this instance saw."""


@dataclass
class _Followed:
    """One partition followed as a standby."""

    reader: ChangelogReader
    next_offset: int
    """Next changelog offset to apply."""
    end: int = 0
    """The last end offset of the partition's changelog seen."""
    warm: bool = False
    """Whether it has caught up with the changelog once: only then does it answer."""

    @property
    def lag(self) -> int:
        return max(0, self.end - self.next_offset)


class StandbyReplicas:
    """Follows the changelog of the partitions this instance keeps as a standby, on a
    thread of its own, into the local store.

    Which partitions: :func:`standby_partitions` of the routing table, minus those the
    group assigned to this instance (:meth:`exclude`). A changelog consumer that fails is
    replaced, with backoff, for as long as it takes (standby answers stop meanwhile);
    anything else that breaks the thread calls ``on_failure``.
    """

    def __init__(
        self,
        settings: CalculatorSettings,
        store: SellableStore,
        routing: RoutingTable,
        advertise: Callable[[], None],
        metrics: CalculatorMetrics,
        on_failure: Callable[[BaseException], None] = lambda exc: None,
    ) -> None:
        self._settings = settings
        self._store = store
        self._routing = routing
        self._advertise = advertise
        self._metrics = metrics
        self._on_failure = on_failure
        self._topic = settings.changelog_topic
        self._lock = threading.Lock()
        """Held while records are applied and while partitions are handed over."""
        self._followed: dict[int, _Followed] = {}
        self._excluded: frozenset[int] = frozenset()
        self._released: frozenset[int] = frozenset()
        """Partitions the last assignment took away from this instance, whose store was
        current when their dataflow stopped: followed as warm at once."""
        self._handed_over: dict[int, int] = {}
        """Warm partitions handed over to this instance's own assignment, with their lag
        then: answered as a standby until they are active here."""
        self._seen_version = -1
        self._placed: frozenset[int] = frozenset()
        self._advertised: tuple[frozenset[int], dict[int, int]] = (frozenset(), {})
        self._advertised_at = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="standby-replicas", daemon=True)

    def start(self) -> None:
        """Start following (nothing to follow while the replicas are 0)."""
        if self._settings.calculator_standby_replicas > 0:
            self._thread.start()

    def stop(self) -> None:
        """Stop following and close the consumer."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)

    def exclude(self, partitions: Collection[int]) -> None:
        """The group assigned ``partitions`` to this instance: stop following them (and
        any other partition excluded before). Returns once nothing writes them any more,
        so that their restore starts from what the store holds. Warm ones still answer
        as a standby until :meth:`activated`."""
        with self._lock:
            released = self._excluded - frozenset(partitions)
            self._excluded = frozenset(partitions)
            self._handed_over = {
                p: f.lag for p, f in self._followed.items() if p in self._excluded and f.warm
            }
            for partition in self._excluded:
                self._followed.pop(partition, None)
            # They ran here until now and their dataflow has stopped: the store holds
            # everything this instance published, so they are warm at once, while their
            # new owner takes them over. (A partition whose local state was deleted,
            # given up while silent, has no changelog position: not warm.)
            self._released = frozenset(p for p in released if self._store.changelog_position(p) > 0)
            self._seen_version = -1  # place again
        # Not advertised from here: the assignment loop advertises its entry next.
        self._routing.change_me(
            lambda me: replace(me, standby=tuple(p for p in me.standby if p not in partitions))
        )

    def activated(self) -> None:
        """The excluded partitions are served as active now."""
        self._handed_over = {}

    def view(self, partition: int) -> StandbyView | None:
        """How this instance can answer for ``partition`` as a standby; None if it cannot
        (not followed, or not caught up yet). Called on the event loop: no lock (a dict
        lookup is atomic)."""
        followed = self._followed.get(partition)
        if followed is not None and followed.warm:
            return StandbyView(followed.lag)
        lag = self._handed_over.get(partition)
        return None if lag is None else StandbyView(lag)

    def lags(self) -> dict[int, int]:
        """Lag of every warm standby partition."""
        return {p: f.lag for p, f in list(self._followed.items()) if f.warm}

    def partitions(self) -> tuple[list[int], list[int]]:
        """(followed partitions, the warm ones among them)."""
        followed = dict(self._followed)
        return sorted(followed), sorted(p for p, f in followed.items() if f.warm)

    def _run(self) -> None:
        try:
            retrying(
                "standby replicas",
                RECONNECT_BACKOFF,
                retry_on=KafkaException,
                stop=self._stop,
                fresh_after=60.0,
                logger=log,
            )(self._follow)
        except RetryStopped:
            pass
        except BaseException as exc:
            log.error("standby replicas failed: %s", exc, exc_info=exc)
            self._on_failure(exc)
        finally:
            with self._lock:
                self._followed = {}

    def _consumer(self) -> Consumer:
        return Consumer(
            {
                "bootstrap.servers": self._settings.kafka_bootstrap_servers,
                "group.id": f"{self._settings.instance_id}-standby-unused",
                "enable.auto.commit": False,
                "enable.partition.eof": True,
                "auto.offset.reset": "earliest",
                "fetch.wait.max.ms": 100,
            }
        )

    def _follow(self) -> None:
        """Follow until stopped; raises KafkaException on a fatal error."""
        consumer = self._consumer()
        assigned: frozenset[int] | None = None
        try:
            while not self._stop.is_set():
                wanted = self._wanted()
                if wanted != assigned:
                    self._reassign(consumer, wanted)
                    assigned = wanted
                if not assigned:
                    self._update_me()
                    self._stop.wait(0.2)
                    continue
                # Wait for the first record only: consume(n, timeout) waits out its whole
                # timeout unless n records come, which kept standbys up to 0.1 s behind.
                messages = consumer.consume(1, 0.1)
                if messages:
                    messages += consumer.consume(1999, 0)
                with self._lock:
                    self._apply(consumer, messages)
                self._update_me()
        finally:
            consumer.close()

    def _wanted(self) -> frozenset[int]:
        """The partitions to follow now."""
        version = self._routing.version
        if version != self._seen_version:
            self._seen_version = version
            owners = self._routing.owners()
            placed = standby_partitions(
                owners,
                self._routing.me,
                self._settings.calculator_standby_replicas,
                self._settings.topic_partitions,
            )
            # A partition nobody claims right now (its dead owner came back and advertised
            # an empty assignment, or the group is between assignments) keeps the standby
            # it has: that is when its answers matter most.
            unclaimed = {p for p in self._followed.keys() | self._released if p not in owners}
            self._placed = placed | unclaimed
        return self._placed - self._excluded

    def _reassign(self, consumer: Consumer, wanted: frozenset[int]) -> None:
        with self._lock:
            wanted = wanted - self._excluded
            for partition in set(self._followed) - wanted:
                del self._followed[partition]
            for partition in wanted - set(self._followed):
                start = self._store.changelog_position(partition)
                warm = partition in self._released
                self._followed[partition] = self._new_followed(partition, start, warm)
            followed = sorted(self._followed.items())
        if followed:
            consumer.assign([TopicPartition(self._topic, p, f.next_offset) for p, f in followed])
        else:
            consumer.unassign()
        log.info("following the changelog of partitions %s as a standby", [p for p, _ in followed])

    def _new_followed(self, partition: int, start: int, warm: bool) -> _Followed:
        """Follow ``partition`` from changelog offset ``start``, where the store is."""
        positions = self._store.positions()
        applied = {
            kind: positions[(topic, partition)]
            for kind, topic in enumerate(INPUT_TOPICS)
            if (topic, partition) in positions
        }
        reader = ChangelogReader(PartitionState({}, applied), keep_states=False)
        return _Followed(reader, start, end=start, warm=warm)

    def _apply(self, consumer: Consumer, messages: Iterable[Message]) -> None:
        """Apply ``messages`` to the store, per partition in one batch (lock held)."""
        encoded: dict[int, dict[bytes, bytes]] = {}
        advanced: set[int] = set()
        applied = 0
        for message in messages:
            followed = self._followed.get(message.partition() or 0)
            if followed is None:
                continue  # no longer followed (handed over, or moved away)
            offset = message.offset() or 0
            error = message.error()
            if error is not None:
                if error.code() == KafkaError._PARTITION_EOF:
                    followed.end = max(followed.end, offset)
                    if followed.next_offset >= offset:
                        if not followed.warm:
                            log.info(
                                "standby partition %d caught up at changelog offset %d",
                                message.partition(),
                                offset,
                            )
                        followed.warm = True
                elif error.fatal():
                    raise KafkaException(error)
                else:
                    log.warning("standby: %s", error)
                continue
            if offset < followed.next_offset:
                continue  # already applied (fetched again after a reassignment)
            followed.next_offset = offset + 1
            advanced.add(message.partition() or 0)
            key, value = message.key(), message.value()
            if key is None or value is None:
                continue
            try:
                data = followed.reader.apply(key, value)
            except ChangelogError as exc:
                log.warning("standby: skipping changelog record at offset %d: %s", offset, exc)
                continue
            if data is not None:
                encoded.setdefault(message.partition() or 0, {})[key] = data
                applied += 1
        for partition, followed in self._followed.items():
            _, high = consumer.get_watermark_offsets(
                TopicPartition(self._topic, partition), cached=True
            )
            if high is not None and high >= 0:
                followed.end = max(followed.end, high)
            if partition not in advanced:
                continue
            states = encoded.get(partition, {})
            positions = {
                (INPUT_TOPICS[kind], partition): offset
                for kind, offset in followed.reader.state.applied.items()
            }
            self._store.apply_encoded(
                states, positions, {partition: followed.next_offset}, followed.reader.results
            )
            followed.reader.results = []
        self._metrics.standby_records.inc(applied)

    def _update_me(self) -> None:
        """Advertise which partitions are warm here when that changed, and their lags
        when those changed, at most every :data:`LAG_ADVERTISE_SECONDS`."""
        followed, warm = self.partitions()
        lags = self.lags()
        self._metrics.standby_partitions.labels("warm").set(len(warm))
        self._metrics.standby_partitions.labels("catching_up").set(len(followed) - len(warm))
        now = time.monotonic()
        warm_set = frozenset(warm)
        advertised_warm, advertised_lags = self._advertised
        if warm_set == advertised_warm and (
            lags == advertised_lags or now - self._advertised_at < LAG_ADVERTISE_SECONDS
        ):
            return
        self._advertised, self._advertised_at = (warm_set, lags), now
        self._routing.change_me(
            lambda me: replace(me, standby=tuple(warm), standby_lag=tuple(sorted(lags.items())))
        )
        self._advertise()
