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
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from urllib.parse import urlsplit

from jupyterhub.utils import subdomain_hook_idna


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
