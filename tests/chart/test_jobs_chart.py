"""Notebook jobs in the chart (templates/jobs/jobs.yaml, ``jobs.enabled``): the jobs service's Deployment, Service,
claim, its Role (batch/jobs and pods in the release's namespace only), its NetworkPolicies and those of the job
pods, the hub's wiring (the external service ``jobs``, its roles, the scope in notebook tokens), every object
valid against the Kubernetes schema, and a Job the service would create selected by the job pods' policy.

Rendered with the real ``helm template``; no cluster (nothing is applied).
"""

from __future__ import annotations

import asyncio

import kubernetes_validate
import pytest

from workbench.jobs.kube import job_spawner_config, render_job_async
from workbench.kubernetes.hub import k8s_hub_settings
from workbench.names import JOBS_ACCESS_SCOPE, JOBS_SERVICE

from .chartlib import OAUTH_SECRET, _core, _peer_components, _policies, platform_policy
from .conftest import (
    K8S_VERSION,
    NAMESPACE,
    PRODUCTION,
    RELEASE,
    container_env,
    find,
    helm_template,
    one,
    secret_data,
)


@pytest.fixture(scope="module")
def jobs_objects(helm) -> list[dict]:
    return helm_template(helm, "--values", str(PRODUCTION), "--set", "jobs.enabled=true")


def mine(objects, kind):
    return [o for o in find(objects, kind) if o["metadata"]["labels"].get("app.kubernetes.io/component") == "jobs"]


def test_on_by_default(default_objects):
    assert one(default_objects, "Deployment", f"{RELEASE}-jobs")
    assert container_env(default_objects, f"{RELEASE}-hub")["WORKBENCH_JOBS_URL"] == f"http://{RELEASE}-jobs:8016"


def test_disabled_renders_nothing_of_it(helm):
    objects = helm_template(helm, "--values", str(PRODUCTION), "--set", "jobs.enabled=false")
    for obj in objects:
        assert "jobs" not in obj["metadata"]["name"], obj["metadata"]["name"]
        labels = obj["metadata"].get("labels", {})
        assert labels.get("app.kubernetes.io/component") not in ("jobs", "notebook-job"), obj["metadata"]["name"]
    assert "jobs-api-token" not in secret_data(objects)
    env = container_env(objects, f"{RELEASE}-hub", OAUTH_SECRET)
    assert not [k for k in env if "JOBS" in k]
    policies = _policies(objects)
    assert "jobs" not in set().union(*(_peer_components(r["from"], objects) for r in policies["hub"]["ingress"]))
    assert "jobs" not in set().union(*(_peer_components(r["from"], objects) for r in policies["quota"]["ingress"]))
    assert all("jobs" not in _peer_components(r.get("to", []), objects) for r in policies["proxy"]["egress"])
    settings = k8s_hub_settings(platform_policy(objects), env)
    assert JOBS_SERVICE not in [s["name"] for s in settings["JupyterHub"]["services"]]
    assert JOBS_ACCESS_SCOPE not in settings["Spawner"]["server_token_scopes"]


def test_every_object_is_valid_and_the_role_is_namespaced_to_jobs_and_pods(jobs_objects):
    for obj in [o for o in jobs_objects if "jobs" in o["metadata"]["name"]]:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    assert not find(jobs_objects, "ClusterRole") and not find(jobs_objects, "ClusterRoleBinding")
    role = one(jobs_objects, "Role", f"{RELEASE}-jobs")
    assert [(r["apiGroups"], r["resources"], sorted(r["verbs"])) for r in role["rules"]] == [
        (["batch"], ["jobs"], ["create", "delete", "patch"]),
        ([""], ["secrets"], ["create", "delete"]),  # a run's gateway token, created and deleted with the run
        (["batch"], ["jobs/status"], ["get"]),
        ([""], ["pods"], ["list"]),
    ]
    binding = one(jobs_objects, "RoleBinding", f"{RELEASE}-jobs")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": f"{RELEASE}-jobs", "namespace": NAMESPACE}]
    assert binding["roleRef"]["kind"] == "Role"


def test_the_jobs_pod_is_locked_down_and_runs_the_kubernetes_engine(jobs_objects):
    dep = one(jobs_objects, "Deployment", f"{RELEASE}-jobs")
    spec = dep["spec"]["template"]["spec"]
    assert spec["serviceAccountName"] == f"{RELEASE}-jobs" and spec["automountServiceAccountToken"] is True
    assert spec["securityContext"]["runAsNonRoot"] is True
    [c] = spec["containers"]
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["command"][:5] == [
        "python",
        "-m",
        "workbench.jobs",
        "--engine=kubernetes",
        "--config=/etc/workbench/platform.yaml",
    ]
    assert "--state-dir=/srv/jobs" in c["command"] and "--ttl=86400" in c["command"]
    assert {"name": "jobs-db", "mountPath": "/srv/jobs"} in c["volumeMounts"]
    env = container_env(jobs_objects, f"{RELEASE}-jobs")
    assert env["WORKBENCH_NAMESPACE"] == NAMESPACE and env["WORKBENCH_RELEASE"] == RELEASE
    assert env["WORKBENCH_QUOTA_URL"] == f"http://{RELEASE}-quota:8013"
    assert env["JUPYTERHUB_SERVICE_PREFIX"] == "/services/jobs/"
    hub_env = container_env(jobs_objects, f"{RELEASE}-hub", OAUTH_SECRET)
    assert env["JUPYTERHUB_API_TOKEN"] == hub_env["WORKBENCH_JOBS_API_TOKEN"]  # one token, from the Secret
    assert hub_env["WORKBENCH_JOBS_URL"] == f"http://{RELEASE}-jobs:8016"
    [svc] = [s for s in find(jobs_objects, "Service") if s["metadata"]["name"] == f"{RELEASE}-jobs"]
    assert svc["spec"]["ports"][0]["port"] == 8016
    pvc = one(jobs_objects, "PersistentVolumeClaim", f"{RELEASE}-jobs-db")
    assert pvc["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"


def test_the_hub_registers_the_jobs_service_with_its_roles_and_scope(jobs_objects):
    env = container_env(jobs_objects, f"{RELEASE}-hub", OAUTH_SECRET)
    policy = platform_policy(jobs_objects)
    settings = k8s_hub_settings(policy, env)
    [svc] = [s for s in settings["JupyterHub"]["services"] if s["name"] == JOBS_SERVICE]
    assert svc["url"] == f"http://{RELEASE}-jobs:8016" and svc["api_token"] == env["WORKBENCH_JOBS_API_TOKEN"]
    roles = {r["name"]: r for r in settings["JupyterHub"]["load_roles"]}
    assert roles["workbench-jobs-users"]["groups"] == list(policy.groups)
    assert roles["workbench-jobs-service"]["services"] == [JOBS_SERVICE]
    assert JOBS_ACCESS_SCOPE in settings["Spawner"]["server_token_scopes"]


def test_job_pods_get_a_policy_of_their_own_and_the_services_links_are_added(jobs_objects):
    policies = {n["metadata"]["name"]: n["spec"] for n in find(jobs_objects, "NetworkPolicy")}
    pods = policies[f"{RELEASE}-notebook-jobs"]
    assert pods["podSelector"] == {
        "matchLabels": {"app.kubernetes.io/instance": RELEASE, "app.kubernetes.io/component": "notebook-job"}
    }
    assert pods["policyTypes"] == ["Ingress", "Egress"] and pods["ingress"] == []
    gateway = {}
    for rule in pods["egress"]:  # DNS, Dask Gateway and public addresses only: never other pods or the metadata service
        for peer in rule.get("to", []):
            if "podSelector" in peer and not peer.get("namespaceSelector"):
                [comp] = _peer_components([peer], jobs_objects)
                gateway[comp] = {p["port"] for p in rule["ports"]}
            if "ipBlock" in peer and peer["ipBlock"]["cidr"] == "0.0.0.0/0":
                assert "169.254.0.0/16" in peer["ipBlock"]["except"]
    assert gateway == {"gateway-guard": {8000}, "gateway-proxy": {8786}}  # as notebook pods reach the gateway
    service = policies[f"{RELEASE}-jobs"]
    assert [p["port"] for r in service["ingress"] for p in r["ports"]] == [8016]
    # the other ends of its links are in the peers' own policies (one NetworkPolicy per component)
    by_component = _policies(jobs_objects)
    assert [
        r["ports"] for r in by_component["proxy"]["egress"] if _peer_components(r["to"], jobs_objects) == {"jobs"}
    ] == [[{"port": 8016, "protocol": "TCP"}]]
    for peer, port in (("hub", 8081), ("quota", 8013)):
        rules = _core(by_component[peer]["ingress"], "from")  # without the operator's metrics scrapers
        [rule] = [r for r in rules if "jobs" in _peer_components(r["from"], jobs_objects)]
        assert [p["port"] for p in rule["ports"]] == [port], peer
    assert by_component["notebook-job"] == pods

    # a Job the service renders with the jobs pod's environment is selected by the job pods' policy
    env = container_env(jobs_objects, f"{RELEASE}-jobs")
    policy = platform_policy(jobs_objects)
    job = {
        "id": "0123456789ab",
        "user": "ada",
        "submitter": "ada",
        "grp": "vision-lab",
        "profile": "h100-x1",
        "notebook": "fit.ipynb",
        "run_dir": "/home/jovyan/jobs/fit/r1",
        "time_limit": 3600,
    }
    manifest = asyncio.run(render_job_async(policy, job, ["vision-lab"], {}, spawner_config=job_spawner_config(env)))
    kubernetes_validate.validate(manifest, K8S_VERSION, strict=True)
    labels = manifest["spec"]["template"]["metadata"]["labels"]
    assert pods["podSelector"]["matchLabels"].items() <= labels.items()
    singleuser = policies[f"{RELEASE}-singleuser"]["podSelector"]["matchLabels"]
    assert not singleuser.items() <= labels.items()  # not taken for a notebook server (no proxy traffic to it)


def test_jobs_alone_give_notebooks_the_services_url_and_the_way_to_the_proxy(helm):
    """The lab's job form and `workbench job` reach the jobs service at WORKBENCH_SERVICES_URL (the hub's proxy),
    so with every other service off the notebook pods still get that URL and an egress rule to the proxy."""
    objects = helm_template(
        helm, "--set", "sessions.enabled=false", "--set", "quota.enabled=false", "--set", "rosters.enabled=false"
    )
    assert (
        container_env(objects, f"{RELEASE}-hub")["WORKBENCH_SERVICES_URL"]
        == f"http://{RELEASE}-proxy-public:80/services/"
    )
    singleuser = _policies(objects)["singleuser"]["egress"]
    assert any("proxy" in _peer_components(r.get("to", []), objects) for r in singleuser)


def test_the_jobs_pod_gives_runs_the_gateway_notebook_pods_get(jobs_objects):
    """The chart gives the jobs pod the gateway's addresses (WORKBENCH_GATEWAY_URL, _PROXY_ADDRESS, as the hub's):
    a run's Job gets the Dask settings a notebook pod of the same groups gets from the hub
    (workbench.kubernetes.hub), and the service stops the run's clusters at that address (workbench.jobs.runend)."""
    from workbench.jobs.kube import kube_gateway
    from workbench.jobs.runend import GatewayAccess, gateway_access

    policy = platform_policy(jobs_objects)
    jobs_env = container_env(jobs_objects, f"{RELEASE}-jobs")
    hub_env = container_env(jobs_objects, f"{RELEASE}-hub", OAUTH_SECRET)
    address, dask_env = kube_gateway(policy, jobs_env)
    server_env = k8s_hub_settings(policy, hub_env)["WorkbenchKubeSpawner"]["environment"]
    groups = ["vision-lab"]
    job_env = dask_env(groups)
    for key in ("DASK_GATEWAY__ADDRESS", "DASK_GATEWAY__PUBLIC_ADDRESS", "DASK_GATEWAY__PROXY_ADDRESS"):
        assert job_env[key] == server_env[key], key
    assert job_env["DASK_GATEWAY__AUTH__TYPE"] == "jupyterhub" and address == server_env["DASK_GATEWAY__ADDRESS"]
    access = gateway_access(object(), policy, None, "kubernetes", jobs_env)
    assert isinstance(access, GatewayAccess) and access.address == address
    # without the gateway's addresses (an older chart) the runs get no gateway, and nothing fails
    bare = {k: v for k, v in jobs_env.items() if not k.startswith("WORKBENCH_GATEWAY_")}
    assert kube_gateway(policy, bare) is None and gateway_access(object(), policy, None, "kubernetes", bare) is None
