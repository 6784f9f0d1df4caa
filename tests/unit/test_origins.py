"""Unit tests of servers isolated by origin: workbench.origins and its use by `workbench up --subdomains`."""

from __future__ import annotations

import pytest
from traitlets.config import Config

from workbench.embedded.hub import apply_settings, hub_settings
from workbench.embedded.up import UpOptions, subdomain_host_for
from workbench.lab.cockpit import hub_prefix
from workbench.lab.notifications import services_base_url
from workbench.origins import (
    OriginRedirectHandler,
    SubdomainHostError,
    check_subdomain_host,
    loopback_redirect_settings,
    subdomain_hook,
    subdomain_settings,
)
from workbench.policy import load_policy

from .test_hub_settings import DEMO, SECRETS, make_runtime

HOST = "http://localhost:8000"


@pytest.fixture(scope="module")
def demo():
    return load_policy(DEMO)


@pytest.fixture(scope="module")
def sub(demo):
    return hub_settings(
        demo, make_runtime(quota_port=18014, extra={"subdomain_host": HOST}), {**SECRETS, "jobs_api_token": "j"}
    )


def test_users_get_their_own_subdomain_and_services_stay_on_the_hubs_host():
    assert subdomain_hook("student1", "localhost", "user") == "student1.localhost"
    assert subdomain_hook("quota", "localhost", "service") == "localhost"
    # JupyterHub's idna rules for names that are not DNS labels: never the hub's host, never a service's
    odd = subdomain_hook("Jane.Doe@uni.example", "localhost", "user")
    assert odd.endswith(".localhost") and odd.count(".") == 1 and odd != "localhost"


def test_subdomains_set_the_hubs_subdomain_host_and_keep_services_reachable_on_127_0_0_1(sub):
    hub = sub["JupyterHub"]
    assert hub["subdomain_host"] == HOST
    assert hub["subdomain_hook"] is subdomain_hook
    routes = sub["ConfigurableHTTPProxy"]["extra_routes"]
    with_url = {s["name"]: s["url"] for s in hub["services"] if s.get("url")}
    assert {"dask-gateway", "quota", "sessions", "rosters"} <= set(with_url), with_url
    service_routes = {f"127.0.0.1/services/{name}/": url for name, url in with_url.items()}
    hub_url = f"http://127.0.0.1:{make_runtime().hub_port}"
    assert routes == {
        **service_routes,
        # a browser's page on 127.0.0.1 goes to the hub's redirect; the hub's API and health check stay for clients
        "127.0.0.1/": f"{hub_url}/hub/workbench-origin-redirect",
        "127.0.0.1/hub/api/": hub_url,
        "127.0.0.1/hub/health": hub_url,
    }
    assert hub["extra_handlers"] == [(r"/workbench-origin-redirect/(.*)", OriginRedirectHandler, {"origin": HOST})]
    # OAuth callbacks stay relative (the dashboard guard's HubOAuth sends /services/dask-gateway/oauth_callback)
    callbacks = {s["name"]: s["oauth_redirect_uri"] for s in hub["services"] if s.get("url")}
    assert callbacks == {name: f"/services/{name}/oauth_callback" for name in with_url}
    spawner = sub["WorkbenchLocalSpawner"]
    assert spawner["environment"]["WORKBENCH_SERVICES_URL"] == "http://127.0.0.1:8000/services/"
    assert spawner["dask_env"]["gateway_url"] == f"{HOST}/services/dask-gateway"
    # the settings are accepted by JupyterHub's traits as they are
    c = Config()
    apply_settings(c, sub)
    assert c.JupyterHub.subdomain_host == HOST


def test_without_subdomains_nothing_changes(demo):
    s = hub_settings(demo, make_runtime(), SECRETS)
    assert "subdomain_host" not in s["JupyterHub"]
    assert "extra_routes" not in s["ConfigurableHTTPProxy"]
    assert "WORKBENCH_SERVICES_URL" not in s["WorkbenchLocalSpawner"]["environment"]


def test_no_extra_route_for_the_hubs_own_host():
    s = subdomain_settings(HOST, [{"name": "quota", "url": "http://127.0.0.1:9"}], ["localhost", "127.0.0.1"])
    assert s["ConfigurableHTTPProxy"]["extra_routes"] == {"127.0.0.1/services/quota/": "http://127.0.0.1:9"}


@pytest.mark.parametrize(
    "url, says",
    [
        ("localhost:8000", "not an http(s) URL"),
        ("http://127.0.0.1:8000", "is an IP address"),
        ("https://workbench.example.edu/hub/", "more than scheme, host and port"),
    ],
)
def test_a_subdomain_host_that_cannot_work_is_refused_naming_the_field_and_the_fix(url, says):
    with pytest.raises(SubdomainHostError) as e:
        check_subdomain_host(url, "hub.subdomainHost")
    assert str(e.value).startswith("hub.subdomainHost: ") and says in str(e.value)
    assert "e.g. https://workbench.example.edu" in str(e.value)


def test_workbench_up_puts_servers_on_their_own_origins_by_default():
    assert subdomain_host_for(UpOptions(port=8123)) == ("http://localhost:8123", "")
    assert subdomain_host_for(UpOptions(subdomains=True, port=8123)) == ("http://localhost:8123", "")
    assert subdomain_host_for(UpOptions(subdomains=False, port=8123)) == ("", "")
    assert subdomain_host_for(UpOptions(subdomain_host="https://wb.example.edu/")) == ("https://wb.example.edu", "")
    assert subdomain_host_for(UpOptions(bind="0.0.0.0", subdomain_host="https://wb.example.edu")) == (
        "https://wb.example.edu",
        "",
    )


def test_on_a_network_bind_the_default_falls_back_to_one_origin_with_a_warning_and_an_explicit_ask_fails():
    host, warning = subdomain_host_for(UpOptions(bind="0.0.0.0"))
    assert host == ""
    assert warning.startswith("--bind 0.0.0.0 without --subdomain-host: users' servers share the hub's origin")
    assert "pass --subdomain-host https://<name>" in warning and "--no-subdomains" in warning
    assert "\n" not in warning
    assert subdomain_host_for(UpOptions(bind="0.0.0.0", subdomains=False)) == ("", "")
    with pytest.raises(SubdomainHostError, match="--subdomain-host https://"):
        subdomain_host_for(UpOptions(subdomains=True, bind="0.0.0.0"))


def test_the_redirect_routes_leave_the_hubs_own_host_alone():
    s = loopback_redirect_settings("http://localhost:8000", ["localhost", "127.0.0.1", "127.0.0.1"], "http://h:1/")
    assert s["ConfigurableHTTPProxy"]["extra_routes"] == {
        "127.0.0.1/": "http://h:1/hub/workbench-origin-redirect",
        "127.0.0.1/hub/api/": "http://h:1",
        "127.0.0.1/hub/health": "http://h:1",
    }


@pytest.mark.parametrize(
    "method, path, status, location",
    [
        ("GET", "/hub/workbench-origin-redirect/", 302, "http://localhost:8000/"),
        (
            "GET",
            "/hub/workbench-origin-redirect/hub/login?next=%2Fhub%2Fhome",
            302,
            "http://localhost:8000/hub/login?next=%2Fhub%2Fhome",
        ),
        ("GET", "/hub/workbench-origin-redirect/user/a%2Fb/lab", 302, "http://localhost:8000/user/a%2Fb/lab"),
        # the host stays the hub's: a path that looks like a host is a path there
        ("GET", "/hub/workbench-origin-redirect//evil.example/x", 302, "http://localhost:8000/evil.example/x"),
        ("POST", "/hub/workbench-origin-redirect/hub/login", 307, "http://localhost:8000/hub/login"),
    ],
)
def test_the_redirect_handler_keeps_path_and_query_and_only_the_hubs_origin(method, path, status, location):
    """The handler in a real tornado server on a free loopback port, asked over HTTP (no hub, no proxy)."""
    import asyncio

    from tornado.httpclient import AsyncHTTPClient
    from tornado.httpserver import HTTPServer
    from tornado.testing import bind_unused_port
    from tornado.web import Application

    async def ask() -> tuple[int, str]:
        app = Application([(r"/hub/workbench-origin-redirect/(.*)", OriginRedirectHandler, {"origin": HOST})])
        sock, port = bind_unused_port()
        server = HTTPServer(app)
        server.add_sockets([sock])
        try:
            r = await AsyncHTTPClient().fetch(
                f"http://127.0.0.1:{port}{path}",
                method=method,
                body=b"x=1" if method == "POST" else None,
                follow_redirects=False,
                raise_error=False,
            )
            return r.code, r.headers.get("Location", "")
        finally:
            server.stop()

    assert asyncio.run(ask()) == (status, location)


def test_the_cockpits_dashboard_links_and_the_notifications_use_the_hubs_origin():
    env = {
        "JUPYTERHUB_BASE_URL": "/",
        "JUPYTERHUB_PUBLIC_URL": "http://student1.localhost:8000/user/student1/",
        "JUPYTERHUB_PUBLIC_HUB_URL": "http://localhost:8000/hub/",
    }
    assert hub_prefix(env) == "http://localhost:8000/"
    assert services_base_url(env) == "http://localhost:8000/services/"
    assert hub_prefix({"JUPYTERHUB_BASE_URL": "/jh/", "JUPYTERHUB_PUBLIC_HUB_URL": ""}) == "/jh"


def test_the_hub_pod_refuses_a_subdomain_host_that_cannot_work():
    """The chart checks hub.subdomainHost at render time; the hub checks WORKBENCH_SUBDOMAIN_HOST once more."""
    from workbench.kubernetes.hub import K8sConfigError, k8s_hub_settings

    from .test_k8s_hub import CENTRE, HUB

    centre = load_policy(CENTRE)
    with pytest.raises(K8sConfigError, match=r"hub\.subdomainHost \(WORKBENCH_SUBDOMAIN_HOST\): .* is an IP address"):
        k8s_hub_settings(centre, {**HUB, "WORKBENCH_SUBDOMAIN_HOST": "https://10.0.0.5"})
    ok = k8s_hub_settings(centre, {**HUB, "WORKBENCH_SUBDOMAIN_HOST": "https://workbench.example.edu/"})
    assert ok["JupyterHub"]["subdomain_host"] == "https://workbench.example.edu"
