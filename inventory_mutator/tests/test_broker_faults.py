"""The mutator as a real process while its broker is frozen, killed and restarted.

Each test starts its own embedded broker (not the session's), so it can SIGSTOP, SIGCONT
or kill it, and its own mutator process. Requests go to a key of their own each, so the
records on the topics afterwards show which ones were written: every 200 exactly once,
every 503 that says "was not written" not at all, every "may have been written" at most
once.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition
from confluent_kafka.admin import AdminClient

from local_stack.broker import EmbeddedBroker
from local_stack.process import ManagedProcess, free_port
from shared_schemas import decode_key
from shared_schemas.topics import INVENTORY_ADJUSTMENTS, INVENTORY_RESERVATIONS

PARTITIONS = 6
SKU = "1"


@dataclass
class Answer:
    """One request and what came back (client-side monotonic times)."""

    sent: float
    answered: float
    status: int
    """HTTP status, or -1 when the request got no HTTP answer at all."""
    body: Any
    location: str = ""


@dataclass
class Stack:
    """A broker of the test's own and a mutator process writing to it."""

    broker: EmbeddedBroker
    mutator: ManagedProcess
    url: str


@contextmanager
def broker_and_mutator(tmp_path: Path, **env: str) -> Iterator[Stack]:
    """A fresh embedded broker and a mutator process on it (``env``: its settings)."""
    broker = EmbeddedBroker(port=free_port(), log_dir=tmp_path)
    broker.start()
    port = free_port()
    mutator = ManagedProcess(
        "mutator",
        [sys.executable, "-m", "inventory_mutator"],
        env={
            **os.environ,
            "KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap_servers,
            "MUTATOR_PORT": str(port),
            "TOPIC_PARTITIONS": str(PARTITIONS),
            **env,
        },
        log_dir=tmp_path,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        with mutator:
            mutator.start()
            mutator.wait_ready(lambda: httpx.get(url + "/health/ready").status_code == 200, 30)
            yield Stack(broker, mutator, url)
    finally:
        # A frozen broker would ignore SIGTERM: thaw it so it stops cleanly.
        if broker.process.pid is not None:
            with suppress(ProcessLookupError):
                os.kill(broker.process.pid, signal.SIGCONT)
        broker.stop()


def _answer(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return response.text


@dataclass
class Load:
    """Threads posting adjustments (a key of its own per request) until stopped."""

    url: str
    threads: int = 4
    answers: list[Answer] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _workers: list[threading.Thread] = field(default_factory=list)

    def _run(self) -> None:
        with httpx.Client(timeout=30) as client:
            while not self._stop.is_set():
                location = f"F-{uuid.uuid4().hex[:12]}"
                sent = time.monotonic()
                try:
                    response = client.post(
                        self.url + "/inventory/adjustment",
                        json={"locationId": location, "sku": SKU, "count": 1},
                    )
                    status, body = response.status_code, _answer(response)
                except httpx.HTTPError as exc:
                    status, body = -1, repr(exc)
                self.answers.append(Answer(sent, time.monotonic(), status, body, location))
                time.sleep(0.05)

    def __enter__(self) -> Load:
        self._workers = [threading.Thread(target=self._run) for _ in range(self.threads)]
        for worker in self._workers:
            worker.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        for worker in self._workers:
            worker.join(60)


@dataclass
class Readiness:
    """A thread asking ``/health/ready`` every 0.2 s until stopped."""

    url: str
    answers: list[Answer] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _worker: threading.Thread | None = None

    def _run(self) -> None:
        with httpx.Client(timeout=10) as client:
            while not self._stop.is_set():
                sent = time.monotonic()
                try:
                    response = client.get(self.url + "/health/ready")
                    status, body = response.status_code, _answer(response)
                except httpx.HTTPError as exc:
                    status, body = -1, repr(exc)
                self.answers.append(Answer(sent, time.monotonic(), status, body))
                time.sleep(0.2)

    def __enter__(self) -> Readiness:
        self._worker = threading.Thread(target=self._run)
        self._worker.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        assert self._worker is not None
        self._worker.join(60)


def written_records(bootstrap: str) -> Counter[str]:
    """How many records each location has on the two mutation topics (all partitions)."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"faults-{uuid.uuid4().hex}",
            "enable.auto.commit": False,
            "enable.partition.eof": True,
        }
    )
    topics = (INVENTORY_ADJUSTMENTS.name, INVENTORY_RESERVATIONS.name)
    consumer.assign(
        [TopicPartition(t, p, OFFSET_BEGINNING) for t in topics for p in range(PARTITIONS)]
    )
    counts: Counter[str] = Counter()
    at_end: set[tuple[str, int]] = set()
    deadline = time.monotonic() + 30
    quiet_since = time.monotonic()
    try:
        # Until every partition reported its end and nothing came for a second (the
        # embedded broker's end offsets can lag a little behind what it holds).
        while time.monotonic() < deadline:
            message = consumer.poll(0.2)
            if message is None:
                if len(at_end) == len(topics) * PARTITIONS and time.monotonic() - quiet_since > 1:
                    break
                continue
            quiet_since = time.monotonic()
            if message.error() is not None:
                at_end.add((message.topic(), message.partition()))
                continue
            key = message.key()
            assert key is not None
            counts[decode_key(key).location] += 1
    finally:
        consumer.close()
    return counts


def assert_every_answer_is_honest(answers: list[Answer], written: Counter[str]) -> None:
    """200: written once. 503: JSON; "was not written": absent; "may have been written": ≤ 1."""
    problems = []
    for answer in answers:
        count = written[answer.location]
        if answer.status == 200:
            if count != 1:
                problems.append(f"200 for {answer.location} but {count} record(s)")
            continue
        if answer.status != 503 or not isinstance(answer.body, dict):
            problems.append(f"status {answer.status}: {answer.body!r}")
            continue
        assert answer.body["error"] in ("kafka_unavailable", "shutting_down"), answer.body
        message = answer.body["message"]
        if "was not written" in message:
            if count != 0:
                problems.append(f"'was not written' but {count} record(s): {message}")
        elif "may have been written" in message:
            if count > 1:
                problems.append(f"{count} records for one request: {message}")
        else:
            problems.append(f"503 saying neither 'may have been' nor 'was not written': {message}")
    assert not problems, "\n".join(problems[:20])


def assert_readiness_never_lied(
    posts: list[Answer], readiness: list[Answer], fault_at: float
) -> None:
    """No readiness 200 after the fault began was followed by a POST that failed.

    A readiness answer of 200 at time t says the producer works: a POST sent after t
    (until the fault ends) must not fail. Half a second of slack after the fault begins:
    a check that had just passed cannot know yet.
    """
    failed_sent = [a.sent for a in posts if a.status != 200 and a.sent > fault_at + 0.5]
    if not failed_sent:
        return
    last_failure = max(failed_sent)
    lies = [r for r in readiness if r.status == 200 and fault_at + 0.5 < r.answered < last_failure]
    assert not lies, (
        f"readiness answered 200 {len(lies)} time(s) while POSTs sent later still failed "
        f"(first at +{lies[0].answered - fault_at:.2f} s, last failed POST sent at "
        f"+{last_failure - fault_at:.2f} s): {lies[0].body}"
    )


def summary(answers: list[Answer], since: float) -> str:
    """Per second since ``since``: the statuses seen (for failure messages)."""
    seconds: dict[int, Counter[str]] = {}
    for answer in answers:
        reason = ""
        if isinstance(answer.body, dict) and answer.status != 200:
            reason = ":" + str(answer.body.get("message", answer.body))[:60]
        seconds.setdefault(int(answer.sent - since), Counter())[f"{answer.status}{reason}"] += 1
    return "\n".join(f"{s:+3d}s {dict(c)}" for s, c in sorted(seconds.items()))


def test_a_broker_frozen_until_the_producer_is_fenced_recovers_without_restart(
    tmp_path: Path,
) -> None:
    """SIGSTOP for twice the delivery timeout, then SIGCONT.

    Records time out inside librdkafka during the pause, which makes it bump its producer
    epoch; the embedded broker then answers PRODUCER_FENCED to that session for good.
    The mutator must answer 503 meanwhile, say not ready, and write again soon after the
    broker is back, with a new producer and no restart.
    """
    with broker_and_mutator(tmp_path, MUTATOR_DELIVERY_TIMEOUT_SECONDS="2") as stack:
        broker, url = stack.broker, stack.url
        session_before = httpx.get(url + "/health/ready").json().get("producerSession", 0)
        with Readiness(url) as readiness, Load(url) as load:
            time.sleep(1.5)
            assert broker.process.pid is not None
            frozen_at = time.monotonic()
            os.kill(broker.process.pid, signal.SIGSTOP)
            time.sleep(4)
            os.kill(broker.process.pid, signal.SIGCONT)
            resumed_at = time.monotonic()
            time.sleep(12)
        final = httpx.get(url + "/health/ready")
        written = written_records(broker.bootstrap_servers)

    posts = load.answers
    table = summary(posts, frozen_at)
    assert any(a.status == 503 for a in posts if frozen_at < a.sent < resumed_at), table
    # Written again without a restart: everything sent from 5 s after the broker came
    # back on was acknowledged (the old producer stayed fenced for minutes).
    late = [a for a in posts if a.sent > resumed_at + 5]
    assert len(late) > 20, table
    assert all(a.status == 200 for a in late), table
    # Not ready while it could not write, ready again after; with a new producer.
    assert any(r.status == 503 for r in readiness.answers if r.sent > frozen_at), table
    assert final.status_code == 200, final.text
    assert final.json()["producerSession"] > session_before, final.text
    assert_readiness_never_lied(posts, readiness.answers, frozen_at)
    assert_every_answer_is_honest(posts, written)


def test_b_broker_killed_and_restarted_empty_gets_its_topics_back_and_writes(
    tmp_path: Path,
) -> None:
    """kill -9 of the (in-memory) broker, a new one on the same port 3 s later.

    The new broker has no topics and knows no producer id: the mutator recreates the
    topics with the configured partition count (never letting the broker auto-create
    them with its own) and writes through a new producer.
    """
    with broker_and_mutator(tmp_path, MUTATOR_DELIVERY_TIMEOUT_SECONDS="2") as stack:
        broker, url = stack.broker, stack.url
        session_before = httpx.get(url + "/health/ready").json().get("producerSession", 0)
        with Readiness(url) as readiness, Load(url) as load:
            time.sleep(1.5)
            killed_at = time.monotonic()
            broker.process.kill()
            time.sleep(3)
            broker.start()  # the same port, empty
            restarted_at = time.monotonic()
            time.sleep(12)
        final = httpx.get(url + "/health/ready")
        metadata = AdminClient({"bootstrap.servers": broker.bootstrap_servers}).list_topics(
            timeout=10
        )
        written = written_records(broker.bootstrap_servers)

    posts = load.answers
    table = summary(posts, killed_at)
    assert any(a.status == 503 for a in posts if killed_at < a.sent < restarted_at), table
    late = [a for a in posts if a.sent > restarted_at + 6]
    assert len(late) > 20, table
    assert all(a.status == 200 for a in late), table
    for spec in (INVENTORY_ADJUSTMENTS, INVENTORY_RESERVATIONS):
        assert len(metadata.topics[spec.name].partitions) == PARTITIONS, spec.name
    assert any(r.status == 503 for r in readiness.answers if r.sent > killed_at), table
    assert final.status_code == 200, final.text
    assert final.json()["producerSession"] > session_before, final.text
    assert_readiness_never_lied(posts, readiness.answers, killed_at)
    # What the first broker held died with it: only requests sent to the new one can be
    # checked against the log.
    assert_every_answer_is_honest([a for a in posts if a.sent > restarted_at], written)


def test_c_sigterm_while_the_broker_is_frozen_answers_in_flight_requests_and_exits_soon(
    tmp_path: Path,
) -> None:
    """SIGTERM with requests waiting on a frozen broker (delivery timeout 10 s).

    The process exits 0 within a few seconds (MUTATOR_SHUTDOWN_TIMEOUT_SECONDS, 3 by
    default, plus start-up of the exit), and every request that was in flight got a
    JSON 503 saying honestly whether its event may have been written.
    """
    with broker_and_mutator(tmp_path, MUTATOR_DELIVERY_TIMEOUT_SECONDS="10") as stack:
        broker, mutator, url = stack.broker, stack.mutator, stack.url
        warm = httpx.post(
            url + "/inventory/adjustment", json={"locationId": "warm", "sku": SKU, "count": 1}
        )
        assert warm.status_code == 200
        assert broker.process.pid is not None
        os.kill(broker.process.pid, signal.SIGSTOP)
        answers: list[Answer] = []

        def post_one() -> None:
            location = f"T-{uuid.uuid4().hex[:12]}"
            sent = time.monotonic()
            try:
                response = httpx.post(
                    url + "/inventory/adjustment",
                    json={"locationId": location, "sku": SKU, "count": 1},
                    timeout=30,
                )
                status, body = response.status_code, _answer(response)
            except httpx.HTTPError as exc:
                status, body = -1, repr(exc)
            answers.append(Answer(sent, time.monotonic(), status, body, location))

        in_flight = [threading.Thread(target=post_one) for _ in range(6)]
        for thread in in_flight:
            thread.start()
        time.sleep(1.0)  # all six are waiting on the broker now
        stopping = time.monotonic()
        status = mutator.stop(grace=30)
        elapsed = time.monotonic() - stopping
        for thread in in_flight:
            thread.join(30)
        os.kill(broker.process.pid, signal.SIGCONT)
        time.sleep(1)  # let the thawed broker finish what it had received
        written = written_records(broker.bootstrap_servers)

    log = mutator.log_path.read_text()
    assert status == 0, log[-3000:]
    assert elapsed < 6, f"took {elapsed:.1f} s to stop\n{log[-3000:]}"
    assert "inventory_mutator stopped" in log
    assert len(answers) == 6
    assert all(a.answered - stopping < 6 for a in answers), answers
    assert_every_answer_is_honest(answers, written)
    assert all(a.status == 503 for a in answers), answers
