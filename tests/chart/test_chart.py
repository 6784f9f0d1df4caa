"""The Helm chart (charts/workbench), rendered with a real Helm and checked object by object.

Every rendered object is validated against the Kubernetes schema (kubernetes-validate, strict); the
Traefik objects, whose CRDs keep every field, are checked structurally. Then the security properties:
non-root pods without privilege escalation, service account tokens only where the Kubernetes API is
used, namespaced least-privilege Roles, NetworkPolicies, secrets kept across upgrades, and the
notebook and Dask pods the hub and gateway will create matching those policies.
"""

from __future__ import annotations

import re

import kubernetes_validate
import pytest
import yaml

from workbench.gateway.kube import render_cluster_pods
from workbench.kubernetes.gateway import k8s_gateway_settings
from workbench.kubernetes.hub import GATEWAY_PREFIX, k8s_hub_settings, singleuser_labels
from workbench.policy import load_policy

from .chartlib import (
    API_USERS,
    COMPONENTS,
    OAUTH_SECRET,
    TRAEFIK_KINDS,
    component,
    platform_policy,
    pod_specs,
)
from .conftest import (
    CENTRE,
    CHART,
    K8S_VERSION,
    NAMESPACE,
    PRODUCTION,
    RELEASE,
    container_env,
    find,
    helm_template,
    one,
)

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
    assert comps == set(COMPONENTS)


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
