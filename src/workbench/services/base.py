"""What the Workbench's hub services (quota, sessions, rosters) share when they start.

Each runs as ``python -m workbench.<name>``, as a hub-managed service (the embedded workbench) or
an external one (Kubernetes). JupyterHub gives a managed service its URL, prefix, the hub's API
and its own token in the environment; the policy comes from ``--config`` or the embedded
workbench's ``$WORKBENCH_RUNTIME``.

- :func:`add_common_args` — ``--config``, ``--port``, ``--ip``, ``--log-level``;
- :func:`service_setup` — logging, the policy (problems to stderr, exit code 2), where to listen;
- :func:`serve_until_signal` — run a tornado app until SIGTERM/SIGINT;
- :class:`HubClient` — the hub's REST API with the service's own token (groups, active servers);
- :class:`JsonHandler` — JSON answers and errors, the caller's token checked with the hub (:meth:`JsonHandler.token_model`),
  health answers that say more than ok/unhealthy only to a valid token (:meth:`JsonHandler.write_health`);
- :func:`log_request` — one log line per request (health and metrics at debug level).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from urllib.parse import quote, urlparse

from tornado import httpclient, web

from workbench.policy import Policy, PolicyError, load_policy
from workbench.runtime import RUNTIME_ENV, Runtime

log = logging.getLogger("workbench.service")


def add_common_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--config", help="platform YAML (default: the embedded workbench's, from $WORKBENCH_RUNTIME)")
    p.add_argument("--port", type=int, help="port to listen on (default: from $JUPYTERHUB_SERVICE_URL)")
    p.add_argument("--ip", default=None, help="address to listen on (default: from $JUPYTERHUB_SERVICE_URL)")
    p.add_argument("--log-level", default="INFO")
    return p


@dataclass(frozen=True)
class ServiceSetup:
    name: str
    runtime: Runtime | None
    config: str
    policy: Policy
    ip: str
    port: int
    prefix: str  # /services/<name>/
    api_url: str  # the hub's REST API
    token: str  # this service's hub token

    @property
    def state_dir(self) -> str:
        return self.runtime.state_dir if self.runtime else "."


def service_setup(
    name: str, args: argparse.Namespace, default_port: int, environ: dict[str, str] | None = None
) -> ServiceSetup | int:
    """Logging, the policy and the service's address; an exit code (2) after printing why, if it cannot run."""
    env = os.environ if environ is None else environ
    logging.basicConfig(
        level=args.log_level.upper(), stream=sys.stderr, format="[%(levelname).1s %(asctime)s %(name)s] %(message)s"
    )
    runtime = Runtime.read(env[RUNTIME_ENV]) if env.get(RUNTIME_ENV) else None
    config = args.config or (runtime.config if runtime else None)
    if not config:
        print(f"{name}: pass --config FILE (no ${RUNTIME_ENV} to find the policy in)", file=sys.stderr)
        return 2
    try:
        policy = load_policy(config)
    except PolicyError as e:
        print(f"{name}: {e}", file=sys.stderr)
        return 2
    url = urlparse(env.get("JUPYTERHUB_SERVICE_URL", f"http://127.0.0.1:{default_port}"))
    return ServiceSetup(
        name=name,
        runtime=runtime,
        config=config,
        policy=policy,
        ip=args.ip or url.hostname or "127.0.0.1",
        port=args.port or url.port or default_port,
        prefix=env.get("JUPYTERHUB_SERVICE_PREFIX", f"/services/{name}/"),
        api_url=env.get("JUPYTERHUB_API_URL", "http://127.0.0.1:8081/hub/api"),
        token=env.get("JUPYTERHUB_API_TOKEN", ""),
    )


def serve_until_signal(setup: ServiceSetup, build: Callable[[], tuple]) -> None:
    """Serve until SIGTERM or SIGINT: ``build()`` runs inside the event loop (so the service's HTTP clients and
    locks belong to it) and returns ``(tornado app, background coroutine function or None)``."""
    from tornado.httpserver import HTTPServer

    async def serve() -> None:
        app, background = build()
        server = HTTPServer(app, xheaders=True)
        server.listen(setup.port, setup.ip)
        log.info("%s service on http://%s:%d%s", setup.name, setup.ip, setup.port, setup.prefix)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        task = asyncio.create_task(background()) if background is not None else None
        await stop.wait()
        log.info("stopping")
        if task is not None:
            task.cancel()
        server.stop()

    asyncio.run(serve())


async def every(seconds: float, fn: Callable[[], Awaitable[object]], what: str, first: float = 0.0) -> None:
    """Run ``fn()`` every ``seconds`` (after ``first``), logging failures: the next round tries again."""
    await asyncio.sleep(first)
    while True:
        try:
            await fn()
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - e.g. the hub is restarting
            log.warning("%s failed (next try in %gs): %s", what, seconds, e)
        await asyncio.sleep(seconds)


class HubClient:
    """The hub's REST API with this service's own token (user groups, active servers)."""

    def __init__(self, api_url: str, token: str):
        self.api_url = api_url.rstrip("/")
        self.token = token
        self.http = httpclient.AsyncHTTPClient()
        self._groups: dict[str, tuple[float, list[str] | None]] = {}

    async def get(self, path: str, accept: str = "application/json"):
        r = await self.http.fetch(
            f"{self.api_url}{path}",
            headers={"Authorization": f"token {self.token}", "Accept": accept},
            request_timeout=30,
        )
        return json.loads(r.body)

    async def request(self, method: str, path: str) -> int:
        r = await self.http.fetch(
            f"{self.api_url}{path}",
            method=method,
            headers={"Authorization": f"token {self.token}"},
            request_timeout=60,
            allow_nonstandard_methods=True,
        )
        return r.code

    async def user_groups(self, name: str, max_age: float = 30.0) -> list[str] | None:
        """The hub groups of ``name`` (None: no such user), cached for ``max_age`` seconds."""
        loop = asyncio.get_running_loop()
        cached = self._groups.get(name)
        if cached and loop.time() - cached[0] < max_age:
            return cached[1]
        try:
            model = await self.get(f"/users/{quote(name, safe='')}")
            groups = list(model.get("groups") or [])
        except httpclient.HTTPClientError as e:
            if e.code != 404:
                raise
            groups = None
        self._groups[name] = (loop.time(), groups)
        return groups

    async def active_users(self) -> list[dict]:
        """Every user with an active (ready or pending) server, following the hub's pagination."""
        users, offset = [], 0
        while True:
            page = await self.get(
                f"/users?state=active&offset={offset}&limit=200",
                accept="application/jupyterhub-pagination+json",
            )
            items = page["items"] if isinstance(page, dict) else page
            users.extend(items)
            nxt = page.get("_pagination", {}).get("next") if isinstance(page, dict) else None
            if not nxt or not items:
                return users
            offset = nxt["offset"]


def log_request(handler: web.RequestHandler) -> None:
    """Tornado's ``log_function`` for the services: health and metrics at debug level, errors louder."""
    status = handler.get_status()
    level = logging.INFO if status < 400 else logging.WARNING if status < 500 else logging.ERROR
    if handler.request.path.endswith(("/health", "/metrics")) and status < 400:
        level = logging.DEBUG
    log.log(
        level,
        "%d %s %s %.1fms",
        status,
        handler.request.method,
        handler.request.path,
        1000 * handler.request.request_time(),
    )


class JsonHandler(web.RequestHandler):
    """A token-authenticated JSON API handler: answers and errors are JSON, nothing is cached, no cookies.

    An error's ``log_message`` (formatted with its args) is the ``message`` of the answer; an error with a
    ``problems`` list adds it.
    """

    def set_default_headers(self):
        self.set_header("Content-Type", "application/json")
        self.set_header("Cache-Control", "no-store")

    def check_xsrf_cookie(self):  # token-authenticated API only, no cookies
        return

    def write_json(self, doc, status: int = 200) -> None:
        self.set_status(status)
        self.finish(json.dumps(doc))

    def write_error(self, status_code, **kwargs):
        message = self._reason
        problems = None
        exc = kwargs.get("exc_info", (None, None, None))[1]
        if isinstance(exc, web.HTTPError) and exc.log_message:
            message = exc.log_message % exc.args if exc.args else exc.log_message
            problems = getattr(exc, "problems", None)
        doc = {"status": status_code, "message": message}
        if problems:
            doc["problems"] = problems
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps(doc))

    def body_json(self):
        try:
            return json.loads(self.request.body or b"null")
        except json.JSONDecodeError as e:
            raise web.HTTPError(400, f"the body is not valid JSON: {e}") from None

    async def token_model(self, hub_auth, hub: HubClient | None = None) -> dict:
        """The hub's model of the caller's token (401 without a token, 403 with an invalid one, 502 when the hub
        does not answer); a user's ``groups`` are filled in from ``hub`` when the model lacks them."""
        token = hub_auth.get_token(self, in_cookie=False)
        if not token:
            raise web.HTTPError(401, "authenticate with a JupyterHub token: 'Authorization: token <token>'")
        try:
            model = await hub_auth.user_for_token(token, sync=False)
        except web.HTTPError as e:  # the hub did not answer
            raise web.HTTPError(502, f"cannot check the token with the hub: {e.log_message}") from None
        if not model:
            raise web.HTTPError(403, "invalid or expired token")
        if model.get("groups") is None and model.get("kind", "user") == "user" and hub is not None:
            model = {**model, "groups": await hub.user_groups(model["name"]) or []}
        return model

    async def has_valid_token(self, hub_auth) -> bool:
        """Whether the request carries a token the hub accepts (False when the hub does not answer)."""
        token = hub_auth.get_token(self, in_cookie=False)
        if not token:
            return False
        try:
            return bool(await hub_auth.user_for_token(token, sync=False))
        except web.HTTPError:
            return False

    async def write_health(self, hub_auth, check: Callable[[], Awaitable[dict]] | None = None) -> None:
        """``{"status": "ok"}`` (200) or ``{"status": "unhealthy"}`` (503) for anyone (probes, load balancers);
        what ``check()`` returns (database, counts, courses; it raises when unhealthy) only with a valid token."""
        try:
            details = await check() if check is not None else {}
            doc, code = {"status": "ok"}, 200
        except Exception as e:  # noqa: BLE001 - any failure of the check is "unhealthy"
            log.warning("health check failed: %s", e)
            details, doc, code = {"error": str(e)}, {"status": "unhealthy"}, 503
        if details and await self.has_valid_token(hub_auth):
            doc.update(details)
        self.write_json(doc, code)
