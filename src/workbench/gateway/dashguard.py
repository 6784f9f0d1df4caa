"""Dashboard guard: an authenticating reverse proxy in front of dask-gateway's HTTP proxy.

dask-gateway serves each cluster's dashboard at ``/services/dask-gateway/clusters/<name>/...``
with no authentication at all (dask/dask-gateway#570): anyone with the link sees it. So the hub's
proxy routes ``/services/dask-gateway/`` to this process (the hub service ``dask-gateway``), which
forwards every request unchanged (method, path, query, headers, body; responses streamed;
WebSockets bridged) to dask-gateway-server's HTTP proxy, except that a cluster's dashboard is
only forwarded to the cluster's owner:

- the caller is identified by an ``Authorization: jupyterhub|token|bearer <token>`` header (what
  the dask-gateway client sends), else by the token that JupyterHub's OAuth for services
  (:class:`jupyterhub.services.auth.HubOAuth`) stored in this service's cookie; a browser with
  neither is sent through the hub's OAuth flow and comes back to ``oauth_callback``. The hub
  says whose the token is and whether it carries ``access:services!service=dask-gateway``;
- ownership is asked of the gateway itself, with the caller's token:
  ``GET /services/dask-gateway/api/v1/clusters/<name>`` answers 200 to the owner only;
- positive answers are cached for :data:`CACHE_SECONDS` per (token, cluster), a token being one
  user's; refusals are not cached.

``/services/dask-gateway/api/...`` (and anything else that is not a dashboard) goes through
untouched: the gateway authenticates its API itself. A path is classified as dask-gateway's own
proxy will route it (on the percent-decoded path, segment by segment), so an encoded path cannot
reach a dashboard unchecked.

What a request is (dashboard or not, its token, which headers go upstream) is decided by the pure
functions of :mod:`workbench.gateway.dashroutes`; this module owns the decision cache, the ownership
check, the forwarding (HTTP and WebSocket) and the service's start-up.

Run by the hub as ``python -m workbench.gateway.dashguard`` with ``WORKBENCH_RUNTIME`` set; it listens
on ``127.0.0.1:<runtime.gateway_guard_port>``.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import html
import logging
import re
import signal
import sys
import time
from collections.abc import Callable
from urllib.parse import quote

from jupyterhub.services.auth import (
    HubOAuth,
    HubOAuthCallbackHandler,
    HubOAuthenticated,
)
from tornado import httputil, web
from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest
from tornado.log import access_log, enable_pretty_logging
from tornado.websocket import WebSocketClosedError, WebSocketHandler, websocket_connect

from workbench.gateway.dashroutes import (
    HOP_BY_HOP,
    PREFIX,
    SAFE_METHODS,
    classify,
    cross_site,
    is_websocket_request,
    subprotocols,
    token_from_authorization,
    upstream_headers,
    wants_login_redirect,
)
from workbench.names import GATEWAY_SERVICE
from workbench.runtime import Runtime, load_or_create_secrets

log = logging.getLogger("workbench.gateway.dashguard")

CACHE_SECONDS = 30.0
#: scopes the caller's token must carry (either one): what dask-gateway-server itself requires
ACCESS_SCOPES = {"access:services", f"access:services!service={GATEWAY_SERVICE}"}
MAX_MESSAGE = 256 * 2**20  # WebSocket messages (Bokeh documents can be large)


# ---------------------------------------------------------------------------
# the decision cache
# ---------------------------------------------------------------------------


class DecisionCache:
    """Positive ownership decisions, per (token, cluster), for ``ttl`` seconds.

    A token belongs to exactly one user, so this is per user and cluster; keying on the token
    (hashed) also keeps a weaker token of the same user from riding on a stronger one's decision.
    """

    def __init__(
        self, ttl: float = CACHE_SECONDS, clock: Callable[[], float] = time.monotonic, max_entries: int = 10000
    ):
        self.ttl = ttl
        self.clock = clock
        self.max_entries = max_entries
        self._expiry: dict[tuple[str, str], float] = {}

    @staticmethod
    def key(token: str, cluster: str) -> tuple[str, str]:
        return hashlib.sha256(token.encode("utf-8", "replace")).hexdigest(), cluster

    def allowed(self, token: str, cluster: str) -> bool:
        key = self.key(token, cluster)
        expiry = self._expiry.get(key)
        if expiry is None:
            return False
        if expiry <= self.clock():
            del self._expiry[key]
            return False
        return True

    def remember(self, token: str, cluster: str) -> None:
        now = self.clock()
        if len(self._expiry) >= self.max_entries:
            self.purge(now)
            if len(self._expiry) >= self.max_entries:
                self._expiry.clear()
        self._expiry[self.key(token, cluster)] = now + self.ttl

    def purge(self, now: float | None = None) -> None:
        now = self.clock() if now is None else now
        for key in [k for k, expiry in self._expiry.items() if expiry <= now]:
            del self._expiry[key]

    def __len__(self) -> int:
        return len(self._expiry)


def derive_cookie_secret(hub_cookie_secret_hex: str) -> bytes:
    """This service's cookie secret, derived from the hub's (stable across restarts, not the hub's own)."""
    return hmac.new(
        bytes.fromhex(hub_cookie_secret_hex), b"workbench.gateway.dashguard cookies", hashlib.sha256
    ).digest()


# ---------------------------------------------------------------------------
# the proxy
# ---------------------------------------------------------------------------


class Guard:
    """Shared state of the guard: where the gateway is, how to ask it, the decision cache."""

    def __init__(self, upstream: str, hub_auth: HubOAuth, cache: DecisionCache | None = None):
        self.upstream = upstream.rstrip("/")  # http://127.0.0.1:<gateway_http_port>
        self.ws_upstream = "ws" + self.upstream[len("http") :]
        self.hub_auth = hub_auth
        self.cache = cache or DecisionCache()
        self.client = AsyncHTTPClient(force_instance=True, max_clients=512, max_body_size=2**30)

    def own_cookie(self, name: str) -> bool:
        """This service's cookies (the OAuth token and the OAuth state), which stay here."""
        return name == self.hub_auth.cookie_name or name.startswith(self.hub_auth.state_cookie_name)

    async def owner_status(self, token: str, cluster: str) -> int:
        """HTTP status of the gateway's ``GET /api/v1/clusters/<cluster>`` for ``token`` (599: no answer)."""
        url = f"{self.upstream}{PREFIX}api/v1/clusters/{quote(cluster, safe='')}"
        try:
            response = await self.client.fetch(
                url,
                headers={"Authorization": f"jupyterhub {token}"},
                raise_error=False,
                follow_redirects=False,
                connect_timeout=5,
                request_timeout=30,
            )
        except Exception as e:  # noqa: BLE001 - connection refused while the gateway restarts, timeouts
            log.warning("asking the gateway who owns cluster %s failed: %s", cluster, e)
            return 599
        return response.code


class _ResponseRelay:
    """Copies an upstream response (status, headers, streamed body) onto a tornado handler."""

    def __init__(self, handler: GuardHandler):
        self.handler = handler
        self.start: httputil.ResponseStartLine | None = None
        self.headers = httputil.HTTPHeaders()
        self.started = False

    def on_header(self, line: str) -> None:
        if line.startswith("HTTP/"):
            self.start = httputil.parse_response_start_line(line.strip())
            self.headers = httputil.HTTPHeaders()
        elif line.strip():
            self.headers.parse_line(line)
        elif self.start is not None and self.start.code >= 200:  # end of the final response's headers
            self._apply()

    def _apply(self) -> None:
        h = self.handler
        assert self.start is not None
        h.set_status(self.start.code, self.start.reason or None)
        for name in ("Content-Type", "Server", "Date"):
            h.clear_header(name)
        for name, value in self.headers.get_all():
            if name.lower() in HOP_BY_HOP:
                continue
            try:
                h.add_header(name, value)
            except ValueError:
                log.warning("dropping an unsafe upstream response header %s", name)
        self.started = True

    def on_chunk(self, chunk: bytes):
        h = self.handler
        if h.client_gone or not self.started:
            # the caller went away: let the (finite) upstream response run out, quietly (raising
            # here would abort it, but tornado logs that as an uncaught exception)
            return None
        h.write(chunk)
        return h.flush()


class GuardHandler(HubOAuthenticated, WebSocketHandler):
    """Every request under the service: authorise dashboards, then forward (HTTP or WebSocket)."""

    def initialize(self, guard: Guard) -> None:
        self.guard = guard
        self.hub_auth = guard.hub_auth
        self.client_gone = False
        self.upstream_ws = None

    # -- tornado hooks ---------------------------------------------------------

    def compute_etag(self):
        return None  # responses are the upstream's, streamed: no ETag of our own

    def on_connection_close(self) -> None:
        self.client_gone = True
        super().on_connection_close()

    def select_subprotocol(self, subprotocols_offered: list[str]) -> str | None:
        return self.upstream_ws.selected_subprotocol if self.upstream_ws is not None else None

    def on_finish(self) -> None:
        # the handshake was refused after connecting upstream (101 is the accepted handshake)
        if self.upstream_ws is not None and self.get_status() != 101:
            self.upstream_ws.close()
            self.upstream_ws = None

    # -- methods ---------------------------------------------------------------

    async def get(self, *args, **kwargs) -> None:
        await self._serve(websocket=is_websocket_request(self.request.headers))

    async def head(self, *args, **kwargs) -> None:
        await self._serve()

    async def post(self, *args, **kwargs) -> None:
        await self._serve()

    async def put(self, *args, **kwargs) -> None:
        await self._serve()

    async def patch(self, *args, **kwargs) -> None:
        await self._serve()

    async def delete(self, *args, **kwargs) -> None:
        await self._serve()

    async def options(self, *args, **kwargs) -> None:
        await self._serve()

    async def _serve(self, websocket: bool = False) -> None:
        route = classify(self.request.path)
        if route.kind == "invalid":
            return self._deny(400, "Bad Request", "This path is not allowed.")
        if route.kind == "no-cluster":
            return self._deny(404, "Not Found", "No such Dask cluster.")
        if route.kind == "dashboard" and not await self._authorize(route.cluster, websocket):
            return
        if websocket:
            await self._bridge_websocket()
        else:
            await self._forward()

    # -- authorisation ---------------------------------------------------------

    async def _authorize(self, cluster: str, websocket: bool) -> bool:
        """Whether the caller owns ``cluster``; when not, the response has been sent."""
        token = token_from_authorization(self.request.headers.get("Authorization"))
        via_cookie = token is None
        if via_cookie:
            # the OAuth token in this service's cookie (or ?token= on a WebSocket, as JupyterHub allows)
            token = self.hub_auth.get_token(self)
            if not token:
                return self._login(websocket, "You are not logged in.")
        # who it is, and the token's scopes (cached by HubAuth)
        session_id = self.hub_auth.get_session_id(self)
        model = await self.hub_auth.user_for_token(token, session_id=session_id, sync=False)
        if model is None:
            if not via_cookie:
                return self._deny(401, "Unauthorized", "Invalid token.")
            self.hub_auth.clear_cookie(self)  # expired or revoked: start over
            return self._login(websocket, "Your session has expired.")
        who = f"{model.get('kind', 'user')} {model.get('name')}"
        if not self.hub_auth.check_scopes(ACCESS_SCOPES, model):
            log.info("refused cluster %s dashboard: %s may not use Dask Gateway", cluster, who)
            return self._deny(403, "Forbidden", "You may not use Dask Gateway (this token lacks access to it).")
        writes = not websocket and self.request.method not in SAFE_METHODS
        if via_cookie and writes and cross_site(self.request.headers):
            log.info("refused a cross-site %s to cluster %s for %s", self.request.method, cluster, who)
            return self._deny(403, "Forbidden", "Cross-site request refused.")

        if self.guard.cache.allowed(token, cluster):
            return True
        status = await self.guard.owner_status(token, cluster)
        if status == 200:
            self.guard.cache.remember(token, cluster)
            return True
        if status == 401:
            log.info("refused cluster %s dashboard: the gateway did not accept the token of %s", cluster, who)
            if via_cookie:
                self.hub_auth.clear_cookie(self)
                return self._deny(403, "Forbidden", "Your session may not use Dask Gateway; reload to log in again.")
            return self._deny(401, "Unauthorized", "Invalid token, or it lacks access to Dask Gateway.")
        if status in (403, 404):
            log.info("refused cluster %s dashboard to %s (gateway said %s)", cluster, who, status)
            return self._deny(
                403, "Forbidden", "This dashboard belongs to another user's cluster, or no such cluster is running."
            )
        return self._deny(502, "Bad Gateway", "Dask Gateway did not answer; try again in a moment.")

    def _login(self, websocket: bool, message: str) -> bool:
        if not websocket and wants_login_redirect(self.request.method, self.request.headers):
            self.redirect(self.get_login_url())  # the hub's OAuth flow, back to oauth_callback, then here
        else:
            hint = "Log in to JupyterHub, or send 'Authorization: jupyterhub <token>'."
            self._deny(401, "Unauthorized", f"{message} {hint}")
        return False

    def _deny(self, code: int, reason: str, message: str) -> bool:
        self.clear()
        self.set_status(code, reason)
        self.set_header("Content-Type", "text/html; charset=UTF-8")
        self.set_header("Cache-Control", "no-store")
        if code == 401:
            self.set_header("WWW-Authenticate", "jupyterhub")
        text = html.escape(message, quote=False)
        self.finish(
            f"<!DOCTYPE html>\n<html><head><title>{code} {reason}</title></head>"
            f"<body><h1>{code} {reason}</h1><p>{text}</p></body></html>\n"
        )
        return False

    # -- HTTP ------------------------------------------------------------------

    async def _forward(self) -> None:
        method = self.request.method
        body = self.request.body
        if method in ("POST", "PUT", "PATCH"):
            body = body or b""
        elif not body:
            body = None
        relay = _ResponseRelay(self)
        request = HTTPRequest(
            self.guard.upstream + self.request.uri,
            method=method,
            headers=upstream_headers(self.request.headers, self.guard.own_cookie),
            body=body,
            follow_redirects=False,
            decompress_response=False,  # bytes pass through as they are, Content-Encoding and all
            allow_nonstandard_methods=True,
            header_callback=relay.on_header,
            streaming_callback=relay.on_chunk,
            connect_timeout=10,
            request_timeout=3600,  # e.g. the client's wait for a cluster to start
        )
        try:
            await self.guard.client.fetch(request, raise_error=False)
        except Exception as e:  # noqa: BLE001 - any failure upstream is a 502 (or a cut-off body)
            if self.client_gone:
                return
            if not relay.started:
                if isinstance(e, HTTPClientError) and e.code == 599:
                    log.warning("upstream %s %s: %s", method, self.request.path, e)
                else:
                    log.warning("upstream %s %s failed: %r", method, self.request.path, e)
                return self._deny(502, "Bad Gateway", "Dask Gateway did not answer; try again in a moment.")
            log.warning("upstream %s %s broke off: %r", method, self.request.path, e)
            if self.request.connection is not None and self.request.connection.stream is not None:
                self.request.connection.stream.close()  # a truncated body must not look complete
            return
        if not self.client_gone and not self._finished:
            self.finish()

    # -- WebSocket -------------------------------------------------------------

    async def _bridge_websocket(self) -> None:
        origin = self.request.headers.get("Origin")
        if origin is not None and cross_site(self.request.headers) and not self.check_origin(origin):
            return self._deny(403, "Forbidden", "Cross origin websockets not allowed.")
        request = HTTPRequest(
            self.guard.ws_upstream + self.request.uri,
            headers=upstream_headers(self.request.headers, self.guard.own_cookie, websocket=True),
            connect_timeout=10,
            request_timeout=30,
        )
        try:
            self.upstream_ws = await websocket_connect(
                request, subprotocols=subprotocols(self.request.headers) or None, max_message_size=MAX_MESSAGE
            )
        except HTTPClientError as e:
            code = e.code if e.code != 599 else 502
            return self._deny(code, e.message or "Bad Gateway", "The dashboard refused the WebSocket.")
        except Exception as e:  # noqa: BLE001 - connection refused, timeouts
            log.warning("WebSocket to %s failed: %r", self.request.path, e)
            return self._deny(502, "Bad Gateway", "Dask Gateway did not answer; try again in a moment.")
        await WebSocketHandler.get(self)

    def open(self, *args, **kwargs) -> None:
        self._pump = asyncio.ensure_future(self._pump_upstream())

    async def _pump_upstream(self) -> None:
        upstream = self.upstream_ws
        while upstream is not None:
            message = await upstream.read_message()
            if message is None:  # upstream closed
                self.close(upstream.close_code, upstream.close_reason)
                return
            try:
                await self.write_message(message, binary=isinstance(message, bytes))
            except WebSocketClosedError:
                upstream.close()
                return

    async def on_message(self, message: str | bytes) -> None:
        if self.upstream_ws is None:
            return
        try:
            await self.upstream_ws.write_message(message, binary=isinstance(message, bytes))
        except WebSocketClosedError:
            self.close()

    def on_close(self) -> None:
        upstream, self.upstream_ws = self.upstream_ws, None
        if upstream is not None:
            code = self.close_code if self.close_code in (1000, 1001) or (self.close_code or 0) >= 3000 else None
            upstream.close(code, self.close_reason if code else None)


class CallbackHandler(HubOAuthCallbackHandler):
    """Completes the hub's OAuth flow: stores the token in this service's cookie, back to the page."""

    def initialize(self, guard: Guard) -> None:
        self.hub_auth = guard.hub_auth


def _log_request(handler: web.RequestHandler) -> None:
    status = handler.get_status()
    level = logging.DEBUG if status < 400 else logging.WARNING if status < 500 else logging.ERROR
    access_log.log(level, "%d %s %.1fms", status, handler._request_summary(), 1000.0 * handler.request.request_time())


def make_hub_auth(hub_api_url: str, api_token: str, service: str = GATEWAY_SERVICE) -> HubOAuth:
    prefix = f"/services/{service}/"
    return HubOAuth(
        api_url=hub_api_url,
        api_token=api_token,
        oauth_client_id=f"service-{service}",
        base_url=prefix,
        oauth_redirect_uri=f"{prefix}oauth_callback",
        access_scopes=set(ACCESS_SCOPES),
        cache_max_age=int(CACHE_SECONDS),
    )


def make_app(guard: Guard, cookie_secret: bytes, service: str = GATEWAY_SERVICE) -> web.Application:
    prefix = f"/services/{service}/"
    return web.Application(
        [
            (re.escape(prefix) + "oauth_callback", CallbackHandler, {"guard": guard}),
            (r"/.*", GuardHandler, {"guard": guard}),
        ],
        cookie_secret=cookie_secret,
        login_url=guard.hub_auth.login_url,
        websocket_max_message_size=MAX_MESSAGE,
        log_function=_log_request,
    )


async def serve(runtime: Runtime, secrets: dict[str, str]) -> None:
    hub_auth = make_hub_auth(f"http://127.0.0.1:{runtime.hub_port}/hub/api", secrets["gateway_api_token"])
    guard = Guard(f"http://127.0.0.1:{runtime.gateway_http_port}", hub_auth)
    app = make_app(guard, derive_cookie_secret(secrets["cookie_secret"]))
    server = app.listen(runtime.gateway_guard_port, address="127.0.0.1", xheaders=False)
    log.info(
        "guarding %s on 127.0.0.1:%d -> dask-gateway at %s",
        PREFIX,
        runtime.gateway_guard_port,
        guard.upstream,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("stopping")
    server.stop()
    guard.client.close()


def main(argv: list[str] | None = None) -> int:
    enable_pretty_logging()
    logging.getLogger().setLevel(logging.INFO)
    try:
        runtime = Runtime.from_env()
    except RuntimeError as e:
        print(f"workbench.gateway.dashguard: {e}", file=sys.stderr)
        return 2
    secrets = load_or_create_secrets(runtime.state_dir)
    asyncio.run(serve(runtime, secrets))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
