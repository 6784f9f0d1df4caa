"""Servers isolated by origin: the JupyterHub settings of ``subdomain_host``, for every engine's hub.

Without subdomains every user's server is a path of the hub's own origin (``/user/<name>/``), so a page
a user serves from it (through jupyter-server-proxy, a notebook's HTML output, ...) runs with the hub's
origin: opened by another user (an instructor helping a student, an admin), its script can read the
hub's pages with that user's cookie, take their XSRF token and act with their hub API rights. With
``JupyterHub.subdomain_host`` each server lives on its own host, ``<user>.<domain>`` (JupyterHub's
``idna`` hook), a different origin and site from the hub's: the hub's cookie (host-only on the hub's
host) is never sent with the server's requests and the hub answers them without CORS headers.

The hub's services stay on the hub's own host (:func:`subdomain_hook`): their clients (notebooks, the
cockpit, dashboards opened by their owner) keep their URLs, and a service's OAuth callback is on the
host its pages are opened at. Clients inside the platform that reach the proxy by another name (the
embedded mode's ``127.0.0.1``, the chart's in-cluster proxy Service) get the same services through
extra proxy routes (:func:`subdomain_settings`); ``/hub/`` answers on every host (the hub's route ``/``).

A browser that opens such another name (the embedded mode's ``http://127.0.0.1:<port>``, the address ``make up``
has always printed) would get the hub's pages on a host where the hub's cookies are not valid (JupyterHub sets
its session cookie for ``subdomain_host``'s domain): its login would never stick. :func:`loopback_redirect_settings`
sends every page there to the hub's origin instead (same path and query), keeping the hub's API, its health check
and the services for the platform's own clients.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from urllib.parse import urlsplit

from jupyterhub.utils import subdomain_hook_idna
from tornado import web


class SubdomainHostError(ValueError):
    """A subdomain host that cannot work, with the field and the fix in the message."""


def subdomain_hook(name: str, domain: str, kind: str) -> str:
    """Users on their own subdomain (JupyterHub's ``idna`` hook); services on the hub's own host."""
    if kind == "service":
        return domain
    return subdomain_hook_idna(name, domain, kind)


def check_subdomain_host(url: str, field: str) -> str:
    """``scheme://host[:port]`` with a DNS name (``*.host`` must resolve to the proxy), or an error naming ``field``."""
    u = urlsplit(url.strip())
    fix = f"set {field} to the wildcard host's origin, e.g. https://workbench.example.edu (users at https://<user>.workbench.example.edu)"
    if u.scheme not in ("http", "https") or not u.hostname:
        raise SubdomainHostError(f"{field}: {url!r} is not an http(s) URL; {fix}")
    if u.path not in ("", "/") or u.query or u.fragment or u.username or u.password:
        raise SubdomainHostError(f"{field}: {url!r} has more than scheme, host and port; {fix}")
    try:
        ipaddress.ip_address(u.hostname)
    except ValueError:
        pass
    else:
        raise SubdomainHostError(
            f"{field}: {url!r} is an IP address, which has no subdomains; {fix} (or http://localhost:<port> on one machine)"
        )
    return f"{u.scheme}://{u.netloc}"


def service_routes(services: Iterable[Mapping], hosts: Iterable[str], hub_host: str) -> dict[str, str]:
    """Proxy routes ``<host>/services/<name>/`` -> the service's URL, for each other name of the proxy (pure)."""
    return {
        f"{host}/services/{s['name']}/": s["url"]
        for host in dict.fromkeys(hosts)
        if host and host != hub_host
        for s in services
        if s.get("url")
    }


def subdomain_settings(subdomain_host: str, services: Iterable[Mapping], internal_hosts: Iterable[str]) -> dict:
    """The hub settings that put each user's server on its own origin (pure).

    ``services``: the hub's service specs (those with a ``url`` get routes and keep their relative OAuth
    callback; the specs are returned as ``JupyterHub.services``); ``internal_hosts``: the other host names by
    which platform processes reach the proxy (without port).
    """
    hub_host = urlsplit(subdomain_host).hostname or ""
    services = [
        # a service's OAuth callback stays where its pages are opened, as without subdomains: JupyterHub would
        # register <subdomain_host>/services/<name>/oauth_callback, and refuse the relative one that HubOAuth
        # sends (the dashboard guard: "400 Bad Request" at the hub's authorize page)
        {"oauth_redirect_uri": f"/services/{s['name']}/oauth_callback", **s} if s.get("url") else dict(s)
        for s in services
    ]
    return {
        "JupyterHub": {"subdomain_host": subdomain_host, "subdomain_hook": subdomain_hook, "services": services},
        "ConfigurableHTTPProxy": {"extra_routes": service_routes(services, internal_hosts, hub_host)},
    }


def merge_settings(settings: dict[str, dict], extra: Mapping[str, Mapping]) -> dict[str, dict]:
    """``settings`` with each section of ``extra`` merged into it (in place; returned for chaining)."""
    for section, values in extra.items():
        settings.setdefault(section, {}).update(values)
    return settings


#: the hub's handler of :class:`OriginRedirectHandler` (under the hub's ``/hub/`` prefix), the target of the
#: proxy's catch-all route of each other host name
REDIRECT_PREFIX = "/workbench-origin-redirect"

#: paths that stay on the other host names for the platform's own clients (the hub's REST API, its health check)
INTERNAL_HUB_PATHS = ("/hub/api/", "/hub/health")


class OriginRedirectHandler(web.RequestHandler):
    """Sends a request that came by another name of the proxy to the same path and query on the hub's origin.

    The proxy routes ``<other host>/`` here with the original path appended to :data:`REDIRECT_PREFIX` (CHP
    prepends the target's path). 302 for GET and HEAD, 307 for the rest (the method and body are kept). The
    target's host is always ``origin``, never taken from the request.
    """

    def initialize(self, origin: str) -> None:
        self.origin = origin

    def check_xsrf_cookie(self) -> None:
        """Nothing to protect: the handler acts on nothing, it only redirects (a POST keeps its method, 307)."""

    def _redirect(self, _path: str) -> None:
        path = self.request.path.split(REDIRECT_PREFIX, 1)[1]  # as sent (tornado's argument is %-decoded)
        query = f"?{self.request.query}" if self.request.query else ""
        status = 302 if self.request.method in ("GET", "HEAD") else 307
        self.redirect(f"{self.origin}/{path.lstrip('/')}{query}", status=status)

    get = head = post = put = patch = delete = options = _redirect


def loopback_redirect_settings(subdomain_host: str, hosts: Iterable[str], hub_url: str) -> dict:
    """Settings that send browsers on ``hosts`` (other names of the proxy) to the hub's origin (pure).

    ``hub_url``: the hub's own address (``http://127.0.0.1:<hub port>``). Each host gets the proxy routes
    ``<host>/`` -> the hub's :class:`OriginRedirectHandler` and ``<host><path>`` -> the hub for each of
    :data:`INTERNAL_HUB_PATHS`; its ``/services/<name>/`` routes come from :func:`service_routes`. The handler
    is one of the hub's ``extra_handlers`` (deprecated by JupyterHub in favour of services, which would be one
    more process for a redirect, and still supported in 6.1).
    """
    origin = check_subdomain_host(subdomain_host, "subdomain_host")
    hub_host = urlsplit(origin).hostname or ""
    hub_url = hub_url.rstrip("/")
    routes: dict[str, str] = {}
    for host in dict.fromkeys(hosts):
        if host and host != hub_host:
            routes[f"{host}/"] = f"{hub_url}/hub{REDIRECT_PREFIX}"
            routes.update({f"{host}{path}": hub_url for path in INTERNAL_HUB_PATHS})
    return {
        "JupyterHub": {"extra_handlers": [(rf"{REDIRECT_PREFIX}/(.*)", OriginRedirectHandler, {"origin": origin})]},
        "ConfigurableHTTPProxy": {"extra_routes": routes},
    }
