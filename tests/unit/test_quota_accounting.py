"""Pure accounting of workbench.services.quota: periods, clipping, budget status and messages (no clock, no I/O)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from workbench.policy import parse_policy
from workbench.services.quota.accounting import (
    BudgetStatus,
    Interval,
    Period,
    budget_period,
    budget_statuses,
    cap_message,
    month_period,
    overlap_seconds,
    parse_period,
    refusal_message,
    term_period,
    usage_in_period,
)

UTC = UTC


def t(*args) -> datetime:
    return datetime(*args, tzinfo=UTC)


def row(start, stop=None, cpu=8.0, gpus=1, gpu_type="h100", user="alice", group="physics-lab", kind="server"):
    return Interval(
        item=f"server:{user}/",
        kind=kind,
        user=user,
        group=group,
        start=start,
        stop=stop,
        cpu=cpu,
        gpu_type=gpu_type if gpus else None,
        gpu_count=gpus,
    )


# -- periods -----------------------------------------------------------------------------------


def test_month_period_bounds():
    p = month_period(2026, 11)
    assert (p.start, p.end, p.name) == (t(2026, 11, 1), t(2026, 12, 1), "2026-11")
    assert p.resets_at == t(2026, 12, 1)


def test_month_rollover_at_the_boundary():
    last = t(2026, 11, 30, 23, 59, 59, 999999)
    first = t(2026, 12, 1)
    assert budget_period("month", last).name == "2026-11"
    assert budget_period("month", first).name == "2026-12"
    assert budget_period("month", first).end == t(2027, 1, 1)
    dec = budget_period("month", t(2026, 12, 31, 23, 59))
    assert (dec.start, dec.end) == (t(2026, 12, 1), t(2027, 1, 1))
    assert budget_period("month", t(2027, 1, 1)).name == "2027-01"


def test_month_period_of_a_non_utc_clock():
    # 00:30 on Dec 1 in Berlin is still November in UTC
    berlin = timezone(timedelta(hours=1))
    assert budget_period("month", datetime(2026, 12, 1, 0, 30, tzinfo=berlin)).name == "2026-11"


def test_term_period():
    starts = ["02-01", "09-01"]
    autumn = term_period(t(2026, 11, 15), starts)
    assert (autumn.start, autumn.end) == (t(2026, 9, 1), t(2027, 2, 1))
    spring = term_period(t(2027, 2, 1), starts)
    assert (spring.start, spring.end) == (t(2027, 2, 1), t(2027, 9, 1))
    assert term_period(t(2027, 1, 31, 23, 59), starts).start == t(2026, 9, 1)
    # one term start a year: the term is the academic year
    year = term_period(t(2026, 3, 1), ["10-01"])
    assert (year.start, year.end) == (t(2025, 10, 1), t(2026, 10, 1))
    assert budget_period("term", t(2026, 11, 15), starts).phrase == "this term"


def test_total_period_never_resets():
    p = budget_period("total", t(2026, 11, 15))
    assert p.end is None and p.resets_at is None and p.phrase == "in total"


@pytest.mark.parametrize(
    "text, start, end",
    [
        ("2026-11", t(2026, 11, 1), t(2026, 12, 1)),
        ("2026-12", t(2026, 12, 1), t(2027, 1, 1)),
        ("current", t(2026, 11, 1), t(2026, 12, 1)),
        ("month", t(2026, 11, 1), t(2026, 12, 1)),
        ("2026-11-01..2026-11-15", t(2026, 11, 1), t(2026, 11, 16)),
    ],
)
def test_parse_period(text, start, end):
    p = parse_period(text, t(2026, 11, 20))
    assert (p.start, p.end) == (start, end)


@pytest.mark.parametrize("text", ["2026-13", "2026/11", "november", "2026-11-15..2026-11-01", "2026-02-30..2026-03-01"])
def test_parse_period_errors_say_what_is_accepted(text):
    with pytest.raises(ValueError) as info:
        parse_period(text, t(2026, 11, 20))
    assert "use a month (2026-11)" in str(info.value)


# -- clipping ----------------------------------------------------------------------------------


def test_row_spanning_a_month_boundary_counts_in_both_months():
    r = row(t(2026, 11, 30, 23, 0), t(2026, 12, 1, 2, 0), cpu=4, gpus=2)  # 1 h in November, 2 h in December
    now = t(2026, 12, 15)
    nov = usage_in_period([r], month_period(2026, 11), now)
    dec = usage_in_period([r], month_period(2026, 12), now)
    assert nov.gpu_seconds == 2 * 3600 and dec.gpu_seconds == 2 * 2 * 3600
    assert nov.cpu_seconds == 4 * 3600 and dec.cpu_seconds == 4 * 2 * 3600
    total = usage_in_period([r], budget_period("total", now), now)
    assert total.gpu_seconds == nov.gpu_seconds + dec.gpu_seconds


def test_running_row_counts_up_to_now_only():
    r = row(t(2026, 11, 30, 22, 0), None, gpus=1)
    nov = month_period(2026, 11)
    assert usage_in_period([r], nov, t(2026, 11, 30, 22, 30)).gpu_seconds == 1800
    # after the month ended, the running row counts to the end of the month in November ...
    assert usage_in_period([r], nov, t(2026, 12, 1, 5, 0)).gpu_seconds == 2 * 3600
    # ... and from the boundary in December
    assert usage_in_period([r], month_period(2026, 12), t(2026, 12, 1, 5, 0)).gpu_seconds == 5 * 3600


def test_overlap_edges():
    nov = month_period(2026, 11)
    now = t(2027, 1, 1)
    assert overlap_seconds(t(2026, 10, 1), t(2026, 11, 1), nov, now) == 0  # ends exactly at the start
    assert overlap_seconds(t(2026, 12, 1), t(2026, 12, 2), nov, now) == 0  # starts exactly at the end
    assert overlap_seconds(t(2026, 11, 2), t(2026, 11, 1), nov, now) == 0  # stop before start: nothing
    assert overlap_seconds(t(2026, 10, 1), t(2027, 1, 1), nov, now) == 30 * 86400
    assert overlap_seconds(t(2026, 11, 10), None, nov, t(2026, 11, 9)) == 0  # starts after now


def test_usage_by_gpu_type_and_cpu_only_rows():
    rows = [
        row(t(2026, 11, 1), t(2026, 11, 1, 1), gpus=1, gpu_type="h100"),
        row(t(2026, 11, 1), t(2026, 11, 1, 2), gpus=1, gpu_type="h100-mig-1g"),
        row(t(2026, 11, 1), t(2026, 11, 1, 3), gpus=0, cpu=2),
    ]
    u = usage_in_period(rows, month_period(2026, 11), t(2026, 12, 1))
    assert u.gpu_seconds_by_type == {"h100": 3600, "h100-mig-1g": 7200}
    assert u.gpu_hours == 3
    assert u.cpu_hours == 8 + 16 + 6
    assert u.to_json()["gpu_hours_by_type"] == {"h100": 1.0, "h100-mig-1g": 2.0}


# -- budgets -----------------------------------------------------------------------------------

POLICY = parse_policy(
    {
        "auth": {"type": "demo", "demo_users": {"alice": {"groups": ["physics-lab"]}}},
        "gpu_types": {"h100": {}},
        "images": {"base": {"image": "x"}},
        "profiles": {"h100-x1": {"cpu": 8, "memory": "64G", "gpu": {"type": "h100"}}},
        "groups": {
            "physics-lab": {
                "kind": "research",
                "profiles": ["h100-x1"],
                "budget": {"gpu_hours": 500, "cpu_hours": 20000, "period": "month", "per_user": {"gpu_hours": 100}},
            },
            "course-ml101": {"kind": "course", "budget": {"cpu_hours": 1000, "period": "term"}},
            "startup-acme": {"kind": "startup", "budget": {"gpu_hours": 100, "period": "total"}},
        },
    }
)


def test_refusal_message_group_month():
    status = BudgetStatus("gpu", "group", "physics-lab", None, 500.0, 500.0, month_period(2026, 11))
    assert status.exhausted and status.fraction == 1.0
    assert refusal_message(status) == (
        "GPU budget of group physics-lab exhausted: 500.0 of 500 GPU-hours used this month; resets 2026-12-01 00:00 UTC"
    )


def test_refusal_messages_user_term_total():
    term = budget_period("term", t(2026, 11, 1), ["02-01", "09-01"])
    s = BudgetStatus("cpu", "user", "course-ml101", "student1", 12.34, 10, term)
    assert s.message() == (
        "CPU budget of user student1 in group course-ml101 exhausted: 12.3 of 10 CPU-hours used this term; "
        "resets 2027-02-01 00:00 UTC"
    )
    total = BudgetStatus("gpu", "group", "startup-acme", None, 100.04, 100, budget_period("total", t(2026, 1, 1)))
    assert total.message() == (
        "GPU budget of group startup-acme exhausted: 100.0 of 100 GPU-hours used in total; this budget does not reset"
    )


def test_budget_statuses_from_rows_at_the_rollover():
    budget = POLICY.groups["physics-lab"].budget
    # 500 GPU-hours in November: one 4-GPU server ran 125 hours up to the end of the month
    rows = [row(t(2026, 11, 25, 19, 0), None, gpus=4, cpu=1)]
    before = budget_statuses(budget, "physics-lab", rows, t(2026, 11, 30, 23, 59, 59), "alice", rows)
    gpu = next(s for s in before if s.resource == "gpu" and s.scope == "group")
    assert round(gpu.used_hours, 3) == round(4 * (124 + 59 / 60 + 59 / 3600), 3)
    assert not gpu.exhausted
    at_end = budget_statuses(budget, "physics-lab", rows, t(2026, 12, 1), "alice", rows)
    # at the boundary the new month has used nothing yet, and the reset is a month later
    assert all(s.used_hours == 0 for s in at_end)
    assert all(s.resets_at == t(2027, 1, 1) for s in at_end)
    later = budget_statuses(budget, "physics-lab", rows, t(2026, 11, 30, 23, 0), "alice", rows)
    assert {(s.scope, s.resource): s.exhausted for s in later} == {
        ("group", "gpu"): False,  # 4 GPUs x 124 h = 496 h
        ("group", "cpu"): False,
        ("user", "gpu"): True,  # alice's own share is 100 GPU-hours
    }
    user = next(s for s in later if s.scope == "user")
    assert user.message().startswith("GPU budget of user alice in group physics-lab exhausted: 496.0 of 100 GPU-hours")


def test_budget_statuses_without_budget_or_limits():
    assert budget_statuses(None, "g", [], t(2026, 1, 1)) == []
    st = budget_statuses(POLICY.groups["course-ml101"].budget, "course-ml101", [], t(2026, 11, 1))
    assert [(s.resource, s.limit_hours, s.period.kind) for s in st] == [("cpu", 1000.0, "term")]


def test_status_json_and_zero_limit():
    s = BudgetStatus("gpu", "group", "g", None, 0.0, 0.0, month_period(2026, 11))
    assert s.exhausted and s.fraction == 1.0  # a zero budget allows no GPU starts
    doc = s.to_json()
    assert doc["resets_at"] == "2026-12-01T00:00:00Z"
    assert doc["period"] == {
        "kind": "month",
        "name": "2026-11",
        "start": "2026-11-01T00:00:00Z",
        "end": "2026-12-01T00:00:00Z",
    }


def test_cap_messages():
    assert cap_message("servers", "group", "course-ml101", None, 5, 5, 1) == (
        "Group course-ml101 already runs 5 of at most 5 servers at once; stop one first or ask the platform "
        "team to raise the cap"
    )
    assert "User alice in group physics-lab already runs 1 of at most 2 GPUs at once and this start needs 2 more" in (
        cap_message("gpus", "user", "physics-lab", "alice", 1, 2, 2)
    )


def test_period_json():
    assert Period("total", "total", t(1970, 1, 1), None).to_json()["end"] is None
