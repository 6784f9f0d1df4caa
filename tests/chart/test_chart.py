"""The Helm chart (charts/workbench), rendered with a real Helm and checked object by object.

Every rendered object is validated against the Kubernetes schema (kubernetes-validate, strict); the
Traefik objects, whose CRDs keep every field, are checked structurally. Then the security properties:
non-root pods without privilege escalation, service account tokens only where the Kubernetes API is
used, namespaced least-privilege Roles, NetworkPolicies, secrets kept across upgrades, and the
notebook and Dask pods the hub and gateway will create matching those policies.
"""

from __future__ import annotations

import ipaddress
import re

import kubernetes_validate
import pytest
import yaml

from workbench.gateway.kube import render_cluster_pods
from workbench.kubernetes.gateway import k8s_gateway_settings
from workbench.kubernetes.guard import k8s_guard_settings
from workbench.kubernetes.hub import GATEWAY_PREFIX, k8s_hub_settings, singleuser_labels
from workbench.policy import load_policy, parse_policy
from workbench.services.quota.authz import ACCESS_SCOPE as QUOTA_ACCESS_SCOPE
from workbench.services.quota.authz import CUSTOM_SCOPES as QUOTA_CUSTOM_SCOPES
from workbench.services.quota.wiring import quota_roles
from workbench.services.sessions.rules import ACCESS_SCOPE as SESSIONS_ACCESS_SCOPE
from workbench.services.sessions.rules import SERVICE_SCOPES as SESSIONS_SCOPES

from .conftest import (
    CENTRE,
    CHART,
    K8S_VERSION,
    NAMESPACE,
    PRODUCTION,
    RELEASE,
    RenderError,
    container_env,
    find,
    helm_template,
    one,
    secret_data,
)

OAUTH_SECRET = {
    ("workbench-oauth", "client-secret"): "s3cret",
    ("workbench-hub-db", "url"): "postgresql+psycopg://x",
    ("workbench-quota-db", "url"): "postgresql+psycopg://quota@db/quota",
}
#: components whose pods use the Kubernetes API, and so get a service account token
API_USERS = {"hub", "gateway-api", "gateway-controller", "gateway-proxy", "jobs"}
TRAEFIK_KINDS = {"IngressRoute", "Middleware"}


def component(obj: dict) -> str:
    return obj["metadata"]["labels"]["app.kubernetes.io/component"]


def pod_specs(objects):
    for dep in find(objects, "Deployment"):
        yield component(dep), dep["spec"]["template"]["spec"]


def platform_policy(objects):
    cm = one(objects, "ConfigMap", f"{RELEASE}-platform")
    return parse_policy(yaml.safe_load(cm["data"]["platform.yaml"]), source="ConfigMap")


def expect_failure(helm, *args) -> str:
    with pytest.raises(RenderError) as err:
        helm_template(helm, *args)
    return str(err.value)


# ---------------------------------------------------------------------------
# Lint and schema validation
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("values", [None, PRODUCTION], ids=["default", "production"])
def test_helm_lint(helm, values):
    import subprocess

    args = [helm, "lint", "--strict", str(CHART), "--namespace", NAMESPACE]
    if values:
        args += ["--values", str(values)]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 chart(s) failed" in proc.stdout


def _check_traefik_object(obj: dict, crds: dict[tuple[str, str], dict]) -> None:
    """Structural check of a Traefik object against its (field-preserving) CRD and Traefik's API."""
    group, version = obj["apiVersion"].split("/")
    crd = crds[(group, obj["kind"])]
    assert version in [v["name"] for v in crd["spec"]["versions"] if v["served"]]
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", obj["metadata"]["name"])
    spec = obj["spec"]
    if obj["kind"] == "IngressRoute":
        assert set(spec) <= {"entryPoints", "routes", "tls"}
        for route in spec["routes"]:
            assert route["kind"] == "Rule" and route["match"].startswith("PathPrefix(`")
            for svc in route["services"]:
                assert set(svc) <= {"name", "namespace", "port", "kind"} and isinstance(svc["port"], int)
            for mw in route.get("middlewares", []):
                assert set(mw) <= {"name", "namespace"}
    else:
        [(kind, conf)] = spec.items()
        assert kind in {"stripPrefix", "stripPrefixRegex"}
        assert all(isinstance(p, str) for p in conf.get("prefixes", conf.get("regex", [])))


def test_every_object_is_valid_kubernetes(objects):
    crds = {(o["spec"]["group"], o["spec"]["names"]["kind"]): o for o in find(objects, "CustomResourceDefinition")}
    assert ("gateway.dask.org", "DaskCluster") in crds
    kinds = set()
    for obj in objects:
        kinds.add(obj["kind"])
        if obj["kind"] in TRAEFIK_KINDS:
            _check_traefik_object(obj, crds)
        else:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    assert {"Deployment", "Service", "NetworkPolicy", "Role", "RoleBinding", "Secret", "ConfigMap"} <= kinds


def test_the_validator_is_strict(default_objects):
    dep = one(default_objects, "Deployment", f"{RELEASE}-hub")
    broken = {**dep, "spec": {**dep["spec"], "replica": 1}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)


def test_crds_cover_what_traefik_and_the_controller_use(default_objects):
    crds = {o["metadata"]["name"] for o in find(default_objects, "CustomResourceDefinition")}
    traefik_role = one(default_objects, "Role", f"{RELEASE}-gateway-proxy")
    [rule] = [r for r in traefik_role["rules"] if r["apiGroups"] == ["traefik.io"]]
    assert {f"{plural}.traefik.io" for plural in rule["resources"]} | {"daskclusters.gateway.dask.org"} == crds
    for crd in find(default_objects, "CustomResourceDefinition"):
        [version] = crd["spec"]["versions"]
        assert version["schema"]["openAPIV3Schema"] == {"type": "object", "x-kubernetes-preserve-unknown-fields": True}


# ---------------------------------------------------------------------------
# The policy reaches the pods
# ---------------------------------------------------------------------------


def test_production_values_carry_centre_yaml():
    """examples/production-values.yaml's `platform:` is hub_config/examples/centre.yaml, unchanged."""
    values = yaml.safe_load(PRODUCTION.read_text())
    assert values["platform"] == yaml.safe_load(CENTRE.read_text())


def test_the_configmap_holds_the_policy(production_objects, default_objects):
    assert platform_policy(production_objects) == load_policy(CENTRE)
    tryout = platform_policy(default_objects)
    assert tryout.auth.type == "demo" and tryout.auth.demo_users
    assert tryout.images["base"].image == "registry.example.edu/workbench/base:0.1.0"


def test_large_numbers_stay_numbers(helm):
    """Helm keeps numbers as float64 and its YAML writes 1e+06; the chart writes the policy as JSON."""
    objects = helm_template(
        helm,
        "--values",
        str(PRODUCTION),
        "--set",
        "platform.groups.climate-lab.budget.cpu_hours=1000000",
        "--set",
        "platform.profiles.cpu-small.memory=4000000000",
    )
    policy = platform_policy(objects)
    assert policy.groups["climate-lab"].budget.cpu_hours == 1_000_000
    assert policy.profiles["cpu-small"].memory == 4_000_000_000


def test_pods_mount_the_platform_read_only(objects):
    for comp in ("hub", "gateway-api", "gateway-controller", "quota", "sessions"):
        dep = one(objects, "Deployment", f"{RELEASE}-{comp}")
        spec = dep["spec"]["template"]["spec"]
        [container] = spec["containers"]
        assert {"name": "platform", "mountPath": "/etc/workbench", "readOnly": True} in container["volumeMounts"]
        assert {"name": "platform", "configMap": {"name": f"{RELEASE}-platform"}} in spec["volumes"]
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert env["WORKBENCH_PLATFORM"] == "/etc/workbench/platform.yaml"
        assert dep["spec"]["template"]["metadata"]["annotations"]["checksum/platform"]


# ---------------------------------------------------------------------------
# Pods: non-root, no privilege escalation, tokens only where needed
# ---------------------------------------------------------------------------


def test_pods_are_locked_down(objects):
    comps = set()
    for comp, spec in pod_specs(objects):
        comps.add(comp)
        pod_sc = spec["securityContext"]
        assert pod_sc["runAsNonRoot"] is True, comp
        assert pod_sc["runAsUser"] > 0, comp
        assert pod_sc["seccompProfile"] == {"type": "RuntimeDefault"}, comp
        for c in spec["containers"] + spec.get("initContainers", []):
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False, comp
            assert sc["capabilities"] == {"drop": ["ALL"]}, comp
            assert sc["readOnlyRootFilesystem"] is True, comp
            assert sc["runAsNonRoot"] is True, comp
            assert c["resources"]["requests"] and c["resources"]["limits"]["memory"], comp
        assert not spec.get("hostNetwork") and not spec.get("hostPID"), comp
    assert comps == {
        "hub",
        "proxy",
        "gateway-api",
        "gateway-controller",
        "gateway-proxy",
        "gateway-guard",
        "quota",
        "sessions",
        "rosters",
        "jobs",
    }


def test_service_account_tokens_only_where_the_api_is_used(objects):
    accounts = {sa["metadata"]["name"]: sa for sa in find(objects, "ServiceAccount")}
    for comp, spec in pod_specs(objects):
        assert spec["automountServiceAccountToken"] is (comp in API_USERS), comp
        assert spec["serviceAccountName"] == f"{RELEASE}-{comp}"
        assert spec["serviceAccountName"] in accounts
    assert accounts[f"{RELEASE}-proxy"]["automountServiceAccountToken"] is False


def test_notebook_pods_from_the_chart(production_objects):
    """The pod the hub will create, from the chart's ConfigMap and the hub Deployment's environment.

    A real WorkbenchKubeSpawner configured by workbench.kubernetes.hub (as hub_config/jupyterhub_config_k8s.py
    does in the hub pod) renders it: non-root, no API token, in the release's namespace, labelled so
    that the chart's NetworkPolicy for notebook pods selects it, and pointed at the gateway's proxy.
    """
    import asyncio

    from kubernetes_asyncio.client import ApiClient
    from traitlets.config import Config

    from workbench.spawn.kube import WorkbenchKubeSpawner, _offline_kube_config, _RenderHub, _RenderUser

    objects = production_objects
    env = container_env(objects, f"{RELEASE}-hub", OAUTH_SECRET)
    policy = platform_policy(objects)
    settings = k8s_hub_settings(policy, env)

    async def render():
        config = Config({"WorkbenchKubeSpawner": settings["WorkbenchKubeSpawner"], "Spawner": settings["Spawner"]})
        with _offline_kube_config():
            spawner = WorkbenchKubeSpawner(
                policy=policy, user=_RenderUser("ada", ["vision-lab"]), hub=_RenderHub(), config=config
            )
            spawner.user_options = {"profile": "h100-x1"}
            await spawner.load_user_options()
            pod = await spawner.get_pod_manifest()
            async with ApiClient() as client:
                return client.sanitize_for_serialization(pod)

    pod = asyncio.run(render())
    kubernetes_validate.validate(pod, K8S_VERSION, strict=True)
    spec = pod["spec"]
    assert spec["automountServiceAccountToken"] is False
    [c] = spec["containers"]
    assert c["securityContext"]["runAsUser"] == 1000 and c["securityContext"]["allowPrivilegeEscalation"] is False
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert settings["WorkbenchKubeSpawner"]["namespace"] == NAMESPACE
    assert spec["imagePullSecrets"] == [{"name": "workbench-registry"}]

    [netpol] = [n for n in find(objects, "NetworkPolicy") if component(n) == "singleuser"]
    selector = netpol["spec"]["podSelector"]["matchLabels"]
    assert selector == singleuser_labels(RELEASE)
    assert selector.items() <= pod["metadata"]["labels"].items()

    pod_env = {e["name"]: e.get("value") for e in c["env"]}
    proxy_svc = one(objects, "Service", f"{RELEASE}-gateway-proxy")
    ports = {p["name"]: p["port"] for p in proxy_svc["spec"]["ports"]}
    host = f"{RELEASE}-gateway-proxy.{NAMESPACE}"
    [guard_port] = one(objects, "Service", f"{RELEASE}-gateway-guard")["spec"]["ports"]
    guard = f"http://{RELEASE}-gateway-guard.{NAMESPACE}:{guard_port['port']}"
    assert pod_env["DASK_GATEWAY__ADDRESS"] == f"{guard}{GATEWAY_PREFIX}"  # the API through the dashboard guard
    assert pod_env["DASK_GATEWAY__PROXY_ADDRESS"] == f"gateway://{host}:{ports['tcp']}"
    assert pod_env["WORKBENCH_DASK_MAX_WORKERS"] == "16"

    hub = settings["JupyterHub"]
    assert hub["hub_connect_url"] == f"http://{RELEASE}-hub:8081"
    # no idle culler; the demo policy has a course, so the rosters service runs too
    assert [s["name"] for s in hub["services"]] == ["dask-gateway", "quota", "sessions", "rosters", "jobs"]
    assert hub["services"][0]["url"] == guard
    [quota_port] = one(objects, "Service", f"{RELEASE}-quota")["spec"]["ports"]
    assert hub["services"][1]["url"] == f"http://{RELEASE}-quota:{quota_port['port']}"
    [sessions_port] = one(objects, "Service", f"{RELEASE}-sessions")["spec"]["ports"]
    assert hub["services"][2]["url"] == f"http://{RELEASE}-sessions:{sessions_port['port']}"
    [rosters_port] = one(objects, "Service", f"{RELEASE}-rosters")["spec"]["ports"]
    assert hub["services"][3]["url"] == f"http://{RELEASE}-rosters:{rosters_port['port']}"
    # notebooks ask the services for notifications through the proxy's Service, at its port
    [public_port] = one(objects, "Service", f"{RELEASE}-proxy-public")["spec"]["ports"]
    assert pod_env["WORKBENCH_SERVICES_URL"] == f"http://{RELEASE}-proxy-public:{public_port['port']}/services/"
    assert settings["ConfigurableHTTPProxy"]["api_url"] == f"http://{RELEASE}-proxy-api:8001"
    assert (
        settings["WorkbenchGenericOAuthenticator"]["oauth_callback_url"]
        == "https://workbench.example.edu/hub/oauth_callback"
    )


def test_dask_pods_from_the_chart(production_objects):
    """Scheduler and worker pods the gateway's controller will create: locked down and selected by the policies."""
    objects = production_objects
    env = container_env(objects, f"{RELEASE}-gateway-api")
    policy = platform_policy(objects)
    settings = k8s_gateway_settings(policy, env)
    instance = env["WORKBENCH_GATEWAY_INSTANCE"]
    assert settings["KubeBackend"]["gateway_instance"] == instance
    api_svc = one(objects, "Service", f"{RELEASE}-gateway-api")
    assert env["WORKBENCH_GATEWAY_API_URL"] == f"http://{api_svc['metadata']['name']}.{NAMESPACE}:8000/api"
    assert env["WORKBENCH_HUB_API_URL"] == f"http://{RELEASE}-hub:8081/hub/api"
    middlewares = {m["metadata"]["name"] for m in find(objects, "Middleware")}
    [dashboard_mw] = settings["KubeController"]["proxy_web_middlewares"]
    assert dashboard_mw["name"] in middlewares

    pods = render_cluster_pods(
        policy,
        "ada",
        ["vision-lab"],
        {"worker_gpus": 1},
        namespace=NAMESPACE,
        gateway_instance=instance,
        api_url=env["WORKBENCH_GATEWAY_API_URL"],
    )
    policies = {component(n): n for n in find(objects, "NetworkPolicy")}
    for name, pod in pods.items():
        kubernetes_validate.validate(pod, K8S_VERSION, strict=True)
        assert pod["spec"]["automountServiceAccountToken"] is False
        selector = policies[f"dask-{name}"]["spec"]["podSelector"]["matchLabels"]
        assert selector.items() <= pod["metadata"]["labels"].items(), name


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

METADATA = ipaddress.ip_address("169.254.169.254")

#: what examples/production-values.yaml adds on purpose: metrics scrapers, on-premises CIDRs, campus Dask clients
_NP = yaml.safe_load(PRODUCTION.read_text())["networkPolicy"]
OPERATOR_PEERS = list(_NP["metricsScrapers"].values())
OPERATOR_CIDRS = {c for who in ("singleuser", "dask") for e in _NP[who]["egress"].values() for c in e["cidrs"]} | set(
    yaml.safe_load(PRODUCTION.read_text())["gateway"]["proxy"]["service"]["loadBalancerSourceRanges"]
)


def _operator_rule(rule: dict, key: str) -> bool:
    peers = rule.get(key) or []
    return bool(peers) and all(
        p in OPERATOR_PEERS
        or ("ipBlock" in p and "except" not in p["ipBlock"] and p["ipBlock"]["cidr"] in OPERATOR_CIDRS)
        for p in peers
    )


def _core(rules: list[dict], key: str) -> list[dict]:
    """The chart's own rules, without those the operator's values add (metricsScrapers, egress, gateway.proxy.service)."""
    return [r for r in rules if not _operator_rule(r, key)]


def _policies(objects) -> dict[str, dict]:
    return {component(n): n["spec"] for n in find(objects, "NetworkPolicy")}


#: where the chart's default DNS rule (networkPolicy.egressAllowRules, port 53 only) may send queries
DNS_PEERS = {
    "{'matchLabels': {'kubernetes.io/metadata.name': 'kube-system'}}",
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "169.254.169.254/32",
    "169.254.20.10/32",
}


def _peer_components(peers: list[dict], objects, dns: bool = False) -> set[str]:
    if dns:  # a port-53-only rule: its peers are DNS servers
        return {"dns:" + str(p.get("namespaceSelector") or p.get("ipBlock", {}).get("cidr") or p) for p in peers}
    labels = {
        comp: {
            "app.kubernetes.io/name": "workbench",
            "app.kubernetes.io/instance": RELEASE,
            "app.kubernetes.io/component": comp,
        }
        for comp in (
            "hub",
            "proxy",
            "gateway-api",
            "gateway-controller",
            "gateway-proxy",
            "gateway-guard",
            "quota",
            "sessions",
            "rosters",
            "jobs",
        )
    }
    labels["singleuser"] = singleuser_labels(RELEASE)
    out = set()
    for peer in peers:
        match = peer.get("podSelector", {}).get("matchLabels", {})
        if match.get("app.kubernetes.io/component", "").startswith("dask-"):
            assert match["gateway.dask.org/instance"] == f"{RELEASE}-gateway"
            out.add(match["app.kubernetes.io/component"])
        elif match:
            [comp] = [c for c, want in labels.items() if want.items() <= match.items()]
            out.add(comp)
        elif "namespaceSelector" in peer:
            out.add("dns:" + str(peer["namespaceSelector"]))
        else:
            out.add("ipBlock:" + peer["ipBlock"]["cidr"])
    return out


def _ports(rule: dict) -> set[int]:
    return {p["port"] for p in rule.get("ports", [])}


def _reaches(rule: dict, ip, port: int = 443) -> bool:
    """Whether an egress rule lets traffic to ``ip`` (not a pod) on ``port`` through."""
    if rule.get("ports") and port not in _ports(rule):
        return False
    if "to" not in rule or not rule["to"]:
        return True
    for peer in rule["to"]:
        block = peer.get("ipBlock")
        if (
            block
            and ip in ipaddress.ip_network(block["cidr"])
            and not any(ip in ipaddress.ip_network(e) for e in block.get("except", []))
        ):
            return True
    return False


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


def policies_selector(objects, comp: str) -> dict:
    return {
        "matchLabels": {
            "app.kubernetes.io/name": "workbench",
            "app.kubernetes.io/instance": RELEASE,
            "app.kubernetes.io/component": comp,
        }
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
    assert gw_proxy == {"gateway-guard": {8000}, "singleuser": {8786}}


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
# Secrets
# ---------------------------------------------------------------------------


def test_secrets_are_kept_across_upgrades(helm, default_objects):
    """The Secret's values survive a second render when the first Secret is fed back.

    On `helm install` / `helm upgrade` the template reads the release's existing Secret with
    ``lookup "v1" "Secret" <namespace> <release>-secrets`` and keeps every key it finds; only missing
    keys are generated. `helm template` has no cluster, so ``lookup`` returns nothing and a render here
    cannot exercise it. The template therefore takes its values in this order: ``.Values.secrets.<key>``
    (which also serves GitOps tools that cannot lookup), then the looked-up Secret, then a new random
    value, all in one helper (workbench.secretData). This test renders once, feeds the generated Secret
    back through ``--set secrets.<key>=...`` as an upgrade would through ``lookup``, renders again and
    asserts the Secret is identical; a third render without it proves values are not constant.
    """
    first = secret_data(default_objects)
    # no culler-api-token: the sessions service culls (sessions.enabled false brings the culler's back)
    assert set(first) == {
        "cookie-secret",
        "proxy-token",
        "crypt-key",
        "gateway-api-token",
        "sessions-api-token",
        "quota-api-token",
        "rosters-api-token",
        "jobs-api-token",
        "guard-cookie-secret",
        "demo-password",
    }
    for key, value in first.items():
        if key != "demo-password":
            assert re.fullmatch(r"[0-9a-f]{64}", value), key
    names = {
        "cookie-secret": "cookieSecret",
        "proxy-token": "proxyToken",
        "crypt-key": "cryptKey",
        "gateway-api-token": "gatewayApiToken",
        "sessions-api-token": "sessionsApiToken",
        "quota-api-token": "quotaApiToken",
        "guard-cookie-secret": "guardCookieSecret",
        "demo-password": "demoPassword",
        "rosters-api-token": "rostersApiToken",
        "jobs-api-token": "jobsApiToken",
    }
    args = [a for key, value in first.items() for a in ("--set", f"secrets.{names[key]}={value}")]
    second = secret_data(helm_template(helm, *args))
    assert second == first
    assert secret_data(helm_template(helm)) != first

    helpers = (CHART / "templates" / "_helpers.tpl").read_text()
    assert 'lookup "v1" "Secret" .Release.Namespace (include "workbench.secretName" .)' in helpers


def test_every_secret_reference_resolves(objects):
    keys = set(secret_data(objects))
    for _, spec in pod_specs(objects):
        for c in spec["containers"]:
            for var in c.get("env", []):
                ref = var.get("valueFrom", {}).get("secretKeyRef")
                if ref and ref["name"] == f"{RELEASE}-secrets":
                    assert ref["key"] in keys, var["name"]


def test_sso_secrets_come_from_the_operators_secret(production_objects, default_objects):
    env = container_env(production_objects, f"{RELEASE}-hub", OAUTH_SECRET)
    assert env["WORKBENCH_OAUTH_CLIENT_SECRET"] == "s3cret"
    assert env["WORKBENCH_DB_URL"] == "postgresql+psycopg://x"
    assert "WORKBENCH_ALLOW_DEMO_AUTH" not in env and "demo-password" not in secret_data(production_objects)
    # postgres, claims made by the platform team; the jobs service's table has no PostgreSQL option (SQLite, kept)
    assert {c["metadata"]["name"] for c in find(production_objects, "PersistentVolumeClaim")} == {f"{RELEASE}-jobs-db"}
    assert container_env(production_objects, f"{RELEASE}-quota", OAUTH_SECRET)["WORKBENCH_QUOTA_DB_URL"] == (
        "postgresql+psycopg://quota@db/quota"
    )
    demo = container_env(default_objects, f"{RELEASE}-hub")
    assert demo["WORKBENCH_ALLOW_DEMO_AUTH"] == "true" and demo["WORKBENCH_DEMO_PASSWORD"]
    assert demo["WORKBENCH_DB_URL"] == "sqlite:////srv/jupyterhub/jupyterhub.sqlite"
    claims = {c["metadata"]["name"] for c in find(default_objects, "PersistentVolumeClaim")}
    assert claims == {
        f"{RELEASE}-hub-db",
        f"{RELEASE}-quota-db",
        f"{RELEASE}-jobs-db",
        "workbench-datasets",
        "workbench-group-research-lab",
        "workbench-group-course-demo",
        "workbench-group-platform-admins",
        # the course's materials folder the demo student's and instructor's pods mount
        "workbench-course-course-demo",
    }


# ---------------------------------------------------------------------------
# Values: images, bad values
# ---------------------------------------------------------------------------


def _images(objects) -> dict[str, str]:
    return {comp: spec["containers"][0]["image"] for comp, spec in pod_specs(objects)}


def test_images_come_from_values(helm, default_objects):
    assert _images(default_objects) == {
        "hub": "registry.example.edu/workbench/hub:0.1.0",
        "gateway-api": "registry.example.edu/workbench/hub:0.1.0",
        "gateway-controller": "registry.example.edu/workbench/hub:0.1.0",
        "gateway-guard": "registry.example.edu/workbench/hub:0.1.0",
        "quota": "registry.example.edu/workbench/hub:0.1.0",
        "sessions": "registry.example.edu/workbench/hub:0.1.0",
        "rosters": "registry.example.edu/workbench/hub:0.1.0",
        "jobs": "registry.example.edu/workbench/hub:0.1.0",
        "proxy": "quay.io/jupyterhub/configurable-http-proxy:5.3.0",
        "gateway-proxy": "docker.io/library/traefik:v3.3.5",
    }
    objects = helm_template(
        helm,
        "--set",
        "images.registry=harbor.example.org/wb",
        "--set",
        "images.tag=2025.1",
        "--set",
        "images.gatewayProxy.registry=mirror.example.org",
        "--set",
        "images.pullSecrets={regcred}",
    )
    images = _images(objects)
    assert images["hub"] == images["jobs"] == "harbor.example.org/wb/hub:2025.1"
    assert images["gateway-proxy"] == "mirror.example.org/library/traefik:v3.3.5"
    assert platform_policy(objects).images["base"].image == "harbor.example.org/wb/base:2025.1"
    for _, spec in pod_specs(objects):
        assert spec["imagePullSecrets"] == [{"name": "regcred"}]


BAD_VALUES = {
    "unknown key in platform": (
        ["--set", "platform.groups.lab.kind=research", "--set", "platform.groups.lab.colour=red"],
        ["/platform/groups/lab", "additional properties 'colour' not allowed"],
    ),
    "profile naming a missing GPU type": (
        ["--values", str(PRODUCTION), "--set", "platform.profiles.h100-x1.gpu.type=h200"],
        ["platform.profiles.h100-x1.gpu.type: unknown GPU type 'h200'", "one of: a100, h100, h100-mig-1g"],
    ),
    "group naming a missing profile": (
        ["--values", str(PRODUCTION), "--set", "platform.groups.startup-acme.profiles={cpu-small,h200-x8}"],
        ["platform.groups.startup-acme.profiles[1]: unknown profile 'h200-x8'"],
    ),
    "bad memory size": (
        ["--values", str(PRODUCTION), "--set", "platform.profiles.cpu-small.memory=4GB"],
        ["/platform/profiles/cpu-small/memory", "does not match pattern"],
    ),
    "name that is not a DNS label": (
        ["--values", str(PRODUCTION), "--set", "platform.gpu_types.H200.resource=nvidia.com/gpu"],
        ["'H200' does not match pattern"],
    ),
    "unknown chart value": (["--set", "hub.replicas=2"], ["additional properties 'replicas' not allowed"]),
    "removed value": (
        ["--set", "hub.cookieSecret=abc", "--set", "singleuser.image=x"],
        [
            "hub.cookieSecret: removed; use secrets.cookieSecret",
            "singleuser: removed; notebook pods are described by the platform policy",
        ],
    ),
    "demo logins on a public service": (
        ["--set", "proxy.service.type=LoadBalancer"],
        ["platform.auth.type: 'demo' (one shared password) would be reachable from the network"],
    ),
    "SSO without public URL and client secret": (
        ["--values", str(PRODUCTION), "--set", "publicUrl=", "--set", "hub.oauthClientSecret.existingSecret="],
        [
            "publicUrl: auth type 'generic-oauth' needs the workbench's public URL",
            "hub.oauthClientSecret.existingSecret:",
        ],
    ),
    "client secret in the policy": (
        ["--values", str(PRODUCTION), "--set", "platform.auth.client_secret=hunter2"],
        ["platform.auth.client_secret: secrets never go in the platform YAML"],
    ),
    "postgres without its Secret": (
        ["--set", "hub.db.type=postgres"],
        ["hub.db.postgres.existingSecret: hub.db.type 'postgres' needs the name of a Secret"],
    ),
    "secret that is not 64 hex characters": (["--set", "secrets.cookieSecret=short"], ["/secrets/cookieSecret"]),
    "quota database URL in values": (
        ["--set-json", 'quota.db.url="postgresql+psycopg://quota:hunter2@db:5432/quota"'],
        [
            "quota.db.url: name the Secret that holds the ledger's database URL, not the URL itself",
            "quota.db.url.existingSecret=workbench-quota-db",
        ],
    ),
    "quota database URL and PVC both set": (
        ["--set", "quota.db.url.existingSecret=workbench-quota-db", "--set", "quota.db.pvc.size=5Gi"],
        ["quota.db.url and quota.db.pvc: both are set", "remove quota.db.pvc to use PostgreSQL"],
    ),
    "quota database key without its Secret": (
        ["--set", "quota.db.url.key=dsn"],
        [
            "quota.db.url.existingSecret: quota.db.url.key is 'dsn' but no Secret is named",
            "kubectl create secret generic workbench-quota-db --from-literal=dsn=",
        ],
    ),
    "quota database Secret with an empty key": (
        ["--set", "quota.db.url.existingSecret=workbench-quota-db", "--set", "quota.db.url.key="],
        ["/quota/db/url/key", "minLength"],
    ),
    "quota reconcile interval below zero": (["--set", "quota.reconcileEvery=-1"], ["/quota/reconcileEvery", "minimum"]),
    "quota PVC with a bad size": (["--set", "quota.db.pvc.size=5GB"], ["/quota/db/pvc/size", "does not match pattern"]),
    "sessions interval below zero": (["--set", "sessions.interval=-1"], ["/sessions/interval", "exclusiveMinimum"]),
    "sessions interval of zero": (["--set", "sessions.interval=0"], ["/sessions/interval", "exclusiveMinimum"]),
    "sessions interval not a number": (["--set", "sessions.interval=often"], ["/sessions/interval", "got string"]),
    # issue 17: operator values
    "extraEnv overriding what the chart sets": (
        ["--set", "hub.extraEnv.WORKBENCH_DB_URL=sqlite://", "--set", "gateway.api.extraEnv.JUPYTERHUB_API_TOKEN=x"],
        [
            "hub.extraEnv.WORKBENCH_DB_URL: the chart sets the WORKBENCH_*, JUPYTERHUB_*",
            "gateway.api.extraEnv.JUPYTERHUB_API_TOKEN: the chart sets",
        ],
    ),
    "extraVolumeMount without its volume": (
        ["--set", "quota.extraVolumeMounts.ca.mountPath=/etc/ssl/centre"],
        ["quota.extraVolumeMounts.ca: no volume of that name; add it under quota.extraVolumes.ca"],
    ),
    "extraVolume named like the chart's own": (
        ["--set", "hub.extraVolumes.platform.emptyDir.medium=Memory"],
        ["hub.extraVolumes.platform: the chart's own volume has this name"],
    ),
    "extraEnv name that is not a variable name": (
        ["--set", "hub.extraEnv.1BAD=x"],
        ["hub.extraEnv.1BAD: not an environment variable name"],
    ),
    "extra volume name that is not a DNS label": (
        ["--set", "hub.extraVolumes.Certs.secret.secretName=x", "--set", "hub.extraVolumeMounts.Certs.mountPath=/c"],
        ["hub.extraVolumes.Certs: a volume name must be a DNS label"],
    ),
    "notebook egress to everything": (
        [
            "--set",
            "networkPolicy.singleuser.egress.all.cidrs={0.0.0.0/0}",
            "--set",
            "networkPolicy.singleuser.egress.all.ports={443}",
        ],
        [
            "networkPolicy.singleuser.egress.all.cidrs[0]: 0.0.0.0/0 would open every address",
            "set networkPolicy.singleuser.allowInternet=true for public addresses",
        ],
    ),
    "Dask egress to the metadata service": (
        [
            "--set",
            "networkPolicy.dask.egress.meta.cidrs={169.254.169.254/32}",
            "--set",
            "networkPolicy.dask.egress.meta.ports={80}",
        ],
        ["networkPolicy.dask.egress.meta.cidrs[0]: 169.254.169.254/32 is link-local"],
    ),
    "egress CIDR that is not a CIDR": (
        [
            "--set",
            "networkPolicy.singleuser.egress.s3.cidrs={s3.example.edu}",
            "--set",
            "networkPolicy.singleuser.egress.s3.ports={443}",
        ],
        ["/networkPolicy/singleuser/egress/s3/cidrs/0", "does not match pattern"],
    ),
    "egress without ports": (
        ["--set", "networkPolicy.singleuser.egress.s3.cidrs={10.0.0.0/16}"],
        ["/networkPolicy/singleuser/egress/s3", "ports"],
    ),
    "placeholders of an unknown profile": (
        ["--values", str(PRODUCTION), "--set", "scheduling.userPlaceholder.profiles.h200-x1=2"],
        [
            "scheduling.userPlaceholder.profiles.h200-x1: unknown profile 'h200-x1'; use one of the policy's profiles: a100-x1"
        ],
    ),
    "placeholders enabled for no profile": (
        ["--set", "scheduling.userPlaceholder.enabled=true"],
        ["scheduling.userPlaceholder.profiles: userPlaceholder is enabled but names no profile"],
    ),
    "pre-puller without GPU types": (
        ["--set", "prePuller.continuous.enabled=true"],
        ["prePuller.continuous.enabled: the pre-puller pulls the images of GPU profiles"],
    ),
    "roster service without a course": (
        [
            "--set",
            "rosters.enabled=true",
            "--set-json",
            'platform={"auth":{"type":"demo","demo_users":{"ada":{"groups":["lab"]}}},"images":{"base":{"image":"r/b:1"}},'
            '"profiles":{"p":{}},"groups":{"lab":{"kind":"research","profiles":["p"]}}}',
        ],
        ["rosters.enabled: true, but the policy has no course"],
    ),
    "gateway proxy service of an unknown type": (
        ["--set", "gateway.proxy.service.type=Ingress"],
        ["/gateway/proxy/service/type"],
    ),
    "GPU runtime class that is not a name": (
        ["--set", "gpu.runtimeClassName=NVIDIA Runtime"],
        ["/gpu/runtimeClassName"],
    ),
    "hub probe with a zero timeout": (
        ["--set", "hub.readinessProbe.timeoutSeconds=0"],
        ["/hub/readinessProbe/timeoutSeconds"],
    ),
}


@pytest.mark.parametrize("case", list(BAD_VALUES))
def test_bad_values_fail_with_a_clear_message(helm, case):
    args, messages = BAD_VALUES[case]
    error = expect_failure(helm, *args)
    for message in messages:
        assert message in error, error
    assert "hunter2" not in error


@pytest.mark.parametrize("values", [None, PRODUCTION], ids=["default", "production"])
def test_install_notes_say_how_to_reach_it(helm, values, tmp_path):
    """NOTES.txt, as `helm install` prints it (a client-side dry run: no cluster)."""
    import subprocess

    args = [helm, "install", RELEASE, str(CHART), "--namespace", NAMESPACE, "--dry-run=client"]
    if values:
        args += ["--values", str(values)]
    proc = subprocess.run(
        args,
        capture_output=True,
        text=True,
        timeout=120,
        env={"KUBECONFIG": "/dev/null", "HOME": str(tmp_path)},
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    notes = proc.stdout.split("NOTES:", 1)[1]
    if values is None:
        assert "built-in TRY-OUT policy" in notes
        assert f"port-forward service/{RELEASE}-proxy-public 8000:80" in notes
        assert f"get secret {RELEASE}-secrets -o jsonpath='{{.data.demo-password}}'" in notes
    else:
        assert "https://workbench.example.edu/hub/oauth_callback" in notes and "Secret workbench-oauth" in notes
        assert "demo" not in notes


# ---------------------------------------------------------------------------
# The quota service
# ---------------------------------------------------------------------------


def _quota_container(objects) -> dict:
    [container] = one(objects, "Deployment", f"{RELEASE}-quota")["spec"]["template"]["spec"]["containers"]
    return container


def test_the_quota_service_is_registered_in_the_hub(objects):
    """The quota Deployment runs `python -m workbench.services.quota` on the platform ConfigMap; the hub, from its
    rendered environment, registers it as the external service quota with its roles and scopes."""
    container = _quota_container(objects)
    assert container["command"][:4] == [
        "python",
        "-m",
        "workbench.services.quota",
        "--config=/etc/workbench/platform.yaml",
    ]
    assert "--reconcile-every=60" in container["command"] and "--port=8013" in container["command"]
    quota_env = container_env(objects, f"{RELEASE}-quota", OAUTH_SECRET)
    hub_env = container_env(objects, f"{RELEASE}-hub", OAUTH_SECRET)
    assert (
        quota_env["JUPYTERHUB_API_TOKEN"]
        == hub_env["WORKBENCH_QUOTA_API_TOKEN"]
        == secret_data(objects)["quota-api-token"]
    )
    assert quota_env["JUPYTERHUB_API_URL"] == f"http://{RELEASE}-hub:8081/hub/api"
    assert quota_env["JUPYTERHUB_SERVICE_PREFIX"] == "/services/quota/"
    [port] = one(objects, "Service", f"{RELEASE}-quota")["spec"]["ports"]
    assert port["port"] == 8013 and port["targetPort"] == "http"

    policy = platform_policy(objects)
    settings = k8s_hub_settings(policy, hub_env)
    hub = settings["JupyterHub"]
    [quota] = [s for s in hub["services"] if s["name"] == "quota"]
    assert quota == {
        "name": "quota",
        "url": f"http://{RELEASE}-quota:8013",
        "api_token": quota_env["JUPYTERHUB_API_TOKEN"],
    }
    assert all(role in hub["load_roles"] for role in quota_roles(policy))
    assert hub["custom_scopes"] == QUOTA_CUSTOM_SCOPES
    assert QUOTA_ACCESS_SCOPE in settings["Spawner"]["server_token_scopes"]


def test_the_quota_ledger_is_sqlite_on_a_kept_pvc_by_default(default_objects, helm):
    container = _quota_container(default_objects)
    assert "--state-dir=/srv/quota" in container["command"]
    assert {"name": "ledger", "mountPath": "/srv/quota"} in container["volumeMounts"]
    assert "WORKBENCH_QUOTA_DB_URL" not in container_env(default_objects, f"{RELEASE}-quota")
    pvc = one(default_objects, "PersistentVolumeClaim", f"{RELEASE}-quota-db")
    assert pvc["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    assert pvc["spec"]["resources"]["requests"]["storage"] == "1Gi" and "storageClassName" not in pvc["spec"]
    dep = one(default_objects, "Deployment", f"{RELEASE}-quota")
    assert dep["spec"]["replicas"] == 1 and dep["spec"]["strategy"]["type"] == "Recreate"
    sized = helm_template(
        helm,
        "--set",
        "quota.db.pvc.size=5Gi",
        "--set",
        "quota.db.pvc.storageClassName=fast",
        "--set",
        "quota.reconcileEvery=300",
    )
    pvc = one(sized, "PersistentVolumeClaim", f"{RELEASE}-quota-db")
    assert pvc["spec"]["resources"]["requests"]["storage"] == "5Gi" and pvc["spec"]["storageClassName"] == "fast"
    assert "--reconcile-every=300" in _quota_container(sized)["command"]


def test_the_quota_ledger_on_postgresql_comes_from_the_operators_secret(helm):
    objects = helm_template(helm, "--set", "quota.db.url.existingSecret=workbench-quota-db")
    env = container_env(objects, f"{RELEASE}-quota", OAUTH_SECRET)
    assert env["WORKBENCH_QUOTA_DB_URL"] == "postgresql+psycopg://quota@db/quota"
    container = _quota_container(objects)
    assert not any(a.startswith("--state-dir") for a in container["command"])
    assert "ledger" not in {m["name"] for m in container["volumeMounts"]}
    assert not find(objects, "PersistentVolumeClaim", f"{RELEASE}-quota-db")
    for obj in objects:
        if obj["kind"] not in TRAEFIK_KINDS:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    # the database may be anywhere: egress is not restricted (as the hub's); ingress is
    spec = _policies(objects)["quota"]
    assert spec["policyTypes"] == ["Ingress"] and "egress" not in spec


def test_the_quota_service_is_reached_by_the_hub_the_proxy_the_gateway_and_the_jobs_service_only(objects):
    policies = _policies(objects)
    spec = policies["quota"]
    [ingress] = _core(spec["ingress"], "from")
    # notebook pods ask through the proxy (WORKBENCH_SERVICES_URL), never the pod directly; the jobs service
    # asks for admission and records its runs' usage
    assert _peer_components(ingress["from"], objects) == {"hub", "proxy", "gateway-api", "jobs"}
    assert _ports(ingress) == {8013}
    if "egress" in spec:  # SQLite: the hub API and DNS only (PostgreSQL: see the test above)
        reached = {}
        for rule in spec["egress"]:
            for comp in _peer_components(rule["to"], objects, dns=_ports(rule) == {53}):
                reached[comp] = _ports(rule)
        assert reached.pop("hub") == {8081}
        assert all(k.startswith("dns:") for k in reached)
    else:
        assert spec["policyTypes"] == ["Ingress"] and "WORKBENCH_QUOTA_DB_URL" in {
            e["name"] for e in _quota_container(objects)["env"]
        }
    assert any(
        8013 in _ports(r) and _peer_components(r["to"], objects) == {"quota"} for r in policies["proxy"]["egress"]
    )


def test_quota_disabled_renders_nothing_of_it(helm):
    objects = helm_template(helm, "--values", str(PRODUCTION), "--set", "quota.enabled=false")
    for obj in objects:
        assert "quota" not in obj["metadata"]["name"], obj["metadata"]["name"]
        labels = obj["metadata"].get("labels", {})
        assert labels.get("app.kubernetes.io/component") != "quota", obj["metadata"]["name"]
    assert "quota-api-token" not in secret_data(objects)
    env = container_env(objects, f"{RELEASE}-hub", OAUTH_SECRET)
    assert not [k for k in env if "QUOTA" in k]
    policies = _policies(objects)
    assert "quota" not in set().union(*(_peer_components(r["from"], objects) for r in policies["hub"]["ingress"]))
    assert all("quota" not in _peer_components(r["to"], objects) for r in policies["proxy"]["egress"])
    settings = k8s_hub_settings(platform_policy(objects), env)
    assert [s["name"] for s in settings["JupyterHub"]["services"]] == ["dask-gateway", "sessions", "rosters", "jobs"]
    assert "custom_scopes" not in settings["JupyterHub"]
    assert QUOTA_ACCESS_SCOPE not in settings["Spawner"]["server_token_scopes"]
    assert not [r for r in settings["JupyterHub"]["load_roles"] if r["name"].startswith("workbench-quota")]


# ---------------------------------------------------------------------------
# The sessions service
# ---------------------------------------------------------------------------


def _sessions_pod(objects) -> tuple[dict, dict]:
    spec = one(objects, "Deployment", f"{RELEASE}-sessions")["spec"]["template"]["spec"]
    [container] = spec["containers"]
    return spec, container


def test_the_sessions_service_is_registered_in_the_hub_instead_of_the_culler(objects):
    """The sessions Deployment runs `python -m workbench.services.sessions.app` on the platform ConfigMap with the environment
    of a hub-managed service; the hub, from its rendered environment, registers it as the external service
    sessions with the roles workbench.embedded.hub.roles() gives it, and runs no idle culler (two cullers would fight)."""
    spec, container = _sessions_pod(objects)
    assert container["command"] == [
        "python",
        "-m",
        "workbench.services.sessions",
        "--config=/etc/workbench/platform.yaml",
        "--ip=0.0.0.0",
        "--port=8014",
    ]  # --interval: the policy's culling.every
    env = container_env(objects, f"{RELEASE}-sessions", OAUTH_SECRET)
    hub_env = container_env(objects, f"{RELEASE}-hub", OAUTH_SECRET)
    assert (
        env["JUPYTERHUB_API_TOKEN"]
        == hub_env["WORKBENCH_SESSIONS_API_TOKEN"]
        == secret_data(objects)["sessions-api-token"]
    )
    assert env["JUPYTERHUB_API_URL"] == f"http://{RELEASE}-hub:8081/hub/api"
    assert env["JUPYTERHUB_SERVICE_URL"] == hub_env["WORKBENCH_SESSIONS_URL"] == f"http://{RELEASE}-sessions:8014"
    assert env["JUPYTERHUB_SERVICE_PREFIX"] == "/services/sessions/"
    [port] = one(objects, "Service", f"{RELEASE}-sessions")["spec"]["ports"]
    assert port["port"] == 8014 and port["targetPort"] == "http"
    assert container["ports"] == [{"name": "http", "containerPort": 8014}]
    for probe in ("readinessProbe", "livenessProbe"):  # its unauthenticated health endpoint
        assert container[probe]["httpGet"] == {"path": "/services/sessions/api/health", "port": "http"}
    # no service account token, no volume but the platform YAML and /tmp, one replica (its memory is the state)
    assert spec["automountServiceAccountToken"] is False
    assert one(objects, "ServiceAccount", f"{RELEASE}-sessions")["automountServiceAccountToken"] is False
    assert {v["name"] for v in spec["volumes"]} <= {"platform", "tmp"}
    assert one(objects, "Deployment", f"{RELEASE}-sessions")["spec"]["replicas"] == 1
    assert "WORKBENCH_CULLER_API_TOKEN" not in hub_env and "culler-api-token" not in secret_data(objects)

    policy = platform_policy(objects)
    settings = k8s_hub_settings(policy, hub_env)
    hub = settings["JupyterHub"]
    [sessions] = [s for s in hub["services"] if s["name"] == "sessions"]
    assert sessions == {
        "name": "sessions",
        "url": f"http://{RELEASE}-sessions:8014",
        "api_token": env["JUPYTERHUB_API_TOKEN"],
    }
    assert "idle-culler" not in {s["name"] for s in hub["services"]}
    assert not [r for r in hub["load_roles"] if r["name"] == "idle-culler" or "idle-culler" in r.get("services", [])]
    [role] = [r for r in hub["load_roles"] if r["name"] == "workbench-sessions"]
    assert role["services"] == ["sessions"] and role["scopes"] == SESSIONS_SCOPES
    assert [r for r in hub["load_roles"] if r["name"] == "workbench-sessions-users"]
    assert SESSIONS_ACCESS_SCOPE in settings["Spawner"]["server_token_scopes"]


def test_the_sessions_interval_comes_from_values(helm):
    objects = helm_template(helm, "--set", "sessions.interval=30")
    assert _sessions_pod(objects)[1]["command"][-1] == "--interval=30"


def test_the_sessions_service_is_reached_by_the_hub_and_the_proxy_and_reaches_the_hub_only(objects):
    policies = _policies(objects)
    spec = policies["sessions"]
    assert spec["policyTypes"] == ["Ingress", "Egress"]
    [ingress] = spec["ingress"]
    # notebook pods ask for their notifications through the proxy (/services/sessions), never directly
    assert _peer_components(ingress["from"], objects) == {"hub", "proxy"} and _ports(ingress) == {8014}
    reached = {}
    for rule in spec["egress"]:
        for comp in _peer_components(rule["to"], objects, dns=_ports(rule) == {53}):
            reached[comp] = _ports(rule)
        assert not _reaches(rule, METADATA) and not _reaches(rule, ipaddress.ip_address("8.8.8.8"))
    assert reached.pop("hub") == {8081}
    assert reached and all(k.startswith("dns:") and v == {53} for k, v in reached.items())
    assert any(
        8014 in _ports(r) and _peer_components(r["to"], objects) == {"sessions"} for r in policies["proxy"]["egress"]
    )


def test_sessions_disabled_brings_back_the_idle_culler(helm):
    objects = helm_template(helm, "--values", str(PRODUCTION), "--set", "sessions.enabled=false")
    for obj in objects:
        assert "sessions" not in obj["metadata"]["name"], obj["metadata"]["name"]
        assert obj["metadata"].get("labels", {}).get("app.kubernetes.io/component") != "sessions", obj["metadata"][
            "name"
        ]
    keys = secret_data(objects)
    assert "sessions-api-token" not in keys and "culler-api-token" in keys
    env = container_env(objects, f"{RELEASE}-hub", OAUTH_SECRET)
    assert not [k for k in env if "SESSIONS" in k]
    assert env["WORKBENCH_CULLER_API_TOKEN"] == keys["culler-api-token"]
    policies = _policies(objects)
    assert "sessions" not in set().union(*(_peer_components(r["from"], objects) for r in policies["hub"]["ingress"]))
    assert all("sessions" not in _peer_components(r["to"], objects) for r in policies["proxy"]["egress"])
    settings = k8s_hub_settings(platform_policy(objects), env)
    hub = settings["JupyterHub"]
    assert [s["name"] for s in hub["services"]] == ["idle-culler", "dask-gateway", "quota", "rosters", "jobs"]
    assert [r for r in hub["load_roles"] if r.get("services") == ["idle-culler"]]
    assert not [r for r in hub["load_roles"] if r["name"] == "workbench-sessions"]
    assert SESSIONS_ACCESS_SCOPE not in settings["Spawner"]["server_token_scopes"]
    # the quota service's notifications still go through the proxy
    assert any(
        _peer_components(r["to"], objects) == {"proxy"} and _ports(r) == {8000}
        for r in policies["singleuser"]["egress"]
    )
    # no service at all: notebooks need not reach the proxy, and have no services URL
    bare = helm_template(
        helm,
        "--set",
        "sessions.enabled=false",
        "--set",
        "quota.enabled=false",
        "--set",
        "rosters.enabled=false",
        "--set",
        "jobs.enabled=false",
    )
    assert "WORKBENCH_SERVICES_URL" not in container_env(bare, f"{RELEASE}-hub")
    assert not any("proxy" in _peer_components(r["to"], bare) for r in _policies(bare)["singleuser"]["egress"])


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
    assert _peer_components(guard_in["from"], objects) == {"proxy", "hub", "singleuser"} and _ports(guard_in) == {8000}
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
