"""The usage ledger: its own database, SQLite by default (in the workbench state folder), PostgreSQL by URL.

Tables (created if missing):

``quota_usage``
    One row per usage interval of one *item* (a notebook server, a Dask scheduler, a Dask
    worker): kind, user, group charged, profile, cores, memory, GPU type and count, ``start``
    and ``stop`` (NULL while it runs). Rows are only ever appended, and closed once (``stop``
    set from NULL). ``start_event`` / ``stop_event`` are the ids of the events that opened and
    closed the row (unique), and a partial unique index allows one open row per item.
``quota_events``
    Every processed event id (unique): replaying an event, or a whole log of them, changes
    nothing. Admissions that were allowed are recorded here too, with their row.
``quota_locks``
    One row per group, locked with ``SELECT ... FOR UPDATE`` by admissions on PostgreSQL so
    that checking the caps and recording the start are one atomic step. On SQLite every
    write transaction starts with ``BEGIN IMMEDIATE`` (a single writer), which does the same.

``reconcile(running_items, now)`` repairs what events cannot: after a crash of the hub, the
gateway or this service, rows of items that stopped meanwhile are closed at the last time a reconcile
saw them alive (their ``seen`` column, else their start), never charging a downtime, and items
running without an open row get one from their own start time, never overlapping the item's
previous rows. So usage is never lost, and never counted twice.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    DateTime,
    Float,
    Index,
    Integer,
    String,
    Text,
    case,
    func,
    literal,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column
from sqlalchemy.types import TypeDecorator

from workbench.names import QUOTA_DB_URL_ENV
from workbench.policy import Policy
from workbench.services.quota.accounting import (
    KINDS,
    UTC,
    BudgetStatus,
    Interval,
    Period,
    as_utc,
    budget_period,
    budget_statuses_for,
    cap_message,
    iso,
)
from workbench.services.quota.enforce import StopItem, stop_plan
from workbench.services.quota.engine import make_engine, normalize_db_url
from workbench.services.quota.migrate import migrate
from workbench.services.quota.models import AdmitRequest, Resources, RunningItem, UsageEvent

log = logging.getLogger("workbench.services.quota")

DB_URL_ENV = QUOTA_DB_URL_ENV

__all__ = [
    "DB_URL_ENV",
    "Ledger",
    "Decision",
    "EventResult",
    "ReconcileResult",
    "UsageRow",
    "default_db_url",
    "normalize_db_url",
    "resolve_resources",
]


# ---------------------------------------------------------------------------
# Schema
# ---------------------------------------------------------------------------


class UTCDateTime(TypeDecorator):
    """Aware UTC datetimes, stored naive (UTC) so SQLite and PostgreSQL compare them alike."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value, dialect):
        return None if value is None else as_utc(value).replace(tzinfo=None)

    def process_result_value(self, value, dialect):
        return None if value is None else value.replace(tzinfo=UTC)


class Base(DeclarativeBase):
    pass


_ID = BigInteger().with_variant(Integer, "sqlite")  # SQLite autoincrements INTEGER PRIMARY KEY only


class UsageRow(Base):
    __tablename__ = "quota_usage"

    id: Mapped[int] = mapped_column(_ID, primary_key=True, autoincrement=True)
    item: Mapped[str] = mapped_column(String(255))
    kind: Mapped[str] = mapped_column(String(32))
    user: Mapped[str] = mapped_column("username", String(255))
    group: Mapped[str] = mapped_column("group_name", String(255))
    profile: Mapped[str | None] = mapped_column(String(255))
    cpu: Mapped[float] = mapped_column(Float)
    memory: Mapped[int] = mapped_column(BigInteger)
    gpu_type: Mapped[str | None] = mapped_column(String(63))
    gpu_count: Mapped[int] = mapped_column(Integer)
    start: Mapped[datetime] = mapped_column(UTCDateTime)
    stop: Mapped[datetime | None] = mapped_column(UTCDateTime)
    seen: Mapped[datetime | None] = mapped_column(UTCDateTime)  # last known alive (reconcile), while open
    start_event: Mapped[str] = mapped_column(String(255), unique=True)
    stop_event: Mapped[str | None] = mapped_column(String(255), unique=True)
    opened_by: Mapped[str] = mapped_column(String(16))  # admit | event | reconcile
    closed_by: Mapped[str | None] = mapped_column(String(16))

    __table_args__ = (
        CheckConstraint("kind IN ('server', 'dask-scheduler', 'dask-worker', 'job')", name="ck_quota_usage_kind"),
        CheckConstraint("stop IS NULL OR stop >= start", name="ck_quota_usage_stop_after_start"),
        CheckConstraint("cpu >= 0 AND memory >= 0 AND gpu_count >= 0", name="ck_quota_usage_resources"),
        # one open interval per item: a second start of a running item cannot add a row
        Index(
            "ux_quota_usage_open_item",
            "item",
            unique=True,
            sqlite_where=text("stop IS NULL"),
            postgresql_where=text("stop IS NULL"),
        ),
        Index("ix_quota_usage_group_start", "group_name", "start"),
        Index("ix_quota_usage_user_start", "username", "start"),
        Index("ix_quota_usage_item", "item"),
        Index(  # what runs now, per group: the caps
            "ix_quota_usage_open_group",
            "group_name",
            sqlite_where=text("stop IS NULL"),
            postgresql_where=text("stop IS NULL"),
        ),
    )

    def interval(self) -> Interval:
        return Interval(
            id=self.id,
            item=self.item,
            kind=self.kind,
            user=self.user,
            group=self.group,
            profile=self.profile,
            cpu=self.cpu,
            memory=self.memory,
            gpu_type=self.gpu_type,
            gpu_count=self.gpu_count,
            start=self.start,
            stop=self.stop,
        )


class EventRow(Base):
    __tablename__ = "quota_events"

    id: Mapped[str] = mapped_column(String(255), primary_key=True)
    type: Mapped[str] = mapped_column(String(16))  # start | stop | admit
    item: Mapped[str] = mapped_column(String(255))
    time: Mapped[datetime] = mapped_column(UTCDateTime)
    received: Mapped[datetime] = mapped_column(UTCDateTime)
    outcome: Mapped[str] = mapped_column(String(32))
    row_id: Mapped[int | None] = mapped_column(_ID)
    detail: Mapped[str | None] = mapped_column(Text)


class LockRow(Base):
    __tablename__ = "quota_locks"

    key: Mapped[str] = mapped_column(String(255), primary_key=True)


# ---------------------------------------------------------------------------
# Engines
# ---------------------------------------------------------------------------


def default_db_url(state_dir: str | os.PathLike) -> str:
    return f"sqlite:///{Path(state_dir).resolve() / 'quota.sqlite'}"


# ---------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class EventResult:
    id: str
    status: str  # recorded | duplicate | already-open | not-open
    row: int | None = None

    def to_json(self) -> dict:
        return {"id": self.id, "status": self.status, "row": self.row}


@dataclass(frozen=True)
class Decision:
    allowed: bool
    reason: str | None  # None | gpu-budget | cpu-budget | running-servers | running-gpus | unknown-group
    message: str
    row: int | None = None
    item: str = ""
    replayed: bool = False
    budgets: tuple[BudgetStatus, ...] = ()

    def to_json(self) -> dict:
        return {
            "allowed": self.allowed,
            "reason": self.reason,
            "message": self.message,
            "row": self.row,
            "item": self.item,
            "replayed": self.replayed,
            "budgets": [b.to_json() for b in self.budgets],
        }


@dataclass(frozen=True)
class ReconcileResult:
    opened: list[str] = field(default_factory=list)
    closed: list[str] = field(default_factory=list)
    running: int = 0

    def to_json(self) -> dict:
        return {"opened": self.opened, "closed": self.closed, "running": self.running}


@dataclass(frozen=True)
class _Res:
    profile: str | None
    cpu: float
    memory: int
    gpu_type: str | None
    gpu_count: int


def resolve_resources(policy: Policy | None, r: Resources) -> _Res:
    """Cores, memory and GPUs of a request: explicit values, else those of its policy profile (pure)."""
    prof = None
    if r.profile is not None and policy is not None:
        prof = policy.profiles.get(r.profile)
        if prof is None:
            raise ValueError(f"unknown profile {r.profile!r}; the policy defines: {', '.join(policy.profiles)}")
    gpu_type = r.gpu_type if r.gpu_type is not None else (prof.gpu.type if prof and prof.gpu else None)
    gpu_count = r.gpu_count if r.gpu_count is not None else (prof.gpu.count if prof and prof.gpu else 0)
    return _Res(
        profile=r.profile,
        cpu=r.cpu if r.cpu is not None else (prof.cpu if prof else 0.0),
        memory=r.memory if r.memory is not None else (prof.memory if prof else 0),
        gpu_type=gpu_type if gpu_count else None,
        gpu_count=gpu_count if gpu_type else 0,
    )


# ---------------------------------------------------------------------------
# The ledger
# ---------------------------------------------------------------------------


class Ledger:
    """The usage ledger of one database. Thread-safe: every method runs its own transaction.

    ``policy`` supplies budgets, caps and profiles (admissions need it); ``clock`` returns the
    current time (aware UTC) and is injected by tests. ``durability`` ("process" or "machine") says what a
    commit survives: see :mod:`workbench.services.quota.engine`.
    """

    def __init__(
        self,
        url: str,
        policy: Policy | None = None,
        clock: Callable[[], datetime] | None = None,
        pool_size: int = 8,
        create: bool = True,
        durability: str = "process",
    ):
        self.url = normalize_db_url(url)
        self.durability = durability
        self.engine = make_engine(self.url, pool_size, durability)  # see quota.engine: what a commit survives
        self.dialect = self.engine.dialect.name
        self._writer = self.engine.execution_options(quota_write=True)
        self.policy = policy
        self.clock = clock or (lambda: datetime.now(UTC))
        self._locks_made: set[str] = set()
        self._locks_guard = threading.Lock()
        self._sqlite_writer = threading.Lock() if self.dialect == "sqlite" else contextlib.nullcontext()
        if create:
            self.create_schema()

    def create_schema(self) -> None:
        Base.metadata.create_all(self.engine)
        migrate(self.engine, UsageRow.__table__)  # ledgers made by older versions: see quota.migrate

    def close(self) -> None:
        self.engine.dispose()

    def __repr__(self) -> str:
        return f"Ledger({make_url(self.url).render_as_string(hide_password=True)})"

    def _now(self, now: datetime | None) -> datetime:
        return as_utc(now) if now is not None else as_utc(self.clock())

    # -- transactions --------------------------------------------------------------

    def _write(self, fn, attempts: int = 5):
        """Run ``fn(session)`` in one write transaction, retrying on races and lock timeouts."""
        for attempt in range(attempts):
            try:
                # SQLite: one writer thread at a time in this process, so they queue on a lock instead of
                # polling SQLite's busy handler (which sleeps up to 100 ms between tries); other
                # processes still wait on BEGIN IMMEDIATE
                with self._sqlite_writer, Session(self._writer, expire_on_commit=False) as s, s.begin():
                    return fn(s)
            except IntegrityError:
                # a concurrent writer got there first (same event id, or an open row for the item):
                # the next attempt sees its committed row and answers "duplicate" / "already-open"
                if attempt == attempts - 1:
                    raise
            except OperationalError as e:
                if "locked" not in str(e).lower() and "deadlock" not in str(e).lower() or attempt == attempts - 1:
                    raise
                time.sleep(0.05 * (attempt + 1))
        raise AssertionError("unreachable")

    def _read(self, fn):
        with Session(self.engine, expire_on_commit=False) as s, s.begin():
            return fn(s)

    def _lock_group(self, s: Session, group: str) -> None:
        """Serialize admissions of one group (PostgreSQL: SELECT ... FOR UPDATE on its lock row)."""
        if self.dialect != "postgresql":
            return  # SQLite: BEGIN IMMEDIATE already holds the database's single write lock
        key = f"group:{group}"
        with self._locks_guard:
            known = key in self._locks_made
        if not known:
            from sqlalchemy.dialects.postgresql import insert as pg_insert

            with self.engine.begin() as c:
                c.execute(pg_insert(LockRow).values(key=key).on_conflict_do_nothing())
            with self._locks_guard:
                self._locks_made.add(key)
        s.execute(select(LockRow.key).where(LockRow.key == key).with_for_update())

    # -- events --------------------------------------------------------------------

    def record(self, ev: UsageEvent, now: datetime | None = None) -> EventResult:
        """Apply one start or stop event; an id seen before changes nothing."""
        return self.record_many([ev], now)[0]

    def record_many(
        self, events: Iterable[UsageEvent], now: datetime | None = None, changes: list | None = None
    ) -> list[EventResult]:
        """Apply events in order, in one transaction (all or nothing); duplicates are no-ops.

        ``changes``: a list that receives ``("open" | "close", Interval)`` for each row opened or
        closed, in order (the service's admission state follows the ledger with them).
        """
        events = list(events)
        now = self._now(now)
        resolved = [resolve_resources(self.policy, e) if e.type == "start" else None for e in events]

        def tx(s: Session) -> list[EventResult]:
            out: list = [] if changes is not None else None
            results = [self._apply(s, e, r, now, out) for e, r in zip(events, resolved, strict=True)]
            if changes is not None:
                changes[:] = out  # only the attempt that committed
            return results

        return self._write(tx)

    def _apply(self, s: Session, ev: UsageEvent, res: _Res | None, now: datetime, changes=None) -> EventResult:
        if s.get(EventRow, ev.id) is not None:
            return EventResult(ev.id, "duplicate", s.get(EventRow, ev.id).row_id)
        at = ev.at or now
        open_row = self._open_row(s, ev.item)
        if ev.type == "start":
            if open_row is not None:
                status, row_id = "already-open", open_row.id
            else:
                start = max(at, self._last_stop(s, ev.item) or at)  # never overlap the item's previous row
                row = UsageRow(
                    item=ev.item,
                    kind=ev.kind,
                    user=ev.user,
                    group=ev.group,
                    profile=res.profile,
                    cpu=res.cpu,
                    memory=res.memory,
                    gpu_type=res.gpu_type,
                    gpu_count=res.gpu_count,
                    start=start,
                    start_event=ev.id,
                    opened_by="event",
                )
                s.add(row)
                s.flush()
                status, row_id = "recorded", row.id
                if changes is not None:
                    changes.append(("open", row.interval()))
        else:
            if open_row is None:
                status, row_id = "not-open", None
            else:
                open_row.stop = max(at, open_row.start)
                open_row.stop_event = ev.id
                open_row.closed_by = "event"
                status, row_id = "recorded", open_row.id
                if changes is not None:
                    changes.append(("close", open_row.interval()))
        s.add(EventRow(id=ev.id, type=ev.type, item=ev.item, time=at, received=now, outcome=status, row_id=row_id))
        s.flush()
        return EventResult(ev.id, status, row_id)

    @staticmethod
    def _open_row(s: Session, item: str) -> UsageRow | None:
        return s.scalar(select(UsageRow).where(UsageRow.item == item, UsageRow.stop.is_(None)))

    @staticmethod
    def _last_stop(s: Session, item: str) -> datetime | None:
        value = s.scalar(select(func.max(UsageRow.stop)).where(UsageRow.item == item))
        if isinstance(value, str):  # SQLite returns aggregates of the stored text
            value = datetime.fromisoformat(value)
        return as_utc(value) if value is not None else None

    # -- reconcile -----------------------------------------------------------------

    def reconcile(
        self,
        running_items: Iterable[RunningItem],
        now: datetime | None = None,
        kinds: Iterable[str] = KINDS,
        grace: float = 30.0,
        changes: list | None = None,
    ) -> ReconcileResult:
        """Make the open rows of ``kinds`` match ``running_items``, the complete list of what runs at ``now``.

        Open rows of running items are marked seen alive at ``now`` (``seen``), unless the item is not
        ``confirmed`` (listed as running by a sender that has not seen it alive since it restarted: its row
        stays open, its ``seen`` unchanged, and none is opened for it). Open rows whose item is not
        running are closed at the last time the item was known alive: its last ``seen``, else its start
        (unless opened by an admission or an event less than ``grace`` seconds before ``now``: it may be
        newer than the sender's snapshot). So an item that died while the platform was down is not
        charged for the downtime. Running items without an open row get one, starting when the item
        started (if known, else ``now``) but never before the item's last row stopped. Reconciling twice
        changes nothing the second time. ``changes`` receives ``("open" | "close", Interval)`` per row.
        """
        now = self._now(now)
        kinds = set(kinds)
        unknown = kinds - set(KINDS)
        if unknown:
            raise ValueError(f"unknown kinds {sorted(unknown)}; expected some of {list(KINDS)}")
        items = {}
        for it in running_items:
            if it.kind not in kinds:
                raise ValueError(f"item {it.item!r} is a {it.kind}, not one of the reconciled kinds {sorted(kinds)}")
            items[it.item] = (it, resolve_resources(self.policy, it))

        def tx(s: Session) -> ReconcileResult:
            opened, closed = [], []
            open_rows = s.scalars(select(UsageRow).where(UsageRow.stop.is_(None), UsageRow.kind.in_(kinds))).all()
            open_items = {r.item for r in open_rows}
            cutoff = now - timedelta(seconds=grace)
            out: list = []
            for row in open_rows:
                # a row opened by an earlier reconcile was in an earlier snapshot: gone now means stopped;
                # others may be admissions or events newer than this snapshot, unless older than the grace
                if row.item not in items and (row.opened_by == "reconcile" or row.start <= cutoff):
                    row.stop = max(min(row.seen or row.start, now), row.start)  # last known alive
                    row.stop_event = f"reconcile-stop:{row.id}"
                    row.closed_by = "reconcile"
                    closed.append(row.item)
                    out.append(("close", row.interval()))
            # an unconfirmed item (the sender restarted and has not seen it alive since) keeps its row open but
            # is not marked seen: if it turns out dead, its row closes at the last time it was known alive
            alive = sorted(open_items & {n for n, (it, _) in items.items() if it.confirmed})
            for k in range(0, len(alive), 500):  # heartbeat: what a later reconcile closes stops here at the latest
                s.execute(
                    update(UsageRow)
                    .where(UsageRow.stop.is_(None), UsageRow.item.in_(alive[k : k + 500]))
                    .values(seen=now)
                    .execution_options(synchronize_session=False)
                )
            for name, (it, res) in items.items():
                if name in open_items or not it.confirmed:
                    continue
                start = min(it.started_at or now, now)
                last = self._last_stop(s, name)
                if last is not None and start < last:
                    start = last
                ev = f"reconcile-start:{name}:{iso(start)}"
                if s.scalar(select(UsageRow.id).where(UsageRow.start_event == ev)) is not None:
                    continue
                s.add(
                    UsageRow(
                        item=name,
                        kind=it.kind,
                        user=it.user,
                        group=it.group,
                        profile=res.profile,
                        cpu=res.cpu,
                        memory=res.memory,
                        gpu_type=res.gpu_type,
                        gpu_count=res.gpu_count,
                        start=start,
                        seen=now,
                        start_event=ev,
                        opened_by="reconcile",
                    )
                )
                opened.append(name)
            s.flush()
            if changes is not None:
                new_rows = s.scalars(select(UsageRow).where(UsageRow.stop.is_(None), UsageRow.item.in_(opened))).all()
                changes[:] = out + [("open", r.interval()) for r in new_rows]
            return ReconcileResult(opened=opened, closed=closed, running=len(items))

        result = self._write(tx)
        if result.opened or result.closed:
            log.info("reconcile %s: opened %s, closed %s", sorted(kinds), result.opened, result.closed)
        return result

    def mark_seen(self, items: Iterable[str], now: datetime | None = None) -> int:
        """Heartbeat: the open rows of ``items`` were known alive at ``now``; returns how many rows."""
        now, items, n = self._now(now), sorted(set(items)), 0

        def tx(s: Session) -> int:
            count = 0
            for k in range(0, len(items), 500):
                stmt = update(UsageRow).where(UsageRow.stop.is_(None), UsageRow.item.in_(items[k : k + 500]))
                count += s.execute(stmt.values(seen=now).execution_options(synchronize_session=False)).rowcount
            return count

        if items:
            n = self._write(tx)
        return n

    # -- admission -----------------------------------------------------------------

    def admit(self, user: str, group: str, request: AdmitRequest, now: datetime | None = None) -> Decision:
        """Check ``group``'s budgets and caps for ``request`` and, if allowed, record its start: one transaction.

        Budgets (the group's and the user's share, in the current period, counting running items up
        to now) refuse a start once used up: GPU budgets only for requests with GPUs. Caps refuse
        a start that would exceed the group's or the user's running servers or GPUs. An item that
        already has an open row is allowed again (a retried admission), without a second row.
        """
        now = self._now(now)
        if self.policy is None or group not in self.policy.groups:
            known = ", ".join(self.policy.groups) if self.policy else "(no policy loaded)"
            return Decision(
                False, "unknown-group", f"unknown group {group!r}; the policy defines: {known}", item=request.item
            )
        pgroup = self.policy.groups[group]
        res = resolve_resources(self.policy, request)
        event_id = request.id or f"admit:{uuid.uuid4().hex}"

        def tx(s: Session) -> Decision:
            self._lock_group(s, group)
            prior = s.get(EventRow, event_id)
            if prior is not None:
                return Decision(True, None, "admitted before (replayed admission)", prior.row_id, request.item, True)
            existing = self._open_row(s, request.item)
            if existing is not None:
                return Decision(
                    True,
                    None,
                    f"{request.item} is already running (row {existing.id})",
                    existing.id,
                    request.item,
                    True,
                )
            statuses = self._budget_statuses(s, pgroup.budget, group, user, now)
            for st in statuses:
                needed = (res.gpu_count > 0 or request.needs_gpu_budget) if st.resource == "gpu" else res.cpu > 0
                if needed and st.exhausted:
                    return Decision(
                        False, f"{st.resource}-budget", st.message(), item=request.item, budgets=tuple(statuses)
                    )
            refusal = self._cap_refusal(s, pgroup.caps, group, user, request.kind, res)
            if refusal is not None:
                return Decision(False, refusal[0], refusal[1], item=request.item, budgets=tuple(statuses))
            row = UsageRow(
                item=request.item,
                kind=request.kind,
                user=user,
                group=group,
                profile=res.profile,
                cpu=res.cpu,
                memory=res.memory,
                gpu_type=res.gpu_type,
                gpu_count=res.gpu_count,
                start=max(now, self._last_stop(s, request.item) or now),
                start_event=event_id,
                opened_by="admit",
            )
            s.add(row)
            s.flush()
            s.add(
                EventRow(
                    id=event_id,
                    type="admit",
                    item=request.item,
                    time=now,
                    received=now,
                    outcome="admitted",
                    row_id=row.id,
                )
            )
            s.flush()
            return Decision(True, None, "admitted", row.id, request.item, False, tuple(statuses))

        return self._write(tx)

    def _cap_refusal(self, s: Session, caps, group: str, user: str, kind: str, res: _Res) -> tuple[str, str] | None:
        if caps is None:
            return None
        q = select(UsageRow.user, UsageRow.kind, UsageRow.gpu_count).where(
            UsageRow.stop.is_(None), UsageRow.group == group
        )
        running = s.execute(q).all()
        servers = sum(1 for r in running if r.kind == "server")
        gpus = sum(r.gpu_count for r in running)
        my_servers = sum(1 for r in running if r.kind == "server" and r.user == user)
        my_gpus = sum(r.gpu_count for r in running if r.user == user)
        if kind == "server":
            if caps.running_servers is not None and servers + 1 > caps.running_servers:
                return "running-servers", cap_message("servers", "group", group, None, servers, caps.running_servers, 1)
            if caps.user_running_servers is not None and my_servers + 1 > caps.user_running_servers:
                return "running-servers", cap_message(
                    "servers", "user", group, user, my_servers, caps.user_running_servers, 1
                )
        if res.gpu_count:
            if caps.running_gpus is not None and gpus + res.gpu_count > caps.running_gpus:
                return "running-gpus", cap_message("gpus", "group", group, None, gpus, caps.running_gpus, res.gpu_count)
            if caps.user_running_gpus is not None and my_gpus + res.gpu_count > caps.user_running_gpus:
                return "running-gpus", cap_message(
                    "gpus", "user", group, user, my_gpus, caps.user_running_gpus, res.gpu_count
                )
        return None

    # -- queries -------------------------------------------------------------------

    @staticmethod
    def _overlapping(
        s: Session, period: Period, now: datetime, group: str | None = None, user: str | None = None
    ) -> list[Interval]:
        q = select(UsageRow).where(
            or_(UsageRow.stop.is_(None), UsageRow.stop > period.start),
            UsageRow.start <= now,
        )
        if period.end is not None:
            q = q.where(UsageRow.start < period.end)
        if group is not None:
            q = q.where(UsageRow.group == group)
        if user is not None:
            q = q.where(UsageRow.user == user)
        return [r.interval() for r in s.scalars(q.order_by(UsageRow.id))]

    def rows(
        self,
        period: Period | None = None,
        now: datetime | None = None,
        group: str | None = None,
        user: str | None = None,
    ) -> list[Interval]:
        """Rows overlapping ``period`` (all rows when None), oldest first."""
        now = self._now(now)
        if period is None:
            period = Period("total", "total", datetime(1970, 1, 1, tzinfo=UTC), None)
        return self._read(lambda s: self._overlapping(s, period, now, group, user))

    def open_rows(self, group: str | None = None, user: str | None = None) -> list[Interval]:
        def q(s):
            stmt = select(UsageRow).where(UsageRow.stop.is_(None))
            if group is not None:
                stmt = stmt.where(UsageRow.group == group)
            if user is not None:
                stmt = stmt.where(UsageRow.user == user)
            return [r.interval() for r in s.scalars(stmt.order_by(UsageRow.id))]

        return self._read(q)

    def budgets(self, group: str, user: str | None = None, now: datetime | None = None) -> list[BudgetStatus]:
        """Budget statuses of ``group`` (and of ``user``'s share) in the current period."""
        now = self._now(now)
        pgroup = self.policy.groups.get(group) if self.policy else None
        if pgroup is None or pgroup.budget is None:
            return []
        return self._read(lambda s: self._budget_statuses(s, pgroup.budget, group, user, now))

    def stop_plan(self, now: datetime | None = None, group: str | None = None) -> list[StopItem]:
        """Running items that draw on a spent budget (of ``group``, or of every group), with their deadlines."""
        now = self._now(now)

        def q(s: Session) -> list[StopItem]:
            stmt = select(UsageRow).where(UsageRow.stop.is_(None))
            if group is not None:
                stmt = stmt.where(UsageRow.group == group)
            rows = [r.interval() for r in s.scalars(stmt.order_by(UsageRow.id))]
            plan: list[StopItem] = []
            for g in sorted({r.group for r in rows}):
                pg = self.policy.groups.get(g) if self.policy else None
                if pg is None or pg.budget is None:
                    continue
                statuses = self._budget_statuses(s, pg.budget, g, None, now)
                if pg.budget.per_user is not None:
                    for u in sorted({r.user for r in rows if r.group == g}):
                        statuses += [st for st in self._budget_statuses(s, pg.budget, g, u, now) if st.scope == "user"]
                plan += stop_plan(statuses, [r for r in rows if r.group == g], pg.budget.grace, now)
            return sorted(plan, key=lambda p: (p.deadline, p.item))

        return self._read(q)

    def _budget_statuses(self, s: Session, budget, group: str, user: str | None, now: datetime) -> list[BudgetStatus]:
        if budget is None:
            return []
        period = budget_period(budget.period, now, budget.term_starts)
        g_gpu, g_cpu, u_gpu, u_cpu = self._usage_sums(s, period, now, group, user)
        return budget_statuses_for(budget, group, period, g_gpu / 3600, g_cpu / 3600, user, u_gpu / 3600, u_cpu / 3600)

    def _seconds(self, hi, lo):
        """SQL: seconds from ``lo`` to ``hi`` (SQLite: rounded to the millisecond; PostgreSQL: exact)."""
        if self.dialect == "sqlite":
            return func.round((func.julianday(hi) - func.julianday(lo)) * 86400.0, 3)
        return func.extract("epoch", hi - lo)

    def _usage_sums(
        self, s: Session, period: Period, now: datetime, group: str, user: str | None
    ) -> tuple[float, float, float, float]:
        """(GPU-seconds, CPU-seconds) of ``group``, then of ``user`` in it, inside ``period`` up to ``now``.

        Summed by the database (the same clipping as :func:`accounting.usage_in_period`), so an
        admission does not load a month of rows while it holds the group's lock.
        """
        cap = min(now, period.end) if period.end is not None else now
        if cap <= period.start:
            return 0.0, 0.0, 0.0, 0.0
        ps, pe = literal(period.start, UTCDateTime()), literal(cap, UTCDateTime())
        lo = case((UsageRow.start > ps, UsageRow.start), else_=ps)
        hi = case((or_(UsageRow.stop.is_(None), UsageRow.stop > pe), pe), else_=UsageRow.stop)
        sec = self._seconds(hi, lo)
        mine = UsageRow.user == (user or "")
        q = select(
            func.coalesce(func.sum(sec * UsageRow.gpu_count), 0),
            func.coalesce(func.sum(sec * UsageRow.cpu), 0),
            func.coalesce(func.sum(case((mine, sec * UsageRow.gpu_count), else_=0)), 0),
            func.coalesce(func.sum(case((mine, sec * UsageRow.cpu), else_=0)), 0),
        ).where(
            UsageRow.group == group,
            UsageRow.start < pe,
            or_(UsageRow.stop.is_(None), UsageRow.stop > ps),
        )
        return tuple(float(v) for v in s.execute(q).one())  # type: ignore[return-value]

    def closed_totals(self) -> list[tuple[str, str, str | None, float, float]]:
        """(group, kind, gpu_type, gpu_seconds, cpu_seconds) of all closed rows, summed in the database."""
        if self.dialect == "sqlite":
            seconds = (func.julianday(UsageRow.stop) - func.julianday(UsageRow.start)) * 86400.0
        else:
            seconds = func.extract("epoch", UsageRow.stop - UsageRow.start)
        q = (
            select(
                UsageRow.group,
                UsageRow.kind,
                UsageRow.gpu_type,
                func.coalesce(func.sum(seconds * UsageRow.gpu_count), 0.0),
                func.coalesce(func.sum(seconds * UsageRow.cpu), 0.0),
            )
            .where(UsageRow.stop.is_not(None))
            .group_by(UsageRow.group, UsageRow.kind, UsageRow.gpu_type)
        )
        return self._read(lambda s: [(g, k, t, float(gs), float(cs)) for g, k, t, gs, cs in s.execute(q)])

    def counts(self) -> dict[str, int]:
        def q(s):
            return {
                "rows": s.scalar(select(func.count()).select_from(UsageRow)),
                "open": s.scalar(select(func.count()).select_from(UsageRow).where(UsageRow.stop.is_(None))),
                "events": s.scalar(select(func.count()).select_from(EventRow)),
            }

        return self._read(q)
