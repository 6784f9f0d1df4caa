"""Issue 17: what breaks when the chart is installed on a real cluster, and what a centre's operators need.

Each install blocker has a test here that failed before its fix (Traefik's cluster-scope lookups, the course
claims, Dask pods' pull secrets, secrets that change without restarting their readers, hub probes, DNS on
common setups); then the operator values (zero-to-jupyterhub's names) as they land in the rendered objects,
the roster service, placeholders and the GPU image pre-puller sized from the policy.
"""

from __future__ import annotations

import asyncio

import kubernetes_validate
import pytest
import yaml

from workbench.kubernetes.gateway import k8s_gateway_settings
from workbench.kubernetes.hub import k8s_hub_settings
from workbench.policy import parse_policy, parse_quantity
from workbench.spawn.kube import render_pod

from .conftest import K8S_VERSION, NAMESPACE, PRODUCTION, RELEASE, container_env, find, helm_template, one, secret_data

OAUTH_SECRET = {
    ("workbench-oauth", "client-secret"): "s3cret",
    ("workbench-hub-db", "url"): "postgresql+psycopg://x",
    ("workbench-quota-db", "url"): "postgresql+psycopg://quota@db/quota",
}
SECRET_NAME = f"{RELEASE}-secrets"


def _policy(objects):
    cm = one(objects, "ConfigMap", f"{RELEASE}-platform")
    return parse_policy(yaml.safe_load(cm["data"]["platform.yaml"]), source="ConfigMap")


def _pod(objects, deployment: str) -> dict:
    kind = "Deployment"
    return one(objects, kind, f"{RELEASE}-{deployment}")["spec"]["template"]


def _netpol(objects, comp: str) -> dict:
    [pol] = [
        n for n in find(objects, "NetworkPolicy") if n["metadata"]["labels"]["app.kubernetes.io/component"] == comp
    ]
    return pol["spec"]


# ---------------------------------------------------------------------------
# Install blockers
# ---------------------------------------------------------------------------


def test_traefik_never_waits_for_cluster_scoped_informers(objects):
    """Traefik has a namespaced Role only: its CRD provider must not look up Nodes (traefik/traefik#10937),
    else it waits forever for a cluster-wide informer and never publishes the gateway's routes."""
    [traefik] = _pod(objects, "gateway-proxy")["spec"]["containers"]
    assert "--providers.kubernetescrd.disableClusterScopeResources=true" in traefik["args"]
    assert f"--providers.kubernetescrd.namespaces={NAMESPACE}" in traefik["args"]
    assert not find(objects, "ClusterRole")
    tag = traefik["image"].rsplit(":v", 1)[1]
    assert tuple(int(x) for x in tag.split(".")) >= (3, 1, 2)  # the flag's first release


def test_course_members_pods_find_their_claims(default_objects):
    """With the default values the demo student's and instructor's pods mount workbench-course-course-demo:
    the chart makes it (storage.createClaims), or they stay Pending until the start timeout."""
    policy = _policy(default_objects)
    claims = {c["metadata"]["name"] for c in find(default_objects, "PersistentVolumeClaim")}
    for user in ("student", "instructor", "researcher"):
        groups = policy.auth.demo_users[user].groups
        pod = render_pod(policy, user, groups, "cpu-small")
        wanted = {
            v["persistentVolumeClaim"]["claimName"] for v in pod["spec"]["volumes"] if "persistentVolumeClaim" in v
        }
        home = {c for c in wanted if c.startswith("claim-")}  # the hub's KubeSpawner makes home claims itself
        assert wanted - home <= claims, (user, wanted - home - claims)
    course = one(default_objects, "PersistentVolumeClaim", "workbench-course-course-demo")
    assert course["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    assert course["spec"]["accessModes"] == ["ReadWriteMany"]


def test_dask_pods_get_the_image_pull_secrets(production_objects, default_objects):
    """The gateway API server (which builds each cluster's KubeClusterConfig) and the controller are told the
    pull secrets, as the hub is for notebook pods."""
    for comp in ("gateway-api", "gateway-controller"):
        assert (
            container_env(production_objects, f"{RELEASE}-{comp}")["WORKBENCH_IMAGE_PULL_SECRETS"]
            == "workbench-registry"
        )
        assert "WORKBENCH_IMAGE_PULL_SECRETS" not in container_env(default_objects, f"{RELEASE}-{comp}")
    hub = container_env(production_objects, f"{RELEASE}-hub", OAUTH_SECRET)
    assert hub["WORKBENCH_IMAGE_PULL_SECRETS"] == "workbench-registry"


def test_dask_pods_get_the_image_pull_secrets_python_side(production_objects):
    env = container_env(production_objects, f"{RELEASE}-gateway-api")
    settings = k8s_gateway_settings(_policy(production_objects), env)
    assert settings["KubeClusterConfig"]["image_pull_secrets"] == [{"name": "workbench-registry"}]


def _readers_of_the_secret(objects) -> set[str]:
    out = set()
    for dep in find(objects, "Deployment"):
        for c in dep["spec"]["template"]["spec"]["containers"]:
            for var in c.get("env", []):
                if var.get("valueFrom", {}).get("secretKeyRef", {}).get("name") == SECRET_NAME:
                    out.add(dep["metadata"]["name"])
    return out


def test_a_changed_secret_rolls_every_reader_together(helm, default_objects):
    """z2jh's checksum/secret: the hub and its proxy restart together when the proxy token changes (else they
    disagree on it); every pod reading the Secret carries the checksum of the Secret as rendered."""
    readers = _readers_of_the_secret(default_objects)
    assert {
        f"{RELEASE}-hub",
        f"{RELEASE}-proxy",
        f"{RELEASE}-gateway-api",
        f"{RELEASE}-gateway-guard",
        f"{RELEASE}-jobs",  # its hub API token (jobs-api-token)
    } <= readers

    def checksums(objects):
        return {
            d["metadata"]["name"]: d["spec"]["template"]["metadata"].get("annotations", {}).get("checksum/secret")
            for d in find(objects, "Deployment")
        }

    first = checksums(default_objects)
    assert len({first[r] for r in readers}) == 1 and None not in {first[r] for r in readers}
    assert first[f"{RELEASE}-gateway-controller"] is None  # reads no secret: no restart
    assert len(first[f"{RELEASE}-hub"]) == 64  # sha256 of the Secret's data, computed once per render

    given = {k: v for k, v in secret_data(default_objects).items()}
    names = {
        "cookie-secret": "cookieSecret",
        "proxy-token": "proxyToken",
        "crypt-key": "cryptKey",
        "gateway-api-token": "gatewayApiToken",
        "sessions-api-token": "sessionsApiToken",
        "quota-api-token": "quotaApiToken",
        "rosters-api-token": "rostersApiToken",
        "jobs-api-token": "jobsApiToken",
        "guard-cookie-secret": "guardCookieSecret",
        "demo-password": "demoPassword",
    }
    args = [a for k, v in given.items() for a in ("--set", f"secrets.{names[k]}={v}")]
    same = checksums(helm_template(helm, *args))
    assert same == checksums(helm_template(helm, *args))  # stable while the Secret is
    changed_args = [a if not a.startswith("secrets.proxyToken=") else "secrets.proxyToken=" + "0" * 64 for a in args]
    changed = checksums(helm_template(helm, *changed_args))
    for reader in readers:
        assert changed[reader] != same[reader], reader


def test_the_secret_outlives_uninstall(objects):
    """Kept like the hub and quota databases: a reinstall must not pair them with a new cookie secret and crypt key."""
    secret = one(objects, "Secret", SECRET_NAME)
    assert secret["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"


def test_hub_probes_survive_a_spawn_burst(objects):
    """z2jh's hub probes: a busy single hub stays in its Service (readiness: 1000 failures) and is restarted only
    after ~5 minutes without an answer (liveness: 30 failures), with 3 s timeouts (1 s drops it under load)."""
    [hub] = _pod(objects, "hub")["spec"]["containers"]
    ready, live = hub["readinessProbe"], hub["livenessProbe"]
    assert ready["httpGet"] == live["httpGet"] == {"path": "/hub/health", "port": "hub"}
    assert ready["failureThreshold"] >= 1000 and ready["timeoutSeconds"] >= 3
    assert live["failureThreshold"] >= 30 and live["timeoutSeconds"] >= 3
    assert live["initialDelaySeconds"] + live["periodSeconds"] * live["failureThreshold"] >= 300
    [proxy] = _pod(objects, "proxy")["spec"]["containers"]
    assert proxy["readinessProbe"]["timeoutSeconds"] >= 3 and proxy["livenessProbe"]["failureThreshold"] >= 30


def _dns_rules(spec) -> list[dict]:
    return [r for r in spec.get("egress", []) if {p["port"] for p in r.get("ports", [])} == {53}]


@pytest.mark.parametrize(
    "comp", ["singleuser", "dask-scheduler", "dask-worker", "gateway-guard", "sessions", "rosters", "proxy"]
)
def test_dns_works_on_common_setups(default_objects, comp):
    """kube-dns in kube-system, NodeLocal DNSCache (169.254.20.10), GKE's Cloud DNS at the metadata server and
    OpenShift's DNS (private addresses / the openshift-dns namespace) all answer restricted pods, on port 53 only."""
    [rule] = _dns_rules(_netpol(default_objects, comp))
    assert {(p["port"], p["protocol"]) for p in rule["ports"]} == {(53, "UDP"), (53, "TCP")}
    peers = rule["to"]
    assert {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}}} in peers
    cidrs = {p["ipBlock"]["cidr"] for p in peers if "ipBlock" in p}
    assert {"10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "169.254.169.254/32", "169.254.20.10/32"} <= cidrs


def test_dns_peers_can_be_added_and_rules_turned_off(helm):
    objects = helm_template(
        helm,
        "--set",
        "networkPolicy.egressAllowRules.dnsPortsPrivateIPs=false",
        "--set",
        "networkPolicy.egressAllowRules.dnsPortsCloudMetadataServer=false",
        "--set-json",
        'networkPolicy.dnsPeers={"openshift":{"namespaceSelector":{"matchLabels":{"kubernetes.io/metadata.name":"openshift-dns"}}}}',
    )
    [rule] = _dns_rules(_netpol(objects, "singleuser"))
    assert rule["to"] == [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}}},
        {"ipBlock": {"cidr": "169.254.20.10/32"}},
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "openshift-dns"}}},
    ]


# ---------------------------------------------------------------------------
# Operator values
# ---------------------------------------------------------------------------

COMPONENTS = {  # component -> its values path
    "hub": "hub",
    "proxy": "proxy",
    "gateway-api": "gateway.api",
    "gateway-controller": "gateway.controller",
    "gateway-proxy": "gateway.proxy",
    "gateway-guard": "gateway.guard",
    "quota": "quota",
    "sessions": "sessions",
    "rosters": "rosters",
}


@pytest.mark.parametrize("comp", list(COMPONENTS))
def test_every_component_takes_the_operator_values(helm, comp):
    path = COMPONENTS[comp]
    objects = helm_template(
        helm,
        "--set",
        f"{path}.extraEnv.HTTPS_PROXY=http://proxy.example.edu:3128",
        "--set",
        f"{path}.extraEnv.LOG_FORMAT.valueFrom.configMapKeyRef.name=logging",
        "--set",
        f"{path}.extraEnv.LOG_FORMAT.valueFrom.configMapKeyRef.key=format",
        "--set",
        f"{path}.extraVolumes.ca.configMap.name=centre-ca",
        "--set",
        f"{path}.extraVolumeMounts.ca.mountPath=/etc/ssl/centre",
        "--set",
        f"{path}.extraVolumeMounts.ca.readOnly=true",
        "--set",
        f"{path}.nodeSelector.pool=services",
        "--set-json",
        f'{path}.tolerations=[{{"key":"services","operator":"Exists","effect":"NoSchedule"}}]',
        "--set-json",
        f'{path}.affinity={{"podAntiAffinity":{{"preferredDuringSchedulingIgnoredDuringExecution":[{{"weight":1,"podAffinityTerm":{{"topologyKey":"kubernetes.io/hostname","labelSelector":{{"matchLabels":{{"app":"x"}}}}}}}}]}}}}',
        "--set-json",
        f'{path}.topologySpreadConstraints=[{{"maxSkew":1,"topologyKey":"topology.kubernetes.io/zone","whenUnsatisfiable":"ScheduleAnyway","labelSelector":{{"matchLabels":{{"app.kubernetes.io/component":"{comp}"}}}}}}]',
        "--set",
        f"{path}.priorityClassName=workbench-services",
        "--set",
        f"{path}.podAnnotations.example\\.edu/team=platform",
        "--set",
        f"{path}.resources.requests.cpu=300m",
        "--set",
        f"{path}.pdb.enabled=true",
    )
    template = _pod(objects, comp)
    spec = template["spec"]
    [container] = spec["containers"]
    env = {e["name"]: e for e in container["env"]}
    assert env["HTTPS_PROXY"]["value"] == "http://proxy.example.edu:3128"
    assert env["LOG_FORMAT"]["valueFrom"] == {"configMapKeyRef": {"name": "logging", "key": "format"}}
    assert {"name": "ca", "configMap": {"name": "centre-ca"}} in spec["volumes"]
    assert {"name": "ca", "mountPath": "/etc/ssl/centre", "readOnly": True} in container["volumeMounts"]
    assert spec["nodeSelector"] == {"pool": "services"}
    assert spec["tolerations"] == [{"key": "services", "operator": "Exists", "effect": "NoSchedule"}]
    assert "podAntiAffinity" in spec["affinity"]
    assert spec["topologySpreadConstraints"][0]["topologyKey"] == "topology.kubernetes.io/zone"
    assert spec["priorityClassName"] == "workbench-services"
    assert template["metadata"]["annotations"]["example.edu/team"] == "platform"
    assert container["resources"]["requests"]["cpu"] == "300m"
    pdb = one(objects, "PodDisruptionBudget", f"{RELEASE}-{comp}")
    assert pdb["spec"]["minAvailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"].items() <= template["metadata"]["labels"].items()
    for obj in objects:
        if obj["kind"] not in ("IngressRoute", "Middleware"):
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def test_gateway_defaults_apply_to_its_parts_unless_they_set_their_own(helm):
    objects = helm_template(
        helm, "--set", "gateway.nodeSelector.pool=services", "--set", "gateway.proxy.nodeSelector.pool=edge"
    )
    assert _pod(objects, "gateway-api")["spec"]["nodeSelector"] == {"pool": "services"}
    assert _pod(objects, "gateway-guard")["spec"]["nodeSelector"] == {"pool": "services"}
    assert _pod(objects, "gateway-proxy")["spec"]["nodeSelector"] == {"pool": "edge"}


def test_production_disruption_budgets(production_objects):
    budgets = {p["metadata"]["name"]: p for p in find(production_objects, "PodDisruptionBudget")}
    assert set(budgets) == {f"{RELEASE}-hub", f"{RELEASE}-proxy", f"{RELEASE}-gateway-api"}


def test_no_disruption_budget_by_default(default_objects):
    assert not find(default_objects, "PodDisruptionBudget")


def test_on_premises_egress_and_metrics_scrapers(production_objects):
    """examples/production-values.yaml: notebooks reach the centre's object store, git server, mirror and licence
    server (those CIDRs and ports only); Dask pods the object store; Prometheus scrapes hub, quota and gateway API."""
    values = yaml.safe_load(PRODUCTION.read_text())["networkPolicy"]
    for comp, who in (("singleuser", "singleuser"), ("dask-worker", "dask"), ("dask-scheduler", "dask")):
        rules = _netpol(production_objects, comp)["egress"]
        for name, wanted in values[who]["egress"].items():
            rule = {
                "to": [{"ipBlock": {"cidr": c}} for c in wanted["cidrs"]],
                "ports": [{"port": p, "protocol": "TCP"} for p in wanted["ports"]],
            }
            assert rule in rules, (comp, name)
    scraper = values["metricsScrapers"]["prometheus"]
    for comp, port in (("hub", 8081), ("quota", 8013), ("gateway-api", 8000)):
        assert {"from": [scraper], "ports": [{"port": port, "protocol": "TCP"}]} in _netpol(production_objects, comp)[
            "ingress"
        ]
    assert scraper not in [p for r in _netpol(production_objects, "singleuser")["ingress"] for p in r["from"]]


def test_gpu_pod_settings_reach_the_hub_and_gateway(production_objects, default_objects):
    for comp in ("hub", "gateway-api", "gateway-controller"):
        env = container_env(production_objects, f"{RELEASE}-{comp}", OAUTH_SECRET)
        assert env["WORKBENCH_GPU_RUNTIME_CLASS"] == "nvidia" and env["WORKBENCH_GPU_DEV_SHM"] == "true"
        assert "WORKBENCH_GPU_RUNTIME_CLASS" not in container_env(default_objects, f"{RELEASE}-{comp}")


def _hub_pod(objects, user: str, groups: list[str], profile: str) -> dict:
    from kubernetes_asyncio.client import ApiClient
    from traitlets.config import Config

    from workbench.spawn.kube import WorkbenchKubeSpawner, _offline_kube_config, _RenderHub, _RenderUser

    policy = _policy(objects)
    settings = k8s_hub_settings(policy, container_env(objects, f"{RELEASE}-hub", OAUTH_SECRET))

    async def render():
        config = Config({"WorkbenchKubeSpawner": settings["WorkbenchKubeSpawner"], "Spawner": settings["Spawner"]})
        with _offline_kube_config():
            spawner = WorkbenchKubeSpawner(
                policy=policy, user=_RenderUser(user, groups), hub=_RenderHub(), config=config
            )
            spawner.user_options = {"profile": profile}
            await spawner.load_user_options()
            pod = await spawner.get_pod_manifest()
            async with ApiClient() as client:
                return client.sanitize_for_serialization(pod)

    return asyncio.run(render())


def test_gpu_notebook_pods_get_the_runtime_class_and_a_large_dev_shm(production_objects):
    pod = _hub_pod(production_objects, "ada", ["vision-lab"], "h100-x1")
    assert pod["spec"]["runtimeClassName"] == "nvidia"
    [c] = pod["spec"]["containers"]
    [shm] = [m for m in c["volumeMounts"] if m["mountPath"] == "/dev/shm"]
    [vol] = [v for v in pod["spec"]["volumes"] if v["name"] == shm["name"]]
    assert vol["emptyDir"]["medium"] == "Memory" and vol["emptyDir"]["sizeLimit"] == c["resources"]["limits"]["memory"]


def _amount(key: str, value) -> float:
    """A resource amount as a number (cores, bytes, devices), whatever way the quantity is written."""
    text = str(value)
    if key == "cpu":
        return float(text[:-1]) / 1000 if text.endswith("m") else float(text)
    if key == "memory":
        return float(parse_quantity(text))
    return float(text)


def test_user_placeholders_are_sized_from_the_policy(production_objects):
    """Each placeholder requests what its profile's notebook pod requests, on the same nodes, below users' priority."""
    placeholders = {
        s["metadata"]["labels"]["workbench.example.edu/profile"]: s for s in find(production_objects, "StatefulSet")
    }
    assert {p: s["spec"]["replicas"] for p, s in placeholders.items()} == {"h100-x1": 2, "mig-1g": 4}
    [priority] = find(production_objects, "PriorityClass")
    assert priority["value"] < 0 and priority["preemptionPolicy"] == "Never" and priority["globalDefault"] is False
    policy = _policy(production_objects)
    for profile, sts in placeholders.items():
        spec = sts["spec"]["template"]["spec"]
        assert spec["priorityClassName"] == priority["metadata"]["name"]
        assert spec["automountServiceAccountToken"] is False
        group = next(g for g, grp in policy.groups.items() if profile in grp.profiles)
        notebook = render_pod(policy, "ada", [group], profile)["spec"]
        [want] = notebook["containers"]
        [have] = spec["containers"]
        for key, value in want["resources"]["requests"].items():
            assert _amount(key, have["resources"]["requests"][key]) == _amount(key, value), (profile, key)
        assert spec.get("nodeSelector") == notebook.get("nodeSelector")
        assert sorted(map(str, spec.get("tolerations", []))) == sorted(
            str(t) for t in notebook.get("tolerations", []) if not t["key"].startswith("node.kubernetes.io/")
        )


def test_gpu_images_are_pre_pulled_on_their_nodes(production_objects):
    policy = _policy(production_objects)
    pullers = {
        d["metadata"]["labels"]["workbench.example.edu/gpu-type"]: d for d in find(production_objects, "DaemonSet")
    }
    expected = {}
    for prof in policy.profiles.values():
        if prof.gpu:
            expected.setdefault(prof.gpu.type, set()).add(policy.images[prof.image].image)
    assert set(pullers) == set(expected)
    for gtype, ds in pullers.items():
        spec = ds["spec"]["template"]["spec"]
        assert {c["image"] for c in spec["initContainers"]} == expected[gtype]
        assert spec.get("nodeSelector") == (dict(policy.gpu_types[gtype].node_selector) or None)
        assert spec["automountServiceAccountToken"] is False


def test_dask_clients_outside_reach_the_scheduler_port_only(production_objects, default_objects):
    svc = one(production_objects, "Service", f"{RELEASE}-gateway-proxy-public")
    assert svc["spec"]["type"] == "LoadBalancer" and svc["spec"]["loadBalancerSourceRanges"] == ["10.0.0.0/8"]
    assert [(p["port"], p["targetPort"]) for p in svc["spec"]["ports"]] == [(8786, "tcp")]  # never the HTTP port
    rules = _netpol(production_objects, "gateway-proxy")["ingress"]
    assert {"ports": [{"port": 8786, "protocol": "TCP"}], "from": [{"ipBlock": {"cidr": "10.0.0.0/8"}}]} in rules
    assert not find(default_objects, "Service", f"{RELEASE}-gateway-proxy-public")


# ---------------------------------------------------------------------------
# The roster service
# ---------------------------------------------------------------------------


def test_the_roster_service_runs_when_the_policy_has_a_course(objects):
    template = _pod(objects, "rosters")
    spec = template["spec"]
    [c] = spec["containers"]
    assert c["command"] == [
        "python",
        "-m",
        "workbench.services.rosters",
        "--config=/etc/workbench/platform.yaml",
        "--ip=0.0.0.0",
        "--port=8015",
    ]
    env = container_env(objects, f"{RELEASE}-rosters", OAUTH_SECRET)
    hub = container_env(objects, f"{RELEASE}-hub", OAUTH_SECRET)
    assert (
        env["JUPYTERHUB_API_TOKEN"] == hub["WORKBENCH_ROSTERS_API_TOKEN"] == secret_data(objects)["rosters-api-token"]
    )
    assert env["JUPYTERHUB_SERVICE_URL"] == hub["WORKBENCH_ROSTERS_URL"] == f"http://{RELEASE}-rosters:8015"
    assert env["JUPYTERHUB_SERVICE_PREFIX"] == "/services/rosters/"
    assert env["JUPYTERHUB_API_URL"] == f"http://{RELEASE}-hub:8081/hub/api"
    for probe in ("readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"] == {"path": "/services/rosters/api/health", "port": "http"}
    assert spec["automountServiceAccountToken"] is False
    assert one(objects, "ServiceAccount", f"{RELEASE}-rosters")["automountServiceAccountToken"] is False
    assert spec["securityContext"]["runAsNonRoot"] is True and c["securityContext"]["readOnlyRootFilesystem"] is True
    [port] = one(objects, "Service", f"{RELEASE}-rosters")["spec"]["ports"]
    assert port["port"] == 8015
    pol = _netpol(objects, "rosters")
    [ingress] = pol["ingress"]
    assert [p["podSelector"]["matchLabels"]["app.kubernetes.io/component"] for p in ingress["from"]] == ["hub", "proxy"]
    assert ingress["ports"] == [{"port": 8015, "protocol": "TCP"}]
    non_dns = [r for r in pol["egress"] if r not in _dns_rules(pol)]
    assert non_dns == [
        {
            "to": [
                {
                    "podSelector": {
                        "matchLabels": {
                            "app.kubernetes.io/name": "workbench",
                            "app.kubernetes.io/instance": RELEASE,
                            "app.kubernetes.io/component": "hub",
                        }
                    }
                }
            ],
            "ports": [{"port": 8081, "protocol": "TCP"}],
        }
    ]
    proxy_out = _netpol(objects, "proxy")["egress"]
    assert any(r["ports"] == [{"port": 8015, "protocol": "TCP"}] for r in proxy_out)


def test_no_roster_service_without_a_course_or_when_disabled(helm):
    for args in (
        ["--set", "rosters.enabled=false"],
        [
            "--set-json",
            'platform={"auth":{"type":"demo","demo_users":{"ada":{"groups":["lab"]}}},'
            '"images":{"base":{"image":"r/base:1"}},"profiles":{"p":{}},'
            '"groups":{"lab":{"kind":"research","profiles":["p"]}}}',
        ],
    ):
        objects = helm_template(helm, *args)
        assert not [o for o in objects if "rosters" in o["metadata"]["name"]]
        assert "rosters-api-token" not in secret_data(objects)
        assert "WORKBENCH_ROSTERS_URL" not in container_env(objects, f"{RELEASE}-hub")
