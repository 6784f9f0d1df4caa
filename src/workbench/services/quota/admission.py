"""Admission in milliseconds: decisions against in-memory state, admitted starts written by a group committer.

The quota service owns one :class:`Admitter`. It holds what an admission needs, in memory, for every group:

- the open rows (item, user, kind, cores, GPUs, start): the running servers and GPUs of the caps, per
  group and per user;
- the CPU- and GPU-seconds of the rows closed in the group's current budget period (per group and
  per user), and running sums of the open rows (rate and rate x start), so a budget's use at ``now`` is
  ``closed + rate * now - sum(rate * start)``: O(1) per decision.

It is loaded from the ledger once (the first job of the committer) and then kept in step by every
write of the service, which all go through the committer in order: admission batches, event batches
(:meth:`Ledger.record_many`) and reconciles (:meth:`Ledger.reconcile`), each reporting the rows it opened
and closed. A decision runs on the event loop without I/O: budgets, then caps, exactly as
:meth:`Ledger.admit` decides; an allowed start is reserved in the state at once (the next decision counts
it) and queued. The committer writes every queued admission in one transaction (one fsync), then
resolves their answers: **an answer "allowed" implies a committed row**, so a crash loses nothing that
was answered. A reservation whose batch fails is released and its caller gets the error (503).

Only one process may write the ledger while a service runs this (the embedded workbench runs one quota
service; the Helm chart runs one replica): another writer's rows would not be in this state.
:meth:`Ledger.admit` stays the transactional path (correct with several writers, one transaction and one
fsync per admission) for tools and tests.

Budget periods roll over in the state: the first admission of a group after its period ended waits for
the group's closed rows in the new period to be summed by the database (a job of the committer, in order).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
import uuid
from collections import defaultdict, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy import case, func, literal, select

from workbench.policy import Policy
from workbench.services.quota.accounting import (
    Interval,
    Period,
    as_utc,
    budget_period,
    budget_statuses_for,
    cap_message,
)
from workbench.services.quota.batch_sql import write_batch
from workbench.services.quota.ledger import (
    Decision,
    Ledger,
    ReconcileResult,
    UsageRow,
    UTCDateTime,
    resolve_resources,
)
from workbench.services.quota.models import AdmitRequest, RunningItem, UsageEvent

log = logging.getLogger("workbench.services.quota")

__all__ = ["Admitter", "AdmissionState", "LedgerUnavailable"]

BATCH_MAX = 500  # admissions per transaction


class LedgerUnavailable(Exception):
    """The batch holding this admission could not be committed (nothing was admitted)."""


@dataclass
class _Open:
    """An open row (``row`` None while its admission is not committed yet)."""

    item: str
    kind: str
    user: str
    group: str
    cpu: float
    gpu_count: int
    start: float  # epoch seconds
    row: int | None = None
    pending: asyncio.Future | None = None  # its admission's answer, while in a batch


@dataclass
class _Sums:
    """Closed seconds in the period, and the open rows' rate and rate x effective start (GPU, CPU)."""

    closed_gpu: float = 0.0
    closed_cpu: float = 0.0
    rate_gpu: float = 0.0
    rate_cpu: float = 0.0
    rs_gpu: float = 0.0
    rs_cpu: float = 0.0

    def used(self, now: float) -> tuple[float, float]:
        return (
            self.closed_gpu + self.rate_gpu * now - self.rs_gpu,
            self.closed_cpu + self.rate_cpu * now - self.rs_cpu,
        )


@dataclass
class _Group:
    period: Period | None = None  # None: no budget (caps only)
    period_start: float = 0.0  # period.start as epoch seconds (computed once: read by every decision)
    sums: _Sums = field(default_factory=_Sums)
    users: dict[str, _Sums] = field(default_factory=lambda: defaultdict(_Sums))
    servers: int = 0
    gpus: int = 0
    user_servers: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    user_gpus: dict[str, int] = field(default_factory=lambda: defaultdict(int))


class AdmissionState:
    """Open rows and budget sums of every group (pure, no I/O): the part of the ledger admissions read."""

    def __init__(self, policy: Policy):
        self.policy = policy
        self.open: dict[str, _Open] = {}
        self.groups: dict[str, _Group] = defaultdict(_Group)

    # -- keeping in step -----------------------------------------------------------------

    def _eff_start(self, g: _Group, start: float) -> float:
        return max(start, g.period_start) if g.period is not None else start

    def _account(self, o: _Open, sign: int) -> None:
        g = self.groups[o.group]
        g.gpus += sign * o.gpu_count
        g.user_gpus[o.user] += sign * o.gpu_count
        if o.kind == "server":
            g.servers += sign
            g.user_servers[o.user] += sign
        if g.period is not None:
            s0 = self._eff_start(g, o.start)
            for sums in (g.sums, g.users[o.user]):
                sums.rate_gpu += sign * o.gpu_count
                sums.rate_cpu += sign * o.cpu
                sums.rs_gpu += sign * o.gpu_count * s0
                sums.rs_cpu += sign * o.cpu * s0

    def add(self, o: _Open) -> None:
        old = self.open.get(o.item)
        if old is not None:
            self._account(old, -1)
        self.open[o.item] = o
        self._account(o, +1)

    def discard(self, o: _Open) -> None:
        """Drop ``o`` if it is still the open row of its item (a released reservation)."""
        if self.open.get(o.item) is o:
            del self.open[o.item]
            self._account(o, -1)

    def apply(self, change: str, row: Interval) -> None:
        """Follow one row the ledger opened or closed (``changes`` of record_many / reconcile)."""
        if change == "open":
            self.add(
                _Open(row.item, row.kind, row.user, row.group, row.cpu, row.gpu_count, row.start.timestamp(), row.id)
            )
            return
        o = self.open.get(row.item)
        if o is None or o.row != row.id:  # not that row (a reservation has no row yet)
            return
        del self.open[row.item]
        self._account(o, -1)
        g = self.groups[o.group]
        if g.period is not None and row.stop is not None:
            hi = row.stop if g.period.end is None else min(row.stop, g.period.end)
            seconds = max(0.0, hi.timestamp() - self._eff_start(g, o.start))
            for sums in (g.sums, g.users[o.user]):
                sums.closed_gpu += seconds * o.gpu_count
                sums.closed_cpu += seconds * o.cpu

    def set_period(self, group: str, period: Period | None, closed: dict[str, tuple[float, float]]) -> None:
        """The group's budget period and the seconds its closed rows used in it, per user (``closed``)."""
        g = self.groups[group]
        mine = [o for o in self.open.values() if o.group == group]
        for o in mine:
            self._account(o, -1)
        g.period = period
        g.period_start = period.start.timestamp() if period is not None else 0.0
        g.sums = _Sums()
        g.users = defaultdict(_Sums)
        for user, (gpu_s, cpu_s) in closed.items():
            g.users[user].closed_gpu, g.users[user].closed_cpu = gpu_s, cpu_s
            g.sums.closed_gpu += gpu_s
            g.sums.closed_cpu += cpu_s
        for o in mine:
            self._account(o, +1)

    def stale(self, group: str, now: datetime) -> bool:
        """Whether ``group``'s budget period is not the one containing ``now`` (then reload it first)."""
        pg = self.policy.groups.get(group)
        if pg is None or pg.budget is None:
            return False
        p = self.groups[group].period if group in self.groups else None
        return p is None or now < p.start or (p.end is not None and now >= p.end)

    # -- deciding ------------------------------------------------------------------------

    def decide(self, user: str, group: str, request: AdmitRequest, res, now: datetime) -> Decision | None:
        """The refusal of ``request`` by ``group``'s budgets or caps, else None (allowed). No I/O."""
        pg = self.policy.groups[group]
        g = self.groups[group]
        statuses: list = []
        if pg.budget is not None:
            t = now.timestamp()
            gg, gc = g.sums.used(t)
            ug, uc = g.users[user].used(t) if user in g.users else (0.0, 0.0)
            statuses = budget_statuses_for(pg.budget, group, g.period, gg / 3600, gc / 3600, user, ug / 3600, uc / 3600)
            for st in statuses:
                needed = (res.gpu_count > 0 or request.needs_gpu_budget) if st.resource == "gpu" else res.cpu > 0
                if needed and st.exhausted:
                    return Decision(
                        False, f"{st.resource}-budget", st.message(), item=request.item, budgets=tuple(statuses)
                    )
        refusal = _cap_refusal(pg.caps, g, group, user, request.kind, res.gpu_count)
        if refusal is not None:
            return Decision(False, refusal[0], refusal[1], item=request.item, budgets=tuple(statuses))
        return Decision(True, None, "admitted", None, request.item, False, tuple(statuses))


def _cap_refusal(caps, g: _Group, group: str, user: str, kind: str, gpu_count: int) -> tuple[str, str] | None:
    if caps is None:
        return None
    if kind == "server":
        if caps.running_servers is not None and g.servers + 1 > caps.running_servers:
            return "running-servers", cap_message("servers", "group", group, None, g.servers, caps.running_servers, 1)
        mine = g.user_servers.get(user, 0)
        if caps.user_running_servers is not None and mine + 1 > caps.user_running_servers:
            return "running-servers", cap_message("servers", "user", group, user, mine, caps.user_running_servers, 1)
    if gpu_count:
        if caps.running_gpus is not None and g.gpus + gpu_count > caps.running_gpus:
            return "running-gpus", cap_message("gpus", "group", group, None, g.gpus, caps.running_gpus, gpu_count)
        mine = g.user_gpus.get(user, 0)
        if caps.user_running_gpus is not None and mine + gpu_count > caps.user_running_gpus:
            return "running-gpus", cap_message("gpus", "user", group, user, mine, caps.user_running_gpus, gpu_count)
    return None


# ---------------------------------------------------------------------------
# Database side (runs on the committer's thread)
# ---------------------------------------------------------------------------


@dataclass
class _Pending:
    event_id: str
    user: str
    group: str
    request: AdmitRequest
    res: object
    now: datetime
    open: _Open
    future: asyncio.Future


def _closed_seconds(ledger: Ledger, s, group: str, period: Period) -> dict[str, tuple[float, float]]:
    """Per user: (GPU-seconds, CPU-seconds) of ``group``'s closed rows inside ``period`` (summed by the database)."""
    ps = literal(period.start, UTCDateTime())
    lo = case((UsageRow.start > ps, UsageRow.start), else_=ps)
    hi = UsageRow.stop
    if period.end is not None:
        pe = literal(period.end, UTCDateTime())
        hi = case((UsageRow.stop > pe, pe), else_=UsageRow.stop)
    sec = ledger._seconds(hi, lo)
    q = select(UsageRow.user, func.sum(sec * UsageRow.gpu_count), func.sum(sec * UsageRow.cpu)).where(
        UsageRow.group == group, UsageRow.stop.is_not(None), UsageRow.stop > ps
    )
    if period.end is not None:
        q = q.where(UsageRow.start < literal(period.end, UTCDateTime()))
    return {u: (max(0.0, float(g or 0)), max(0.0, float(c or 0))) for u, g, c in s.execute(q.group_by(UsageRow.user))}


def _load(ledger: Ledger, now: datetime) -> tuple[list[Interval], dict]:
    def q(s):
        rows = [r.interval() for r in s.scalars(select(UsageRow).where(UsageRow.stop.is_(None)))]
        periods = {}
        for name, pg in ledger.policy.groups.items():
            if pg.budget is not None:
                p = budget_period(pg.budget.period, now, pg.budget.term_starts)
                periods[name] = (p, _closed_seconds(ledger, s, name, p))
        return rows, periods

    return ledger._read(q)


def _reload_period(ledger: Ledger, group: str, now: datetime):
    budget = ledger.policy.groups[group].budget
    p = budget_period(budget.period, now, budget.term_starts)
    return p, ledger._read(lambda s: _closed_seconds(ledger, s, group, p))


def _commit_batch(ledger: Ledger, batch: list[_Pending]) -> list[tuple[str, int | None, datetime | None]]:
    """Record ``batch`` in one transaction; per entry ("admitted", row, start) | ("replayed", row) | ("running", row).

    The statements are the driver's own (``batch_sql``): four per batch whatever its size, no per-row compilation."""
    return ledger._write(lambda s: write_batch(s.connection(), batch))


# ---------------------------------------------------------------------------
# The admitter (event loop side)
# ---------------------------------------------------------------------------


class Admitter:
    """Admissions, events and reconciles of one quota service: decided in memory, written in order by one thread.

    Every method is a coroutine of the service's event loop. ``ledger`` is the only writer's ledger.
    """

    def __init__(self, ledger: Ledger):
        self.ledger = ledger
        self.state = AdmissionState(ledger.policy)
        self.thread = ThreadPoolExecutor(1, thread_name_prefix="quota-commit")
        self._jobs: deque = deque()  # ("admit", [_Pending]) | ("call", fn, apply, future)
        self._worker: asyncio.Task | None = None
        self._loaded: asyncio.Future | None = None
        self._reloads: dict[str, asyncio.Future] = {}
        self.batches = 0  # transactions of admissions (for the benchmark and the tests)
        self.admitted = 0
        self.timeline: deque = deque(maxlen=64)  # (commit start, commit end, size) per batch, perf_counter s
        self.decided = 0.0  # perf_counter s of the last allowed decision (the benchmark's timeline)
        # event ids of admissions that come without one: unique per service process, no urandom read each
        self._ids = itertools.count()
        self._id_prefix = f"admit:{uuid.uuid4().hex[:16]}-"

    def close(self) -> None:
        self.thread.shutdown(wait=True)

    # -- the committer ------------------------------------------------------------------

    def _kick(self) -> None:
        if self._worker is None or self._worker.done():
            self._worker = asyncio.get_running_loop().create_task(self._work())

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while self._jobs:
            job = self._jobs.popleft()
            if job[0] == "admit":
                batch = job[1]
                try:
                    began = time.perf_counter()
                    outcomes = await loop.run_in_executor(self.thread, _commit_batch, self.ledger, batch)
                    self.timeline.append((began, time.perf_counter(), len(batch)))
                except Exception as e:  # noqa: BLE001 - every caller of the batch gets the error
                    log.error("could not commit %d admissions: %s", len(batch), e)
                    for p in batch:
                        self.state.discard(p.open)
                        if not p.future.done():
                            p.future.set_exception(LedgerUnavailable(f"the ledger could not record the start: {e}"))
                    continue
                self.batches += 1
                for p, (kind, row, start) in zip(batch, outcomes, strict=True):
                    if kind == "admitted":
                        self.admitted += 1
                        opened = start.timestamp()  # later than the reservation's if the item stopped after it
                        if opened != p.open.start and self.state.open.get(p.open.item) is p.open:
                            self.state.discard(p.open)
                            p.open.start = opened
                            self.state.add(p.open)
                        p.open.row = row
                    else:
                        self.state.discard(p.open)
                    if not p.future.done():
                        p.future.set_result((kind, row))
            else:
                _, fn, apply, future = job
                try:
                    result = await loop.run_in_executor(self.thread, fn)
                except Exception as e:  # noqa: BLE001
                    if not future.done():
                        future.set_exception(e)
                    continue
                if apply is not None:
                    apply(result)
                if not future.done():
                    future.set_result(result)

    def _call(self, fn, apply=None) -> asyncio.Future:
        future = asyncio.get_running_loop().create_future()
        self._jobs.append(("call", fn, apply, future))
        self._kick()
        return future

    async def _ensure_loaded(self) -> None:
        if self._loaded is None:
            now = as_utc(self.ledger.clock())

            def apply(result):
                rows, periods = result
                for r in rows:
                    self.state.apply("open", r)
                for name, (period, closed) in periods.items():
                    self.state.set_period(name, period, closed)
                log.info("admission state: %d open rows, %d budget periods", len(rows), len(periods))

            self._loaded = self._call(lambda: _load(self.ledger, now), apply)
        await asyncio.shield(self._loaded)

    def _follow(self, changes: list):
        def apply(_result):
            if self._loaded is not None and self._loaded.done():
                for change, row in changes:
                    self.state.apply(change, row)

        return apply

    # -- the API -------------------------------------------------------------------------

    async def record_many(self, events: list[UsageEvent]):
        changes: list = []
        return await self._call(lambda: self.ledger.record_many(events, changes=changes), self._follow(changes))

    async def reconcile(self, items: list[RunningItem], now: datetime, kinds, grace: float) -> ReconcileResult:
        changes: list = []
        return await self._call(
            lambda: self.ledger.reconcile(items, now, kinds=kinds, grace=grace, changes=changes),
            self._follow(changes),
        )

    async def _ensure_period(self, group: str, now: datetime) -> None:
        while self.state.stale(group, now):
            if group not in self._reloads or self._reloads[group].done():

                def apply(result, group=group):
                    self.state.set_period(group, *result)

                self._reloads[group] = self._call(lambda: _reload_period(self.ledger, group, now), apply)
            await asyncio.shield(self._reloads[group])

    async def admit(self, user: str, group: str, request: AdmitRequest, now: datetime | None = None) -> Decision:
        """Decide ``request`` in memory; an allowed start answers once its batch is committed."""
        policy = self.ledger.policy
        if policy is None or group not in policy.groups:
            known = ", ".join(policy.groups) if policy else "(no policy loaded)"
            return Decision(
                False, "unknown-group", f"unknown group {group!r}; the policy defines: {known}", item=request.item
            )
        res = resolve_resources(policy, request)  # ValueError: unknown profile (400)
        await self._ensure_loaded()
        now = as_utc(now or self.ledger.clock())
        await self._ensure_period(group, now)
        existing = self.state.open.get(request.item)
        if existing is not None:
            return await self._running(existing, user, group, request)
        decision = self.state.decide(user, group, request, res, now)
        if not decision.allowed:
            return decision
        o = _Open(request.item, request.kind, user, group, res.cpu, res.gpu_count, now.timestamp())
        self.state.add(o)
        pending = _Pending(
            request.id or f"{self._id_prefix}{next(self._ids)}",
            user,
            group,
            request,
            res,
            now,
            o,
            asyncio.get_running_loop().create_future(),
        )
        o.pending = pending.future
        if self._jobs and self._jobs[-1][0] == "admit" and len(self._jobs[-1][1]) < BATCH_MAX:
            self._jobs[-1][1].append(pending)
        else:
            self._jobs.append(("admit", [pending]))
        self.decided = time.perf_counter()
        self._kick()
        kind, row = await pending.future
        if kind == "admitted":
            return Decision(True, None, "admitted", row, request.item, False, decision.budgets)
        if kind == "replayed":
            return Decision(True, None, "admitted before (replayed admission)", row, request.item, True)
        return Decision(True, None, f"{request.item} is already running (row {row})", row, request.item, True)

    async def _running(self, existing: _Open, user: str, group: str, request: AdmitRequest) -> Decision:
        """A retried admission of a running item: allowed again, without a second row (once that row is durable)."""
        if existing.row is None and existing.pending is not None:  # its admission is in a batch: wait for it
            try:
                await asyncio.shield(existing.pending)
            except LedgerUnavailable:
                pass
        if existing.row is None or self.state.open.get(existing.item) is not existing:
            return await self.admit(user, group, request)  # its batch failed or found another row
        row = existing.row
        return Decision(True, None, f"{request.item} is already running (row {row})", row, request.item, True)
