"""The chart's `hub.subdomainHost`: each user's server on its own origin, rendered with the real `helm template`.

Rendered with examples/production-values.yaml (Ingress on workbench.example.edu with TLS) plus
``hub.subdomainHost``; every object is validated against the Kubernetes schema, and the hub's settings are
computed from the rendered hub environment by the hub's own code (`k8s_hub_settings`). No cluster is used.
"""

from __future__ import annotations

import kubernetes_validate
import pytest
from traitlets.config import Config

from workbench.kubernetes.hub import GATEWAY_PREFIX, k8s_hub_settings
from workbench.origins import subdomain_hook
from workbench.settings import apply_settings

from .chartlib import OAUTH_SECRET, TRAEFIK_KINDS, expect_failure, platform_policy
from .conftest import K8S_VERSION, PRODUCTION, RELEASE, container_env, find, helm_template, one

HOST = "https://workbench.example.edu"


@pytest.fixture(scope="module")
def sub_objects(helm):
    return helm_template(helm, "--values", str(PRODUCTION), "--set", f"hub.subdomainHost={HOST}")


def test_the_ingress_serves_the_wildcard_host_with_tls_and_every_object_is_valid(sub_objects):
    for obj in sub_objects:
        if obj["kind"] not in TRAEFIK_KINDS:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    [ingress] = find(sub_objects, "Ingress")
    hosts = ["workbench.example.edu", "*.workbench.example.edu"]
    assert [r["host"] for r in ingress["spec"]["rules"]] == hosts
    assert ingress["spec"]["tls"] == [{"hosts": hosts, "secretName": "workbench-tls"}]
    for rule in ingress["spec"]["rules"]:
        assert rule["http"]["paths"][0]["backend"]["service"]["name"] == f"{RELEASE}-proxy-public"


def test_the_proxy_routes_by_host_and_the_hub_gets_subdomain_host(sub_objects):
    [proxy] = one(sub_objects, "Deployment", f"{RELEASE}-proxy")["spec"]["template"]["spec"]["containers"]
    assert "--host-routing" in proxy["command"]
    env = container_env(sub_objects, f"{RELEASE}-hub", OAUTH_SECRET)
    assert env["WORKBENCH_SUBDOMAIN_HOST"] == HOST
    settings = k8s_hub_settings(platform_policy(sub_objects), env)
    hub = settings["JupyterHub"]
    assert hub["subdomain_host"] == HOST and hub["subdomain_hook"] is subdomain_hook
    # notebooks reach the services through the proxy's in-cluster Service: that host keeps their routes
    services = {s["name"]: s for s in hub["services"] if s.get("url")}
    assert {"dask-gateway", "quota", "sessions"} <= set(services)
    assert settings["ConfigurableHTTPProxy"]["extra_routes"] == {
        f"{RELEASE}-proxy-public/services/{name}/": s["url"] for name, s in services.items()
    }
    assert env["WORKBENCH_SERVICES_URL"].startswith(f"http://{RELEASE}-proxy-public:")
    assert all(s["oauth_redirect_uri"] == f"/services/{n}/oauth_callback" for n, s in services.items())
    # Dask dashboards are linked on the hub's origin, where the dashboard guard's login lives
    environment = settings["WorkbenchKubeSpawner"]["environment"]
    assert environment["DASK_GATEWAY__PUBLIC_ADDRESS"] == f"{HOST}{GATEWAY_PREFIX}"
    c = Config()
    apply_settings(c, settings)
    assert c.JupyterHub.subdomain_host == HOST


def test_without_it_nothing_changes(production_objects):
    [proxy] = one(production_objects, "Deployment", f"{RELEASE}-proxy")["spec"]["template"]["spec"]["containers"]
    assert "--host-routing" not in proxy["command"]
    [ingress] = find(production_objects, "Ingress")
    assert [r["host"] for r in ingress["spec"]["rules"]] == ["workbench.example.edu"]
    env = container_env(production_objects, f"{RELEASE}-hub", OAUTH_SECRET)
    assert "WORKBENCH_SUBDOMAIN_HOST" not in env
    assert "subdomain_host" not in k8s_hub_settings(platform_policy(production_objects), env)["JupyterHub"]


@pytest.mark.parametrize(
    "sets, says",
    [
        (
            ["hub.subdomainHost=https://10.0.0.5"],
            'hub.subdomainHost: "https://10.0.0.5" is an IP address, which has no subdomains',
        ),
        (
            ["hub.subdomainHost=https://lab.example.edu"],
            'hub.subdomainHost: its host "lab.example.edu" is not ingress.host "workbench.example.edu"',
        ),
        (
            ["hub.subdomainHost=https://lab.example.edu", "ingress.enabled=false"],
            "publicUrl to https://lab.example.edu (or leave it empty)",
        ),
        (
            ["hub.subdomainHost=https://workbench.example.edu/hub/"],
            'hub.subdomainHost: "https://workbench.example.edu/hub/" is not an origin (scheme://host[:port], '
            "nothing after); set it to the hub's origin, e.g. https://workbench.example.edu",
        ),
        (["hub.subdomainHost=workbench.example.edu"], "is not an origin"),
    ],
)
def test_a_subdomain_host_that_cannot_work_fails_naming_the_value_and_the_fix(helm, sets, says):
    args = ["--values", str(PRODUCTION)]
    for s in sets:
        args += ["--set", s]
    assert says in expect_failure(helm, *args)
