"""Notifications of the hub services in JupyterLab (part of the jupyter_server extension ``workbench.lab``).

Two hub services publish per-user notifications as JSON, each behind a JupyterHub token
(``Authorization: token ...``): the quota service (budget warnings, spent budgets and when running
work stops) and the sessions service (session limits, idle culling). A browser holds no such token,
so this extension asks them on the user's behalf, with the server's own ``$JUPYTERHUB_API_TOKEN``
(it carries ``access:services!service=quota`` and ``access:services!service=sessions``), and serves
the merged list to the browser's session::

    GET <base_url>workbench/notifications
    {"as_of": "2026-05-04T10:00:00Z",
     "notifications": [{"id": "quota:physics-lab:cpu:warning:", "level": "warning", "source": "quota",
                        "message": "...", "at": "...", ...}],          # most severe first
     "problems": [{"source": "sessions", "message": "not reachable: ..."}]}

A service that is absent, down, slow or answers nonsense is reported in ``problems``; the others'
notifications are still served. Answers are cached for a few seconds (``cache_seconds``) and the
services are asked with a short timeout (``timeout``), so a browser polling every minute costs little.

Each notification gets a stable ``id`` (:func:`notification_id`) so the JupyterLab extension
(``extensions/workbench-notifications``) shows it once: a quota notification is the same while its
group, resource, level and stop time are (its figures change as usage grows), a sessions one is an
event with its own time.

Installed with the ``workbench`` distribution: ``etc/jupyter/jupyter_server_config.d/workbench.json``
enables the extension, ``share/jupyter/labextensions/workbench-notifications`` is the prebuilt
JupyterLab extension (built from ``extensions/workbench-notifications`` by ``make lab-extension``).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from urllib.parse import urlsplit

from jupyter_server.base.handlers import APIHandler
from tornado import httpclient, web
from traitlets import Dict, Float, Unicode, default
from traitlets.config import LoggingConfigurable

from workbench.names import QUOTA_SERVICE, SESSIONS_SERVICE

#: severity order of the levels the services use; unknown levels count as "info"
LEVEL_RANK = {"critical": 0, "error": 0, "warning": 1, "info": 2}

#: the services asked, by default: name -> path below their service prefix
DEFAULT_SOURCES = {QUOTA_SERVICE: "api/notifications", SESSIONS_SERVICE: "api/notifications"}

#: the URL path of the endpoint, below the server's base_url
ENDPOINT = "workbench/notifications"


# ---------------------------------------------------------------------------
# pure: merging the services' answers


@dataclass(frozen=True)
class SourceAnswer:
    """What one service gave: its notifications, or a problem (absent, down, bad answer)."""

    source: str
    notifications: list[dict] = field(default_factory=list)
    problem: str | None = None


def notification_id(note: Mapping) -> str:
    """A stable identity of ``note``, the same on every poll while it says the same thing.

    Quota notifications are states recomputed on each request (their ``at`` is the time of the
    request, their figures grow): one is the same while its group, resource, level and stop time
    are. Other notifications are events: their time and text identify them.
    """
    source = str(note.get("source") or "")
    if source == QUOTA_SERVICE:
        parts = [note.get("group"), note.get("resource"), note.get("level"), note.get("stops_at")]
        return ":".join([source, *("" if p is None else str(p) for p in parts)])
    digest = hashlib.sha256(str(note.get("message", "")).encode()).hexdigest()[:12]
    return f"{source}:{note.get('server') or ''}:{note.get('at') or ''}:{digest}"


def _normalised(note: object, source: str) -> dict | None:
    if not isinstance(note, Mapping) or not str(note.get("message") or "").strip():
        return None
    out = dict(note)
    out["source"] = str(out.get("source") or source)
    level = str(out.get("level") or "info").lower()
    out["level"] = level if level in LEVEL_RANK else "info"
    out["message"] = str(out["message"])
    out.setdefault("id", notification_id(out))
    return out


def _when(note: Mapping) -> float:
    try:
        return datetime.fromisoformat(str(note.get("at")).replace("Z", "+00:00")).timestamp()
    except (TypeError, ValueError):
        return 0.0


def merge_notifications(answers: Iterable[SourceAnswer], as_of: datetime | None = None) -> dict:
    """One list from the services' answers: most severe first, then the fullest budget, then newest.

    Malformed entries (not an object, no message) are dropped; an unknown level counts as "info";
    every notification gets its ``source`` and an ``id`` (:func:`notification_id`). A service with a
    problem adds ``{"source", "message"}`` to ``problems``; the others' notifications still count.
    """
    notes: list[dict] = []
    problems: list[dict] = []
    for a in answers:
        if a.problem is not None:
            problems.append({"source": a.source, "message": a.problem})
            continue
        notes += [n for n in (_normalised(x, a.source) for x in a.notifications) if n is not None]
    unique = list({n["id"]: n for n in notes}.values())
    unique.sort(key=lambda n: (LEVEL_RANK[n["level"]], -_fraction(n), -_when(n)))
    stamp = (as_of or datetime.now(UTC)).astimezone(UTC)
    return {"as_of": stamp.strftime("%Y-%m-%dT%H:%M:%SZ"), "notifications": unique, "problems": problems}


def _fraction(note: Mapping) -> float:
    try:
        return float(note.get("fraction") or 0.0)
    except (TypeError, ValueError):
        return 0.0


def parse_answer(source: str, code: int, body: bytes) -> SourceAnswer:
    """A service's HTTP answer as a :class:`SourceAnswer` (a problem unless a 200 with a list)."""
    if code != 200:
        text = body.decode(errors="replace").strip()
        try:
            text = json.loads(text).get("message") or text
        except (ValueError, AttributeError):
            pass
        return SourceAnswer(source, problem=f"answered {code}" + (f": {text[:200]}" if text else ""))
    try:
        doc = json.loads(body)
    except ValueError:
        return SourceAnswer(source, problem="answered something that is not JSON")
    notes = doc.get("notifications") if isinstance(doc, dict) else None
    if not isinstance(notes, list):
        return SourceAnswer(source, problem="answered JSON without a 'notifications' list")
    return SourceAnswer(source, notifications=notes)


def services_base_url(env: Mapping[str, str]) -> str:
    """Where the hub's services are reached from this server: ``<proxy>/<hub base_url>services/``.

    ``$WORKBENCH_SERVICES_URL`` when set; else the proxy's public origin, from
    ``$JUPYTERHUB_PUBLIC_HUB_URL`` / ``$JUPYTERHUB_PUBLIC_URL`` (JupyterHub sets them when its
    ``public_url`` is configured) or, in the embedded workbench, from ``$DASK_GATEWAY__ADDRESS``
    (``<proxy>/services/dask-gateway``); empty when none is known.
    """
    explicit = (env.get("WORKBENCH_SERVICES_URL") or "").strip()
    if explicit:
        return explicit.rstrip("/") + "/"
    base = "/" + (env.get("JUPYTERHUB_BASE_URL") or "/").strip("/")
    base = base.rstrip("/") + "/"
    # the hub's URL first: with subdomains this server's own URL is on another host than the services
    for name in ("JUPYTERHUB_PUBLIC_HUB_URL", "JUPYTERHUB_PUBLIC_URL"):
        u = urlsplit((env.get(name) or "").strip())
        if u.scheme and u.netloc:
            return f"{u.scheme}://{u.netloc}{base}services/"
    gateway = (env.get("DASK_GATEWAY__ADDRESS") or "").strip()
    if "/services/" in gateway:
        return gateway[: gateway.index("/services/")] + "/services/"
    return ""


# ---------------------------------------------------------------------------
# the server side: asking the services, caching, the handler


class WorkbenchNotifications(LoggingConfigurable):
    """Asks the hub services for the user's notifications (configure as ``c.WorkbenchNotifications``)."""

    services_url = Unicode(
        "",
        help="""Base URL of the hub's services as this server reaches them (…/services/).

        Empty: from the environment (see workbench.lab.services_base_url).""",
    ).tag(config=True)
    sources = Dict(
        dict(DEFAULT_SOURCES),
        help="The services asked: service name -> path of its notifications below /services/<name>/.",
    ).tag(config=True)
    timeout = Float(5.0, help="Seconds to wait for each service before reporting it as a problem.").tag(config=True)
    cache_seconds = Float(15.0, help="Seconds an answer is reused before the services are asked again.").tag(
        config=True
    )
    token = Unicode(help="Hub token sent to the services (default: $JUPYTERHUB_API_TOKEN).").tag(config=True)

    def __init__(self, **kw):
        super().__init__(**kw)
        self._cached: tuple[float, dict] | None = None
        self._lock = asyncio.Lock()

    @default("token")
    def _token_default(self):
        return os.environ.get("JUPYTERHUB_API_TOKEN", "")

    def base_url(self) -> str:
        return self.services_url.rstrip("/") + "/" if self.services_url else services_base_url(os.environ)

    async def ask(self, client: httpclient.AsyncHTTPClient, source: str, path: str) -> SourceAnswer:
        base = self.base_url()
        if not base:
            return SourceAnswer(source, problem="the hub's services URL is unknown (set WORKBENCH_SERVICES_URL)")
        url = f"{base}{source}/{path.lstrip('/')}"
        try:
            r = await client.fetch(
                url,
                headers={"Authorization": f"token {self.token}", "Accept": "application/json"},
                connect_timeout=self.timeout,
                request_timeout=self.timeout,
                follow_redirects=False,
                raise_error=False,
            )
        except (OSError, httpclient.HTTPError) as e:  # refused, unresolvable, timed out
            return SourceAnswer(source, problem=f"not reachable: {e}")
        if r.code == 599:
            return SourceAnswer(source, problem=f"not reachable: {r.error}")
        return parse_answer(source, r.code, r.body or b"")

    async def fetch(self) -> dict:
        if not self.token:
            problem = "no hub token: this server does not run under JupyterHub"
            return merge_notifications([SourceAnswer(s, problem=problem) for s in self.sources])
        client = httpclient.AsyncHTTPClient()
        answers = await asyncio.gather(*(self.ask(client, s, p) for s, p in self.sources.items()))
        for a in answers:
            if a.problem:
                self.log.warning("workbench notifications: %s %s", a.source, a.problem)
        return merge_notifications(answers)

    async def get(self) -> dict:
        """The merged notifications, from the cache when it is fresh (concurrent callers share one ask)."""
        async with self._lock:
            if self._cached and time.monotonic() - self._cached[0] < self.cache_seconds:
                return self._cached[1]
            doc = await self.fetch()
            self._cached = (time.monotonic(), doc)
            return doc


class NotificationsHandler(APIHandler):
    """``GET <base_url>workbench/notifications``: the user's notifications (the browser's session)."""

    def initialize(self, notifier: WorkbenchNotifications):
        self.notifier = notifier

    @web.authenticated
    async def get(self):
        doc = await self.notifier.get()
        self.set_header("Cache-Control", "no-store")
        self.finish(json.dumps(doc))
