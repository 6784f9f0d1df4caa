"""The usage ledger on SQLite (a file in tmp_path): idempotent replay, reconcile, atomic admission.

The same behaviour on PostgreSQL is checked by tests/integration/test_quota_service.py.
"""

from __future__ import annotations

import random
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError

from tests.quota_support import POLICY, Clock, admit_request, running, start, stop, t
from workbench.services.quota.accounting import month_period, usage_in_period
from workbench.services.quota.ledger import Ledger, default_db_url, normalize_db_url
from workbench.services.quota.models import UsageEvent


@pytest.fixture
def clock():
    return Clock(t(2026, 11, 30, 22, 0))


@pytest.fixture
def ledger(tmp_path, clock):
    led = Ledger(default_db_url(tmp_path), POLICY, clock=clock)
    yield led
    led.close()


def snapshot(led: Ledger):
    return sorted((r.item, r.start, r.stop, r.gpu_count, r.cpu) for r in led.rows())


# -- events ------------------------------------------------------------------------------------


def test_start_stop_events_make_one_row_with_gpu_seconds(ledger):
    a = start("dask-worker:c1/w1", gpu_type="h100", gpu_count=2, cpu=4, time=t(2026, 11, 30, 20, 0))
    b = stop("dask-worker:c1/w1", time=t(2026, 11, 30, 21, 30))
    assert [r.status for r in ledger.record_many([a, b])] == ["recorded", "recorded"]
    [row] = ledger.rows()
    assert (row.kind, row.user, row.group, row.gpu_type, row.gpu_count) == (
        "dask-worker",
        "researcher",
        "physics-lab",
        "h100",
        2,
    )
    u = usage_in_period([row], month_period(2026, 11), ledger.clock())
    assert u.gpu_seconds == 2 * 5400 and u.cpu_seconds == 4 * 5400


def test_profile_fills_resources(ledger):
    ledger.record(start("server:researcher/", kind="server", profile="h100-x1", cpu=None, memory=None))
    [row] = ledger.rows()
    assert (row.cpu, row.memory, row.gpu_type, row.gpu_count) == (8.0, 64 * 10**9, "h100", 1)
    with pytest.raises(ValueError, match="unknown profile 'nope'"):
        ledger.record(start("server:x/", kind="server", profile="nope", cpu=None, memory=None))


def test_replaying_events_changes_nothing(ledger):
    log = []
    for i in range(5):
        log.append(start(f"dask-worker:c/{i}", id=f"s{i}", time=t(2026, 11, 30, 10 + i), gpu_type="h100", gpu_count=1))
    for i in range(3):
        log.append(stop(f"dask-worker:c/{i}", id=f"e{i}", time=t(2026, 11, 30, 18 + i)))
    first = ledger.record_many(log)
    assert all(r.status == "recorded" for r in first)
    before = snapshot(ledger)
    again = ledger.record_many(log)  # the whole log once more
    assert [r.status for r in again] == ["duplicate"] * len(log)
    assert [r.row for r in again] == [r.row for r in first]
    random.Random(1).shuffle(log)
    for ev in log:  # and one by one, shuffled
        assert ledger.record(ev).status == "duplicate"
    assert snapshot(ledger) == before
    assert ledger.counts() == {"rows": 5, "open": 2, "events": 8}


def test_duplicates_inside_one_batch(ledger):
    ev = start("dask-worker:c/1", id="same")
    assert [r.status for r in ledger.record_many([ev, ev, ev])] == ["recorded", "duplicate", "duplicate"]
    assert len(ledger.rows()) == 1


def test_second_start_of_a_running_item_and_stop_of_an_unknown_one(ledger):
    assert ledger.record(start("dask-worker:c/1")).status == "recorded"
    assert ledger.record(start("dask-worker:c/1")).status == "already-open"
    assert ledger.record(stop("dask-worker:c/zzz")).status == "not-open"
    assert len(ledger.rows()) == 1


def test_the_unique_constraints_hold_in_the_database(ledger):
    ledger.record(start("dask-worker:c/1", id="ev-1"))
    with ledger.engine.begin() as c:
        with pytest.raises(IntegrityError):  # a second open row for the same item
            c.execute(
                text(
                    "INSERT INTO quota_usage (item, kind, username, group_name, cpu, memory, gpu_count, start, "
                    "start_event, opened_by) VALUES ('dask-worker:c/1', 'dask-worker', 'u', 'g', 1, 0, 0, "
                    "'2026-11-30 00:00:00', 'other', 'event')"
                )
            )
    with ledger.engine.begin() as c:
        with pytest.raises(IntegrityError):  # the same start event twice
            c.execute(
                text(
                    "INSERT INTO quota_usage (item, kind, username, group_name, cpu, memory, gpu_count, start, "
                    "start_event, opened_by) VALUES ('dask-worker:c/2', 'dask-worker', 'u', 'g', 1, 0, 0, "
                    "'2026-11-30 00:00:00', 'ev-1', 'event')"
                )
            )


def test_restart_never_overlaps_the_previous_row(ledger):
    ledger.record(start("dask-worker:c/1", time=t(2026, 11, 30, 10)))
    ledger.record(stop("dask-worker:c/1", time=t(2026, 11, 30, 12)))
    ledger.record(start("dask-worker:c/1", time=t(2026, 11, 30, 11)))  # a late, earlier start
    rows = ledger.rows()
    assert rows[1].start == t(2026, 11, 30, 12)


def test_stop_before_start_is_clamped(ledger):
    ledger.record(start("dask-worker:c/1", time=t(2026, 11, 30, 10)))
    ledger.record(stop("dask-worker:c/1", time=t(2026, 11, 30, 9)))
    [row] = ledger.rows()
    assert row.stop == row.start


def test_event_times_need_a_timezone():
    with pytest.raises(ValueError, match="timezone"):
        UsageEvent(id="x", type="stop", item="i", time="2026-11-30T10:00:00")
    with pytest.raises(ValueError, match="a start event needs kind, user, group"):
        UsageEvent(id="x", type="start", item="i")


# -- reconcile ---------------------------------------------------------------------------------


def test_reconcile_opens_from_the_items_start_and_closes_what_stopped(ledger, clock):
    ledger.record(start("server:gone/", kind="server", user="gone", time=t(2026, 11, 30, 8)))
    result = ledger.reconcile([running("server:researcher/", started=t(2026, 11, 30, 9))], kinds=["server"])
    assert result.opened == ["server:researcher/"] and result.closed == ["server:gone/"]
    rows = {r.item: r for r in ledger.rows()}
    assert rows["server:researcher/"].start == t(2026, 11, 30, 9)  # no gap: counted from its own start
    assert rows["server:researcher/"].cpu == 4.0  # from the cpu-large profile
    assert rows["server:gone/"].stop == t(2026, 11, 30, 8)  # never seen alive by a reconcile: its start
    before = snapshot(ledger)
    clock.now = t(2026, 11, 30, 22, 5)
    again = ledger.reconcile([running("server:researcher/", started=t(2026, 11, 30, 9))], kinds=["server"])
    assert (again.opened, again.closed) == ([], [])
    assert snapshot(ledger) == before


def test_reconcile_leaves_other_kinds_and_fresh_admissions_alone(ledger, clock):
    ledger.record(start("dask-worker:c/1"))
    assert ledger.admit(
        "student1", "course-ml101", admit_request("server:student1/", kind="server", profile="cpu-small")
    ).allowed
    clock.now = t(2026, 11, 30, 22, 0, 10)  # 10 s later, the hub's snapshot does not show it yet
    result = ledger.reconcile([], kinds=["server"], grace=30)
    assert result.closed == []
    clock.now = t(2026, 11, 30, 22, 1)
    assert ledger.reconcile([], kinds=["server"], grace=30).closed == ["server:student1/"]
    assert [r.item for r in ledger.open_rows()] == ["dask-worker:c/1"]
    with pytest.raises(ValueError, match="not one of the reconciled kinds"):
        ledger.reconcile([running("dask-worker:c/2", kind="dask-worker")], kinds=["server"])


def test_crash_recovery_no_gap_no_double_count(ledger, clock):
    """Events lost while the service was down are repaired by reconcile, without counting anything twice."""
    clock.now = t(2026, 11, 30, 10)
    ledger.record(start("server:a/", kind="server", user="a", id="a1", time=t(2026, 11, 30, 10)))
    ledger.record(start("server:b/", kind="server", user="b", id="b1", time=t(2026, 11, 30, 10)))
    clock.now = t(2026, 11, 30, 11)  # the last reconcile round before the service went down sees a and b alive
    ledger.reconcile(
        [running("server:a/", user="a", started=t(2026, 11, 30, 10)), running("server:b/", user="b")],
        kinds=["server"],
    )
    # down from 11:00 to 12:00: b stopped at 11:30 and c started at 11:15, both events lost
    clock.now = t(2026, 11, 30, 12)
    ledger.reconcile(
        [
            running("server:a/", user="a", started=t(2026, 11, 30, 10)),
            running("server:c/", user="c", started=t(2026, 11, 30, 11, 15)),
        ],
        kinds=["server"],
    )
    # the senders retry what they could not deliver: replays are no-ops, late stops close nothing twice
    assert ledger.record(start("server:a/", kind="server", user="a", id="a1")).status == "duplicate"
    assert ledger.record(stop("server:b/", id="b-stop", time=t(2026, 11, 30, 11, 30))).status == "not-open"
    rows = {r.item: r for r in ledger.rows()}
    assert len(rows) == 3 and len(ledger.rows()) == 3
    assert rows["server:a/"].stop is None and rows["server:a/"].start == t(2026, 11, 30, 10)
    # closed when last known alive (the 11:00 round), not when the service came back: no downtime charged
    assert rows["server:b/"].stop == t(2026, 11, 30, 11)
    assert rows["server:c/"].start == t(2026, 11, 30, 11, 15)


# -- admission ---------------------------------------------------------------------------------


def test_admit_records_the_start_and_replays(ledger):
    d = ledger.admit(
        "researcher", "physics-lab", admit_request("server:researcher/", kind="server", profile="h100-x1", id="adm-1")
    )
    assert d.allowed and d.row and d.message == "admitted"
    again = ledger.admit(
        "researcher", "physics-lab", admit_request("server:researcher/", kind="server", profile="h100-x1", id="adm-1")
    )
    assert again.allowed and again.replayed and again.row == d.row
    retry = ledger.admit(
        "researcher", "physics-lab", admit_request("server:researcher/", kind="server", profile="h100-x1")
    )
    assert retry.allowed and retry.row == d.row  # a retried admission of a running item adds nothing
    # the hub's start event for the admitted server then finds it open
    assert (
        ledger.record(start("server:researcher/", kind="server", profile="h100-x1", cpu=None, memory=None)).status
        == "already-open"
    )
    assert len(ledger.rows()) == 1


def test_gpu_budget_refusal_and_rollover(ledger, clock):
    # 500 GPU-hours used in November by 5 workers of 1 GPU over 100 hours
    for i in range(5):
        ledger.record(
            start(f"dask-worker:big/{i}", gpu_type="h100", gpu_count=1, cpu=0.5, user=f"u{i}", time=t(2026, 11, 20, 0))
        )
        ledger.record(stop(f"dask-worker:big/{i}", time=t(2026, 11, 24, 4)))
    clock.now = t(2026, 11, 30, 23, 59, 59)
    d = ledger.admit("researcher", "physics-lab", admit_request("server:researcher/", kind="server", profile="h100-x1"))
    assert not d.allowed and d.reason == "gpu-budget"
    assert d.message == (
        "GPU budget of group physics-lab exhausted: 500.0 of 500 GPU-hours used this month; resets 2026-12-01 00:00 UTC"
    )
    cpu_only = ledger.admit(
        "researcher", "physics-lab", admit_request("server:researcher/", kind="server", profile="cpu-large")
    )
    assert cpu_only.allowed  # the CPU budget is not used up
    ledger.record(stop("server:researcher/"))
    clock.now = t(2026, 12, 1, 0, 0)  # a new month: the GPU budget is back
    d = ledger.admit(
        "researcher", "physics-lab", admit_request("server:researcher2/", kind="server", profile="h100-x1")
    )
    assert d.allowed, d.message


def test_per_user_budget(ledger, clock):
    ledger.record(start("dask-worker:mine/1", gpu_type="h100", gpu_count=3, time=t(2026, 11, 1)))
    ledger.record(stop("dask-worker:mine/1", time=t(2026, 11, 5, 4)))  # 3 x 100 h = 300 GPU-hours
    d = ledger.admit("researcher", "physics-lab", admit_request("dask-worker:mine/2", gpu_type="h100", gpu_count=1))
    assert not d.allowed
    assert d.message.startswith("GPU budget of user researcher in group physics-lab exhausted: 300.0 of 300 GPU-hours")
    assert ledger.admit(
        "colleague", "physics-lab", admit_request("dask-worker:theirs/1", gpu_type="h100", gpu_count=1)
    ).allowed


def test_caps(ledger):
    ok = ledger.admit(
        "researcher", "physics-lab", admit_request("server:researcher/", kind="server", profile="h100-x1")
    )
    assert ok.allowed
    second = ledger.admit(
        "researcher", "physics-lab", admit_request("server:researcher/other", kind="server", profile="cpu-large")
    )
    assert (second.allowed, second.reason) == (False, "running-servers")
    assert second.message.startswith("User researcher in group physics-lab already runs 1 of at most 1 servers")
    for i in range(4):
        assert ledger.admit(
            f"u{i}", "physics-lab", admit_request(f"dask-worker:c/{i}", gpu_type="h100", gpu_count=1)
        ).allowed
    full = ledger.admit("u9", "physics-lab", admit_request("dask-worker:c/9", gpu_type="h100", gpu_count=1))
    assert (full.allowed, full.reason) == (False, "running-gpus")
    assert full.message.startswith("Group physics-lab already runs 5 of at most 5 GPUs")
    unknown = ledger.admit("x", "no-such-group", admit_request("server:x/", kind="server", profile="cpu-small"))
    assert (unknown.allowed, unknown.reason) == (False, "unknown-group")


def test_fifty_concurrent_admissions_against_a_cap_of_five(tmp_path, clock):
    # two ledgers on one file: two connection pools, as two service processes would have
    url = default_db_url(tmp_path)
    ledgers = [Ledger(url, POLICY, clock=clock, pool_size=10) for _ in range(2)]
    barrier = threading.Barrier(50)

    def one(i):
        barrier.wait()
        return ledgers[i % 2].admit(
            f"student{i}", "course-ml101", admit_request(f"server:student{i}/", kind="server", profile="cpu-small")
        )

    with ThreadPoolExecutor(50) as pool:
        decisions = list(pool.map(one, range(50)))
    assert sum(d.allowed for d in decisions) == 5
    assert {d.reason for d in decisions if not d.allowed} == {"running-servers"}
    assert len(ledgers[0].open_rows(group="course-ml101")) == 5
    for led in ledgers:
        led.close()


def test_urls():
    assert normalize_db_url("postgresql://u:p@h:5/db").startswith("postgresql+psycopg://u:p@h:5/db")
    assert normalize_db_url("sqlite:////x/q.sqlite") == "sqlite:////x/q.sqlite"
    with pytest.raises(ValueError, match="database file"):
        Ledger("sqlite://", POLICY)


def test_rows_opened_by_reconcile_close_without_grace(ledger, clock):
    ledger.reconcile([running("server:researcher/", started=t(2026, 11, 30, 21, 59, 50))], kinds=["server"])
    clock.now = t(2026, 11, 30, 22, 0, 5)  # stopped 15 s after it started: the next snapshot no longer lists it
    assert ledger.reconcile([], kinds=["server"], grace=30).closed == ["server:researcher/"]
    [row] = ledger.rows()
    # closed when the reconcile that opened it last saw it alive (22:00), not at this reconcile (22:00:05)
    assert (row.start, row.stop) == (t(2026, 11, 30, 21, 59, 50), t(2026, 11, 30, 22, 0))


def test_rows_dead_after_a_downtime_close_when_last_seen_alive(ledger, clock):
    """Issue 16: a cluster stopped just before the platform went down (its stop event lost) is charged until the
    last reconcile round that saw it running, not for the hours the platform was down."""
    clock.now = t(2026, 11, 30, 9)
    assert ledger.admit("researcher", "physics-lab", admit_request("dask-scheduler:c1", kind="dask-scheduler")).allowed
    ledger.record(start("dask-worker:c1/w", id="w-start"))
    for minute in (0, 1, 2):  # the gateway's reconcile rounds while both run
        clock.now = t(2026, 11, 30, 10, minute)
        items = [
            running("dask-scheduler:c1", kind="dask-scheduler", cpu=1),
            running("dask-worker:c1/w", kind="dask-worker", cpu=1),
        ]
        assert ledger.reconcile(items, kinds=["dask-scheduler", "dask-worker"]).closed == []
    assert {r.item for r in ledger.open_rows()} == {"dask-scheduler:c1", "dask-worker:c1/w"}
    # stopped at 10:02:30, the stop event lost in the shutdown; the platform comes back at 18:00
    clock.now = t(2026, 11, 30, 18)
    result = ledger.reconcile([], kinds=["dask-scheduler", "dask-worker"])
    assert sorted(result.closed) == ["dask-scheduler:c1", "dask-worker:c1/w"]
    assert {r.item: r.stop for r in ledger.rows()} == {
        "dask-scheduler:c1": t(2026, 11, 30, 10, 2),
        "dask-worker:c1/w": t(2026, 11, 30, 10, 2),
    }
    # a kind not reconciled keeps its heartbeat: servers are seen by the hub's reconcile only
    ledger.record(start("server:researcher/", kind="server", id="s1", time=t(2026, 11, 30, 18)))
    clock.now = t(2026, 11, 30, 18, 5)
    ledger.reconcile([], kinds=["dask-scheduler", "dask-worker"])
    assert [r.item for r in ledger.open_rows()] == ["server:researcher/"]


def test_ledgers_made_before_the_seen_column_get_it(tmp_path):
    """An existing quota.sqlite without ``seen`` gains the column at start (no row rewritten)."""
    url = default_db_url(tmp_path)
    led = Ledger(url, POLICY)
    led.record(start("dask-worker:old/1", id="old"))
    with led.engine.begin() as c:
        c.exec_driver_sql("ALTER TABLE quota_usage DROP COLUMN seen")
    led.close()
    again = Ledger(url, POLICY)
    try:
        again.reconcile([running("dask-worker:old/1", kind="dask-worker", cpu=1)], kinds=["dask-worker"])
        with again.engine.connect() as c:
            assert c.exec_driver_sql("SELECT count(*) FROM quota_usage WHERE seen IS NOT NULL").scalar() == 1
    finally:
        again.close()


def test_database_sums_match_the_pure_accounting(ledger, clock):
    """Admissions sum usage in SQL; it must agree with accounting.usage_in_period over the same rows."""
    from datetime import timedelta

    from workbench.services.quota.accounting import budget_statuses

    rng = random.Random(7)
    evs = []
    for i in range(60):
        begin = t(2026, 10, 25) + timedelta(seconds=rng.randrange(0, 40 * 86400), microseconds=rng.randrange(10**6))
        user = rng.choice(["researcher", "other"])
        evs.append(
            start(
                f"dask-worker:r/{i}",
                user=user,
                gpu_type="h100",
                gpu_count=rng.randrange(0, 3),
                cpu=rng.choice([0.5, 1, 4]),
                time=begin,
            )
        )
        if rng.random() < 0.8:
            evs.append(stop(f"dask-worker:r/{i}", time=begin + timedelta(seconds=rng.randrange(1, 5 * 86400))))
    ledger.record_many(evs)
    for now in (t(2026, 11, 30, 22), t(2026, 12, 1), t(2026, 12, 3, 12)):
        budget = POLICY.groups["physics-lab"].budget
        rows = ledger.rows()
        pure = budget_statuses(
            budget, "physics-lab", rows, now, "researcher", [r for r in rows if r.user == "researcher"]
        )
        sql = ledger.budgets("physics-lab", "researcher", now)
        assert [(s.resource, s.scope) for s in sql] == [(s.resource, s.scope) for s in pure]
        for a, b in zip(sql, pure, strict=True):
            assert a.used_hours == pytest.approx(b.used_hours, abs=1e-6), (a, b)


def test_a_last_heartbeat_at_exit_closes_rows_at_the_shutdown(ledger, clock):
    """The quota service marks the servers its last hub reconcile saw as alive when it exits (the hub stops its
    services before the servers, whose stop events then find no service): after the restart they close then."""
    clock.now = t(2026, 11, 30, 9)
    ledger.reconcile([running("server:researcher/", started=t(2026, 11, 30, 8))], kinds=["server"])
    clock.now = t(2026, 11, 30, 9, 0, 40)  # the service is told to exit, 40 s after its last reconcile
    assert ledger.mark_seen(["server:researcher/", "server:gone/"]) == 1
    clock.now = t(2026, 11, 30, 12)  # back after three hours down; the server was stopped with the hub
    assert ledger.reconcile([], kinds=["server"]).closed == ["server:researcher/"]
    [row] = ledger.rows()
    assert (row.start, row.stop) == (t(2026, 11, 30, 8), t(2026, 11, 30, 9, 0, 40))


def test_an_unconfirmed_item_keeps_its_row_open_unseen_and_closes_at_its_last_seen(ledger, clock):
    """Issue 16: a gateway restarted after a downtime lists what its database calls running as unconfirmed until a
    heartbeat shows it alive; a worker that died in the downtime is then left out, and its row closes when it was
    last known alive before the downtime, not at the restart."""
    kinds = ["dask-scheduler", "dask-worker"]

    def items(worker_confirmed=True):
        return [
            running("dask-scheduler:c1", kind="dask-scheduler", cpu=1),
            running("dask-worker:c1/w", kind="dask-worker", cpu=1, confirmed=worker_confirmed),
        ]

    clock.now = t(2026, 11, 30, 10)
    assert sorted(ledger.reconcile(items(), kinds=kinds).opened) == ["dask-scheduler:c1", "dask-worker:c1/w"]
    clock.now = t(2026, 11, 30, 10, 1)
    ledger.reconcile(items(), kinds=kinds)  # last seen alive at 10:01; the gateway is down from 10:01:30 to 18:00
    clock.now = t(2026, 11, 30, 18)
    assert ledger.reconcile(items(worker_confirmed=False), kinds=kinds).closed == []  # still open, not seen
    assert {r.item for r in ledger.open_rows()} == {"dask-scheduler:c1", "dask-worker:c1/w"}
    clock.now = t(2026, 11, 30, 18, 0, 5)  # the heartbeat shows it gone: the gateway leaves it out
    assert ledger.reconcile(items()[:1], kinds=kinds).closed == ["dask-worker:c1/w"]
    [row] = [r for r in ledger.rows() if r.item == "dask-worker:c1/w"]
    assert row.stop == t(2026, 11, 30, 10, 1)
    # an unconfirmed item with no open row gets none until it is confirmed
    assert ledger.reconcile(items(worker_confirmed=False), kinds=kinds).opened == []
