"""Warnings and stop deadlines of spent budgets (workbench.services.quota.enforce): pure, literal inputs."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from workbench.services.quota.accounting import BudgetStatus, Interval, month_period
from workbench.services.quota.enforce import draws_on, exhausted_since, notifications, stop_plan

UTC = UTC
NOW = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)
NOV = month_period(2026, 11)


def status(resource="gpu", used=10.0, limit=10.0, scope="group", user=None, group="lab"):
    return BudgetStatus(resource, scope, group, user, used, limit, NOV)


def running(item, user="alice", group="lab", cpu=4.0, gpus=0, started=NOW - timedelta(hours=3), kind="server"):
    return Interval(item, kind, user, group, started, None, cpu, 0, "h100" if gpus else None, gpus)


def test_which_rows_draw_on_which_budget():
    gpu_server = running("server:alice/", gpus=2)
    cpu_worker = running("dask-worker:c/1", user="bob", kind="dask-worker", cpu=1)
    assert draws_on(gpu_server, status("gpu")) and not draws_on(cpu_worker, status("gpu"))
    assert draws_on(cpu_worker, status("cpu")) and draws_on(gpu_server, status("cpu"))
    assert not draws_on(gpu_server, status("gpu", scope="user", user="bob"))  # bob's own share only
    assert not draws_on(running("server:x/", group="other", gpus=1), status("gpu"))


def test_the_moment_a_budget_ran_out_is_computed_from_the_overshoot_and_the_burn_rate():
    # 1 GPU-hour over with 2 GPUs running: it ran out half an hour ago
    rows = [running("server:a/", gpus=1), running("server:b/", user="bob", gpus=1)]
    assert exhausted_since(status(used=11, limit=10), rows, NOW) == NOW - timedelta(minutes=30)
    assert exhausted_since(status(used=10, limit=10), rows, NOW) == NOW  # just now
    assert exhausted_since(status(used=11, limit=10), [], NOW) == NOW  # nothing burns: no past moment to find


def test_stop_plan_gives_each_drawing_item_the_grace_after_exhaustion():
    rows = [
        running("server:a/", gpus=1),
        running("dask-worker:c/1", cpu=1, kind="dask-worker"),
        running("server:z/", group="other", gpus=1),
    ]
    plan = stop_plan([status(used=10.5, limit=10)], rows, grace_seconds=900, now=NOW)
    assert [p.item for p in plan] == ["server:a/"]  # the CPU worker and the other group's server keep running
    (p,) = plan
    assert p.deadline == NOW - timedelta(minutes=30) + timedelta(minutes=15)
    assert p.due(NOW) and p.reason == "gpu-budget" and p.user == "alice"
    assert "GPU budget of group lab is spent (10.50 of 10 GPU-hours this month)" in p.message
    assert "stops at 2026-11-20 11:45 UTC" in p.message
    # the same plan after a restart of the service: nothing was remembered, nothing changes
    assert stop_plan([status(used=10.5, limit=10)], rows, 900, NOW) == plan


def test_a_budget_just_spent_stops_nothing_before_the_grace():
    plan = stop_plan([status("cpu", used=20.0, limit=20.0)], [running("server:a/", cpu=4)], 600, NOW)
    assert plan[0].deadline == NOW + timedelta(minutes=10) and not plan[0].due(NOW)
    assert stop_plan([status("cpu", used=19.9, limit=20.0)], [running("server:a/")], 600, NOW) == []


def test_the_earliest_deadline_wins_when_two_budgets_are_spent():
    rows = [running("server:a/", cpu=4, gpus=1)]
    plan = stop_plan([status("cpu", used=24, limit=20), status("gpu", used=10, limit=10)], rows, 0, NOW)
    assert len(plan) == 1 and plan[0].reason == "cpu-budget" and plan[0].deadline == NOW - timedelta(hours=1)


def test_per_user_budget_stops_only_that_users_items():
    rows = [running("server:a/", gpus=1), running("server:b/", user="bob", gpus=1)]
    plan = stop_plan([status(used=3, limit=2, scope="user", user="bob")], rows, 60, NOW)
    assert [p.item for p in plan] == ["server:b/"]
    assert "GPU budget of user bob in group lab is spent" in plan[0].message


def test_notifications_warn_at_the_policy_levels():
    levels = [0.8, 0.95]
    assert notifications([status(used=7.9)], levels, [], NOW) == []
    (n,) = notifications([status(used=8.5)], levels, [], NOW)
    assert n.level == "warning"
    assert n.message.startswith("GPU budget of group lab: 8.5 of 10 GPU-hours used this month (85%)")
    assert "resets 2026-12-01 00:00 UTC" in n.message
    (n,) = notifications([status(used=9.6)], levels, [], NOW)
    assert n.level == "critical" and "(96%)" in n.message
    (n,) = notifications([status(used=10.2)], levels, [], NOW)
    assert n.level == "critical" and "exhausted" in n.message and n.deadline is None
    assert "new servers and clusters that need it are refused" in n.message


def test_a_spent_budget_with_running_work_says_when_it_stops():
    plan = stop_plan([status(used=10, limit=10)], [running("server:a/", gpus=1)], 300, NOW)
    (n,) = notifications([status(used=10, limit=10)], [0.8], plan, NOW)
    assert n.deadline == NOW + timedelta(minutes=5)
    assert "stop at 2026-11-20 12:05 UTC" in n.message
    doc = n.to_json(NOW)
    assert doc["source"] == "quota" and doc["level"] == "critical" and doc["stops_at"] == "2026-11-20T12:05:00Z"


def test_most_severe_first():
    notes = notifications([status("cpu", used=8.1), status("gpu", used=10.0)], [0.8, 0.95], [], NOW)
    assert [(n.resource, n.level) for n in notes] == [("gpu", "critical"), ("cpu", "warning")]
