"""The quota service: a JupyterHub service (tornado) over the usage ledger.

``python -m workbench.services.quota`` runs it. As a hub-managed service it finds the hub, its own token,
its URL and prefix in the environment JupyterHub gives it (``JUPYTERHUB_API_URL``,
``JUPYTERHUB_API_TOKEN``, ``JUPYTERHUB_SERVICE_URL``, ``JUPYTERHUB_SERVICE_PREFIX``); the policy
comes from ``--config`` or the embedded workbench's ``$WORKBENCH_RUNTIME``; the ledger database
from ``--db-url``, ``$WORKBENCH_QUOTA_DB_URL``, else ``quota.sqlite`` in the state folder.

Every request is authenticated with :class:`jupyterhub.services.auth.HubAuth` (a hub token in
the ``Authorization`` header) and authorized by :mod:`workbench.services.quota.authz`. Admissions are
decided in memory and committed in groups by :class:`workbench.services.quota.admission.Admitter`, which
also writes events and reconciles (in order, on its own thread): this process must be the ledger's only
writer. Reads run in a thread pool, so the event loop keeps answering while a query runs.
Every ``--reconcile-every`` seconds (and at start) the service reconciles notebook servers
with the hub's list of active servers, so servers are accounted even with no events at all.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from functools import partial
from urllib.parse import quote

from jupyterhub.services.auth import HubAuth
from pydantic import ValidationError
from tornado import httpclient, web

from workbench.policy import Policy
from workbench.services.base import (
    HubClient,
    JsonHandler,
    add_common_args,
    every,
    log_request,
    serve_until_signal,
    service_setup,
)
from workbench.services.quota.accounting import as_utc, iso, parse_period
from workbench.services.quota.admission import Admitter, LedgerUnavailable
from workbench.services.quota.authz import (
    ACCESS_SCOPE,
    SERVICE_NAME,
    Forbidden,
    Viewer,
    can_read_members,
    check_group,
    user_scope,
)
from workbench.services.quota.enforce import StopItem, notifications
from workbench.services.quota.engine import DURABILITY
from workbench.services.quota.ledger import DB_URL_ENV, Ledger, default_db_url
from workbench.services.quota.metrics import QuotaMetrics
from workbench.services.quota.models import AdmitBody, EventBatch, ReconcileBody, validation_problems
from workbench.services.quota.openapi import openapi_document
from workbench.services.quota.views import group_usage_doc, overview_doc, server_items, user_usage_doc

log = logging.getLogger("workbench.services.quota")


class QuotaService:
    """State shared by the handlers: the ledger, the policy, HubAuth, the hub client, metrics."""

    def __init__(
        self,
        ledger: Ledger,
        policy: Policy,
        hub_auth: HubAuth | None,
        hub: HubClient | None,
        prefix: str = f"/services/{SERVICE_NAME}/",
        threads: int = 8,
        public_metrics: bool = False,
        reconcile_grace: float = 30.0,
    ):
        self.ledger = ledger
        self.policy = policy
        self.hub_auth = hub_auth
        self.hub = hub
        self.prefix = "/" + prefix.strip("/") + "/"
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="quota-db")
        self.metrics = QuotaMetrics(ledger)
        self.public_metrics = public_metrics
        self.reconcile_grace = reconcile_grace
        self._reconcile_lock = asyncio.Lock()
        self._stopping: dict[str, datetime] = {}
        self.admitter = Admitter(ledger)
        self.servers_alive: list[str] = []  # server items of the last reconcile with the hub

    def now(self) -> datetime:
        return self.ledger.clock()

    async def db(self, fn, *args, **kw):
        return await asyncio.get_running_loop().run_in_executor(self.pool, partial(fn, *args, **kw))

    async def reconcile_hub(self):
        """Reconcile notebook servers with the hub's active servers (one at a time)."""
        async with self._reconcile_lock:
            snapshot = self.now()
            users = await self.hub.active_users()
            items = server_items(self.policy, users)
            result = await self.admitter.reconcile(items, snapshot, kinds=("server",), grace=self.reconcile_grace)
            self.servers_alive = [it.item for it in items]
            return result

    async def last_heartbeat(self, timeout: float = 5.0) -> None:
        """At exit: the servers the last reconcile saw are still running now (the hub stops its services before
        the servers), so rows a lost stop event leaves open close at this time after a restart, not earlier."""
        if self.servers_alive:
            now = self.now()
            job = self.admitter._call(lambda: self.ledger.mark_seen(self.servers_alive, now))
            await asyncio.wait_for(asyncio.shield(job), timeout)

    async def enforce(self) -> list[StopItem]:
        """Stop the notebook servers whose spent budget's grace is over (through the hub's API).

        Dask schedulers and workers are stopped by the gateway, which asks ``GET api/enforcement``.
        Returns the servers it asked the hub to stop.
        """
        now = self.now()
        plan = await self.db(self.ledger.stop_plan, now)
        stopped = []
        for item in plan:
            if item.kind != "server" or not item.due(now) or item.item in self._stopping:
                continue
            user, _, server = item.item.removeprefix("server:").partition("/")
            path = f"/users/{quote(user, safe='')}/server" + (f"s/{quote(server, safe='')}" if server else "")
            log.warning("stopping %s: %s", item.item, item.message)
            try:
                await self.hub.request("DELETE", path)
            except httpclient.HTTPClientError as e:
                if e.code not in (400, 404):  # 400: already stopped; 404: no such server
                    log.error("could not stop %s: %s", item.item, e)
                    continue
            self._stopping[item.item] = now
            self.metrics.stops.labels(item.kind, item.reason).inc()
            stopped.append(item)
        # forget servers the hub has stopped (their rows are closed) so a later start is watched again
        running = {p.item for p in plan}
        for key in [k for k in self._stopping if k not in running]:
            del self._stopping[key]
        return stopped

    def make_app(self) -> web.Application:
        p = self.prefix
        handlers = [
            (rf"{p}api/health", HealthHandler),
            (rf"{p}api/openapi\.json", OpenAPIHandler),
            (rf"{p}api/events", EventsHandler),
            (rf"{p}api/admit", AdmitHandler),
            (rf"{p}api/reconcile", ReconcileHandler),
            (rf"{p}api/reconcile/hub", HubReconcileHandler),
            (rf"{p}api/enforcement", EnforcementHandler),
            (rf"{p}api/notifications", NotificationsHandler),
            (rf"{p}api/usage", OverviewHandler),
            (rf"{p}api/usage/users/([^/]+)", UserUsageHandler),
            (rf"{p}api/usage/groups/([^/]+)", GroupUsageHandler),
            (rf"{p}metrics", MetricsHandler),
        ]
        return web.Application(handlers, service=self, log_function=log_request, default_handler_class=NotFoundHandler)


class BaseHandler(JsonHandler):
    @property
    def svc(self) -> QuotaService:
        return self.settings["service"]

    def parse(self, model, data):
        try:
            return model.model_validate(data)
        except ValidationError as err:
            problems = validation_problems(err)
            e = web.HTTPError(400, "invalid request: " + "; ".join(problems))
            e.problems = problems
            raise e from None

    async def viewer(self) -> Viewer:
        """The token's owner as the hub knows it (401 without a token, 403 with an invalid one)."""
        model = await self.token_model(self.svc.hub_auth, self.svc.hub)
        return Viewer.from_model(model, model.get("groups") or [])

    async def reader(self) -> Viewer:
        v = await self.viewer()
        if not (v.reads_all or v.writes or ACCESS_SCOPE in v.scopes):
            raise web.HTTPError(403, f"this token lacks the scope {ACCESS_SCOPE}")
        return v

    async def writer(self, also_admin: bool = False) -> Viewer:
        v = await self.viewer()
        if not (v.writes or (also_admin and v.admin)):
            raise web.HTTPError(
                403,
                f"{v.name} may not write to the quota ledger (needs a service token "
                "with the scope custom:workbench-quota:write)",
            )
        return v

    def period(self, default: str = "month", term_starts: tuple[str, ...] = ("02-01", "09-01")):
        try:
            return parse_period(self.get_argument("period", "current"), self.svc.now(), default, term_starts)  # type: ignore[arg-type]
        except ValueError as e:
            raise web.HTTPError(400, str(e)) from None


class NotFoundHandler(BaseHandler):
    def prepare(self):
        raise web.HTTPError(404, f"no such endpoint; see {self.svc.prefix}api/openapi.json")


class HealthHandler(BaseHandler):
    async def get(self):
        async def check() -> dict:
            counts = await self.svc.db(self.svc.ledger.counts)
            return {"database": self.svc.ledger.dialect, **counts}

        await self.write_health(self.svc.hub_auth, check)


class OpenAPIHandler(BaseHandler):
    def get(self):
        self.write_json(openapi_document(self.svc.prefix))


class EventsHandler(BaseHandler):
    async def post(self):
        await self.writer()
        data = self.body_json()
        if isinstance(data, dict) and "events" not in data:
            data = {"events": [data]}
        batch = self.parse(EventBatch, data)
        try:
            results = await self.svc.admitter.record_many(batch.events)
        except ValueError as e:
            raise web.HTTPError(400, str(e)) from None
        for r in results:
            self.svc.metrics.events.labels(r.status).inc()
        self.write_json({"results": [r.to_json() for r in results]})


class AdmitHandler(BaseHandler):
    async def post(self):
        await self.writer()
        body = self.parse(AdmitBody, self.body_json())
        request = body.model_copy()
        try:
            decision = await self.svc.admitter.admit(body.user, body.group, request)
        except ValueError as e:
            raise web.HTTPError(400, str(e)) from None
        except LedgerUnavailable as e:
            raise web.HTTPError(503, str(e)) from None
        self.svc.metrics.admissions.labels("allowed" if decision.allowed else "refused", decision.reason or "").inc()
        self.write_json(decision.to_json(), 200 if decision.allowed else 403)


class ReconcileHandler(BaseHandler):
    async def post(self):
        await self.writer()
        body = self.parse(ReconcileBody, self.body_json())
        at = as_utc(body.time) if body.time else self.svc.now()
        try:
            result = await self.svc.admitter.reconcile(body.items, at, kinds=body.kinds, grace=self.svc.reconcile_grace)
        except ValueError as e:
            raise web.HTTPError(400, str(e)) from None
        self.write_json(result.to_json())


class HubReconcileHandler(BaseHandler):
    async def post(self):
        await self.writer(also_admin=True)
        try:
            result = await self.svc.reconcile_hub()
        except (httpclient.HTTPClientError, OSError) as e:
            raise web.HTTPError(502, f"the hub did not answer: {e}") from None
        self.write_json(result.to_json())


class EnforcementHandler(BaseHandler):
    """Running items that draw on spent budgets and when they stop (the gateway stops its clusters' ones)."""

    async def get(self):
        v = await self.viewer()
        if not (v.writes or v.reads_all):
            raise web.HTTPError(403, f"{v.name} may not read the enforcement plan (admins and the gateway may)")
        kinds = set(self.get_arguments("kind"))
        now = self.svc.now()
        plan = await self.svc.db(self.svc.ledger.stop_plan, now)
        self.write_json(
            {
                "as_of": iso(now),
                "stop": [p.to_json(now) for p in plan if not kinds or p.kind in kinds],
            }
        )


class NotificationsHandler(BaseHandler):
    """The calling user's budget warnings: 80%/95% (``budget.warn_at``), spent, and when running work stops."""

    async def get(self):
        v = await self.reader()
        if v.kind != "user":
            raise web.HTTPError(400, "notifications are per user: ask with a user's token (e.g. a notebook's)")
        policy, ledger, now = self.svc.policy, self.svc.ledger, self.svc.now()
        out = []
        for g in policy.groups_of(v.groups):
            budget = policy.groups[g].budget
            if budget is None:
                continue
            statuses = await self.svc.db(ledger.budgets, g, v.name, now)
            plan = await self.svc.db(ledger.stop_plan, now, g)
            mine = [p for p in plan if p.user == v.name]
            out += [n.to_json(now) for n in notifications(statuses, budget.warn_at, mine or plan, now)]
        self.write_json({"user": v.name, "as_of": iso(now), "notifications": out})


class OverviewHandler(BaseHandler):
    async def get(self):
        v = await self.reader()
        if not v.reads_all:
            raise web.HTTPError(403, f"{v.name} may not read every group's usage; ask for your own groups'")
        period, now = self.period(), self.svc.now()
        ledger, policy = self.svc.ledger, self.svc.policy
        rows = await self.svc.db(ledger.rows, period, now)
        budgets = {g: await self.svc.db(ledger.budgets, g, None, now) for g in policy.groups}
        self.write_json(overview_doc(policy, rows, period, now, budgets))


class UserUsageHandler(BaseHandler):
    async def get(self, user: str):
        v = await self.reader()
        policy = self.svc.policy
        limited: set[str] | None = None
        if not (v.reads_all or (v.kind == "user" and v.name == user)):
            target_groups = await self.svc.hub.user_groups(user) if self.svc.hub else None
            try:
                limited = user_scope(policy, v, user, target_groups or [])
            except Forbidden as e:
                raise web.HTTPError(403, str(e)) from None
        period, now = self.period(), self.svc.now()
        ledger = self.svc.ledger
        rows = await self.svc.db(ledger.rows, period, now, None, user)
        groups = sorted({r.group for r in rows} | (set(v.groups) if v.name == user else set()))
        budgets = []
        for g in groups:
            if g in policy.groups and (limited is None or g in limited):
                budgets += await self.svc.db(ledger.budgets, g, user, now)
        self.write_json(user_usage_doc(user, rows, period, now, budgets, limited))


class GroupUsageHandler(BaseHandler):
    async def get(self, group: str):
        v = await self.reader()
        policy = self.svc.policy
        try:
            check_group(policy, v, group)
        except Forbidden as e:
            raise web.HTTPError(403, str(e)) from None
        if group not in policy.groups:
            raise web.HTTPError(404, f"no group {group!r} in the policy")
        g = policy.groups[group]
        now = self.svc.now()
        # a group's "current" and "term" are its own budget period, with its own term_starts
        period = self.period(*((g.budget.period, tuple(g.budget.term_starts)) if g.budget else ("month",)))
        ledger = self.svc.ledger
        rows = await self.svc.db(ledger.rows, period, now, group)
        budgets = await self.svc.db(ledger.budgets, group, None, now)
        self.write_json(group_usage_doc(policy, group, rows, period, now, budgets, can_read_members(policy, v, group)))


class MetricsHandler(BaseHandler):
    async def get(self):
        if not self.svc.public_metrics:
            v = await self.viewer()
            if not v.reads_metrics:
                raise web.HTTPError(403, f"{v.name} may not read metrics (needs the scope read:metrics)")
        body = await self.svc.db(self.svc.metrics.render)
        self.set_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
        self.finish(body)


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m workbench.services.quota",
        description="The Workbench quota service (a JupyterHub service): usage ledger, budgets, caps, metrics.",
    )
    add_common_args(p)
    p.add_argument(
        "--db-url", help=f"ledger database URL (default: ${DB_URL_ENV}, else quota.sqlite in the state folder)"
    )
    p.add_argument("--state-dir", help="state folder for the default SQLite ledger (default: from $WORKBENCH_RUNTIME)")
    p.add_argument(
        "--reconcile-every",
        type=float,
        default=60.0,
        help="seconds between reconciles with the hub's active servers; 0: never (default: %(default)s)",
    )
    p.add_argument(
        "--reconcile-grace",
        type=float,
        default=30.0,
        help="rows younger than this many seconds are never closed by a reconcile (default: %(default)s)",
    )
    p.add_argument(
        "--enforce-every",
        type=float,
        default=30.0,
        help="seconds between checks for servers to stop because a budget is spent (after the "
        "policy's budget.grace); 0: never stop running servers (default: %(default)s)",
    )
    p.add_argument("--threads", type=int, default=8, help="database threads (default: %(default)s)")
    p.add_argument(
        "--durability",
        choices=DURABILITY,
        default="process",
        help="what an answered admission or recorded event survives: 'process' = a kill -9 of this service "
        "(SQLite synchronous=NORMAL, PostgreSQL synchronous_commit=off; a machine or PostgreSQL server crash may "
        "lose the last ~0.6 s, repaired by the next reconcile), 'machine' = also a machine crash (one fsync per "
        "commit) (default: %(default)s)",
    )
    p.add_argument("--public-metrics", action="store_true", help="serve /metrics without authentication")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup = service_setup(SERVICE_NAME, args, default_port=8013)
    if isinstance(setup, int):
        return setup
    db_url = args.db_url or os.environ.get(DB_URL_ENV) or default_db_url(args.state_dir or setup.state_dir)
    ledger = Ledger(db_url, setup.policy, pool_size=max(args.threads, 2), durability=args.durability)
    log.info(
        "ledger %r (durability: %s), policy %s (%d groups)",
        ledger,
        args.durability,
        setup.config,
        len(setup.policy.groups),
    )
    services: list[QuotaService] = []

    def build():
        hub_auth = HubAuth(api_url=setup.api_url, api_token=setup.token, cache_max_age=60, access_scopes={ACCESS_SCOPE})
        svc = QuotaService(
            ledger,
            setup.policy,
            hub_auth,
            HubClient(setup.api_url, setup.token),
            setup.prefix,
            threads=args.threads,
            public_metrics=args.public_metrics,
            reconcile_grace=args.reconcile_grace,
        )
        services.append(svc)

        async def background():
            rounds = []
            if args.reconcile_every > 0 and setup.token:  # servers are accounted even with no events at all
                rounds.append(every(args.reconcile_every, svc.reconcile_hub, "reconcile with the hub"))
            if args.enforce_every > 0 and setup.token:
                rounds.append(
                    every(args.enforce_every, svc.enforce, "enforcing spent budgets", first=args.enforce_every)
                )
            try:
                await asyncio.gather(*rounds)
            except asyncio.CancelledError:  # stopping: one last heartbeat (bounded), then exit
                try:
                    await svc.last_heartbeat()
                except Exception as e:  # noqa: BLE001
                    log.warning("last heartbeat failed: %s", e)
                raise

        return svc.make_app(), background

    try:
        serve_until_signal(setup, build)
    finally:
        for svc in services:
            svc.admitter.close()
            svc.pool.shutdown(wait=True)
        ledger.close()
    return 0
