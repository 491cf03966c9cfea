"""Who owns which partition: the calculator's routing table (Kafka Streams' ``metadataForKey``).

Every instance advertises ``{id, url, partitions, restoring, generation}`` on the
compacted ``sellable_calculator_instances`` topic (key: instance id, value: JSON) each
time its assignment or the state of a partition changes, and every instance reads that
topic from the beginning, continuously, into a :class:`RoutingTable`. When two instances
claim a partition (a dead one's record stays until the group reassigns its partitions,
and a rebalance reaches the instances one by one), the claim of the newer assignment
(``generation``) wins. To find a key's owner:
``partition_for(encode_key(location, sku), partitions)``, then ``table.owner(partition)``.

Example::

    table = RoutingTable(me)
    follower = RoutingFollower(table, settings)   # background thread
    follower.start(); advertise(settings, me)
    owner = table.owner(3)                         # InstanceInfo or None
    owner.is_restoring(3)                          # still restoring its state?
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace

import confluent_kafka as kafka
from confluent_kafka import Consumer, KafkaError, KafkaException, Producer

from sellable_calculator.settings import CalculatorSettings
from shared_schemas.topics import CALCULATOR_INSTANCES

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class InstanceInfo:
    """One calculator instance as the others see it."""

    instance_id: str
    url: str
    partitions: tuple[int, ...]
    """The partitions the group assigned it (restoring ones included)."""
    partition_count: int
    """TOPIC_PARTITIONS the instance runs with; instances that disagree are ignored."""
    started_at: float
    restoring: tuple[int, ...] = ()
    """Assigned partitions whose state is still being restored: not served yet."""
    group: str = ""
    """The calculator group (``CALCULATOR_GROUP_ID``): instances of other groups sharing
    the topic are ignored."""
    generation: int = 0
    """When the instance got this assignment (epoch ms): the newer claim of a partition wins."""
    member_id: str = ""
    """Its member id in the calculator group: the order the range assignor hands out
    partitions in, from which every instance predicts where a partition goes if its
    owner dies (:func:`sellable_calculator.standby.standby_partitions`)."""
    standby: tuple[int, ...] = ()
    """Partitions it keeps warm as a standby replica (caught up with their changelog)."""
    standby_lag: tuple[tuple[int, int], ...] = ()
    """``(partition, changelog records behind)`` of each standby partition when advertised."""

    def is_restoring(self, partition: int) -> bool:
        """Whether ``partition`` is assigned here but not served yet."""
        return partition in self.restoring

    def assigned(
        self, partitions: tuple[int, ...], restoring: tuple[int, ...], generation: int
    ) -> InstanceInfo:
        """This entry with another assignment."""
        return replace(self, partitions=partitions, restoring=restoring, generation=generation)

    def to_json(self) -> bytes:
        """The value advertised on the instances topic."""
        return json.dumps(asdict(self)).encode()

    @classmethod
    def from_json(cls, data: bytes) -> InstanceInfo:
        """Parse an advertised value; raises (``ValueError``, ``KeyError``, ``TypeError``,
        ``OverflowError``, …) if it is bad."""
        raw = json.loads(data)
        return cls(
            instance_id=str(raw["instance_id"]),
            url=str(raw["url"]).rstrip("/"),
            partitions=tuple(int(p) for p in raw["partitions"]),
            partition_count=int(raw["partition_count"]),
            started_at=float(raw["started_at"]),
            restoring=tuple(int(p) for p in raw.get("restoring", ())),
            generation=int(raw.get("generation", 0)),
            group=str(raw.get("group", "")),
            member_id=str(raw.get("member_id", "")),
            standby=tuple(int(p) for p in raw.get("standby", ())),
            standby_lag=tuple((int(p), int(lag)) for p, lag in raw.get("standby_lag", ())),
        )

    @classmethod
    def of(cls, settings: CalculatorSettings) -> InstanceInfo:
        """This process's own entry, before the group assigned it anything."""
        return cls(
            settings.instance_id,
            settings.advertised_url,
            (),
            settings.topic_partitions,
            time.time(),
            group=settings.calculator_group_id,
        )


class RoutingTable:
    """Partition -> owning instance, kept current from the instances topic. Thread-safe."""

    def __init__(self, me: InstanceInfo) -> None:
        self.me = me
        """This instance's own entry (replaced by :meth:`set_me`)."""
        self._lock = threading.Lock()
        self._instances: dict[str, InstanceInfo] = {me.instance_id: me}
        self._owners: dict[int, InstanceInfo] = {}
        self.version = 0
        """Grows with every change of the table: whoever derives something from it (the
        standby placement) knows when to derive it again."""
        self._rebuild()

    def set_me(self, me: InstanceInfo) -> None:
        """This instance's entry changed (an assignment, a partition restored)."""
        with self._lock:
            self._set_me(me)

    def change_me(self, change: Callable[[InstanceInfo], InstanceInfo]) -> InstanceInfo:
        """Replace this instance's entry by ``change(entry)``, atomically (the assignment
        loop and the standby replicas both change it); the new entry."""
        with self._lock:
            self._set_me(change(self.me))
            return self.me

    def _set_me(self, me: InstanceInfo) -> None:
        self.me = me
        self._instances[me.instance_id] = me
        self._rebuild()

    def update(self, info: InstanceInfo) -> None:
        """Take an advertisement into account (the latest per instance id wins)."""
        if info.instance_id == self.me.instance_id or info.group != self.me.group:
            return  # we know ourselves better than any old record of us; other groups' own
        if info.partition_count != self.me.partition_count:
            log.error(
                "ignoring instance %s: it runs with %d partitions, this one with %d",
                info.instance_id,
                info.partition_count,
                self.me.partition_count,
            )
            return
        with self._lock:
            self._instances[info.instance_id] = info
            self._rebuild()

    def remove(self, instance_id: str) -> None:
        """Forget an instance (its record was deleted)."""
        with self._lock:
            if instance_id != self.me.instance_id:
                self._instances.pop(instance_id, None)
                self._rebuild()

    def _rebuild(self) -> None:
        # The newest assignment's claim wins; between equal generations, the most
        # recently started instance.
        owners: dict[int, InstanceInfo] = {}
        for info in sorted(self._instances.values(), key=lambda i: (i.generation, i.started_at)):
            for partition in info.partitions:
                owners[partition] = info
        self._owners = owners
        self.version += 1

    def owners(self) -> dict[int, InstanceInfo]:
        """Every owned partition's owner."""
        with self._lock:
            return dict(self._owners)

    def standby_holders(self, partition: int) -> list[InstanceInfo]:
        """Other instances that advertise ``partition`` as a warm standby, least behind
        first (as advertised); never its owner. Only instances that own partitions count:
        a dead instance's record drops out once the group has reassigned its partitions."""
        with self._lock:
            owner = self._owners.get(partition)
            members = {info.instance_id for info in self._owners.values()}
            holders = [
                info
                for info in self._instances.values()
                if partition in info.standby
                and info.instance_id in members
                and info.instance_id != self.me.instance_id
                and (owner is None or info.instance_id != owner.instance_id)
            ]
        return sorted(holders, key=lambda i: (dict(i.standby_lag).get(partition, 0), i.instance_id))

    def owner(self, partition: int) -> InstanceInfo | None:
        """The instance that serves ``partition``, if any is known."""
        with self._lock:
            return self._owners.get(partition)

    def instances(self) -> list[InstanceInfo]:
        """Every known instance, this one included, by id."""
        with self._lock:
            return sorted(self._instances.values(), key=lambda i: i.instance_id)

    def owning_instances(self) -> list[InstanceInfo]:
        """The instances that own at least one partition (no other claim is newer), by id:
        those a GET over every key must ask. A dead instance's record drops out as soon
        as the group has reassigned its partitions."""
        with self._lock:
            owning = {info.instance_id: info for info in self._owners.values()}
        return sorted(owning.values(), key=lambda i: i.instance_id)

    def owned_by(self, instance_id: str) -> list[int]:
        """The partitions ``instance_id``'s claim wins."""
        with self._lock:
            return sorted(p for p, info in self._owners.items() if info.instance_id == instance_id)


class Advertiser:
    """Advertises this instance's current entry; thread-safe.

    The assignment loop and the standby replicas both change the entry: each change is
    followed by a call, and each call publishes the entry as it is when the call holds
    the lock, so the last record on the topic is always the latest entry (two threads
    publishing snapshots they took earlier could leave an older one last). A failure is
    logged: the others route by the last record they saw, to an owner that answers 503
    for a moment, never to a wrong value.
    """

    def __init__(self, settings: CalculatorSettings, routing: RoutingTable) -> None:
        self._settings = settings
        self._routing = routing
        self._lock = threading.Lock()

    def __call__(self) -> None:
        """Publish the current entry and wait for the acknowledgement."""
        with self._lock:
            me = self._routing.me
            try:
                advertise(self._settings, me)
            except (RuntimeError, KafkaException) as exc:
                log.warning("could not advertise %s: %s", me.instance_id, exc)


def advertise(settings: CalculatorSettings, info: InstanceInfo, timeout: float = 10.0) -> None:
    """Publish ``info`` on the instances topic and wait for the acknowledgement."""
    _publish(settings, info.instance_id, info.to_json(), timeout)
    log.info(
        "advertised %s at %s owning partitions %s, standby for %s",
        info.instance_id,
        info.url,
        info.partitions,
        info.standby,
    )


def withdraw(settings: CalculatorSettings, info: InstanceInfo, timeout: float = 3.0) -> None:
    """Delete ``info``'s record (a tombstone): an instance that stops cleanly leaves the
    routing table, so nobody forwards to it or fans out to it any more."""
    _publish(settings, info.instance_id, None, timeout)
    log.info("withdrew %s from the routing table", info.instance_id)


def _publish(
    settings: CalculatorSettings, instance_id: str, value: bytes | None, timeout: float
) -> None:
    producer = Producer(
        {
            "bootstrap.servers": settings.kafka_bootstrap_servers,
            "acks": "all",
            "allow.auto.create.topics": False,  # never with the broker's partition count
        }
    )
    failures: list[str] = []
    producer.produce(
        CALCULATOR_INSTANCES.name,
        value,
        instance_id.encode(),
        on_delivery=lambda err, _msg: failures.append(str(err)) if err else None,
    )
    if producer.flush(timeout) or failures:
        raise RuntimeError(
            f"could not publish the record of {instance_id}: {failures or 'timed out'}"
        )


class RoutingFollower:
    """Reads the instances topic into a :class:`RoutingTable`, on a background thread.

    A consumer that fails (a fatal Kafka error, or anything unexpected) is logged and
    replaced by a new one that reads the topic from the beginning again (the table ends
    up the same: the latest record per instance wins). If that keeps failing, more than
    ``len(RESTART_DELAYS)`` times within ``FAILURE_WINDOW_SECONDS``, the follower gives
    up and calls ``on_failure``: a routing table nobody keeps current would route
    requests to instances that moved or died, silently. :attr:`following` says whether
    it still runs (readiness reports it).
    """

    RESTART_DELAYS: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0)
    """Pauses before each new consumer: the n-th failure within ``FAILURE_WINDOW_SECONDS``
    waits the n-th; one failure more and the follower gives up."""
    FAILURE_WINDOW_SECONDS = 60.0
    """Failures older than this no longer count towards giving up."""

    def __init__(
        self,
        table: RoutingTable,
        settings: CalculatorSettings,
        on_failure: Callable[[BaseException], None] = lambda exc: None,
        consumer_factory: Callable[[], Consumer] | None = None,
    ) -> None:
        self._table = table
        self._settings = settings
        self._on_failure = on_failure
        self._new_consumer = consumer_factory or self._consumer
        self._stop = threading.Event()
        self._failed: BaseException | None = None
        self.loaded = threading.Event()
        """Set once the whole topic, as it was when the follower started, has been read:
        before that the table may lack owners (an instance that serves too early answers
        503 ``owner_unknown`` for keys that have one)."""
        self._thread = threading.Thread(target=self._run, name="routing-follower", daemon=True)

    @property
    def following(self) -> bool:
        """Whether the table is being kept current: started, not stopped, not given up."""
        return self._thread.is_alive() and self._failed is None

    def start(self) -> None:
        """Start following."""
        self._thread.start()

    def stop(self) -> None:
        """Stop following and close the consumer (nothing to do if it never started)."""
        self._stop.set()
        if self._thread.ident is not None:
            self._thread.join(timeout=5)

    def _consumer(self) -> Consumer:
        consumer = Consumer(
            {
                "bootstrap.servers": self._settings.kafka_bootstrap_servers,
                "group.id": f"{self._settings.instance_id}-routing-unused",
                "enable.auto.commit": False,
                "enable.partition.eof": True,  # tells when the table is loaded
            }
        )
        # No consumer group: every instance must see every record.
        consumer.assign(
            [kafka.TopicPartition(CALCULATOR_INSTANCES.name, 0, kafka.OFFSET_BEGINNING)]
        )
        return consumer

    def _run(self) -> None:
        failures: list[float] = []
        while not self._stop.is_set():
            try:
                self._follow()
                return
            except Exception as exc:
                now = time.monotonic()
                failures = [t for t in failures if now - t < self.FAILURE_WINDOW_SECONDS]
                failures.append(now)
                if len(failures) > len(self.RESTART_DELAYS):
                    log.error(
                        "routing follower failed %d times within %g s; giving up: %s",
                        len(failures),
                        self.FAILURE_WINDOW_SECONDS,
                        exc,
                        exc_info=exc,
                    )
                    self._failed = exc
                    self._on_failure(exc)
                    return
                delay = self.RESTART_DELAYS[len(failures) - 1]
                log.warning(
                    "routing follower failed (%s: %s); reading the instances topic again "
                    "with a new consumer in %g s",
                    type(exc).__name__,
                    exc,
                    delay,
                    exc_info=exc,
                )
                self._stop.wait(delay)

    def _follow(self) -> None:
        """Apply the topic's records until stopped; raises whatever breaks the consumer."""
        consumer = self._new_consumer()
        try:
            while not self._stop.is_set():
                message = consumer.poll(0.2)
                if message is None:
                    continue
                error = message.error()
                if error is not None:
                    if error.fatal():
                        raise KafkaException(error)
                    if error.code() == KafkaError._PARTITION_EOF:
                        self.loaded.set()
                    else:
                        log.warning("routing follower: %s", error)
                    continue
                key = (message.key() or b"").decode(errors="replace")
                value = message.value()
                if value is None:
                    self._table.remove(key)
                    continue
                try:
                    info = InstanceInfo.from_json(value)
                except Exception as exc:  # any bad record, e.g. a number too large for int
                    log.warning("ignoring bad routing record for %r: %s", key, exc)
                    continue
                self._table.update(info)
        finally:
            consumer.close()
