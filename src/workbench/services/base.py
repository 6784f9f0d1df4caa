"""What the Workbench's hub services (quota, sessions, rosters) share when they start.

Each runs as ``python -m workbench.<name>``, as a hub-managed service (the embedded workbench) or
an external one (Kubernetes). JupyterHub gives a managed service its URL, prefix, the hub's API
and its own token in the environment; the policy comes from ``--config`` or the embedded
workbench's ``$WORKBENCH_RUNTIME``.

- :func:`add_common_args` — ``--config``, ``--port``, ``--ip``, ``--log-level``;
- :func:`service_setup` — logging, the policy (problems to stderr, exit code 2), where to listen;
- :func:`serve_until_signal` — run a tornado app until SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from urllib.parse import urlparse

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


def service_setup(name: str, args: argparse.Namespace, default_port: int,
                  environ: dict[str, str] | None = None) -> ServiceSetup | int:
    """Logging, the policy and the service's address; an exit code (2) after printing why, if it cannot run."""
    env = os.environ if environ is None else environ
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="[%(levelname).1s %(asctime)s %(name)s] %(message)s")
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
