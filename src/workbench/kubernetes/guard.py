"""The dashboard guard pod on Kubernetes: :mod:`workbench.gateway.dashguard` configured from the chart's environment."""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field

from workbench.kubernetes.hub import GATEWAY_PREFIX, GUARD_ENV, GUARD_PORT, K8sConfigError, _require

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GuardSettings:
    """What the dashboard guard pod needs (:func:`k8s_guard_settings`)."""

    hub_api_url: str
    upstream: str
    api_token: str = field(repr=False)
    cookie_secret: bytes = field(repr=False)
    port: int = GUARD_PORT


def k8s_guard_settings(env: Mapping[str, str]) -> GuardSettings:
    """Settings of the dashboard guard pod (pure): :mod:`workbench.gateway.dashguard` on Kubernetes.

    As in the embedded mode, the hub service ``dask-gateway`` is the guard: it forwards everything
    under :data:`GATEWAY_PREFIX` to the gateway's Traefik proxy (``WORKBENCH_GATEWAY_PROXY_URL``) and
    a cluster's dashboard to its owner only (it asks the gateway, with the caller's token, for the
    cluster). It logs browsers in with the hub's OAuth as the service ``dask-gateway`` (its token:
    ``WORKBENCH_GATEWAY_API_TOKEN``); its cookie key is derived from ``WORKBENCH_GUARD_COOKIE_SECRET``,
    a secret of its own (the guard never holds the hub's cookie secret).
    """
    from workbench.gateway.dashguard import derive_cookie_secret

    _require(env, GUARD_ENV, "dashboard guard")
    try:
        cookie_secret = derive_cookie_secret(env["WORKBENCH_GUARD_COOKIE_SECRET"])
    except ValueError:
        raise K8sConfigError(
            "dashboard guard: WORKBENCH_GUARD_COOKIE_SECRET must be hex (openssl rand -hex 32)"
        ) from None
    return GuardSettings(
        hub_api_url=env["WORKBENCH_HUB_API_URL"],
        upstream=env["WORKBENCH_GATEWAY_PROXY_URL"].rstrip("/"),
        api_token=env["WORKBENCH_GATEWAY_API_TOKEN"],
        cookie_secret=cookie_secret,
        port=int(env.get("WORKBENCH_GUARD_PORT") or GUARD_PORT),
    )


async def serve_k8s_guard(settings: GuardSettings, stop: asyncio.Event) -> None:
    """Run the guard on ``settings.port`` (all addresses) until ``stop`` is set."""
    from workbench.gateway.dashguard import Guard, make_app, make_hub_auth

    guard = Guard(settings.upstream, make_hub_auth(settings.hub_api_url, settings.api_token))
    # behind the hub's proxy (the NetworkPolicy admits only it, the hub and notebook pods): trust its
    # X-Forwarded-Proto, so that the login cookie is Secure behind TLS
    server = make_app(guard, settings.cookie_secret).listen(settings.port, xheaders=True)
    log.info("guarding %s on :%d -> dask-gateway at %s", GATEWAY_PREFIX, settings.port, guard.upstream)
    try:
        await stop.wait()
    finally:
        server.stop()
        guard.client.close()


def _guard_main() -> int:
    import os
    import signal

    from tornado.log import enable_pretty_logging

    enable_pretty_logging()
    logging.getLogger().setLevel(logging.INFO)
    try:
        settings = k8s_guard_settings(os.environ)
    except K8sConfigError as e:
        print(f"workbench: {e}", file=sys.stderr)
        return 2

    async def run() -> None:
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            asyncio.get_running_loop().add_signal_handler(sig, stop.set)
        await serve_k8s_guard(settings, stop)

    asyncio.run(run())
    return 0
