"""Warnings and enforcement of spent budgets (pure: statuses and rows in, decisions out).

- :func:`notifications` — what a user is told about the budgets that concern them: a warning
  once a budget passes the first of the policy's ``budget.warn_at`` fractions (default 80%), a
  critical notice past the last one (95%) and once it is spent, with when running work stops.
- :func:`stop_plan` — which running ledger items must stop because a budget they draw on is
  spent, and when: ``budget.grace`` after the moment the budget ran out.

The moment a budget ran out is computed, not remembered: ``used - limit`` hours were burnt since
then by the items running now, so it was ``(used - limit) / burn_rate`` hours ago. The plan is
therefore the same after a restart of the quota service (no state to lose), and the grace
period does not start again.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta

from workbench.services.quota.accounting import BudgetStatus, Interval, format_utc, iso

__all__ = ["Notification", "StopItem", "notifications", "stop_plan", "draws_on", "exhausted_since"]

_RESOURCE = {"gpu": "GPU", "cpu": "CPU"}


@dataclass(frozen=True)
class StopItem:
    """A running item that draws on a spent budget, and when it is stopped."""

    item: str
    kind: str
    user: str
    group: str
    reason: str  # gpu-budget | cpu-budget
    deadline: datetime
    message: str

    def due(self, now: datetime) -> bool:
        return self.deadline <= now

    def to_json(self, now: datetime) -> dict:
        return {
            "item": self.item,
            "kind": self.kind,
            "user": self.user,
            "group": self.group,
            "reason": self.reason,
            "deadline": iso(self.deadline),
            "due": self.due(now),
            "message": self.message,
        }


@dataclass(frozen=True)
class Notification:
    level: str  # info | warning | critical
    message: str
    group: str
    resource: str
    fraction: float
    deadline: datetime | None = None

    def to_json(self, now: datetime) -> dict:
        return {
            "level": self.level,
            "source": "quota",
            "message": self.message,
            "at": iso(now),
            "group": self.group,
            "resource": self.resource,
            "fraction": round(self.fraction, 4),
            "stops_at": iso(self.deadline),
        }


def draws_on(row: Interval, status: BudgetStatus) -> bool:
    """Whether a running row uses what ``status`` budgets (its group's; its user's for a per-user budget)."""
    if row.group != status.group or (status.scope == "user" and row.user != status.user):
        return False
    return row.gpu_count > 0 if status.resource == "gpu" else row.cpu > 0


def _burn_per_hour(rows: Iterable[Interval], resource: str) -> float:
    return float(sum(r.gpu_count if resource == "gpu" else r.cpu for r in rows))


def exhausted_since(status: BudgetStatus, running: list[Interval], now: datetime) -> datetime:
    """When ``status``'s budget ran out, assuming ``running`` (the rows drawing on it) ran since then."""
    burn = _burn_per_hour(running, status.resource)
    over = max(0.0, status.used_hours - status.limit_hours)
    if burn <= 0:
        return now
    return now - timedelta(hours=over / burn)


def stop_plan(
    statuses: Iterable[BudgetStatus], open_rows: Iterable[Interval], grace_seconds: float, now: datetime
) -> list[StopItem]:
    """Running items drawing on spent budgets, each with its stop deadline (the earliest if several)."""
    rows = list(open_rows)
    plan: dict[str, StopItem] = {}
    for st in statuses:
        if not st.exhausted:
            continue
        running = [r for r in rows if draws_on(r, st)]
        if not running:
            continue
        deadline = exhausted_since(st, running, now) + timedelta(seconds=grace_seconds)
        message = (
            f"{_RESOURCE[st.resource]} budget of {st.owner} is spent ({st.used_hours:.2f} of "
            f"{st.limit_hours:g} {_RESOURCE[st.resource]}-hours {st.period.phrase}); running work that uses it "
            f"stops at {format_utc(deadline)}"
        )
        for r in running:
            prior = plan.get(r.item)
            if prior is None or deadline < prior.deadline:
                plan[r.item] = StopItem(r.item, r.kind, r.user, r.group, f"{st.resource}-budget", deadline, message)
    return sorted(plan.values(), key=lambda s: (s.deadline, s.item))


def notifications(
    statuses: Iterable[BudgetStatus], warn_at: list[float], plan: Iterable[StopItem], now: datetime
) -> list[Notification]:
    """What to tell a user about ``statuses`` (their groups' and their own budgets), most severe first."""
    deadlines: dict[tuple[str, str], datetime] = {}
    for s in plan:
        key = (s.group, s.reason.removesuffix("-budget"))
        deadlines[key] = min(s.deadline, deadlines.get(key, s.deadline))
    out: list[Notification] = []
    for st in statuses:
        res = _RESOURCE[st.resource]
        reset = f"resets {format_utc(st.resets_at)}" if st.resets_at else "it does not reset"
        deadline = deadlines.get((st.group, st.resource))
        if st.exhausted:
            stops = (
                f"; your running servers and Dask clusters that use it stop at {format_utc(deadline)}"
                if deadline
                else "; new servers and clusters that need it are refused"
            )
            out.append(Notification("critical", st.message() + stops, st.group, st.resource, st.fraction, deadline))
            continue
        passed = [x for x in warn_at if st.fraction >= x]
        if not passed:
            continue
        level = "critical" if len(warn_at) > 1 and passed[-1] == warn_at[-1] else "warning"
        out.append(
            Notification(
                level,
                f"{res} budget of {st.owner}: {st.used_hours:.1f} of {st.limit_hours:g} {res}-hours used "
                f"{st.period.phrase} ({st.fraction:.0%}); {reset}. When it is spent, running work that uses it stops.",
                st.group,
                st.resource,
                st.fraction,
            )
        )
    order = {"critical": 0, "warning": 1, "info": 2}
    return sorted(out, key=lambda n: (order[n.level], -n.fraction))
