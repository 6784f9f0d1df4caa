"""Scheduled notebook jobs: job definitions with a cron schedule, stored by the jobs service, run when due.

A *definition* is a job request (notebook, profile, parameters, time limit, name) of one user plus a cron
expression (``0 3 * * *``: five fields, minute hour day-of-month month day-of-week) and a time zone (IANA
name, default UTC). The jobs service (:mod:`workbench.jobs.service`) keeps them in ``job_schedules.sqlite``
in its state folder and, at each look, submits one run of every active definition whose next time has come,
through the same path as any job (entitlement, time limit, quota admission, charging), as the definition's
user. A run that is refused (budget spent, profile no longer entitled) is recorded on the definition
(``last_error``) and the next time is still computed: a definition never fires twice for one due time, and
times missed while the service was down are not caught up (one run at the first look after them).

- :func:`check_schedule` / :func:`check_timezone` — validation, errors naming the field, the fix and an example;
- :func:`next_time` — the next due time after a moment (croniter, in the definition's time zone);
- :class:`DefinitionStore` — the table; :func:`definition_doc` — its API view;
- :func:`run_due` — one look: submit the due definitions through a callback.
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from workbench.jobs.model import JobError
from workbench.jobs.store import private_sqlite

log = logging.getLogger("workbench.jobs")

#: what a schedule error shows as an example
SCHEDULE_EXAMPLE = "'0 3 * * *' (every day at 03:00) or '*/30 * * * 1-5' (every 30 minutes on weekdays)"


class ScheduleError(JobError):
    """A schedule or time zone that cannot be used (HTTP 422); the message names the field and the fix."""


def check_schedule(expr) -> str:
    """A five-field cron expression, normalised (single spaces); else :class:`ScheduleError`."""
    from croniter import croniter

    if not isinstance(expr, str) or not expr.strip():
        raise ScheduleError(f"schedule: give a cron expression of five fields, e.g. {SCHEDULE_EXAMPLE}")
    fields = expr.split()
    if len(fields) != 5:
        raise ScheduleError(
            f"schedule: {expr!r} has {len(fields)} fields; a cron expression has five "
            f"(minute hour day-of-month month day-of-week), e.g. {SCHEDULE_EXAMPLE}"
        )
    norm = " ".join(fields)
    if not croniter.is_valid(norm):
        raise ScheduleError(
            f"schedule: {expr!r} is not a valid cron expression (minute 0-59, hour 0-23, day 1-31, "
            f"month 1-12, day of week 0-6); e.g. {SCHEDULE_EXAMPLE}"
        )
    return norm


def check_timezone(name) -> str:
    """An IANA time zone name (``Europe/Zurich``); empty or None is UTC; else :class:`ScheduleError`."""
    if name is None or name == "":
        return "UTC"
    if not isinstance(name, str):
        raise ScheduleError("timezone: give an IANA time zone name such as 'UTC' or 'Europe/Zurich'")
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ScheduleError(
            f"timezone: {name!r} is not a known time zone; use an IANA name such as 'UTC' or 'Europe/Zurich'"
        ) from None
    return name


def next_time(expr: str, tz: str, after: float) -> float:
    """The first due time of ``expr`` (in time zone ``tz``) strictly after ``after`` (epoch seconds; pure)."""
    from croniter import croniter

    start = datetime.fromtimestamp(after, ZoneInfo(tz))
    return float(croniter(expr, start).get_next(float))


# ---------------------------------------------------------------------------
# the table
# ---------------------------------------------------------------------------

COLUMNS = (
    "id TEXT PRIMARY KEY",
    "user TEXT NOT NULL",
    "name TEXT NOT NULL",
    "request TEXT NOT NULL",  # the job request (JSON): notebook, profile, parameters, time, name
    "schedule TEXT NOT NULL",
    "timezone TEXT NOT NULL",
    "active INTEGER NOT NULL DEFAULT 1",
    "created REAL NOT NULL",
    "updated REAL NOT NULL",
    "next_run REAL",
    "last_run REAL",
    "last_job TEXT",
    "last_error TEXT",
)


class DefinitionStore:
    """Job definitions and the jobs each one submitted (SQLite, mode 0600, opened without following links)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.db = private_sqlite(self.path)
        self.db.execute(f"CREATE TABLE IF NOT EXISTS definitions ({', '.join(COLUMNS)})")
        self.db.execute(
            "CREATE TABLE IF NOT EXISTS definition_jobs (definition TEXT NOT NULL, job TEXT PRIMARY KEY, at REAL)"
        )
        self.db.commit()

    def add(self, user: str, request: dict, schedule: str, timezone: str, now: float | None = None) -> dict:
        now = time.time() if now is None else now
        row = {
            "id": uuid.uuid4().hex[:12],
            "user": user,
            "name": request["name"],
            "request": json.dumps(request),
            "schedule": schedule,
            "timezone": timezone,
            "active": 1,
            "created": now,
            "updated": now,
            "next_run": next_time(schedule, timezone, now),
        }
        cols = list(row)
        self.db.execute(
            f"INSERT INTO definitions ({', '.join(cols)}) VALUES ({', '.join('?' for _ in cols)})", list(row.values())
        )
        self.db.commit()
        return self.get(row["id"])

    def get(self, def_id: str) -> dict | None:
        row = self.db.execute("SELECT * FROM definitions WHERE id = ?", (def_id,)).fetchone()
        return dict(row) if row else None

    def update(self, def_id: str, **values) -> None:
        if not values:
            return
        values.setdefault("updated", time.time())
        sets = ", ".join(f"{k} = ?" for k in values)
        self.db.execute(f"UPDATE definitions SET {sets} WHERE id = ?", [*values.values(), def_id])
        self.db.commit()

    def delete(self, def_id: str) -> None:
        self.db.execute("DELETE FROM definitions WHERE id = ?", (def_id,))
        self.db.commit()

    def of_user(self, user: str, admin: bool = False) -> list[dict]:
        if admin:
            rows = self.db.execute("SELECT * FROM definitions ORDER BY created DESC")
        else:
            rows = self.db.execute("SELECT * FROM definitions WHERE user = ? ORDER BY created DESC", (user,))
        return [dict(r) for r in rows]

    def due(self, now: float) -> list[dict]:
        rows = self.db.execute(
            "SELECT * FROM definitions WHERE active = 1 AND next_run IS NOT NULL AND next_run <= ? ORDER BY next_run",
            (now,),
        )
        return [dict(r) for r in rows]

    def link(self, def_id: str, job_id: str, at: float | None = None) -> None:
        self.db.execute(
            "INSERT OR REPLACE INTO definition_jobs (definition, job, at) VALUES (?, ?, ?)",
            (def_id, job_id, time.time() if at is None else at),
        )
        self.db.commit()

    def jobs_of(self, def_id: str) -> list[str]:
        rows = self.db.execute("SELECT job FROM definition_jobs WHERE definition = ? ORDER BY at", (def_id,))
        return [r[0] for r in rows]

    def definition_of(self, job_ids: list[str]) -> dict[str, str]:
        """job id -> definition id, for the given jobs that a definition submitted."""
        if not job_ids:
            return {}
        marks = ", ".join("?" for _ in job_ids)
        rows = self.db.execute(f"SELECT job, definition FROM definition_jobs WHERE job IN ({marks})", job_ids)
        return {r[0]: r[1] for r in rows}


def _iso(t: float | None) -> str | None:
    return datetime.fromtimestamp(t, UTC).isoformat().replace("+00:00", "Z") if t else None


def definition_doc(d: dict, jobs: list[str] | None = None) -> dict:
    """The API's view of a definition row (pure)."""
    request = json.loads(d["request"])
    return {
        "id": d["id"],
        "user": d["user"],
        "name": d["name"],
        "notebook": request.get("notebook"),
        "profile": request.get("profile"),
        "parameters": request.get("parameters") or {},
        "time_limit": request.get("time"),
        "schedule": d["schedule"],
        "timezone": d["timezone"],
        "active": bool(d["active"]),
        "created": _iso(d["created"]),
        "updated": _iso(d["updated"]),
        "next_run": _iso(d["next_run"]) if d["active"] else None,
        "last_run": _iso(d["last_run"]),
        "last_job": d["last_job"],
        "last_error": d["last_error"] or "",
        "jobs": list(jobs or []),
    }


def definition_changes(d: dict, body, now: float) -> dict:
    """The column values a PATCH ``body`` (``active``, ``schedule``, ``timezone``) makes of definition ``d``
    (pure), with its next due time from ``now``; a :class:`ScheduleError`/:class:`JobError` names the field."""
    if not isinstance(body, dict):
        raise JobError("the body must be a JSON object with active, schedule or timezone")
    unknown = sorted(set(body) - {"active", "schedule", "timezone"})
    if unknown:
        raise JobError(f"{unknown[0]}: cannot be changed; change active, schedule or timezone")
    values: dict = {}
    if "schedule" in body:
        values["schedule"] = check_schedule(body["schedule"])
    if "timezone" in body:
        values["timezone"] = check_timezone(body["timezone"])
    if "active" in body:
        if not isinstance(body["active"], bool):
            raise JobError("active: true or false")
        values["active"] = int(body["active"])
    if values:
        merged = {**d, **values}
        values["next_run"] = next_time(merged["schedule"], merged["timezone"], now)
    return values


async def run_due(
    store: DefinitionStore, submit: Callable[[dict], Awaitable[dict]], now: float | None = None
) -> list[str]:
    """Submit one run of every due definition (``submit(definition) -> job doc``); returns the job ids.

    The next time is computed from *now* before the submission, so a slow or failing submission never
    fires the same due time twice; a refused run is recorded in ``last_error``.
    """
    now = time.time() if now is None else now
    submitted = []
    for d in store.due(now):
        store.update(d["id"], next_run=next_time(d["schedule"], d["timezone"], now), last_run=now)
        try:
            doc = await submit(d)
        except Exception as e:  # tornado's HTTPError from the service's checks, or the engine's
            message = getattr(e, "log_message", None) or str(e)
            log.warning("scheduled run of definition %s of %s refused: %s", d["id"], d["user"], message)
            store.update(d["id"], last_error=message)
            continue
        store.link(d["id"], doc["id"], now)
        store.update(d["id"], last_job=doc["id"], last_error="")
        submitted.append(doc["id"])
        log.info("definition %s of %s (%s): submitted job %s", d["id"], d["user"], d["schedule"], doc["id"])
    return submitted
