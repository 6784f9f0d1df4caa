"""The chart's access rules, rendered with a real Helm: namespaced least-privilege RBAC, a NetworkPolicy for
every component (notebooks reach only the hub, the gateway and DNS; schedulers only through the gateway proxy),
and Dask dashboards reached only through the owner-checking guard."""

from __future__ import annotations

import ipaddress

from workbench.kubernetes.gateway import k8s_gateway_settings
from workbench.kubernetes.guard import k8s_guard_settings
from workbench.kubernetes.hub import GATEWAY_PREFIX, k8s_hub_settings

from .chartlib import (
    API_USERS,
    METADATA,
    OAUTH_SECRET,
    _core,
    _peer_components,
    _policies,
    _ports,
    _reaches,
    component,
    platform_policy,
    policies_selector,
)
from .conftest import (
    NAMESPACE,
    RELEASE,
    container_env,
    find,
    helm_template,
    one,
    secret_data,
)

# ---------------------------------------------------------------------------
# RBAC
# ---------------------------------------------------------------------------

EXPECTED_RULES = {
    "hub": [
        ([""], ["pods", "persistentvolumeclaims", "services"], ["get", "list", "watch", "create", "delete"]),
        ([""], ["events"], ["get", "list", "watch"]),
    ],
    "gateway-api": [
        (["gateway.dask.org"], ["daskclusters"], ["get", "list", "watch", "create", "patch"]),
        ([""], ["secrets"], ["get"]),
    ],
    "gateway-controller": [
        (["gateway.dask.org"], ["daskclusters"], ["get", "list", "watch", "patch", "delete"]),
        (["gateway.dask.org"], ["daskclusters/status"], ["get", "patch", "update"]),
        ([""], ["pods"], ["get", "list", "watch", "create", "delete"]),
        ([""], ["endpoints"], ["get", "list", "watch"]),
        ([""], ["secrets", "services"], ["get", "create", "delete"]),
        (["traefik.io"], ["ingressroutes", "ingressroutetcps"], ["get", "create", "delete"]),
    ],
    "jobs": [  # the calls of workbench.jobs.kube: create/patch/delete a Job, read its status, list its pods
        (["batch"], ["jobs"], ["create", "patch", "delete"]),
        ([""], ["secrets"], ["create", "delete"]),  # a run's gateway token (workbench.jobs.runend)
        (["batch"], ["jobs/status"], ["get"]),
        ([""], ["pods"], ["list"]),
    ],
}


def test_rbac_is_namespaced_and_least_privilege(objects):
    assert not find(objects, "ClusterRole") and not find(objects, "ClusterRoleBinding")
    roles = {component(r): r for r in find(objects, "Role")}
    assert set(roles) == API_USERS
    for comp, expected in EXPECTED_RULES.items():
        rules = [(r["apiGroups"], r["resources"], r["verbs"]) for r in roles[comp]["rules"]]
        assert rules == expected, comp
    for rule in roles["gateway-proxy"]["rules"]:  # Traefik: read-only
        assert set(rule["verbs"]) <= {"get", "list", "watch"}
    for role in roles.values():
        for rule in role["rules"]:
            assert "*" not in rule["verbs"] and "*" not in rule["resources"]
    bindings = {component(b): b for b in find(objects, "RoleBinding")}
    assert set(bindings) == API_USERS
    for comp, binding in bindings.items():
        assert binding["roleRef"] == {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "Role",
            "name": f"{RELEASE}-{comp}",
        }
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": f"{RELEASE}-{comp}", "namespace": NAMESPACE}]


# ---------------------------------------------------------------------------
# NetworkPolicies
# ---------------------------------------------------------------------------


def test_every_component_has_a_network_policy(objects):
    policies = _policies(objects)
    # placeholders and pre-pullers (production values) only sleep: nothing in, nothing out
    for comp in ("user-placeholder", "image-puller"):
        if comp in policies:
            assert policies.pop(comp) == {
                "podSelector": policies_selector(objects, comp),
                "policyTypes": ["Ingress", "Egress"],
            }
    assert set(policies) == {
        "hub",
        "proxy",
        "singleuser",
        "gateway-api",
        "gateway-controller",
        "gateway-proxy",
        "dask-scheduler",
        "dask-worker",
        "gateway-guard",
        "quota",
        "sessions",
        "rosters",
        "jobs",
        "notebook-job",
    }


def test_notebook_pods_reach_only_the_hub_the_gateway_and_dns(objects):
    spec = _policies(objects)["singleuser"]
    assert spec["policyTypes"] == ["Ingress", "Egress"]
    [ingress] = spec["ingress"]
    assert _peer_components(ingress["from"], objects) == {"proxy", "hub"} and _ports(ingress) == {8888}
    reached = {}
    for rule in _core(spec["egress"], "to"):
        for comp in _peer_components(rule["to"], objects, dns=_ports(rule) == {53}):
            reached[comp] = _ports(rule)
    assert reached.pop("hub") == {8081}
    assert reached.pop("gateway-guard") == {8000}  # the gateway API, and dashboards of their own clusters
    assert reached.pop("gateway-proxy") == {8786}  # scheduler TLS only: never the dashboards' HTTP port
    # their user's notifications from the quota and sessions services, through the hub's proxy (the services
    # check the token); never those services' pods directly
    assert reached.pop("proxy") == {8000}
    dns = [k for k in reached if k.startswith("dns:")]
    assert dns and all(reached.pop(k) == {53} for k in dns)
    # not other users' pods (or any pod, or a private address); at most public addresses
    assert set(reached) <= {"ipBlock:0.0.0.0/0"}
    for rule in _core(spec["egress"], "to"):
        assert not _reaches(rule, METADATA)
        for private in ("10.1.2.3", "172.16.0.9", "192.168.1.1", "100.64.0.1"):
            assert not _reaches(rule, ipaddress.ip_address(private))


def test_internet_egress_is_a_choice(default_objects, production_objects):
    default = _policies(default_objects)
    production = _policies(production_objects)
    for comp in ("singleuser", "dask-worker", "dask-scheduler"):
        assert not any(_reaches(r, ipaddress.ip_address("8.8.8.8")) for r in default[comp]["egress"])
        assert any(_reaches(r, ipaddress.ip_address("8.8.8.8")) for r in production[comp]["egress"])
        assert not any(_reaches(r, METADATA) for r in production[comp]["egress"])


def test_schedulers_are_reached_through_the_gateway_proxy_only(objects):
    policies = _policies(objects)
    sched = policies["dask-scheduler"]
    sources = {}
    for rule in sched["ingress"]:
        for comp in _peer_components(rule["from"], objects):
            sources[comp] = _ports(rule)
    assert sources == {"gateway-proxy": {8786, 8787}, "dask-worker": {8786}, "gateway-api": {8788}}
    worker = policies["dask-worker"]
    [ingress] = worker["ingress"]
    assert _peer_components(ingress["from"], objects) == {"dask-scheduler", "dask-worker"}
    # users reach the gateway's proxy, never the API server or the controller directly
    api_sources = set().union(
        *(_peer_components(r["from"], objects) for r in _core(policies["gateway-api"]["ingress"], "from"))
    )
    assert api_sources == {"gateway-proxy", "dask-scheduler"}
    assert "ingress" not in policies["gateway-controller"] and policies["gateway-controller"]["policyTypes"] == [
        "Ingress"
    ]
    hub_sources = set().union(
        *(_peer_components(r["from"], objects) for r in _core(policies["hub"]["ingress"], "from"))
    )
    assert hub_sources == {
        "proxy",
        "singleuser",
        "gateway-api",
        "gateway-guard",
        "quota",
        "sessions",
        "rosters",
        "jobs",
    }
    gw_proxy = {}
    for rule in _core(policies["gateway-proxy"]["ingress"], "from"):
        for comp in _peer_components(rule["from"], objects):
            gw_proxy[comp] = _ports(rule)
    # notebook jobs are Dask clients too (jobs.enabled, on by default and in the production values)
    assert gw_proxy == {"gateway-guard": {8000}, "singleuser": {8786}, "notebook-job": {8786}}


def test_the_proxy_forwards_only_to_the_workbench(objects):
    spec = _policies(objects)["proxy"]
    for rule in spec["egress"]:
        assert not _reaches(rule, METADATA) and not _reaches(rule, ipaddress.ip_address("8.8.8.8"))
    api = [r for r in spec["ingress"] if 8001 in _ports(r)]
    assert len(api) == 1 and _peer_components(api[0]["from"], objects) == {"hub"}


def test_network_policies_can_be_turned_off(helm):
    objects = helm_template(helm, "--set", "networkPolicy.enabled=false")
    assert not find(objects, "NetworkPolicy")


# ---------------------------------------------------------------------------
# Dask dashboards: owner-only, through the dashboard guard
# ---------------------------------------------------------------------------


def test_dashboards_are_reached_only_through_the_dashboard_guard(objects):
    """dask-gateway's Traefik serves every cluster's dashboard with no authentication (the controller's
    route for a cluster only strips a prefix). So, from the rendered objects:

    - the hub service dask-gateway (what the hub's proxy routes /services/dask-gateway to) and notebook
      pods' DASK_GATEWAY__ADDRESS are the guard (workbench.gateway.dashguard), which forwards the API untouched and
      a dashboard to its cluster's owner only, and whose upstream is Traefik's HTTP entrypoint;
    - Traefik's HTTP port admits the guard only (notebook pods get its TLS port for schedulers), and a
      scheduler's dashboard port (8787) admits Traefik only: no pod reaches a dashboard around the guard;
    - the middleware on each cluster's route is the prefix strip of workbench.kubernetes.hub, nothing that authenticates.
    """
    hub_env = container_env(objects, f"{RELEASE}-hub", OAUTH_SECRET)
    guard_url = f"http://{RELEASE}-gateway-guard.{NAMESPACE}:8000"
    settings = k8s_hub_settings(platform_policy(objects), hub_env)
    [gateway] = [s for s in settings["JupyterHub"]["services"] if s["name"] == "dask-gateway"]
    assert gateway["url"] == guard_url and gateway["oauth_no_confirm"] is True
    assert settings["WorkbenchKubeSpawner"]["environment"]["DASK_GATEWAY__ADDRESS"] == f"{guard_url}{GATEWAY_PREFIX}"

    guard = k8s_guard_settings(container_env(objects, f"{RELEASE}-gateway-guard"))
    assert guard.upstream == f"http://{RELEASE}-gateway-proxy.{NAMESPACE}:8000"
    assert guard.hub_api_url == f"http://{RELEASE}-hub:8081/hub/api"
    assert guard.api_token == hub_env["WORKBENCH_GATEWAY_API_TOKEN"]  # the hub service dask-gateway's token
    dep = one(objects, "Deployment", f"{RELEASE}-gateway-guard")
    [container] = dep["spec"]["template"]["spec"]["containers"]
    assert container["command"] == ["python", "-m", "workbench.kubernetes", "dashguard"]
    [port] = one(objects, "Service", f"{RELEASE}-gateway-guard")["spec"]["ports"]
    assert port["port"] == guard.port == 8000

    policies = _policies(objects)
    web = {}
    for rule in policies["gateway-proxy"]["ingress"]:
        for comp in _peer_components(rule["from"], objects):
            web.setdefault(comp, set()).update(_ports(rule))
    assert {comp for comp, ports in web.items() if 8000 in ports} == {"gateway-guard"}
    dashboard_sources = set()
    for rule in policies["dask-scheduler"]["ingress"]:
        if 8787 in _ports(rule):
            dashboard_sources |= _peer_components(rule["from"], objects)
    assert dashboard_sources == {"gateway-proxy"}
    [guard_in] = policies["gateway-guard"]["ingress"]
    # the gateway API for notebook pods and notebook jobs; the jobs service stops a run's clusters
    assert _peer_components(guard_in["from"], objects) == {"proxy", "hub", "singleuser", "notebook-job", "jobs"}
    assert _ports(guard_in) == {8000}
    guard_out = {}
    for rule in policies["gateway-guard"]["egress"]:
        for comp in _peer_components(rule["to"], objects, dns=_ports(rule) == {53}):
            guard_out[comp] = _ports(rule)
    assert guard_out.pop("hub") == {8081} and guard_out.pop("gateway-proxy") == {8000}
    assert all(k.startswith("dns:") for k in guard_out)
    proxy_out = set().union(*(_peer_components(r["to"], objects) for r in policies["proxy"]["egress"]))
    assert "gateway-proxy" not in proxy_out and "gateway-guard" in proxy_out
    gw = k8s_gateway_settings(platform_policy(objects), container_env(objects, f"{RELEASE}-gateway-api"))
    [mw_ref] = gw["KubeController"]["proxy_web_middlewares"]
    assert set(one(objects, "Middleware", mw_ref["name"])["spec"]) == {"stripPrefixRegex"}


def test_the_guards_cookie_key_is_its_own(objects):
    secrets = secret_data(objects)
    env = container_env(objects, f"{RELEASE}-gateway-guard")
    assert env["WORKBENCH_GUARD_COOKIE_SECRET"] == secrets["guard-cookie-secret"] != secrets["cookie-secret"]
    assert secrets["cookie-secret"] not in env.values()  # the guard cannot forge the hub's cookies
