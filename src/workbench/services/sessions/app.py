"""The sessions service: session limits, per-profile idle culling and idle-GPU culling, with notifications.

``python -m workbench.services.sessions.app`` runs it as the hub-managed service ``sessions`` (see
:func:`workbench.embedded.hub.services`); it replaces jupyterhub-idle-culler in the embedded mode. Every
``--interval`` seconds (the policy's ``culling.every``; sooner when a limit falls due earlier) it

1. lists the active servers through the hub's REST API (its own token: ``list:users``,
   ``read:users:name``, ``read:users:groups``, ``read:servers``, ``admin:server_state`` for the
   profile and GPU devices in the spawner state, ``delete:servers``);
2. samples the utilisation of the servers' GPUs (:mod:`workbench.gpu_utilisation`: NVML, or a JSON
   file for ``--fake-gpus`` and tests); servers whose GPUs are not on this machine (Slurm jobs) report
   their own (``POST /services/sessions/api/gpu-utilisation``, :mod:`workbench.services.sessions.report`);
3. asks :func:`workbench.services.sessions.rules.decide` what to do, warns users of session limits ahead and
   stops servers through the hub (the spawner then stops the user's Dask clusters too).

Users read their own notifications (warnings, and why a server was stopped) as JSON::

    GET /services/sessions/api/notifications   (Authorization: token <a hub token of the user>)
    {"notifications": [{"level": "warning", "source": "sessions", "message": "...",
                        "at": "2026-05-04T10:00:00Z", "server": ""}]}

The token must carry ``access:services!service=sessions`` (every policy group's members have it);
a user sees only their own notifications, which are kept in memory for ``--keep`` seconds.

What the checks have done, for tests and operators (hub admins only, 403 for anyone else)::

    GET /services/sessions/api/status
    {"checks": 42, "failed_checks": 0, "last_check": "2026-05-04T10:00:00Z", "last_error": null,
     "servers": {"gus/": {"profile": "gpu-watch", "started": "...", "first_checked": "...",
                          "last_checked": "...", "checks": 17, "gpu_utilisation": {"0": 90.0},
                          "gpu_idle_since": null, "last_action": null}}}

``servers`` lists the servers of the last check (``user/server``): when this run of the server was first and
last checked, how many checks looked at it, its GPUs' last samples, since when they are idle (``null``: busy
or no GPUs) and the last action taken on it (``warn`` or ``stop``). ``GET api/health`` with a valid token adds
the counters (``checks``, ``failed_checks``, ``last_check``).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from urllib.parse import quote

from jupyterhub.services.auth import HubAuth
from tornado import httpclient, web

from workbench.gpu_utilisation import GpuUtilisation, choose_source
from workbench.names import SESSIONS_ACCESS_SCOPE as ACCESS_SCOPE
from workbench.names import SESSIONS_SERVICE as SERVICE_NAME
from workbench.policy import Policy
from workbench.services.base import HubClient as BaseHubClient
from workbench.services.base import JsonHandler, add_common_args, serve_until_signal, service_setup
from workbench.services.sessions.report import REPORT_PATH, Reports, parse_report
from workbench.services.sessions.rules import (
    DEFAULT_GPU_IDLE_THRESHOLD,
    Action,
    Server,
    decide,
    iso,
    next_due,
    servers_of,
    update_gpu_idle,
)

log = logging.getLogger("workbench.services.sessions.app")


def utcnow() -> datetime:
    return datetime.now(UTC)


class HubClient(BaseHubClient):
    """The hub's REST API with this service's own token (``active_users`` as the quota service lists them)."""

    async def stop_server(self, user: str, server: str) -> None:
        """Ask the hub to stop a server (a server that is already gone is fine)."""
        path = f"/users/{quote(user, safe='')}/server" + (f"s/{quote(server, safe='')}" if server else "")
        try:
            await self.request("DELETE", path)
        except httpclient.HTTPClientError as e:
            if e.code not in (400, 404):  # 400: not running any more
                raise


class SessionsService:
    """What the service remembers between checks: warnings given, GPU idle stretches, notifications."""

    def __init__(
        self,
        policy: Policy,
        hub: HubClient,
        gpu: GpuUtilisation | None = None,
        threshold: float = DEFAULT_GPU_IDLE_THRESHOLD,
        clock: Callable[[], datetime] = utcnow,
        keep: float = 86400.0,
        max_per_user: int = 50,
        report_max_age: float = 120.0,
    ):
        self.policy = policy
        self.hub = hub
        self.gpu = gpu
        self.threshold = threshold
        self.clock = clock
        self.keep = timedelta(seconds=keep)
        self.max_per_user = max_per_user
        self.warned: set[tuple[str, int]] = set()
        self.gpu_idle_since: dict[str, datetime] = {}
        self.stopping: set[str] = set()
        self.servers: list[Server] = []
        self.notes: dict[str, list[dict]] = {}
        self.reports = Reports(max_age=report_max_age)  # GPU utilisation sent by servers themselves
        # what the checks have done (api/status, api/health): counters and the last check of each server
        self.checks = 0
        self.failed_checks = 0
        self.last_check: datetime | None = None
        self.last_error: str | None = None
        self.seen: dict[str, dict] = {}

    # -- notifications --------------------------------------------------------------

    def notify(self, user: str, note: dict) -> None:
        notes = self.notes.setdefault(user, [])
        notes.append(note)
        del notes[: -self.max_per_user]

    def notifications(self, user: str) -> list[dict]:
        """The user's notifications of the last ``keep`` seconds, oldest first."""
        cutoff = self.clock() - self.keep
        fresh = [
            n for n in self.notes.get(user, []) if datetime.fromisoformat(n["at"].replace("Z", "+00:00")) >= cutoff
        ]
        self.notes[user] = fresh
        return list(fresh)

    # -- one check ------------------------------------------------------------------

    async def sample_gpus(self, servers: list[Server]) -> dict[str, float]:
        devices = sorted({d for s in servers for d in s.gpu_devices})
        if not devices or self.gpu is None:
            return {}
        return await asyncio.to_thread(self.gpu.utilisation, devices)

    async def check(self) -> list[Action]:
        """Look at every active server once; warn and stop as :func:`decide` says."""
        users = await self.hub.active_users()
        now = self.clock()
        servers = servers_of(self.policy, users)
        samples = await self.sample_gpus(servers)
        servers, samples = self.reports.apply(servers, samples, now)
        self.gpu_idle_since = update_gpu_idle(self.gpu_idle_since, servers, samples, now, self.threshold)
        actions = decide(self.policy, servers, now, warned=self.warned, gpu_idle_since=self.gpu_idle_since)
        done = []
        for a in actions:
            if a.kind == "warn":
                self.warned.update((a.key, lead) for lead in a.covers)
                log.info("warned %s: %s", a.user, a.message)
            else:
                if a.key in self.stopping:
                    continue
                try:
                    await self.hub.stop_server(a.user, a.server)
                except Exception as e:  # the next check tries again
                    log.warning("could not stop the server %r of %s (%s): %s", a.server, a.user, a.reason, e)
                    continue
                self.stopping.add(a.key)
                log.info("stopped the server %r of %s (%s): %s", a.server, a.user, a.reason, a.message)
            self.notify(a.user, a.notification(now))
            done.append(a)
        live = {s.key for s in servers}  # forget servers that are gone
        self.warned = {w for w in self.warned if w[0] in live}
        self.stopping &= live
        self.servers = servers
        self.record(servers, samples, done, now)
        return done

    def record(self, servers: list[Server], samples: dict[str, float], done: list[Action], now: datetime) -> None:
        """Remember what this check saw and did, per server (``api/status``), and count it."""
        acted = {a.key: a.kind for a in done}
        seen = {}
        for s in servers:
            before = self.seen.get(s.key) or {"first_checked": iso(now), "checks": 0, "last_action": None}
            idle = self.gpu_idle_since.get(s.key)
            seen[s.key] = {
                "user": s.user,
                "server": s.name,
                "profile": s.profile,
                "started": iso(s.started),
                "first_checked": before["first_checked"],
                "last_checked": iso(now),
                "checks": before["checks"] + 1,
                "gpu_utilisation": {d: samples[d] for d in s.gpu_devices if d in samples},
                "gpu_idle_since": iso(idle) if idle else None,
                "last_action": acted.get(s.key, before["last_action"]),
            }
        self.seen = seen
        self.checks += 1
        self.last_check = now

    def counters(self) -> dict:
        """How many checks ran and failed, and when the last one ran."""
        return {
            "checks": self.checks,
            "failed_checks": self.failed_checks,
            "last_check": iso(self.last_check) if self.last_check else None,
            "last_error": self.last_error,
        }

    def status(self) -> dict:
        """:meth:`counters` and the servers of the last check, keyed ``user/server``."""
        servers = {f"{v['user']}/{v['server']}": v for v in self.seen.values()}
        return {**self.counters(), "servers": servers}

    def delay(self, interval: float) -> float:
        """Seconds until the next check: ``interval``, or sooner when a limit falls due earlier."""
        now = self.clock()
        due = next_due(self.policy, self.servers, now, warned=self.warned, gpu_idle_since=self.gpu_idle_since)
        if due is not None:
            interval = min(interval, (due - now).total_seconds() + 0.2)
        return max(interval, 0.5)

    async def run(self, interval: float) -> None:
        while True:
            try:
                await self.check()
            except Exception as e:  # the hub may be starting or restarting; the next check retries
                self.failed_checks += 1
                self.last_error = str(e)
                log.warning("check failed: %s", e)
            await asyncio.sleep(self.delay(interval))

    # -- HTTP -----------------------------------------------------------------------

    def make_app(self, hub_auth: HubAuth, prefix: str) -> web.Application:
        p = "/" + prefix.strip("/") + "/"
        settings = {"svc": self, "hub_auth": hub_auth}
        return web.Application(
            [
                (rf"{p}api/health", HealthHandler, settings),
                (rf"{p}api/status", StatusHandler, settings),
                (rf"{p}(?:api/notifications)?", NotificationsHandler, settings),
                (rf"{p}{REPORT_PATH}", GpuReportHandler, settings),
            ]
        )


class BaseHandler(JsonHandler):
    def initialize(self, svc: SessionsService, hub_auth: HubAuth):
        self.svc = svc
        self.hub_auth = hub_auth


class HealthHandler(BaseHandler):
    async def get(self):
        async def counters() -> dict:
            return self.svc.counters()

        await self.write_health(self.hub_auth, counters)


class StatusHandler(BaseHandler):
    """What the checks saw and did (hub admins only: it names every user with a server)."""

    async def get(self):
        model = await self.token_model(self.hub_auth)
        if not model.get("admin"):
            raise web.HTTPError(403, "the sessions status is for hub admins: use an admin's token")
        self.write_json(self.svc.status())


class NotificationsHandler(BaseHandler):
    async def get(self):
        model = await self.token_model(self.hub_auth)
        if model.get("kind", "user") != "user":
            raise web.HTTPError(403, "notifications are per user: use a token of the user")
        scopes = set(model.get("scopes") or ())
        if not scopes & {ACCESS_SCOPE, "access:services"}:
            raise web.HTTPError(403, f"this token lacks the scope {ACCESS_SCOPE}")
        self.write_json({"notifications": self.svc.notifications(model["name"])})


class GpuReportHandler(BaseHandler):
    """A server's own GPU utilisation (:mod:`workbench.services.sessions.report`), for its user's servers only."""

    async def post(self):
        model = await self.token_model(self.hub_auth)
        if model.get("kind", "user") != "user":
            raise web.HTTPError(403, "GPU reports come from a server: use its token ($JUPYTERHUB_API_TOKEN)")
        scopes = set(model.get("scopes") or ())
        if not scopes & {ACCESS_SCOPE, "access:services"}:
            raise web.HTTPError(403, f"this token lacks the scope {ACCESS_SCOPE}")
        try:
            report = parse_report(self.body_json())
        except ValueError as e:
            raise web.HTTPError(400, str(e)) from None
        user = model["name"]  # the token's user: a report never speaks for another user's server
        if self.svc.reports.add(user, report, self.svc.clock(), self.svc.threshold):
            idle = all(v < self.svc.threshold for v in report.utilisation.values())
            log.info("GPU report of %s's server %r: %s %s", user, report.server, "idle" if idle else "busy",
                     report.utilisation)  # fmt: skip
        self.write_json({"recorded": sorted(report.utilisation)})


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m workbench.services.sessions", description=__doc__.split("\n\n")[0])
    add_common_args(p)
    p.add_argument(
        "--interval", type=float, default=None, help="seconds between checks (default: the policy's culling.every)"
    )
    p.add_argument(
        "--gpu-idle-threshold",
        type=float,
        default=DEFAULT_GPU_IDLE_THRESHOLD,
        help="a GPU below this utilisation (percent) is idle (default: %(default)s)",
    )
    p.add_argument(
        "--gpu-utilisation-file",
        default=os.environ.get("WORKBENCH_GPU_UTILISATION_FILE"),
        help="read GPU utilisation from this JSON file {device: percent} instead of NVML "
        "(default: $WORKBENCH_GPU_UTILISATION_FILE; with --fake-gpus: "
        "<state>/fake-gpu-utilisation.json)",
    )
    p.add_argument("--keep", type=float, default=86400.0, help="seconds notifications are kept (default: %(default)s)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup = service_setup(SERVICE_NAME, args, default_port=8014)
    if isinstance(setup, int):
        return setup
    policy, runtime = setup.policy, setup.runtime
    interval = args.interval if args.interval is not None else float(policy.culling.every)
    gpu = choose_source(runtime.gpus if runtime else {}, setup.state_dir, args.gpu_utilisation_file)
    log.info(
        "sessions: checks every %gs, idle culling %s, GPU utilisation from %s",
        interval,
        "on" if policy.culling.enabled else "off",
        type(gpu).__name__ if gpu else "nowhere (no GPUs)",
    )
    if getattr(gpu, "path", None):
        log.info("GPU utilisation file: %s", gpu.path)

    def build():
        hub_auth = HubAuth(api_url=setup.api_url, api_token=setup.token, cache_max_age=60, access_scopes={ACCESS_SCOPE})
        svc = SessionsService(
            policy,
            HubClient(setup.api_url, setup.token),
            gpu,
            threshold=args.gpu_idle_threshold,
            keep=args.keep,
            report_max_age=max(3 * interval, 60.0),  # reporters send every culling.every (at least every 20 s)
        )
        return svc.make_app(hub_auth, setup.prefix), lambda: svc.run(interval)

    try:
        serve_until_signal(setup, build)
    finally:
        close = getattr(gpu, "close", None)
        if close:
            close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
