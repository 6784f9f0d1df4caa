"""What a request to the dashboard guard is, and what of it is forwarded (pure; :mod:`workbench.gateway.dashguard`
is the proxy that uses it).

- :func:`classify`: a raw request path as dask-gateway's own proxy routes it (a cluster's dashboard, the API,
  invalid), on the percent-decoded path segment by segment, so an encoded path cannot reach a dashboard
  unchecked;
- the caller's token from ``Authorization`` (:func:`token_from_authorization`), whether a request is a
  WebSocket, a page view to send to the login, or cross-site;
- the headers passed upstream (:func:`upstream_headers`: no hop-by-hop headers, none of the guard's cookies).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

from tornado import httputil

from workbench.names import GATEWAY_SERVICE

PREFIX = f"/services/{GATEWAY_SERVICE}/"
#: dask-gateway names clusters with uuid4().hex (Kubernetes: "<namespace>.<hex>")
CLUSTER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,252}")
TOKEN_SCHEMES = ("jupyterhub", "token", "bearer")
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
    }
)
#: request headers never passed on: hop-by-hop, and those the HTTP client sets itself
NOT_FORWARDED = HOP_BY_HOP | {"content-length", "expect"}
WEBSOCKET_HANDSHAKE = frozenset(
    {"sec-websocket-key", "sec-websocket-version", "sec-websocket-extensions", "sec-websocket-protocol"}
)


@dataclass(frozen=True)
class Route:
    """What a request path is, as dask-gateway's proxy would route it.

    ``kind``: ``"dashboard"`` (a cluster's dashboard: ``cluster`` is its name), ``"no-cluster"``
    (under ``clusters/`` but with no valid cluster name), ``"pass"`` (anything else: the API, …)
    or ``"invalid"`` (not a path, or with ``.``/``..`` segments).
    """

    kind: str
    cluster: str = ""


def gateway_segments(raw_path: str) -> list[str]:
    """The path segments dask-gateway-proxy matches routes on (pure).

    Go's ``net/url`` gives the proxy the percent-decoded path (``%2F`` included); its router strips
    one leading and one trailing ``/`` and splits on ``/``, with no other normalisation.
    """
    path = unquote(raw_path).removeprefix("/").removesuffix("/")
    return path.split("/") if path else []


def classify(raw_path: str, service: str = GATEWAY_SERVICE) -> Route:
    """Classify a raw (still percent-encoded) request path (pure)."""
    if not raw_path.startswith("/"):
        return Route("invalid")
    segments = gateway_segments(raw_path)
    if any(s in (".", "..") for s in segments):
        return Route("invalid")
    if segments[:3] != ["services", service, "clusters"]:
        return Route("pass")
    name = segments[3] if len(segments) > 3 else ""
    if not CLUSTER_NAME.fullmatch(name):
        return Route("no-cluster")
    return Route("dashboard", name)


def token_from_authorization(value: str | None) -> str | None:
    """The token of an ``Authorization: jupyterhub|token|bearer <token>`` header, else None (pure)."""
    scheme, _, token = (value or "").strip().partition(" ")
    token = token.strip()
    if scheme.lower() in TOKEN_SCHEMES and token and " " not in token:
        return token
    return None


def is_websocket_request(headers: Mapping[str, str]) -> bool:
    return headers.get("Upgrade", "").lower() == "websocket"


def wants_login_redirect(method: str, headers: Mapping[str, str]) -> bool:
    """A caller with no credentials is sent to log in when it looks like a browser page view (pure)."""
    return method in ("GET", "HEAD") and not is_websocket_request(headers)


def cross_site(headers: Mapping[str, str]) -> bool:
    """Whether a request comes from another site's page (pure).

    Same rules as tornado's cross-origin protection: ``Sec-Fetch-Site`` when the browser sends
    it, else ``Origin`` against ``Host``; a request with neither is not a browser's cross-site one.
    """
    site = headers.get("Sec-Fetch-Site")
    if site in ("same-origin", "none"):
        return False
    origin = headers.get("Origin")
    if site is None:
        if origin is None:
            return False
        return urlsplit(origin).netloc.lower() != headers.get("Host", "").lower()
    return True


def strip_cookies(cookie_header: str, drop: Callable[[str], bool]) -> str:
    """A ``Cookie`` header without the cookies whose name ``drop`` selects (pure)."""
    kept = []
    for part in cookie_header.split(";"):
        part = part.strip()
        if part and not drop(part.partition("=")[0].strip()):
            kept.append(part)
    return "; ".join(kept)


def upstream_headers(
    headers: httputil.HTTPHeaders, drop_cookie: Callable[[str], bool], websocket: bool = False
) -> httputil.HTTPHeaders:
    """Request headers to send upstream: all but hop-by-hop ones and this guard's own cookies (pure)."""
    listed = {t.strip().lower() for t in headers.get("Connection", "").split(",") if t.strip()}
    out = httputil.HTTPHeaders()
    for name, value in headers.get_all():
        low = name.lower()
        if low in NOT_FORWARDED or low in listed or (websocket and low in WEBSOCKET_HANDSHAKE):
            continue
        if low == "cookie":
            value = strip_cookies(value, drop_cookie)
            if not value:
                continue
        out.add(name, value)
    return out


def subprotocols(headers: Mapping[str, str]) -> list[str]:
    value = headers.get("Sec-WebSocket-Protocol", "")
    return [p.strip() for p in value.split(",") if p.strip()]
