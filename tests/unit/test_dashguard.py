"""workbench.gateway.dashguard and its pure half workbench.gateway.dashroutes: the pure parts, then the guard in-process in front of a stand-in gateway.

The stand-in answers the gateway's ``GET /api/v1/clusters/<name>`` like dask-gateway-server
(200 to the owner's token, 404 to anyone else), the hub's ``GET /hub/api/user`` (403 to a bad
token) and serves a "dashboard" with a page, a streamed response and a WebSocket, so forwarding
and the WebSocket bridge are checked in-process (the integration tests do the rest with real
processes).
"""

from __future__ import annotations

import asyncio
import json
import socket
from urllib.parse import parse_qs, urlsplit

import pytest
from tornado import httputil, web
from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest
from tornado.websocket import WebSocketHandler, websocket_connect

from workbench.gateway.dashguard import DecisionCache, Guard, derive_cookie_secret, make_app, make_hub_auth
from workbench.gateway.dashroutes import (
    CLUSTER_NAME,
    Route,
    classify,
    cross_site,
    gateway_segments,
    strip_cookies,
    token_from_authorization,
    upstream_headers,
    wants_login_redirect,
)

P = "/services/dask-gateway"
NAME = "0f1e2d3c4b5a69788796a5b4c3d2e1f0"

# ---------------------------------------------------------------------------
# paths
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path, route",
    [
        (f"{P}/clusters/{NAME}/status", Route("dashboard", NAME)),
        (f"{P}/clusters/{NAME}", Route("dashboard", NAME)),
        (f"{P}/clusters/{NAME}/", Route("dashboard", NAME)),
        (f"{P}/clusters/{NAME}/status/ws", Route("dashboard", NAME)),
        (f"{P}/clusters/ns.{NAME}/status", Route("dashboard", f"ns.{NAME}")),  # Kubernetes-style names
        # the gateway's proxy routes on the percent-decoded path: so does the guard
        (f"{P}/%63lusters/{NAME}/status", Route("dashboard", NAME)),
        (f"{P}/clusters%2F{NAME}/status", Route("dashboard", NAME)),
        (f"/services/dask%2Dgateway/clusters/{NAME}/status", Route("dashboard", NAME)),
        (f"{P}/clusters/{NAME}%2Fstatus", Route("dashboard", NAME)),
        # not a dashboard
        (f"{P}/api/v1/clusters/{NAME}", Route("pass")),
        (f"{P}/api/health", Route("pass")),
        (f"{P}/", Route("pass")),
        (P, Route("pass")),
        (f"{P}/Clusters/{NAME}/status", Route("pass")),  # the proxy's match is case-sensitive
        (f"{P}//clusters/{NAME}/status", Route("pass")),  # an empty segment matches no cluster route
        ("/hub/api/user", Route("pass")),
        # under clusters/ but not a cluster name: refused, never forwarded
        (f"{P}/clusters", Route("no-cluster")),
        (f"{P}/clusters/", Route("no-cluster")),
        (f"{P}/clusters//status", Route("no-cluster")),
        (f"{P}/clusters/a b/status", Route("no-cluster")),
        (f"{P}/clusters/%2e%2e", Route("invalid")),
        # dot segments are refused outright, encoded or not
        (f"{P}/api/../clusters/{NAME}/status", Route("invalid")),
        (f"{P}/clusters/{NAME}/../../api/health", Route("invalid")),
        (f"{P}/api/%2E%2E/clusters/{NAME}", Route("invalid")),
        (f"{P}/./clusters/{NAME}", Route("invalid")),
        (f"http://evil{P}/clusters/{NAME}/status", Route("invalid")),  # absolute-form target
        ("", Route("invalid")),
    ],
)
def test_classify(path, route):
    assert classify(path) == route


def test_gateway_segments_mirror_the_proxy_router():
    assert gateway_segments("/") == []
    assert gateway_segments("") == []
    assert gateway_segments("/a/b/") == ["a", "b"]
    assert gateway_segments("//a") == ["", "a"]  # only one leading slash is stripped
    assert gateway_segments("/a%2Fb") == ["a", "b"]


def test_cluster_name_pattern():
    assert CLUSTER_NAME.fullmatch(NAME)
    for bad in ("", ".", "..", "-x", "a/b", "a b", "a%b", "x" * 300):
        assert not CLUSTER_NAME.fullmatch(bad), bad


def test_classify_other_service_name():
    assert classify(f"/services/other/clusters/{NAME}", service="other") == Route("dashboard", NAME)
    assert classify(f"{P}/clusters/{NAME}", service="other") == Route("pass")


# ---------------------------------------------------------------------------
# headers
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value, token",
    [
        ("jupyterhub abc123", "abc123"),
        ("token abc123", "abc123"),
        ("Token abc123", "abc123"),
        ("JupyterHub  abc123 ", "abc123"),
        ("Bearer abc123", "abc123"),
        ("Basic dXNlcjpwYXNz", None),
        ("jupyterhub", None),
        ("jupyterhub ", None),
        ("token a b", None),
        ("", None),
        (None, None),
    ],
)
def test_token_from_authorization(value, token):
    assert token_from_authorization(value) == token


def test_login_redirect_only_for_page_views():
    assert wants_login_redirect("GET", {})
    assert wants_login_redirect("HEAD", {})
    assert not wants_login_redirect("POST", {})
    assert not wants_login_redirect("DELETE", {})
    assert not wants_login_redirect("GET", {"Upgrade": "websocket"})


@pytest.mark.parametrize(
    "headers, expected",
    [
        ({}, False),  # not a browser
        ({"Sec-Fetch-Site": "same-origin", "Origin": "http://evil"}, False),
        ({"Sec-Fetch-Site": "none"}, False),
        ({"Sec-Fetch-Site": "cross-site", "Origin": "http://evil"}, True),
        ({"Sec-Fetch-Site": "same-site", "Origin": "http://a.example"}, True),
        ({"Origin": "http://hub:8000", "Host": "hub:8000"}, False),
        ({"Origin": "http://evil:8000", "Host": "hub:8000"}, True),
    ],
)
def test_cross_site(headers, expected):
    assert cross_site(headers) is expected


def test_strip_cookies():
    drop = lambda n: n == "service-dask-gateway" or n.startswith("service-dask-gateway-oauth-state")
    header = "a=1; service-dask-gateway=secret; service-dask-gateway-oauth-state-xy=s; _xsrf=x;b=2"
    assert strip_cookies(header, drop) == "a=1; _xsrf=x; b=2"
    assert strip_cookies("service-dask-gateway=secret", drop) == ""


def test_upstream_headers_drop_hop_by_hop_and_own_cookies():
    h = httputil.HTTPHeaders()
    for k, v in [
        ("Host", "hub:8000"),
        ("Authorization", "jupyterhub t"),
        ("Connection", "keep-alive, X-Private"),
        ("X-Private", "1"),
        ("Keep-Alive", "timeout=5"),
        ("Transfer-Encoding", "chunked"),
        ("Content-Length", "12"),
        ("Expect", "100-continue"),
        ("Cookie", "service-dask-gateway=secret; other=1"),
        ("Accept", "text/html"),
        ("Sec-WebSocket-Key", "k"),
        ("Sec-WebSocket-Protocol", "bokeh, tok"),
        ("Upgrade", "websocket"),
        ("X-Forwarded-For", "10.0.0.1"),
    ]:
        h.add(k, v)
    own = lambda n: n == "service-dask-gateway"
    out = dict(upstream_headers(h, own).get_all())
    assert out == {
        "Host": "hub:8000",
        "Authorization": "jupyterhub t",
        "Cookie": "other=1",
        "Accept": "text/html",
        "Sec-Websocket-Key": "k",
        "Sec-Websocket-Protocol": "bokeh, tok",
        "X-Forwarded-For": "10.0.0.1",
    }
    ws = dict(upstream_headers(h, own, websocket=True).get_all())
    assert "Sec-Websocket-Key" not in ws and "Sec-Websocket-Protocol" not in ws and "Upgrade" not in ws


# ---------------------------------------------------------------------------
# decision cache
# ---------------------------------------------------------------------------


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_cache_expires_after_ttl():
    clock = Clock()
    cache = DecisionCache(ttl=30, clock=clock)
    assert not cache.allowed("tok", "c1")
    cache.remember("tok", "c1")
    assert cache.allowed("tok", "c1")
    assert not cache.allowed("tok", "c2")  # per cluster
    assert not cache.allowed("other", "c1")  # per token (so per user)
    clock.now += 29.9
    assert cache.allowed("tok", "c1")
    clock.now += 0.2
    assert not cache.allowed("tok", "c1")
    assert len(cache) == 0


def test_cache_keys_do_not_hold_tokens():
    cache = DecisionCache()
    cache.remember("secret-token", "c1")
    assert "secret-token" not in repr(cache._expiry)


def test_cache_is_bounded():
    clock = Clock()
    cache = DecisionCache(ttl=30, clock=clock, max_entries=3)
    for i in range(3):
        cache.remember(f"t{i}", "c")
    clock.now += 31  # all expired: purged on the next insert
    cache.remember("t9", "c")
    assert len(cache) == 1
    for i in range(5):
        cache.remember(f"u{i}", "c")
    assert len(cache) <= 3


def test_cookie_secret_is_derived_and_stable():
    a = derive_cookie_secret("ab" * 32)
    assert a == derive_cookie_secret("ab" * 32) and len(a) == 32
    assert a != bytes.fromhex("ab" * 32) and a != derive_cookie_secret("cd" * 32)


# ---------------------------------------------------------------------------
# in-process: the guard in front of a stand-in gateway
# ---------------------------------------------------------------------------

OWNER, OTHER, BAD, NOSCOPE = "owner-token", "other-token", "bad-token", "no-scope-token"
USERS = {OWNER: "owner", OTHER: "other", NOSCOPE: "owner"}


class FakeHubUser(web.RequestHandler):
    """The hub's GET /hub/api/user: who the token is, and its scopes."""

    def get(self):
        self.application.settings["hub_calls"].append(self.request.headers.get("Authorization"))
        token = (self.request.headers.get("Authorization") or "").partition(" ")[2]
        if token not in USERS:
            raise web.HTTPError(403)
        name = USERS[token]
        scopes = [] if token == NOSCOPE else ["access:services!service=dask-gateway", f"read:users:name!user={name}"]
        self.write({"kind": "user", "name": name, "scopes": scopes})


class FakeClusterAPI(web.RequestHandler):
    def get(self, name):
        self.application.settings["calls"].append((name, self.request.headers.get("Authorization")))
        token = (self.request.headers.get("Authorization") or "").partition(" ")[2]
        if token == BAD:
            raise web.HTTPError(401)
        if token == OWNER and name == NAME:
            self.write({"name": name, "status": "RUNNING"})
        else:
            raise web.HTTPError(404)


class FakeHealth(web.RequestHandler):
    def get(self):
        self.write({"status": "pass"})


class FakeDashboard(web.RequestHandler):
    def _echo(self):
        self.set_header("X-Upstream", "yes")
        self.set_cookie("dash", "1")
        self.write(
            {
                "method": self.request.method,
                "uri": self.request.uri,
                "body": self.request.body.decode(),
                "cookie": self.request.headers.get("Cookie"),
                "authorization": self.request.headers.get("Authorization"),
            }
        )

    get = head = post = put = delete = _echo


class FakeStream(web.RequestHandler):
    async def get(self):
        for i in range(5):
            self.write(f"chunk{i};")
            await self.flush()
            await asyncio.sleep(0.01)


class FakeTruncated(web.RequestHandler):
    async def get(self):
        self.set_header("Content-Length", "100")
        self.write("x" * 10)
        await self.flush()
        self.request.connection.stream.close()  # dies mid-body


class FakeRedirect(web.RequestHandler):
    def get(self):
        self.redirect("status", status=302)


class FakeWS(WebSocketHandler):
    def select_subprotocol(self, subprotocols):
        return "bokeh" if "bokeh" in subprotocols else None

    def open(self):
        self.write_message("hello")  # sent before the client speaks, like Bokeh's ACK

    def on_message(self, message):
        if isinstance(message, bytes):
            self.write_message(b"bin:" + message, binary=True)
        else:
            self.write_message(f"echo:{message}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


async def start_pair():
    upstream_port, guard_port = free_port(), free_port()
    calls: list = []
    upstream = web.Application(
        [
            (r"/hub/api/user", FakeHubUser),
            (rf"{P}/api/v1/clusters/([^/]+)", FakeClusterAPI),
            (rf"{P}/api/health", FakeHealth),
            (rf"{P}/clusters/{NAME}/stream", FakeStream),
            (rf"{P}/clusters/{NAME}/truncated", FakeTruncated),
            (rf"{P}/clusters/{NAME}/ws", FakeWS),
            (rf"{P}/clusters/{NAME}/", FakeRedirect),
            (rf"{P}/clusters/{NAME}/.*", FakeDashboard),
        ],
        calls=calls,
        hub_calls=[],
    )
    up_server = upstream.listen(upstream_port, address="127.0.0.1")
    hub_auth = make_hub_auth(f"http://127.0.0.1:{upstream_port}/hub/api", "guard-api-token")
    guard = Guard(f"http://127.0.0.1:{upstream_port}", hub_auth)
    guard_server = make_app(guard, derive_cookie_secret("ab" * 32)).listen(guard_port, address="127.0.0.1")
    return f"http://127.0.0.1:{guard_port}", calls, guard, (up_server, guard_server)


def auth_header(token: str) -> dict:
    return {"Authorization": f"jupyterhub {token}"}


async def fetch(url, token=None, **kw):
    headers = kw.pop("headers", {})
    if token:
        headers["Authorization"] = f"jupyterhub {token}"
    client = AsyncHTTPClient()
    return await client.fetch(url, headers=headers, raise_error=False, follow_redirects=False, **kw)


def test_owner_gets_the_dashboard_others_do_not():
    async def scenario():
        base, calls, _guard, servers = await start_pair()
        try:
            dash = f"{base}{P}/clusters/{NAME}/status?x=1&y=%20z"
            r = await fetch(dash, OWNER, headers={"Cookie": "service-dask-gateway=s; keep=1"})
            assert r.code == 200, r.body
            seen = json.loads(r.body)
            assert seen["uri"] == f"{P}/clusters/{NAME}/status?x=1&y=%20z"  # path and query unchanged
            assert seen["authorization"] == f"jupyterhub {OWNER}"
            assert seen["cookie"] == "keep=1"  # the guard's own cookie stays here
            assert r.headers["X-Upstream"] == "yes" and "dash=1" in r.headers["Set-Cookie"]
            assert calls == [(NAME, f"jupyterhub {OWNER}")]
            # cached: no second question to the gateway
            r = await fetch(dash, OWNER)
            assert r.code == 200 and len(calls) == 1
            # token scheme too
            r = await fetch(dash, headers={"Authorization": f"token {OWNER}"})
            assert r.code == 200

            r = await fetch(dash, OTHER)
            assert r.code == 403
            assert b"belongs to another user's cluster" in r.body
            r = await fetch(dash, OTHER)  # refusals are not cached
            assert r.code == 403 and calls.count((NAME, f"jupyterhub {OTHER}")) == 2

            r = await fetch(dash, BAD)
            assert r.code == 401 and r.headers["WWW-Authenticate"] == "jupyterhub"
            r = await fetch(dash, NOSCOPE)  # the owner's, but without access to the gateway
            assert r.code == 403 and b"may not use Dask Gateway" in r.body
            assert all(c[1] != f"jupyterhub {BAD}" and c[1] != f"jupyterhub {NOSCOPE}" for c in calls)

            # an encoded path reaches the same dashboard in the gateway's proxy: checked too
            r = await fetch(f"{base}{P}/%63lusters/{NAME}/status", OTHER)
            assert r.code == 403
            r = await fetch(f"{base}{P}/api/%2e%2e/clusters/{NAME}/status", OTHER)
            assert r.code == 400
            r = await fetch(f"{base}{P}/clusters/not%20a%20name/status", OWNER)
            assert r.code == 404

            # redirects are passed on, not followed
            r = await fetch(f"{base}{P}/clusters/{NAME}/", OWNER)
            assert r.code == 302 and r.headers["Location"] == "status"
        finally:
            for s in servers:
                s.stop()

    run(scenario())


def test_methods_bodies_and_streaming_are_forwarded():
    async def scenario():
        base, _calls, _guard, servers = await start_pair()
        try:
            url = f"{base}{P}/clusters/{NAME}/thing?q=1"
            for method, body in [("POST", '{"a": 1}'), ("PUT", "x" * 100_000), ("DELETE", None)]:
                r = await fetch(url, OWNER, method=method, body=body, allow_nonstandard_methods=True)
                assert r.code == 200, (method, r.code)
                seen = json.loads(r.body)
                assert seen["method"] == method and seen["body"] == (body or "")
            r = await fetch(url, OWNER, method="HEAD")
            assert r.code == 200 and r.body == b""

            chunks = []
            req = HTTPRequest(
                f"{base}{P}/clusters/{NAME}/stream",
                headers={"Authorization": f"jupyterhub {OWNER}"},
                streaming_callback=chunks.append,
            )
            r = await AsyncHTTPClient().fetch(req)
            assert r.code == 200
            assert b"".join(chunks) == b"".join(f"chunk{i};".encode() for i in range(5))
            assert len(chunks) > 1  # streamed, not buffered into one piece

            # a caller that goes away mid-stream: nothing breaks, the next request is served
            def give_up(chunk):
                raise RuntimeError("caller gives up")

            req = HTTPRequest(
                f"{base}{P}/clusters/{NAME}/stream",
                headers={"Authorization": f"jupyterhub {OWNER}"},
                streaming_callback=give_up,
            )
            with pytest.raises(HTTPClientError):
                await AsyncHTTPClient().fetch(req)
            assert (await fetch(f"{base}{P}/api/health")).code == 200

            # an upstream that dies mid-body: the caller sees a broken response, not a short complete one
            with pytest.raises(HTTPClientError):
                await AsyncHTTPClient().fetch(
                    f"{base}{P}/clusters/{NAME}/truncated", headers={"Authorization": f"jupyterhub {OWNER}"}
                )
            await asyncio.sleep(0.2)  # let the abandoned stream run out
        finally:
            for s in servers:
                s.stop()

    run(scenario())


def test_api_passes_without_the_guard_asking():
    async def scenario():
        base, calls, _guard, servers = await start_pair()
        try:
            r = await fetch(f"{base}{P}/api/health")
            assert r.code == 200 and json.loads(r.body) == {"status": "pass"}
            r = await fetch(f"{base}{P}/api/v1/clusters/{NAME}", OTHER)
            assert r.code == 404  # the gateway's own answer
            assert calls == [(NAME, f"jupyterhub {OTHER}")]  # one call: the forwarded request itself
        finally:
            for s in servers:
                s.stop()

    run(scenario())


def test_no_credentials_browser_goes_to_hub_oauth_api_caller_gets_401():
    async def scenario():
        base, calls, _guard, servers = await start_pair()
        try:
            r = await fetch(f"{base}{P}/clusters/{NAME}/status")
            assert r.code == 302
            loc = urlsplit(r.headers["Location"])
            assert loc.path == "/hub/api/oauth2/authorize"
            q = parse_qs(loc.query)
            assert q["client_id"] == ["service-dask-gateway"]
            assert q["redirect_uri"] == [f"{P}/oauth_callback"]
            assert q["response_type"] == ["code"] and q["state"] and q["code_challenge"]
            assert "service-dask-gateway-oauth-state" in r.headers["Set-Cookie"]
            r = await fetch(f"{base}{P}/clusters/{NAME}/status", method="POST", body="x")
            assert r.code == 401
            assert calls == []  # nothing forwarded, nobody asked
        finally:
            for s in servers:
                s.stop()

    run(scenario())


def test_websocket_is_bridged_for_the_owner_only():
    async def scenario():
        base, _calls, _guard, servers = await start_pair()
        ws_url = base.replace("http", "ws") + f"{P}/clusters/{NAME}/ws"
        try:
            conn = await websocket_connect(
                HTTPRequest(ws_url, headers={"Authorization": f"jupyterhub {OWNER}"}),
                subprotocols=["bokeh", "session-token"],
            )
            assert conn.selected_subprotocol == "bokeh"
            assert await conn.read_message() == "hello"
            await conn.write_message("ping")
            assert await conn.read_message() == "echo:ping"
            await conn.write_message(b"\x00\x01", binary=True)
            assert await conn.read_message() == b"bin:\x00\x01"
            conn.close()

            for token, code in [(OTHER, 403), (BAD, 401), (None, 401)]:
                headers = {"Authorization": f"jupyterhub {token}"} if token else {}
                with pytest.raises(HTTPClientError) as info:
                    await websocket_connect(HTTPRequest(ws_url, headers=headers))
                assert info.value.code == code

            # a page of another site may not open the owner's WebSocket
            with pytest.raises(HTTPClientError) as info:
                await websocket_connect(
                    HTTPRequest(ws_url, headers={**auth_header(OWNER), "Origin": "http://evil.example"})
                )
            assert info.value.code == 403
        finally:
            for s in servers:
                s.stop()

    run(scenario())


def test_gateway_down_is_a_502():
    async def scenario():
        port, hub_port = free_port(), free_port()
        hub = web.Application([(r"/hub/api/user", FakeHubUser)], hub_calls=[]).listen(hub_port, address="127.0.0.1")
        hub_auth = make_hub_auth(f"http://127.0.0.1:{hub_port}/hub/api", "t")
        guard = Guard(f"http://127.0.0.1:{free_port()}", hub_auth)  # nothing listens there
        server = make_app(guard, b"x" * 32).listen(port, address="127.0.0.1")
        try:
            base = f"http://127.0.0.1:{port}"
            r = await fetch(f"{base}{P}/clusters/{NAME}/status", OWNER)
            assert r.code == 502
            r = await fetch(f"{base}{P}/api/health")
            assert r.code == 502
        finally:
            server.stop()
            hub.stop()

    run(scenario())


def test_oauth_cookie_identifies_a_browser():
    from tornado.web import create_signed_value

    secret = derive_cookie_secret("ab" * 32)

    def cookie(token: str) -> str:
        return "service-dask-gateway=" + create_signed_value(secret, "service-dask-gateway", token).decode()

    async def scenario():
        base, _calls, _guard, servers = await start_pair()
        try:
            dash = f"{base}{P}/clusters/{NAME}/status"
            r = await fetch(dash, headers={"Cookie": cookie(OWNER) + "; keep=1"})
            assert r.code == 200, r.body
            assert json.loads(r.body)["cookie"] == "keep=1"  # the token cookie is not passed on
            r = await fetch(dash, headers={"Cookie": cookie(OTHER)})
            assert r.code == 403 and b"belongs to another user's cluster" in r.body
            # a cookie signed with another secret is no cookie: log in
            forged = "service-dask-gateway=" + create_signed_value(b"y" * 32, "service-dask-gateway", OWNER).decode()
            r = await fetch(dash, headers={"Cookie": forged})
            assert r.code == 302 and "/hub/api/oauth2/authorize" in r.headers["Location"]
            # a token the hub no longer knows: the cookie is cleared and the browser logs in again
            r = await fetch(dash, headers={"Cookie": cookie(BAD)})
            assert r.code == 302 and "/hub/api/oauth2/authorize" in r.headers["Location"]
            cleared = [c for c in r.headers.get_list("Set-Cookie") if c.startswith("service-dask-gateway=")]
            assert cleared[0].startswith('service-dask-gateway=""; expires='), cleared  # cleared
            # cookie-authenticated writes from another site's page are refused; same-site ones pass
            cross = {"Cookie": cookie(OWNER), "Sec-Fetch-Site": "cross-site", "Origin": "http://evil.example"}
            r = await fetch(dash, method="POST", body="x", headers=cross)
            assert r.code == 403 and b"Cross-site" in r.body
            same = {"Cookie": cookie(OWNER), "Sec-Fetch-Site": "same-origin"}
            r = await fetch(dash, method="POST", body="x", headers=same)
            assert r.code == 200
            # a token header is not a browser's ambient credential: no cross-site rule
            r = await fetch(dash, OWNER, method="POST", body="x", headers={"Sec-Fetch-Site": "cross-site"})
            assert r.code == 200
        finally:
            for s in servers:
                s.stop()

    run(scenario())


# ---------------------------------------------------------------------------
# wiring: dask-gateway-server behind the guard
# ---------------------------------------------------------------------------


def test_gateway_serves_under_the_guards_prefix_and_checks_its_scope(tmp_path, monkeypatch):
    """dask-gateway-server runs as the hub service `dask-gateway-server`, yet serves under
    /services/dask-gateway and requires access:services!service=dask-gateway."""
    from pathlib import Path

    from traitlets.config import Config

    from workbench.gateway.config import configure_gateway
    from workbench.policy import load_policy
    from workbench.runtime import Runtime

    demo = Path(__file__).resolve().parents[2] / "hub_config" / "demo.yaml"
    monkeypatch.setenv("JUPYTERHUB_SERVICE_NAME", "dask-gateway-server")
    rt = Runtime(config=str(demo), state_dir=str(tmp_path), hub_config_dir="h", venv_bin="/v/bin", proxy_command="p")
    c = Config()
    configure_gateway(c, rt, load_policy(demo))
    assert c.Proxy.prefix == "/services/dask-gateway"
    assert c.JupyterHubAuthenticator.jupyterhub_service_name == "dask-gateway"
    assert c.JupyterHubAuthenticator.use_service_access_scopes is True
    assert c.Proxy.address == f"127.0.0.1:{rt.gateway_http_port}"
