"""The service's in-memory admission (workbench.services.quota.admission) on SQLite in tmp_path.

It must decide exactly as the transactional :meth:`Ledger.admit` does (a differential test drives both with
the same random operations, across a month boundary), keep caps exact under a burst of concurrent
admissions, answer "allowed" only for committed rows, and batch the commits.
"""

from __future__ import annotations

import asyncio
import random
from datetime import timedelta

import pytest

from tests.quota_support import POLICY, Clock, admit_request, running, start, stop, t
from workbench.services.quota.admission import AdmissionState, Admitter, LedgerUnavailable
from workbench.services.quota.ledger import Ledger, default_db_url


@pytest.fixture
def clock():
    return Clock(t(2026, 11, 30, 22, 0))


def make(tmp_path, clock, name="a"):
    return Ledger(default_db_url(tmp_path / name), POLICY, clock=clock)


def test_a_burst_of_200_admissions_gets_exactly_the_cap_in_few_transactions(tmp_path, clock):
    ledger = make(tmp_path, clock)
    admitter = Admitter(ledger)

    async def burst():
        reqs = [
            admitter.admit(
                f"member{i}", "physics-lab", admit_request(f"dask-worker:c/{i}", gpu_type="h100", gpu_count=1)
            )
            for i in range(200)
        ]
        return await asyncio.gather(*reqs)

    try:
        decisions = asyncio.run(burst())
        allowed = [d for d in decisions if d.allowed]
        assert len(allowed) == 5  # physics-lab: running_gpus 5
        assert {d.reason for d in decisions if not d.allowed} == {"running-gpus"}
        assert sorted(r.id for r in ledger.open_rows()) == sorted(d.row for d in allowed)
        assert admitter.batches < 5 and admitter.admitted == 5
    finally:
        admitter.close()
        ledger.close()


def test_answers_come_after_the_commit_and_a_failed_batch_admits_nothing(tmp_path, clock):
    ledger = make(tmp_path, clock)
    admitter = Admitter(ledger)

    async def run():
        d = await admitter.admit(
            "researcher", "physics-lab", admit_request("dask-worker:c/1", gpu_type="h100", gpu_count=1)
        )
        assert d.allowed and [r.id for r in ledger.open_rows()] == [d.row]  # durable when answered
        again = await admitter.admit("researcher", "physics-lab", admit_request("dask-worker:c/1"))
        assert again.allowed and again.replayed and again.row == d.row
        # the database goes away: the batch fails, its caller gets the error, the reservation is released
        with ledger.engine.begin() as c:
            c.exec_driver_sql("DROP TABLE quota_events")
        with pytest.raises(LedgerUnavailable):
            await admitter.admit(
                "researcher", "physics-lab", admit_request("dask-worker:c/2", gpu_type="h100", gpu_count=1)
            )
        assert "dask-worker:c/2" not in admitter.state.open
        assert admitter.state.groups["physics-lab"].gpus == 1

    try:
        asyncio.run(run())
    finally:
        admitter.close()
        ledger.close()


def test_decides_like_the_transactional_ledger(tmp_path, clock):
    """Random admissions, start/stop events and reconciles, with the clock crossing into December: the
    in-memory decisions equal Ledger.admit's on a twin ledger, step by step."""
    clock.now = t(2026, 11, 28)
    twin = make(tmp_path, clock, "twin")
    ledger = make(tmp_path, clock, "svc")
    admitter = Admitter(ledger)
    rng = random.Random(12)
    users = ["researcher", "alice", "bob"]
    groups = ["physics-lab", "startup-acme", "course-ml101"]
    running_items: dict[str, tuple[str, str, str]] = {}

    async def run():
        # history: heavy GPU use this month, so budgets run out during the run
        hist = []
        for i in range(8):
            begin = t(2026, 11, 1) + timedelta(days=i)
            hist += [
                start(f"dask-worker:h/{i}", user=users[i % 3], gpu_type="h100", gpu_count=4, time=begin, id=f"h{i}"),
                stop(f"dask-worker:h/{i}", time=begin + timedelta(hours=9), id=f"h{i}x"),
            ]
        twin.record_many(hist)
        await admitter.record_many(hist)
        compared = 0
        for step in range(400):
            clock.now += timedelta(minutes=rng.choice([1, 5, 30, 60]))
            op = rng.random()
            if op < 0.6:
                group = rng.choice(groups)
                user = rng.choice(users)
                n = rng.randrange(12)
                kind = rng.choice(["server", "dask-worker", "dask-scheduler"])
                item = f"server:{user}/{n}" if kind == "server" else f"{kind}:x/{n}"
                if item in running_items:
                    continue
                gpu = rng.choice([0, 0, 1, 2])
                req = admit_request(
                    item, kind=kind, cpu=rng.choice([1, 4]), gpu_type="h100" if gpu else None, gpu_count=gpu
                )
                a = twin.admit(user, group, req)
                b = await admitter.admit(user, group, req)
                assert (a.allowed, a.reason, a.message) == (b.allowed, b.reason, b.message), (step, item)
                assert [s.exhausted for s in a.budgets] == [s.exhausted for s in b.budgets]
                compared += 1
                if a.allowed:
                    running_items[item] = (user, group, kind)
            elif op < 0.85 and running_items:
                item = rng.choice(sorted(running_items))
                del running_items[item]
                ev = stop(item, id=f"stop-{step}")
                twin.record(ev)
                await admitter.record_many([ev])
            elif running_items:
                # a reconcile that no longer sees one item (the others keep running)
                gone = rng.choice(sorted(running_items))
                kinds = ["dask-worker"]
                items = [
                    running(i, user=u, group=g, kind=k, cpu=1)
                    for i, (u, g, k) in running_items.items()
                    if k == "dask-worker" and i != gone
                ]
                twin.reconcile(items, clock.now, kinds=kinds)
                await admitter.reconcile(items, clock.now, kinds, 30.0)
                if running_items[gone][2] == "dask-worker":
                    del running_items[gone]
        return compared

    try:
        assert asyncio.run(run()) > 150
        assert clock.now > t(2026, 12, 1)  # the month rolled over during the run
        assert len(ledger.open_rows()) == len(twin.open_rows())
    finally:
        admitter.close()
        ledger.close()
        twin.close()


def test_state_loaded_from_the_ledger_at_start(tmp_path, clock):
    ledger = make(tmp_path, clock)
    ledger.record_many(
        [
            start(f"dask-worker:old/{i}", user="alice", gpu_type="h100", gpu_count=1, time=t(2026, 11, 30, 20))
            for i in range(4)
        ]
        + [start("server:alice/", kind="server", user="alice", profile="cpu-small", time=t(2026, 11, 30, 20))]
    )
    admitter = Admitter(ledger)

    async def run():
        one = await admitter.admit(
            "bob", "physics-lab", admit_request("dask-worker:new/1", gpu_type="h100", gpu_count=1)
        )
        two = await admitter.admit(
            "bob", "physics-lab", admit_request("dask-worker:new/2", gpu_type="h100", gpu_count=1)
        )
        srv = await admitter.admit(
            "alice", "physics-lab", admit_request("server:alice/2", kind="server", profile="cpu-small")
        )
        return one, two, srv

    try:
        one, two, srv = asyncio.run(run())
        assert one.allowed and not two.allowed and two.reason == "running-gpus"
        assert not srv.allowed and srv.message.startswith("User alice in group physics-lab already runs 1 of at most 1")
        state = admitter.state
        assert isinstance(state, AdmissionState) and state.groups["physics-lab"].gpus == 5
    finally:
        admitter.close()
        ledger.close()
