"""Pure accounting: periods, usage clipped to periods, budget status and refusal messages.

Nothing here does I/O or reads a clock: ``now`` is always passed in, so the rollover at a
month or term boundary is tested with literal datetimes. All times are timezone-aware UTC.

A usage *interval* is one row of the ledger: something (a notebook server, a Dask scheduler,
a Dask worker) that held ``cpu`` cores and ``gpu_count`` GPUs of ``gpu_type`` from ``start``
to ``stop`` (``None`` while it runs). Its usage in a period is the overlap of the interval
with the period, so a row spanning a month boundary counts in both months, each with its part.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Literal, Protocol

UTC = UTC
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
KINDS = ("server", "dask-scheduler", "dask-worker", "job")
PeriodKind = Literal["month", "term", "total"]

__all__ = [
    "UTC",
    "KINDS",
    "Interval",
    "Period",
    "Usage",
    "BudgetStatus",
    "month_period",
    "term_period",
    "budget_period",
    "parse_period",
    "overlap_seconds",
    "usage_in_period",
    "budget_statuses",
    "budget_statuses_for",
    "refusal_message",
    "cap_message",
    "as_utc",
]


def as_utc(value: datetime) -> datetime:
    """``value`` as an aware UTC datetime (naive values are taken to be UTC already)."""
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value.astimezone(UTC)


# ---------------------------------------------------------------------------
# Periods
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Period:
    """A half-open time range ``[start, end)``; ``end`` None: open-ended (a ``total`` budget)."""

    kind: str  # month | term | total | range
    name: str  # "2026-11", "term from 2026-09-01", "total", "2026-11-01..2026-11-15"
    start: datetime
    end: datetime | None

    @property
    def resets_at(self) -> datetime | None:
        return self.end if self.kind in ("month", "term") else None

    @property
    def phrase(self) -> str:
        """How a message says "in this period": this month / this term / in total."""
        return {"month": "this month", "term": "this term", "total": "in total"}.get(self.kind, f"in {self.name}")

    def to_json(self) -> dict:
        return {
            "kind": self.kind,
            "name": self.name,
            "start": iso(self.start),
            "end": iso(self.end) if self.end else None,
        }


def iso(t: datetime | None) -> str | None:
    """ISO 8601 in UTC with a ``Z`` (None stays None)."""
    if t is None:
        return None
    return as_utc(t).isoformat().replace("+00:00", "Z")


def _next_month(year: int, month: int) -> tuple[int, int]:
    return (year + 1, 1) if month == 12 else (year, month + 1)


def month_period(year: int, month: int) -> Period:
    start = datetime(year, month, 1, tzinfo=UTC)
    ny, nm = _next_month(year, month)
    return Period("month", f"{year:04d}-{month:02d}", start, datetime(ny, nm, 1, tzinfo=UTC))


def term_period(now: datetime, term_starts: Iterable[str]) -> Period:
    """The term containing ``now``: from the latest term start at or before ``now`` to the next one.

    ``term_starts`` are ``MM-DD`` days that repeat every year (``["02-01", "09-01"]``).
    """
    now = as_utc(now)
    days = sorted({tuple(int(x) for x in s.split("-")) for s in term_starts})
    if not days:
        raise ValueError("term_starts must list at least one 'MM-DD' day")
    candidates = [datetime(y, m, d, tzinfo=UTC) for y in (now.year - 1, now.year, now.year + 1) for m, d in days]
    start = max(c for c in candidates if c <= now)
    end = min(c for c in candidates if c > now)
    return Period("term", f"term from {start:%Y-%m-%d}", start, end)


def budget_period(kind: PeriodKind, now: datetime, term_starts: Iterable[str] = ("02-01", "09-01")) -> Period:
    """The budget period of ``kind`` (month | term | total) that contains ``now``."""
    now = as_utc(now)
    if kind == "month":
        return month_period(now.year, now.month)
    if kind == "term":
        return term_period(now, term_starts)
    if kind == "total":
        return Period("total", "total", EPOCH, None)
    raise ValueError(f"unknown budget period {kind!r}; expected month, term or total")


_MONTH_RE = re.compile(r"^(\d{4})-(\d{2})$")
_DAY_RE = re.compile(r"^\d{4}-\d{2}-\d{2}$")


def parse_period(
    text: str, now: datetime, default: PeriodKind = "month", term_starts: Iterable[str] = ("02-01", "09-01")
) -> Period:
    """A period named on a command line or in a query string.

    ``2026-11`` (a calendar month), ``2026-11-01..2026-11-15`` (days, the end day included),
    ``current`` (the ``default`` budget period containing ``now``), ``month``, ``term``, ``total``.
    Raises ``ValueError`` with the accepted forms.
    """
    text = (text or "current").strip()
    if text == "current":
        return budget_period(default, now, term_starts)
    if text in ("month", "term", "total"):
        return budget_period(text, now, term_starts)  # type: ignore[arg-type]
    m = _MONTH_RE.match(text)
    if m and 1 <= int(m[2]) <= 12:
        return month_period(int(m[1]), int(m[2]))
    if ".." in text:
        a, _, b = text.partition("..")
        if _DAY_RE.match(a) and _DAY_RE.match(b):
            try:
                start = datetime.strptime(a, "%Y-%m-%d").replace(tzinfo=UTC)
                end = datetime.strptime(b, "%Y-%m-%d").replace(tzinfo=UTC) + timedelta(days=1)
            except ValueError:
                pass
            else:
                if end > start:
                    return Period("range", text, start, end)
    raise ValueError(
        f"unknown period {text!r}; use a month (2026-11), a range of days (2026-11-01..2026-11-15), "
        "or one of: current, month, term, total"
    )


# ---------------------------------------------------------------------------
# Usage
# ---------------------------------------------------------------------------


class IntervalLike(Protocol):
    start: datetime
    stop: datetime | None
    cpu: float
    gpu_count: int
    gpu_type: str | None


@dataclass(frozen=True)
class Interval:
    """One ledger row as plain data."""

    item: str
    kind: str
    user: str
    group: str
    start: datetime
    stop: datetime | None = None
    cpu: float = 0.0
    memory: int = 0
    gpu_type: str | None = None
    gpu_count: int = 0
    profile: str | None = None
    id: int | None = None

    def to_json(self) -> dict:
        return {
            "id": self.id,
            "item": self.item,
            "kind": self.kind,
            "user": self.user,
            "group": self.group,
            "profile": self.profile,
            "cpu": self.cpu,
            "memory": self.memory,
            "gpu_type": self.gpu_type,
            "gpu_count": self.gpu_count,
            "start": iso(self.start),
            "stop": iso(self.stop),
        }


def overlap_seconds(start: datetime, stop: datetime | None, period: Period, now: datetime) -> float:
    """Seconds of ``[start, stop or now)`` inside ``period`` (never negative, never past ``now``)."""
    now = as_utc(now)
    lo = max(as_utc(start), period.start)
    hi = min(as_utc(stop) if stop is not None else now, now)
    if period.end is not None:
        hi = min(hi, period.end)
    return max(0.0, (hi - lo).total_seconds())


@dataclass
class Usage:
    """GPU-seconds and CPU-seconds, in total and by GPU type."""

    gpu_seconds: float = 0.0
    cpu_seconds: float = 0.0
    gpu_seconds_by_type: dict[str, float] = field(default_factory=dict)

    @property
    def gpu_hours(self) -> float:
        return self.gpu_seconds / 3600

    @property
    def cpu_hours(self) -> float:
        return self.cpu_seconds / 3600

    def add(self, row: IntervalLike, seconds: float) -> None:
        self.cpu_seconds += row.cpu * seconds
        if row.gpu_count and row.gpu_type:
            g = row.gpu_count * seconds
            self.gpu_seconds += g
            self.gpu_seconds_by_type[row.gpu_type] = self.gpu_seconds_by_type.get(row.gpu_type, 0.0) + g

    def to_json(self) -> dict:
        return {
            "gpu_hours": round(self.gpu_hours, 6),
            "cpu_hours": round(self.cpu_hours, 6),
            "gpu_seconds": round(self.gpu_seconds, 3),
            "cpu_seconds": round(self.cpu_seconds, 3),
            "gpu_hours_by_type": {k: round(v / 3600, 6) for k, v in sorted(self.gpu_seconds_by_type.items())},
        }


def usage_in_period(rows: Iterable[IntervalLike], period: Period, now: datetime) -> Usage:
    """Usage of ``rows`` inside ``period`` as of ``now`` (running rows count up to ``now``)."""
    out = Usage()
    for row in rows:
        seconds = overlap_seconds(row.start, row.stop, period, now)
        if seconds:
            out.add(row, seconds)
    return out


def usage_by(rows: Iterable[Interval], period: Period, now: datetime, key) -> dict:
    """Usage in ``period`` grouped by ``key(row)`` (a tuple or a string)."""
    groups: dict = defaultdict(list)
    for row in rows:
        groups[key(row)].append(row)
    return {k: usage_in_period(v, period, now) for k, v in sorted(groups.items(), key=lambda kv: str(kv[0]))}


# ---------------------------------------------------------------------------
# Budgets
# ---------------------------------------------------------------------------

_RESOURCE_NAME = {"gpu": "GPU", "cpu": "CPU"}


@dataclass(frozen=True)
class BudgetStatus:
    """How much of one budget (a group's or one member's GPU-hours or CPU-hours) is used."""

    resource: Literal["gpu", "cpu"]
    scope: Literal["group", "user"]
    group: str
    user: str | None
    used_hours: float
    limit_hours: float
    period: Period

    @property
    def fraction(self) -> float:
        if self.limit_hours <= 0:
            return 1.0 if self.used_hours >= 0 else 0.0
        return self.used_hours / self.limit_hours

    @property
    def exhausted(self) -> bool:
        return self.used_hours >= self.limit_hours

    @property
    def resets_at(self) -> datetime | None:
        return self.period.resets_at

    @property
    def owner(self) -> str:
        return f"group {self.group}" if self.scope == "group" else f"user {self.user} in group {self.group}"

    def message(self) -> str:
        return refusal_message(self)

    def to_json(self) -> dict:
        return {
            "resource": self.resource,
            "scope": self.scope,
            "group": self.group,
            "user": self.user,
            "used_hours": round(self.used_hours, 6),
            "limit_hours": self.limit_hours,
            "fraction": round(self.fraction, 6),
            "exhausted": self.exhausted,
            "period": self.period.to_json(),
            "resets_at": iso(self.resets_at),
        }


def format_utc(t: datetime) -> str:
    return f"{as_utc(t):%Y-%m-%d %H:%M} UTC"


def refusal_message(status: BudgetStatus) -> str:
    """The message a refused start shows, e.g.

    ``GPU budget of group physics-lab exhausted: 500.0 of 500 GPU-hours used this month; resets 2026-12-01 00:00 UTC``
    """
    res = _RESOURCE_NAME[status.resource]
    reset = f"resets {format_utc(status.resets_at)}" if status.resets_at else "this budget does not reset"
    return (
        f"{res} budget of {status.owner} exhausted: {status.used_hours:.1f} of {status.limit_hours:g} "
        f"{res}-hours used {status.period.phrase}; {reset}"
    )


def cap_message(
    what: Literal["servers", "gpus"],
    scope: Literal["group", "user"],
    group: str,
    user: str | None,
    running: int,
    cap: int,
    requested: int,
) -> str:
    """The message of a start refused by a concurrency cap."""
    owner = f"Group {group}" if scope == "group" else f"User {user} in group {group}"
    noun = "servers" if what == "servers" else "GPUs"
    return (
        f"{owner} already runs {running} of at most {cap} {noun} at once"
        + (f" and this start needs {requested} more" if requested > 1 else "")
        + "; stop one first or ask the platform team to raise the cap"
    )


def budget_statuses(
    budget,
    group: str,
    group_rows: Iterable[IntervalLike],
    now: datetime,
    user: str | None = None,
    user_rows: Iterable[IntervalLike] | None = None,
) -> list[BudgetStatus]:
    """Statuses of a group's budgets (and of ``user``'s per-user budgets in it) for the period containing ``now``.

    ``budget`` is a :class:`workbench.policy.Budget` (or None: no budgets); ``group_rows`` are
    the group's ledger rows (any superset of those overlapping the period works), ``user_rows``
    the user's rows charged to the group.
    """
    if budget is None:
        return []
    period = budget_period(budget.period, now, budget.term_starts)
    used = usage_in_period(group_rows, period, now)
    mine = usage_in_period(user_rows or [], period, now)
    return budget_statuses_for(
        budget, group, period, used.gpu_hours, used.cpu_hours, user, mine.gpu_hours, mine.cpu_hours
    )


def budget_statuses_for(
    budget,
    group: str,
    period: Period,
    gpu_hours: float,
    cpu_hours: float,
    user: str | None = None,
    user_gpu_hours: float = 0.0,
    user_cpu_hours: float = 0.0,
) -> list[BudgetStatus]:
    """Statuses of ``budget`` given what was used in ``period`` (the database may sum it)."""
    if budget is None:
        return []
    out: list[BudgetStatus] = []
    for res, limit, value in (("gpu", budget.gpu_hours, gpu_hours), ("cpu", budget.cpu_hours, cpu_hours)):
        if limit is not None:
            out.append(BudgetStatus(res, "group", group, None, value, float(limit), period))
    if user is not None and budget.per_user is not None:
        for res, limit, value in (
            ("gpu", budget.per_user.gpu_hours, user_gpu_hours),
            ("cpu", budget.per_user.cpu_hours, user_cpu_hours),
        ):
            if limit is not None:
                out.append(BudgetStatus(res, "user", group, user, value, float(limit), period))
    return out
