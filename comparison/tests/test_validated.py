"""Validated reservations in ``make compare``, without a system: how each answer enters
the model of acknowledged writes (only CONFIRMED ones count, a 202 once decided), and the
report's section."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from comparison.__main__ import main
from comparison.report import summarize, terminal_table, write_results
from comparison.validated import ValidatedReservations, outcome
from comparison.workload import Endpoints, Key, Measurements, Options, Workload

KEY = ("STL", "123123")


def _body(status: str, mutation_id: str = "m-1") -> dict[str, Any]:
    return {"status": status, "mutationId": mutation_id}


@pytest.mark.parametrize(
    ("status", "body", "said"),
    [
        (200, _body("CONFIRMED"), "confirmed"),
        (409, {**_body("FAILED"), "error": "insufficient_stock", "available": 0}, "failed"),
        (202, _body("PENDING"), "pending"),
        # The HTTP status and the body must say the same.
        (200, _body("FAILED"), "error"),
        (409, {"error": "idempotency_key_reused"}, "error"),  # refused, not decided
        (202, {"status": "PENDING"}, "error"),  # no id to ask later with
        (503, {"error": "broker_unavailable"}, "error"),
        (None, None, "error"),  # no answer (a time-out, a refused connection)
        (200, None, "error"),  # not JSON
    ],
)
def test_an_answer_is_confirmed_failed_pending_or_an_error(
    status: int | None, body: Any, said: str
) -> None:
    assert outcome(status, body) == said


def test_only_confirmed_reservations_reserve_units_and_a_202_once_decided() -> None:
    tally = ValidatedReservations()
    expected = 100

    def answer(status: int | None, body: Any, count: int) -> str:
        nonlocal expected
        said, units = tally.answered(status, body, KEY, count)
        expected -= units
        return said

    assert answer(200, _body("CONFIRMED", "a"), 3) == "confirmed"
    assert answer(409, _body("FAILED", "b"), 500) == "failed"
    assert answer(202, _body("PENDING", "c"), 4) == "pending"
    assert answer(202, _body("PENDING", "d"), 5) == "pending"
    assert answer(202, _body("PENDING", "e"), 6) == "pending"
    assert answer(None, None, 7) == "error"
    assert expected == 97  # only "a" so far
    assert set(tally.waiting) == {"c", "d", "e"}

    assert tally.decided("c", "PENDING") is None  # not yet
    assert tally.decided("unknown", "CONFIRMED") is None
    decided = tally.decided("c", "CONFIRMED")
    assert decided == (KEY, 4)
    expected -= decided[1]
    assert tally.decided("c", "CONFIRMED") is None  # counted once
    assert tally.decided("d", "FAILED") == (KEY, 0)
    tally.give_up()  # "e" never decided: left out of the model, and said so
    assert expected == 93
    assert tally.summary() == {
        "sent": 6,
        "answers": {"confirmed": 1, "failed": 1, "pending": 3, "error": 1},
        "decided_later": {"confirmed": 1, "failed": 1},
        "undecided": 1,
    }


class _Response:
    def __init__(self, status: int, body: Any) -> None:
        self.status = status
        self._body = body

    async def __aenter__(self) -> _Response:
        return self

    async def __aexit__(self, *_: object) -> None:
        return None

    async def json(self) -> Any:
        return self._body


class _Mutator:
    """Answers GET /inventory/reservations/{id}: PENDING the first ``pending_for`` times
    it is asked about an id, then the decision given."""

    def __init__(self, decisions: dict[str, str], pending_for: int = 2) -> None:
        self.decisions = decisions
        self.asked: dict[str, int] = {}
        self.pending_for = pending_for

    def get(self, url: str) -> _Response:
        mutation_id = url.rsplit("/", 1)[1]
        self.asked[mutation_id] = self.asked.get(mutation_id, 0) + 1
        if mutation_id not in self.decisions:
            return _Response(404, {"error": "reservation_not_found"})
        if self.asked[mutation_id] <= self.pending_for:
            return _Response(200, _body("PENDING", mutation_id))
        return _Response(200, _body(self.decisions[mutation_id], mutation_id))


def _workload() -> Workload:
    endpoints = Endpoints("http://mutator", "http://service", ["http://c1", "http://c2"])
    return Workload(endpoints, Options(validated_share=0.5))


def test_the_workload_counts_a_validated_reservation_by_its_decision() -> None:
    workload = _workload()
    hot, cold = Key("STL", "1", 0), Key("STL", "2", 1)
    workload.expected = {("STL", "1"): 1_000, ("STL", "2"): 1_000}

    def post(key: Key, status: int | None, body: Any, count: int = 1) -> float | None:
        raw = json.dumps(body).encode() if body is not None else b""
        return workload._validated_answer(key, count, status, raw, 12.5)

    assert post(hot, 200, _body("CONFIRMED", "a"), 2) is not None
    assert post(hot, 409, _body("FAILED", "b"), 5_000) is not None
    assert post(cold, 202, _body("PENDING", "c"), 3) is not None
    assert post(cold, 202, _body("PENDING", "d"), 4) is not None
    assert post(hot, 503, {"error": "broker_unavailable"}) is None
    assert workload.expected == {("STL", "1"): 998, ("STL", "2"): 1_000}
    m = workload.measurements
    assert (m.writes, m.write_errors) == (4, 1)  # 200, 409 and 202 were written
    assert m.reservation_latency_ms == {"unvalidated": [], "validated": [12.5] * 4}

    mutator = _Mutator({"c": "CONFIRMED", "d": "FAILED"})
    workload._session = mutator  # type: ignore[assignment]
    asyncio.run(workload._settle_validated(seconds=10))
    assert workload.expected == {("STL", "1"): 998, ("STL", "2"): 997}
    assert m.validated.waiting == {} and m.validated.undecided == 0
    assert mutator.asked == {"c": 3, "d": 3}


def test_a_202_never_decided_stays_out_of_the_model_and_is_reported() -> None:
    workload = _workload()
    workload.expected = {("STL", "1"): 10}
    raw = json.dumps(_body("PENDING", "z")).encode()
    workload._validated_answer(Key("STL", "1", 0), 1, 202, raw, 5_000.0)
    workload._session = _Mutator({}, pending_for=0)  # type: ignore[assignment]
    asyncio.run(workload._settle_validated(seconds=0.3))  # 404 for z: never decided
    assert workload.expected == {("STL", "1"): 10}
    assert workload.measurements.validated.undecided == 1


@pytest.mark.filterwarnings("ignore:No artists with labels")  # no reads: empty charts
def test_the_report_has_a_validated_reservations_section(tmp_path: Path) -> None:
    m = Measurements(Options(validated_share=0.3, failover=False))
    m.reservation_latency_ms["unvalidated"].extend([8.0, 10.0, 12.0])
    m.reservation_latency_ms["validated"].extend([20.0, 30.0, 40.0, 5_000.0])
    tally = m.validated
    tally.answered(200, _body("CONFIRMED", "a"), KEY, 1)
    tally.answered(200, _body("CONFIRMED", "b"), KEY, 1)
    tally.answered(409, _body("FAILED", "c"), KEY, 1)
    tally.answered(202, _body("PENDING", "d"), KEY, 1)
    tally.answered(None, None, KEY, 1)
    tally.decided("d", "CONFIRMED")

    summary = summarize(m)
    validated = summary["validated_reservations"]
    assert validated["share"] == 0.3
    assert validated["sent"] == 5
    assert validated["answers"] == {"confirmed": 2, "failed": 1, "pending": 1, "error": 1}
    assert validated["decided_later"] == {"confirmed": 1, "failed": 0}
    assert validated["latency_ms"]["unvalidated"]["p50"] == 10.0
    assert validated["latency_ms"]["validated"]["count"] == 4
    assert validated["p50_ratio"] == pytest.approx(validated["latency_ms"]["validated"]["p50"] / 10)
    assert validated["in_failover_phase"] is False

    text = terminal_table(summary)
    assert "validated reservations: 5 sent (share 0.3): 2 confirmed, 1 failed (409)" in text
    assert "1 pending (202; decided later: 1 confirmed, 0 failed, 0 never), 1 errors" in text
    assert "p50 ratio" in text

    files = write_results(summary, m, tmp_path)
    page = files["report.html"].read_text()
    assert "<h2>Validated reservations</h2>" in page
    assert "2 confirmed (200), 1 failed (409, not counted), 1 pending (202" in page
    assert "decided afterwards: 1 confirmed, 0 failed, 0 never" in page
    assert "reservation POST ?validate=true" in page
    assert "The failover phase writes adjustments only" in page
    assert page.count('src="data:image/png;base64,') == 3  # no chart of its own
    raw = json.loads(files["report.json"].read_text())
    assert raw["summary"]["validated_reservations"] == json.loads(json.dumps(validated))
    assert raw["raw"]["reservation_latency_ms"]["validated"] == [20.0, 30.0, 40.0, 5_000.0]


def test_without_validated_reservations_the_section_says_so() -> None:
    summary = summarize(Measurements(Options()))
    assert summary["validated_reservations"]["sent"] == 0
    assert summary["validated_reservations"]["p50_ratio"] is None
    assert "validated reservations: none (--validated-share 0)" in terminal_table(summary)


@pytest.mark.parametrize("share", ["-0.1", "1.5"])
def test_the_validated_share_is_between_0_and_1(share: str) -> None:
    with pytest.raises(SystemExit):
        main(["--validated-share", share])
