"""The admission committer's driver-level statements (workbench.services.quota.batch_sql).

Real SQLite (tmp_path) and real PostgreSQL (scripts/postgres-up.sh; skipped where there is none, as in
test_quota_durability). Nothing is stubbed.

- Rows the committer writes in the driver's own SQL read back through the ORM exactly as rows the ORM writes:
  same start times (aware UTC, microseconds kept), the same budget seconds once stopped, and a later start of
  the same item never before the item's last stop, also when that stop was written by the ORM.
- A batch sent again is answered "replayed" with the same rows; new admissions of open items, "running".
"""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest

from tests.quota_support import POLICY, Clock, admit_request, database_url, start, stop, t
from workbench.services.quota import admission
from workbench.services.quota.admission import Admitter
from workbench.services.quota.batch_sql import bind_time, read_time, statements
from workbench.services.quota.ledger import Ledger


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path):
    url, drop = database_url(request.param, tmp_path)
    yield url
    drop()


def test_times_are_bound_as_the_orm_stores_them_and_read_back_aware():
    at = t(2026, 12, 5, 9, 0, 0)
    assert bind_time("sqlite", at) == "2026-12-05 09:00:00.000000"  # microseconds always: text compares in order
    assert bind_time("postgresql", at) == at.replace(tzinfo=None)
    assert read_time("2026-12-05 09:00:00.000250") == t(2026, 12, 5, 9, 0, 0, 250)
    with pytest.raises(ValueError, match="SQLite and PostgreSQL, not 'mysql'"):
        statements("mysql", 1, 1, 1)
    prior, state, usage, events = statements("sqlite", 2, 3, 2)  # IN lists and VALUES rows for the batch's size
    assert prior.endswith("IN (?, ?)") and state.count("?") == 3 and usage.count("?") == 22 and events.count("?") == 10
    prior, state, usage, events = statements("postgresql")  # one array per column: the same text for every size
    assert prior.endswith("ANY(%s::varchar[])") and usage.count("%s") == 11 and events.count("%s") == 4


def test_committed_rows_read_back_like_rows_the_orm_writes(db_url):
    clock = Clock(t(2026, 11, 10, 8, 0, 0, 123456))
    ledger = Ledger(db_url, POLICY, clock=clock)
    admitter = Admitter(ledger)

    async def admit(item, **res):
        return await admitter.admit("researcher", "physics-lab", admit_request(item, **res))

    try:
        # the ORM writes item x's row, stopped one hour later than the clock will say at its next admission
        ledger.record(start("x", time=t(2026, 11, 10, 6, 0)))
        late_stop = t(2026, 11, 10, 8, 30, 0, 500)
        ledger.record(stop("x", time=late_stop))
        d1 = asyncio.run(admit("a", gpu_type="h100", gpu_count=2))
        d2 = asyncio.run(admit("x"))
        assert d1.allowed and d2.allowed
        rows = {r.item: r for r in ledger.open_rows()}
        assert rows["a"].id == d1.row and rows["a"].start == clock.now and rows["a"].gpu_count == 2
        assert rows["x"].start == late_stop  # not before the ORM-written stop (read back from the driver's MAX)
        assert admitter.state.open["x"].start == late_stop.timestamp()  # and the state follows the committed start
        # stopped by the ORM two hours after its start: 2 h x 2 GPUs in the period's budget
        clock.now += timedelta(hours=2)
        ledger.record(stop("a"))
        used = {(b.scope, b.resource): b.used_hours for b in ledger.budgets("physics-lab", "researcher")}
        assert used[("group", "gpu")] == pytest.approx(4.0, abs=1e-6)
        # a fresh admitter loads the driver-written open row as the ORM reads it
        again = Admitter(ledger)
        try:
            asyncio.run(again.admit("researcher", "physics-lab", admit_request("b")))
            assert again.state.open["x"].row == d2.row and again.state.open["x"].start == late_stop.timestamp()
        finally:
            again.close()
    finally:
        admitter.close()
        ledger.close()


def test_a_batch_sent_again_is_replayed_and_open_items_are_running(db_url):
    clock = Clock(t(2026, 11, 10, 8, 0))
    ledger = Ledger(db_url, POLICY, clock=clock)

    def pendings(ids):
        loop = asyncio.new_event_loop()
        try:
            out = []
            for i, event_id in enumerate(ids):
                req = admit_request(f"dask-worker:r/{i}")
                res = admission.resolve_resources(POLICY, req)
                o = admission._Open(req.item, req.kind, "researcher", "physics-lab", res.cpu, 0, clock.now.timestamp())
                out.append(
                    admission._Pending(
                        event_id, "researcher", "physics-lab", req, res, clock.now, o, loop.create_future()
                    )
                )
            return out
        finally:
            loop.close()

    try:
        first = admission._commit_batch(ledger, pendings(["e0", "e1", "e2"]))
        assert [k for k, _, _ in first] == ["admitted"] * 3 and first[0][2] == clock.now
        rows = [row for _, row, _ in first]
        assert len(set(rows)) == 3
        assert [(k, row) for k, row, _ in admission._commit_batch(ledger, pendings(["e0", "e1", "e2"]))] == [
            ("replayed", r) for r in rows
        ]
        assert [(k, row) for k, row, _ in admission._commit_batch(ledger, pendings(["n0", "n1", "n2"]))] == [
            ("running", r) for r in rows
        ]
        assert ledger.counts()["open"] == 3
    finally:
        ledger.close()
